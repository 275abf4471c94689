"""Memory and quality of quantized weights on a random checkpoint (figures for docs/quantization.md).

    python scripts/quant_report.py --preset mid --threads 1 [--out report.json]

1. Memory: for each method, a fresh subprocess loads the checkpoint and reports the growth of its resident set
   (RSS after ``load_model`` minus RSS just before it; the Python + torch runtime itself is ~300 MB and is not the
   model) and the peak RSS growth during loading (``ru_maxrss``).
2. Quality vs full precision on the same inputs: the relative error of the denoise logits (prompt encoded, a random
   canvas, a self-conditioning signal from a first step), top-1 agreement of those logits, and the token agreement
   of a 1-canvas seeded generation.
3. Sensitivity: int4 applied to one part at a time (attention, dense MLP, experts, self-conditioning) and the int8
   embedding alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def memory_child(path: str, method: str) -> None:
    import gc

    import safetensors.torch  # noqa: F401  everything the load imports, imported first: not the model's memory

    import blockdiff.quant.gguf  # noqa: F401
    from blockdiff.loader import load_model

    # Warm the runtime (lazy imports, kernel libraries, allocator pools) with a tiny model of the same method.
    from blockdiff.bench.checkpoints import write_random_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        warm = load_model(write_random_checkpoint(tmp, "tiny"), quantization=None if method == "fp32" else method)
        del warm
    gc.collect()
    before = rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = load_model(path, quantization=None if method == "fp32" else method)
    gc.collect()
    after = rss_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
                      "model_rss_mb": round(after - before, 1),
                      "peak_growth_mb": round(peak - max(peak_before, before), 1),
                      "layers": model.text.num_hidden_layers}))


def logits_and_tokens(model, seed: int = 0):
    from blockdiff.engine.llm import LLM
    from blockdiff.sampling.params import SamplingParams

    g = torch.Generator().manual_seed(seed)
    V, C = model.vocab_size, model.canvas_length
    cache = model.new_cache(1)
    with torch.no_grad():
        model.encode(torch.randint(0, V, (1, 64), generator=g), cache)
        canvas = torch.randint(0, V, (1, C), generator=g)
        first = model.denoise(canvas, cache)
        logits = model.denoise(canvas, cache, self_conditioning_logits=first)
    llm = LLM.from_model(model)
    out = llm.generate(prompt_token_ids=[torch.randint(0, V, (64,), generator=g).tolist()],
                       sampling_params=SamplingParams(max_new_tokens=C, seed=seed, max_denoising_steps=16,
                                                      ignore_eos=True))[0]
    return logits, out.token_ids


def quality(path: str, only: str | None, methods: list[str]) -> list[dict]:
    from blockdiff.loader import load_model
    from blockdiff.quant import plan as plan_mod

    ref_logits, ref_tokens = logits_and_tokens(load_model(path))
    rows = []

    def compare(label, model):
        lg, toks = logits_and_tokens(model)
        rows.append({"setting": label,
                     "logit_rel_err": round(float((lg - ref_logits).norm() / ref_logits.norm()), 4),
                     "top1_agreement": round(float((lg.argmax(-1) == ref_logits.argmax(-1)).float().mean()), 4),
                     "token_agreement": round(sum(a == b for a, b in zip(toks, ref_tokens)) / len(ref_tokens), 4)})
        print(rows[-1], file=sys.stderr, flush=True)

    for m in methods:
        compare(m, load_model(path, quantization=m))
        compare(f"{m}, embedding fp32", load_model(path, quantization=m, quantize_embedding=False))
    # Sensitivity: int4 on one part only (the target table filtered), embedding kept unless it is the part.
    parts = {"attention": ".self_attn.", "dense MLP": ".mlp.", "experts": ".experts.",
             "self-conditioning": "self_conditioning.", "embedding (int8)": "embed_tokens."}
    original = plan_mod.target_shapes
    for label, key in parts.items():
        def only_part(cfg, embedding, key=key):
            return {k: v for k, v in original(cfg, True).items() if key in k}
        plan_mod.target_shapes = only_part
        try:
            # int4-all: with plain "int4" the non-expert parts would be int8 (the default int4 scope)
            compare(f"int4 on {label} only", load_model(path, quantization="int4-all"))
        finally:
            plan_mod.target_shapes = original
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="int8,int4,int4-g32")
    ap.add_argument("--out")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--qk-norm", type=float, default=None,
                    help="set every q_norm/k_norm weight to this value first (e.g. 0.3: unsaturated attention, as "
                         "in tests/fixtures.py; with 1.0 the random model's attention softmax is saturated and any "
                         "perturbation flips which key a query attends to)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        memory_child(*args.child)
        return 0
    from blockdiff.bench.checkpoints import write_random_checkpoint

    methods = [m for m in args.methods.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(tmp, args.preset)
        if args.qk_norm is not None:
            from safetensors.torch import load_file, save_file
            f = os.path.join(path, "model.safetensors")
            sd = load_file(f)
            for k in sd:
                if k.endswith(("q_norm.weight", "k_norm.weight")):
                    sd[k] = torch.full_like(sd[k], args.qk_norm)
            save_file(sd, f, metadata={"format": "pt"})
        mem = []
        for m in ["fp32"] + methods:
            out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", path, m],
                                 capture_output=True, text=True, check=True)
            mem.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(mem[-1], file=sys.stderr, flush=True)
        base = mem[0]["model_rss_mb"]
        for r in mem:
            r["x_fp32"] = round(r["model_rss_mb"] / base, 3) if base > 0 else None
        qual = [] if args.memory_only else quality(path, None, methods)
    report = {"preset": args.preset, "qk_norm": args.qk_norm, "torch": torch.__version__, "threads": args.threads, "memory": mem,
              "quality": qual}
    print("| method | model RSS MB | x fp32 | peak RSS growth while loading MB |\n|---|---:|---:|---:|")
    for r in mem:
        print(f"| {r['method']} | {r['model_rss_mb']} | {r['x_fp32']} | {r['peak_growth_mb']} |")
    print("\n| setting | logit rel. error | top-1 agreement | token agreement (generation) |\n|---|---:|---:|---:|")
    for r in qual:
        print(f"| {r['setting']} | {r['logit_rel_err']} | {r['top1_agreement']} | {r['token_agreement']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
