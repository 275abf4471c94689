"""How much one expert run slows down while the other core works (issue 20 item 3: is it the GIL or the cores?).

    python scripts/partner_interference.py /tmp/speed/mid/ckpt --quant int8

The calling thread times one run of consecutive experts of layer 0 (``_block``, half of the layer's experts, the
~16-row expert GEMMs of one canvas of 128 positions) while one worker thread loops on a partner:

- nothing (the run alone),
- one big fp32 product (256 x 512 x 4,096): long GIL-free kernel time, the core kept busy,
- many tiny products (16 x 64 x 64): the GIL taken and given back every few microseconds, little work,
- the layer's other expert run, or half of its dense MLP (what the worker threads run beside each other in a step).

If the GIL were what costs the second core, the tiny products would slow the run most; if the cores slow each
other (shared caches, memory, a shared physical core), the big product would. Medians of ms per run.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from functools import partial

import blockdiff  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads OpenMP)
import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--quant", default="int8", help="fp32, int8 or int4")
    p.add_argument("--calls", type=int, default=200)
    a = p.parse_args()
    from blockdiff.engine.llm import LLM
    from blockdiff.model import cpu_threads as ct
    from blockdiff.model.moe import route

    llm = LLM(a.model, dtype=torch.float32, device="cpu", quantization=None if a.quant == "fp32" else a.quant)
    layer = llm.model.layers[0]
    ex, H, E = layer.experts, llm.model.config.text.hidden_size, layer.experts.num_experts
    K = llm.model.config.text.top_k_experts
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, H, generator=g) * 0.5
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(128)])
    torch.set_num_threads(2)
    with torch.inference_mode():
        r = route(idx, E)
        xs, counts = x.index_select(0, r.token_of), r.counts.tolist()
        runs = ct.expert_blocks(ct.spans_of(counts), 2)
        if hasattr(ex, "gate_up_proj") and not isinstance(ex.gate_up_proj, torch.Tensor):  # quantized experts
            per_row = idx.reshape(-1).index_select(0, r.order)
            run = [partial(ex._block, xs, counts, per_row, b) for b in runs]
        else:
            run = [partial(ex._block, xs, counts, b) for b in runs]
    A, B = torch.randn(256, H), torch.randn(H, 4096)
    ta, tb = torch.randn(16, 64), torch.randn(64, 64)

    def tiny() -> None:
        for _ in range(40):
            torch.mm(ta, tb)

    partners = {"nothing": None, "big fp32 product": lambda: torch.mm(A, B), "tiny products": tiny,
                "the other expert run": run[-1], "half the dense MLP": lambda: layer.mlp(x[:64])}
    pool = ct._pool(2)  # worker threads with one intra-op thread each, as in a step

    def loop(f, stop: threading.Event) -> None:
        with torch.inference_mode():
            while not stop.is_set():
                f()

    torch.set_num_threads(1)
    print(f"{a.quant}: one expert run ({runs[0][-1][2] - runs[0][0][1]} rows) on the calling thread, ms per run")
    alone = None
    with torch.inference_mode():
        for _ in range(20):
            run[0]()
        for name, f in partners.items():
            stop = threading.Event()
            fut = pool.submit(loop, f, stop) if f else None
            time.sleep(0.01)
            ts = []
            for _ in range(a.calls):
                t0 = time.perf_counter()
                run[0]()
                ts.append(time.perf_counter() - t0)
            stop.set()
            if fut:
                fut.result()
            ms = 1e3 * statistics.median(ts)
            alone = alone or ms
            print(f"  partner {name:<22} {ms:7.3f}  ({ms / alone:.2f}x)")


if __name__ == "__main__":
    main()
