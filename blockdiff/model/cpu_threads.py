"""Work of one layer dealt to the CPU's threads (issue 20, "use every core").

A denoising step on the mid checkpoint runs ~540 expert GEMMs of ~16 rows each. A GEMM that small has too little
work for torch to split across two threads, so with torch's intra-op threads alone the second core idled through
the experts (2 threads were 1.2-1.4x one; per-op profile in docs/benchmarks.md). Here each thread instead takes
whole experts (``map_expert_blocks``): the experts of a layer are cut into one run of consecutive experts per
``torch.get_num_threads()`` worker thread, balanced by their rows, and each worker runs its run's whole MLP
single-threaded (both GEMMs of each expert, the activation once over the run). torch releases the GIL inside each
op, so the workers' GEMMs run at the same time; the caller waits and concatenates the outputs in their order. The
big products over the vocabulary (LM head, probs @ E) are cut the same way (``split``): one single-threaded
product per core was faster than torch's own split of the one product.

Each worker sets its own intra-op thread count to 1 once, when its pool is made; ``torch.set_num_threads`` also
writes a process-wide default, so the caller's count is restored right after (nothing else runs meanwhile: the
caller waits on the workers' start-up). An expert's result does not depend on which worker ran it: it is the same
single-threaded GEMM on the same rows. An exception in a worker reaches the caller (``Future.result``), so the
engine's failure rule applies as on one thread. Only for inference: with autograd recording, or inside a worker,
everything runs on the calling thread.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, Sequence

import torch

# Below this many multiply-adds the hand-off to the workers (~0.1 ms: wake-ups, the GIL) costs more than a second
# core saves; tiny test models stay on the calling thread.
MIN_WORK = 1 << 22
_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()
_LOCAL = threading.local()  # .worker: set in the pools' threads (no nested fan-out from inside a worker)


def _forget_pools() -> None:
    """In a forked child: the pools' threads did not survive the fork, so a submit would wait forever."""
    global _LOCK
    _POOLS.clear()
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools)

Span = tuple[int, int, int]  # (expert, first row, end row) of the expert-sorted rows


def spans_of(counts: Sequence[int]) -> list[Span]:
    """Per-expert row counts (host ints) -> the spans of the experts that have rows, in expert order."""
    spans, start = [], 0
    for e, n in enumerate(counts):
        if n:
            spans.append((e, start, start + n))
            start += n
    return spans


def workers() -> int:
    """How many worker threads a fan-out would use now: torch's intra-op thread count where running ops on
    worker threads is allowed (no autograd graph being recorded, not already inside a worker, not being traced
    by ``torch.compile``: a graph holds no threads), else 1."""
    if torch.is_grad_enabled() or getattr(_LOCAL, "worker", False) or torch.compiler.is_compiling():
        return 1
    return torch.get_num_threads()


def fan_out(fn: Callable, shares: list[list], n: int) -> list[list]:
    """``[[fn(*args) for args in share] for share in shares]`` with each share on its own worker thread (n of
    them, single-threaded torch ops each). The caller waits; results keep the shares' order."""
    inference = torch.is_inference_mode_enabled()
    futures = [_pool(n).submit(_run, fn, share, inference) for share in shares]
    return [f.result() for f in futures]


Task = tuple[int, Callable[[], object]]  # (multiply-adds, callable)


def run_tasks(tasks: Sequence[Task], device: torch.device | None = None) -> list:
    """``[g() for _, g in tasks]``, the tasks (``(multiply-adds, callable)``: one expert's GEMM, the layer's dense
    MLP beside them) dealt to the CPU's worker threads by their cost when the work is on the CPU (``device``; None:
    the CPU), there are at least two threads and ``MIN_WORK`` multiply-adds in all. Results in the tasks' order."""
    n = min(workers() if device is None or torch.device(device).type == "cpu" else 1, len(tasks))
    if n < 2 or sum(c for c, _ in tasks) < MIN_WORK:
        return [g() for _, g in tasks]
    shares = _deal([c for c, _ in tasks], n)
    results = [None] * len(tasks)
    for share, ys in zip(shares, fan_out(_call, [[(tasks[i][1],) for i in share] for share in shares], n)):
        for i, y in zip(share, ys):
            results[i] = y
    return results


def expert_blocks(spans: list[Span], n: int) -> list[list[Span]]:
    """The experts that have rows cut into at most ``n`` runs of consecutive experts of about equal cost (rows, plus
    4 per expert: every GEMM call has a fixed cost): one run per worker, so that a worker runs its experts' whole
    MLP (both GEMMs and the activation between them) with a handful of torch ops per run beside one kernel call per
    expert.

    Why runs and not experts: with fast kernels (VNNI int8, AVX-512) a ~16-row expert GEMM takes tens of
    microseconds, as long as the few Python-side ops around it (slices, casts, scales), and those ops hold the GIL
    and run on the calling thread between fan-outs (docs/benchmarks.md, "Speed round two" section 11)."""
    if not spans:
        return []
    if n <= 1 or len(spans) == 1:
        return [spans]
    costs = [b - a + 4 for _, a, b in spans]
    total, blocks, run, acc = sum(costs), [], [], 0
    for span, c in zip(spans, costs):
        run.append(span)
        acc += c
        if len(blocks) < n - 1 and acc * n >= total * (len(blocks) + 1):
            blocks.append(run)
            run = []
    return blocks + [run] if run else blocks


def map_expert_blocks(fn: Callable[[list[Span]], torch.Tensor], counts: Sequence[int], macs_per_row: int,
                      like: torch.Tensor, width: int, side: Sequence[Task] = (), n: int | None = None,
                      device: torch.device | None = None) -> tuple[torch.Tensor, list]:
    """``(torch.cat([fn(run) for run in expert_blocks(...)]), [g() for _, g in side])``: the experts (``counts``
    rows each, in order) cut into one run per worker (``n``; None: ``workers()``), the runs and the side tasks (e.g.
    the layer's dense MLP, independent of the experts) dealt to the CPU's threads by ``run_tasks``. No rows: an
    empty [0, width] tensor like ``like``."""
    blocks = expert_blocks(spans_of(counts), workers() if n is None else n)
    tasks = [(sum(b - a + 4 for _, a, b in blk) * macs_per_row, partial(fn, blk)) for blk in blocks]
    ys = run_tasks(tasks + list(side), device)
    return (torch.cat(ys[:len(tasks)]) if tasks else like.new_zeros(0, width)), ys[len(tasks):]


def each_expert(kernel: Callable, x: torch.Tensor, counts: Sequence[int], weights: Sequence[torch.Tensor],
                out: torch.Tensor) -> torch.Tensor:
    """``kernel(rows of expert i, weights[i], out=its rows of out)`` for each expert i with rows (``counts``: rows
    per expert, in order; ``x`` and ``out`` hold them consecutively). One op per expert: the views are made by one
    ``split`` each. Returns ``out``."""
    for xe, we, oe, c in zip(x.split(counts), weights, out.split(counts), counts):
        if c:
            kernel(xe, we, out=oe)
    return out


def split(fn: Callable[[int, int], torch.Tensor], size: int, macs: int, dim: int | None = 0,
          device: torch.device | None = None) -> torch.Tensor:
    """``fn(0, size)`` computed over equal slices [a, b) of ``size``, one per worker thread, when the work is on
    the CPU (``device``: where its tensors are; None: the CPU), there are at least two threads and ``macs`` (the
    whole product's multiply-adds) reaches ``MIN_WORK``: for the big GEMMs
    (LM head, probs @ E), where one single-threaded product per core beats torch's own split of one product.
    The parts are concatenated along ``dim``, or summed in slice order when ``dim`` is None (a split of the
    product's inner dimension)."""
    n = _slices(size, macs, device)
    if n < 2:
        return fn(0, size)
    parts = [p[0] for p in fan_out(fn, _cuts(size, n), n)]
    if dim is not None:
        return torch.cat(parts, dim)
    out = parts[0]
    for p in parts[1:]:
        out = out.add_(p)
    return out


def each_slice(fn: Callable[[int, int], object], size: int, macs: int, device: torch.device | None = None) -> None:
    """``fn(0, size)`` run as ``fn(a, b)`` over one slice [a, b) of ``size`` per worker thread, under the same rule
    as ``split``, for products that write their slice of a preallocated output themselves: no concatenation of
    the parts afterwards (a [128 x 32,768] logits table copied twice cost ~15 ms of a ~330 ms step)."""
    n = _slices(size, macs, device)
    if n < 2:
        fn(0, size)
    else:
        fan_out(fn, _cuts(size, n), n)


def _slices(size: int, macs: int, device) -> int:
    """How many slices ``split`` / ``each_slice`` cut a product into (1: run it on the calling thread)."""
    n = workers() if device is None or torch.device(device).type == "cpu" else 1
    return 1 if n < 2 or size < 2 * n or macs < MIN_WORK else n


def _cuts(size: int, n: int) -> list[list[tuple[int, int]]]:
    cuts = [size * i // n for i in range(n + 1)]
    return [[(cuts[i], cuts[i + 1])] for i in range(n)]


def _deal(costs: list[int], n: int) -> list[list[int]]:
    """Task indices dealt to n threads: largest first, each to the least-loaded thread (an expert's cost counts
    4 rows more than it has: every GEMM call has a fixed cost)."""
    load = [0] * n
    shares: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        t = load.index(min(load))
        shares[t].append(i)
        load[t] += costs[i]
    return [s for s in shares if s]


def _call(g: Callable[[], torch.Tensor]) -> torch.Tensor:
    return g()


def _run(fn, share: list[tuple], inference: bool) -> list[torch.Tensor]:
    with torch.inference_mode(inference), torch.no_grad():
        return [fn(*args) for args in share]


def _pool(n: int) -> ThreadPoolExecutor:
    with _LOCK:
        pool = _POOLS.get(n)
        if pool is None:
            caller = torch.get_num_threads()
            pool = ThreadPoolExecutor(n, thread_name_prefix="blockdiff-experts")
            started = threading.Barrier(n)  # holds each start-up task on its own thread until all n exist

            def start() -> None:
                _LOCAL.worker = True
                # torch sets a thread's intra-op count from the process-wide default on its first parallel op;
                # run one first, or that later first op would undo the 1 below (the caller restores its default)
                torch.get_num_threads()
                torch.ones(2).add_(1)
                torch.set_num_threads(1)
                started.wait()
            for f in [pool.submit(start) for _ in range(n)]:
                f.result()
            torch.set_num_threads(caller)
            _POOLS[n] = pool
        return pool
