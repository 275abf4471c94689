"""How much a second core can give at all on this machine (issue 20 item 3): the ceiling for 2 threads vs 1.

    python scripts/core_ceiling.py [--rounds 5]

Runs the same fixed work once on one thread, then on two threads at once (each thread its own copy of the work,
no synchronisation between them, torch at one intra-op thread per thread), and prints the throughput ratio
``2 * t_alone / t_both`` per round and its median. The work:

- ``sha256`` of an 8 MB buffer (scalar/SHA units; the GIL is released): shows whether the two CPUs are two cores;
- a sum over 256 MB (memory bandwidth), and 16-row GEMMs over 64 MB of weights (the experts' kind: each
  weight read from memory is used 16 times);
- single-threaded fp32 GEMMs (``torch.mm``) of several sizes: the kind of work a denoising step is made of. Each
  call holds the GIL only to dispatch; at 256 and above the dispatch is under 2% of the call.

No model step can scale better than its GEMMs do here, whatever the threading scheme: on a box where two
independent GEMM streams reach only ~1.6x one, a whole step (with its sync points and small ops) stays below that.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import threading
import time

import torch


def _one_thread(fn) -> None:
    # A new thread's OpenMP team starts at the machine's core count, whatever the caller set: set 1 in the thread.
    torch.set_num_threads(1)
    fn()


def _time(fn, threads: int) -> float:
    ts = [threading.Thread(target=_one_thread, args=(fn,)) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def ratio_rounds(fn, rounds: int) -> list[float]:
    fn()  # warm-up: allocations, kernel selection
    out = []
    for _ in range(rounds):
        alone = _time(fn, 1)
        both = _time(fn, 2)
        out.append(2 * alone / both)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sizes", default="256,512,1024", help="square GEMM sizes")
    a = p.parse_args()
    buf = bytes(range(256)) * 32768  # 8 MB

    def sha():
        for _ in range(8):
            hashlib.sha256(buf).digest()

    work = {"sha256 8 MB x8": sha}
    for n in (int(s) for s in a.sizes.split(",")):
        x, y = torch.randn(n, n), torch.randn(n, n)
        calls = max(4, round(1.1e10 / (2 * n ** 3)))  # ~11 GFLOP: ~0.25 s on one AVX2 core

        def gemm(x=x, y=y, calls=calls):
            for _ in range(calls):
                torch.mm(x, y)
        work[f"fp32 mm {n}^2 x{calls}"] = gemm
    big = torch.randn(64 * 2 ** 20)  # 256 MB of fp32: far past the caches

    def stream():
        for _ in range(2):
            big.sum()
    work["sum over 256 MB"] = stream
    ws = [torch.randn(512, 512) for _ in range(64)]  # 64 MB of weights, ~16 rows each: the experts' shape
    rows = torch.randn(16, 512)

    def skinny():
        for _ in range(3):
            for w in ws:
                torch.mm(rows, w)
    work["16-row mm, 64 MB weights"] = skinny
    print(f"{'work':<24} {'2 threads vs 1 (throughput), per round':<44} median")
    for name, fn in work.items():
        r = ratio_rounds(fn, a.rounds)
        print(f"{name:<24} {' '.join(f'{x:.2f}' for x in r):<44} {statistics.median(r):.2f}x", flush=True)


if __name__ == "__main__":
    main()
