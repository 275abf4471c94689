"""The tied LM head's CPU product three ways, at 1 and 2 threads, interleaved rounds (issue 20 item 3).

    python scripts/lm_head_blocks.py [--rounds 7] [--rows 128] [--vocab 32768] [--hidden 512]

one: one [M, V/n] product per worker thread, the parts concatenated (blockdiff before round five);
blocks + cat: each worker's slice a ~1 MiB block of the table at a time, the blocks concatenated;
blocks into out: each block's product written straight into its columns of a preallocated logits table (now).
Prints the median ms per call of each, per thread count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import blockdiff  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads OpenMP)
import torch
import torch.nn.functional as F

from blockdiff.model import cpu_threads
from blockdiff.model.diffusion_gemma import HEAD_BLOCK_BYTES, _head_blocks


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=512)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(a.rows, a.hidden, generator=g), torch.randn(a.vocab, a.hidden, generator=g) * 0.02
    macs, V = a.rows * a.hidden * a.vocab, a.vocab
    block = max(64, HEAD_BLOCK_BYTES // (a.hidden * 4))

    def one():
        return cpu_threads.split(lambda lo, hi: F.linear(h, w[lo:hi]), V, macs, dim=-1)

    def blocks_cat():
        return cpu_threads.split(lambda lo, hi: torch.cat([F.linear(h, w[i:min(i + block, hi)])
                                                           for i in range(lo, hi, block)], -1), V, macs, dim=-1)

    def blocks_out():
        out = torch.empty(a.rows, V)
        cpu_threads.each_slice(lambda lo, hi: _head_blocks(h, w, out, lo, hi), V, macs)
        return out
    ways = {"one": one, "blocks + cat": blocks_cat, "blocks into out": blocks_out}
    times: dict[tuple[str, int], list[float]] = {(k, t): [] for k in ways for t in (1, 2)}
    with torch.inference_mode():
        want = F.linear(h, w)
        for f in ways.values():
            torch.testing.assert_close(f(), want, rtol=1e-4, atol=1e-4)
        for _ in range(a.rounds):
            for t in (1, 2):
                torch.set_num_threads(t)
                for k, f in ways.items():
                    f()
                    t0 = time.perf_counter()
                    for _ in range(5):
                        f()
                    times[(k, t)].append((time.perf_counter() - t0) / 5 * 1000)
    print(f"[{a.rows} x {a.hidden}] x [{a.hidden} x {V}], block {block} rows, median ms per call of {a.rounds} rounds")
    for k in ways:
        m1, m2 = statistics.median(times[(k, 1)]), statistics.median(times[(k, 2)])
        print(f"  {k:<16} 1 thread {m1:6.1f}   2 threads {m2:6.1f}   ({m1 / m2:.2f}x)")


if __name__ == "__main__":
    main()
