"""1 vs 2 (or more) torch threads on one checkpoint, interleaved in one process (issue 20 item 3).

    python scripts/thread_scaling.py /tmp/speed/mid/ckpt --quant fp32,int8,int4 --threads 1,2 --repeats 5
    python scripts/thread_scaling.py /tmp/speed/mid/ckpt --quant int8 --profile   # per-op table at each count

Each round runs every (quantization, thread count) once, one canvas (prompt 64, 128 new tokens, 16 steps,
early stopping off); the medians of ms per denoising step and the ratio to the first thread count are printed,
then the process's CPU time per step and the cores busy (CPU time / wall) per thread count.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import blockdiff  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads OpenMP)
import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--quant", default="fp32,int8,int4")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops per thread count")
    a = p.parse_args()
    from blockdiff.bench.harness import make_prompt
    from blockdiff.bench.systems import blockdiff_system
    from blockdiff.engine.llm import LLM

    threads = [int(t) for t in a.threads.split(",")]
    runs = {}
    for q in a.quant.split(","):
        llm = LLM(a.model, dtype=torch.float32, device="cpu", quantization=None if q == "fp32" else q)
        prompt = make_prompt(llm.model.vocab_size, 64, 0)
        runs[q] = blockdiff_system(llm, [prompt], 128, a.steps, "default")
    for q, fn in runs.items():
        for t in threads:
            torch.set_num_threads(t)
            t0 = time.perf_counter(); fn(0)  # warm-up
            print("warm-up", q, t, f"{time.perf_counter() - t0:.1f} s", flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        for q, fn in runs.items():
            for t in threads:
                torch.set_num_threads(t)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    res = fn(0)
                ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:14]
                print(f"\n{q}, {t} thread(s): top ops, ms per step (self), calls per step")
                for e in ev:
                    print(f"  {e.key[:44]:<44} {e.self_cpu_time_total / 1000 / res.forwards:8.2f} "
                          f"{e.count / res.forwards:8.1f}")
        return
    times = {(q, t): [] for q in runs for t in threads}
    cpu_ms = {(q, t): [] for q in runs for t in threads}
    for _ in range(a.repeats):
        for q, fn in runs.items():
            for t in threads:
                torch.set_num_threads(t)
                r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                res = fn(0)
                wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
                cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
                times[(q, t)].append(1000 * wall / res.forwards)
                cpu_ms[(q, t)].append(1000 * cpu / res.forwards)
                # CPU time / wall: how many cores were busy on average (idle ones do not count, spinning ones do)
                print(q, t, f"{times[(q, t)][-1]:.0f} ms/step, CPU time {cpu_ms[(q, t)][-1]:.0f} ms/step, "
                      f"cores busy {cpu / wall:.2f}", flush=True)
    # Medians, and the best round of each: on a shared host other jobs only ever add time, so the best round is
    # the least disturbed one (both are printed; docs/benchmarks.md quotes both).
    print(f"{'quant':<6} " + " ".join(f"{t:>2} thr ms/step" for t in threads) + "  ratio (median)  " +
          " ".join(f"{t:>2} thr best" for t in threads) + "  ratio (best)  median of per-round ratios")
    for q in runs:
        med = [statistics.median(times[(q, t)]) for t in threads]
        best = [min(times[(q, t)]) for t in threads]
        # Paired: each round's ratio (its thread counts ran back to back), then the median of those ratios, so
        # that a slow spell of the host that spans one round cancels instead of landing on one side.
        paired = [statistics.median(a / b for a, b in zip(times[(q, threads[0])], times[(q, t)])) for t in threads[1:]]
        print(f"{q:<6} " + " ".join(f"{m:>14.1f}" for m in med) + "  " +
              " ".join(f"{med[0] / m:.2f}x" for m in med[1:]) + "          " +
              " ".join(f"{m:>11.1f}" for m in best) + "  " + " ".join(f"{best[0] / m:.2f}x" for m in best[1:]) +
              "  paired " + " ".join(f"{r:.2f}x" for r in paired) +
              "   rounds: " + " | ".join(",".join(f"{x:.0f}" for x in times[(q, t)]) for t in threads))
    # Where a second core's time went: busy (CPU time / wall) and the work's own inflation (CPU time per step
    # against one thread's): a core that is busy but slowed by its neighbour shows as inflation, not idleness.
    print("CPU time per step (median ms) and cores busy, per thread count:")
    for q in runs:
        c1 = statistics.median(cpu_ms[(q, threads[0])])
        print(f"  {q:<6} " + "  ".join(
            f"{t} thr: {statistics.median(cpu_ms[(q, t)]):.0f} ms ({statistics.median(cpu_ms[(q, t)]) / c1:.2f}x), "
            f"busy {statistics.median(c / w for c, w in zip(cpu_ms[(q, t)], times[(q, t)])):.2f}" for t in threads))


if __name__ == "__main__":
    main()
