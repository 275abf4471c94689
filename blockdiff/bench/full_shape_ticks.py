"""``blockdiff bench --random-config full``: the released 26B-A4B text shape with random weights, per batch size.

The model is built on the meta device and materialised tensor by tensor on the target device in the target
dtype (bf16 on GPU): no download, no checkpoint on disk, never an fp32 copy of the full model. Each batch size
gets ``B`` requests with a ``prompt_len``-token prefix; after ``warmup`` ticks, ``repeats`` denoising ticks of
the engine are timed one by one (each tick: ``model.denoise`` over the batch, the batched sampler, the
self-conditioning product and the one readback), and the report gives per batch size:

- ``step_ms`` min / median over the timed ticks;
- ``floor_ms``: the memory-bandwidth floor of a tick, bytes read / the device's peak bandwidth (``BYTES_READ``);
- ``floor_ratio``: step_ms (min) / floor_ms;
- ``tok_per_s`` at 16 and 48 steps per canvas: ``B * canvas_length / (steps * step time)``, the
  canvas_length / steps rule (every canvas position counted, a fixed step count, no early stop);
- ``peak_mem_mb``: ``torch.cuda.max_memory_allocated`` over the whole batch size's run (weights included;
  CPU: not measured, null).

BYTES_READ, per tick: every weight once (experts weighted by the expected fraction routed to at least once,
1 - (1 - k/E)^tokens, i.e. all of them for a 256-token canvas with top-8 of 128), the embedding table a second
time (LM head and the self-conditioning product each read it), the cached keys/values each layer attends to,
and the fp32 logits buffer written once and read once.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from contextlib import contextmanager

import torch

# name fragment (lower case) of torch.cuda.get_device_name -> peak memory bandwidth, bytes/s (vendor figures)
PEAK_BANDWIDTH = [
    ("h200", 4.8e12),
    ("h100 pcie", 2.0e12),
    ("h100 nvl", 3.9e12),
    ("h100", 3.35e12),  # SXM (HBM3)
    ("a100-sxm4-80gb", 2.039e12),
    ("a100 80gb pcie", 1.935e12),
    ("a100", 1.555e12),  # 40 GB
    ("rtx 5090", 1.792e12),
    ("rtx 4090", 1.008e12),
    ("l4", 0.3e12),
]

FULL_TEXT = dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                 num_global_key_value_heads=2, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
                 sliding_window=1024)
FULL_CANVAS = 256
# The same structure (5 sliding + 1 full, no v_proj on full layers, proportional RoPE) at toy size: the CPU
# smoke run of scripts/gpu_bench.sh.
SMOKE_TEXT = dict(vocab_size=2048, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                  num_global_key_value_heads=1, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
                  sliding_window=64)
SMOKE_CANVAS = 32
SHAPES = {"full": (FULL_TEXT, FULL_CANVAS), "full-smoke": (SMOKE_TEXT, SMOKE_CANVAS)}


def peak_bandwidth(device: torch.device, override: float | None = None) -> tuple[float | None, str]:
    """(bytes/s, where the figure came from) for ``device``; None when unknown (CPU, unlisted GPU)."""
    if override:
        return override, "--peak-bandwidth"
    if device.type != "cuda":
        return None, "unknown (not a CUDA device; pass --peak-bandwidth GB/s)"
    name = torch.cuda.get_device_name(device)
    low = name.lower()
    for key, bw in PEAK_BANDWIDTH:
        if key in low:
            return bw, f"table: {name}"
    return None, f"unknown device {name!r} (pass --peak-bandwidth GB/s)"


def shape_config(shape: str, layers: int | None = None):
    from ..config import ModelConfig
    from .checkpoints import released_layout

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    text, canvas = SHAPES[shape]
    text = dict(text)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        text["num_hidden_layers"] = layers
    return ModelConfig.from_dict(released_layout(text, canvas, max_positions=262144))


@contextmanager
def _skip_init():
    """The modules' own initialisers are no-ops while building on meta (every tensor is initialised after
    materialising; meta-device RNG ops would otherwise import the compiler stack, seconds on a small CPU)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "xavier_uniform_",
             "xavier_normal_", "constant_", "ones_", "zeros_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


@torch.no_grad()
def build_random_model(config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """DiffusionGemma with random weights, built on the meta device and materialised per tensor on ``device``
    in ``dtype`` (normal(0, 0.02) matrices, norms and scalars at one, RoPE tables recomputed in fp32)."""
    from ..model import DiffusionGemma
    from ..model.layers import rope_inv_freq

    with torch.device("meta"), _skip_init():
        model = DiffusionGemma(config)
    model = model.to(dtype=dtype)  # on meta: free
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for _, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.02, generator=g)
        else:
            p.fill_(1.0)
    t = config.text
    for name, buf in model.named_buffers():
        if name.startswith("inv_freq_"):
            lt = name[len("inv_freq_"):]
            spec = next(s for s in t.layers if s.layer_type == lt)
            # the model's buffers are registered in fp32; keep them so (model.to(dtype) cast them)
            setattr(model, name, rope_inv_freq(t.rope_parameters[lt], spec.head_dim).to(device))
        else:  # layer scalars
            buf.fill_(1.0)
    return model.eval()


def bytes_read(model, batch: int, prompt_len: int) -> dict:
    """Bytes a denoising tick must read at least (see the module docstring)."""
    t = model.text
    C, V = model.canvas_length, model.vocab_size
    tokens = batch * C
    expert_frac = 1 - (1 - t.top_k_experts / t.num_experts) ** tokens
    weights = experts = 0
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        if ".experts." in name:
            experts += n
        else:
            weights += n
    embed = model.embed_tokens.weight
    embed_again = embed.numel() * embed.element_size()
    kv = 0
    for spec in t.layers:
        seen = min(prompt_len, spec.sliding_window - 1) if spec.layer_type == "sliding_attention" else prompt_len
        kv += 2 * batch * spec.num_kv_heads * spec.head_dim * seen * embed.element_size()
    logits = 2 * tokens * V * 4
    total = weights + experts * expert_frac + embed_again + kv + logits
    return {"total": int(total), "weights_non_expert": weights, "experts_read": int(experts * expert_frac),
            "expert_fraction": round(expert_frac, 6), "embedding_second_read": embed_again, "kv_prefix": kv,
            "logits_write_read": logits}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_full_benchmark(shape: str = "full", device: str = "cuda", dtype: str = "auto", batches=(1, 4, 16),
                       layers: int | None = None, prompt_len: int = 256, warmup: int = 2, repeats: int = 5,
                       peak_bandwidth_gbs: float | None = None, seed: int = 0, log=print, fast: bool = False) -> dict:
    from .. import __version__
    from ..engine.llm import LLM
    from ..placement import resolve_dtype
    from ..sampling.params import SamplingParams
    from .harness import make_prompt

    dev = torch.device(device)
    dt = resolve_dtype(dtype, dev)
    if any(b < 1 for b in batches):
        raise ValueError(f"batch sizes must be positive, got {batches}")
    if warmup < 0 or repeats < 1 or prompt_len < 1:
        raise ValueError("need warmup >= 0, repeats >= 1 and prompt-len >= 1")
    config = shape_config(shape, layers)
    log(f"building the random '{shape}' model on {dev} in {dt} ...")
    t0 = time.perf_counter()
    model = build_random_model(config, dev, dt, seed)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    log(f"built {n_params / 1e9:.2f}B parameters in {build_s:.1f} s")
    llm = LLM.from_model(model)
    engine = llm.engine
    bw, bw_source = peak_bandwidth(dev, peak_bandwidth_gbs * 1e9 if peak_bandwidth_gbs else None)
    C = model.canvas_length
    ticks = warmup + repeats
    params = SamplingParams(max_new_tokens=C, max_denoising_steps=ticks + 2, stability_threshold=ticks + 3,
                            ignore_eos=True)
    prompt = make_prompt(model.vocab_size, prompt_len, seed)
    results = []
    # With ``fast``: every batch size also in fast mode (approximate; on random weights nothing settles, so this
    # times fast mode's overhead over the exact tick, the worst case).
    for B, mode in [(b, m) for b in batches for m in ((False, True) if fast else (False,))]:
        params = dataclasses.replace(params, fast=mode)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        states = [engine.add_request(list(prompt), dataclasses.replace(params, seed=seed + i)) for i in range(B)]
        times = []
        try:
            for k in range(ticks + 1):  # the first tick also encodes the prompts: never timed
                _sync(dev)
                t0 = time.perf_counter()
                engine.step()
                _sync(dev)
                if k > warmup:
                    times.append(time.perf_counter() - t0)
            if any(s.finished for s in states):
                raise RuntimeError("a request finished while being timed")
        finally:
            for s in states:
                engine.abort(s.request_id)
        # the tick after the prefill tick: `warmup` untimed, then `repeats` timed (the prefill tick is k=0)
        times = times[-repeats:]
        step = min(times)
        br = bytes_read(model, B, prompt_len)
        floor = br["total"] / bw if bw else None
        row = {"batch": B, "fast": mode, "step_ms_min": round(1000 * step, 3), "step_ms_median": round(1000 * statistics.median(times), 3),
               "runs_ms": [round(1000 * x, 3) for x in times], "bytes_read": br,
               "floor_ms": round(1000 * floor, 3) if floor else None,
               "floor_ratio": round(step / floor, 3) if floor else None,
               "tok_per_s_16_steps": round(B * C / (16 * step), 1),
               "tok_per_s_48_steps": round(B * C / (48 * step), 1),
               "peak_mem_mb": round(torch.cuda.max_memory_allocated(dev) / 2 ** 20, 1) if dev.type == "cuda" else None}
        results.append(row)
        log(f"batch {B:>3}{' fast' if mode else ''}: step {row['step_ms_min']:.2f} ms (median {row['step_ms_median']:.2f})"
            + (f", floor {row['floor_ms']:.2f} ms ({row['floor_ratio']:.2f}x)" if floor else "")
            + f", {row['tok_per_s_16_steps']:.0f} tok/s at 16 steps, {row['tok_per_s_48_steps']:.0f} at 48")
    for r in results:
        base = next(x for x in results if x["fast"] == r["fast"])
        r["aggregate_speedup_vs_first"] = round(r["tok_per_s_16_steps"] / base["tok_per_s_16_steps"], 3)
    t = model.text
    return {
        "shape": shape, "layers": t.num_hidden_layers, "parameters": n_params,
        "model": {"hidden_size": t.hidden_size, "layer_types": list(t.layer_types), "experts": t.num_experts,
                  "top_k": t.top_k_experts, "moe_intermediate_size": t.moe_intermediate_size,
                  "intermediate_size": t.intermediate_size, "vocab_size": t.vocab_size, "canvas_length": C},
        "settings": {"device": str(dev), "dtype": str(dt).replace("torch.", ""), "batches": list(batches),
                     "prompt_len": prompt_len, "warmup": warmup, "repeats": repeats, "seed": seed,
                     "deterministic": llm.deterministic, "threads": torch.get_num_threads(),
                     "compile": os.environ.get("BLOCKDIFF_COMPILE", "auto"),
                     "tok_per_s_rule": "batch * canvas_length / (steps * min step time): every canvas position, "
                                       "fixed steps per canvas"},
        "peak_bandwidth_bytes_per_s": bw, "peak_bandwidth_source": bw_source,
        "build_seconds": round(build_s, 2),
        "environment": {"blockdiff": __version__, "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "results": results,
    }


def format_full(report: dict) -> str:
    s = report["settings"]
    head = f"{'batch':>5} {'mode':>5} {'step ms':>9} {'median':>9} {'floor ms':>9} {'x floor':>8} {'tok/s@16':>9} {'tok/s@48':>9} {'peak MB':>9}"
    lines = [f"random '{report['shape']}' ({report['parameters'] / 1e9:.2f}B parameters, {report['layers']} layers) "
             f"on {s['device']} ({report['environment']['gpu'] or 'cpu'}), {s['dtype']}, prompt {s['prompt_len']}, "
             f"min/median of {s['repeats']} ticks; bandwidth {report['peak_bandwidth_source']}", head, "-" * len(head)]

    def f(x, fmt):
        return format(x, fmt) if x is not None else format("-", fmt[0] + fmt[1:].split(".")[0])
    for r in report["results"]:
        lines.append(f"{r['batch']:>5} {'fast' if r.get('fast') else 'exact':>5} {r['step_ms_min']:>9.2f} {r['step_ms_median']:>9.2f} {f(r['floor_ms'], '>9.2f')} "
                     f"{f(r['floor_ratio'], '>8.2f')} {r['tok_per_s_16_steps']:>9.1f} {r['tok_per_s_48_steps']:>9.1f} "
                     f"{f(r['peak_mem_mb'], '>9.1f')}")
    return "\n".join(lines)
