"""Wall time of each part of a denoising step at 1 and 2 threads (issue 20 item 3: where the second core is lost).

    python scripts/step_phases.py /tmp/speed/mid/ckpt --quant int8 --repeats 5

Each part (attention, router, experts with the dense MLP beside them, the dense MLP on its own, whole layers, the
LM head, probs @ E, the sampler, the engine's encode and denoise ticks) is timed by wrapping its method; a part that
runs on the workers (the dense MLP as a side task) is summed over them. Medians of ms per step over the rounds,
thread counts interleaved in one process; one canvas (prompt 64, 128 new tokens).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import blockdiff  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads OpenMP)
import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--quant", default="int8", help="fp32, int8 or int4")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    import blockdiff.engine.engine as engine
    from blockdiff.bench.harness import make_prompt
    from blockdiff.bench.systems import blockdiff_system
    from blockdiff.engine.llm import LLM

    llm = LLM(a.model, dtype=torch.float32, device="cpu", quantization=None if a.quant == "fp32" else a.quant)
    m = llm.model
    acc: dict[str, float] = collections.defaultdict(float)

    def wrap(obj, name: str, key: str) -> None:
        f = getattr(obj, name)

        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                acc[key] += time.perf_counter() - t0
        setattr(obj, name, timed)
    for layer in m.layers:
        wrap(layer.self_attn, "forward", "attention")
        wrap(layer.router, "forward", "router")
        wrap(layer.experts, "forward_with", "experts (+ dense MLP beside)")
        wrap(layer.mlp, "forward", "dense MLP (summed over workers)")
        wrap(layer, "forward", "layers in all")
    wrap(m, "lm_head", "LM head")
    wrap(m, "soft_embeddings", "probs @ E")
    wrap(m, "denoise", "model.denoise")
    wrap(engine, "default_step", "sampler")
    wrap(engine.Engine, "_encode", "engine encode")
    wrap(engine.Engine, "_denoise", "engine denoise tick")
    fn = blockdiff_system(llm, [make_prompt(m.vocab_size, 64, 0)], 128, a.steps, "default")
    threads = (1, 2)
    for t in threads:  # warm-up
        torch.set_num_threads(t)
        fn(0)
    parts = {t: collections.defaultdict(list) for t in threads}
    for _ in range(a.repeats):
        for t in threads:
            torch.set_num_threads(t)
            acc.clear()
            t0 = time.perf_counter()
            res = fn(0)
            acc["step (wall)"] += time.perf_counter() - t0
            for k, v in acc.items():
                parts[t][k].append(1000 * v / res.forwards)
    print(f"{a.quant}: ms per step, median of {a.repeats} rounds")
    print(f"{'part':<34}{'1 thr':>8}{'2 thr':>8}{'ratio':>8}")
    for k in ["step (wall)"] + [k for k in parts[1] if k != "step (wall)"]:
        one, two = statistics.median(parts[1][k]), statistics.median(parts[2][k])
        print(f"{k:<34}{one:8.1f}{two:8.1f}{one / two:7.2f}x")


if __name__ == "__main__":
    main()
