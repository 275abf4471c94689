"""Time to first block of a chat's second turn with a long shared prefix: cold (no prefix cache) vs warm (turn 1's
prompt blocks cached).

    python scripts/prefix_cache_bench.py --preset mid --prefix 2000 --threads 1 --repeats 3 --out pc.json

Turn 1 = ``--prefix`` shared tokens (a long system prompt) + a 32-token user message; its answer is one canvas.
Turn 2 = turn 1 + the answer + another 32-token user message. Both engines share one random checkpoint (built with
``blockdiff.bench.checkpoints``, or ``--model PATH``). Before each warm measurement the cache is cleared and turn 1
is run again (untimed), so the cache holds exactly what a real second turn would find. Every canvas takes exactly
``--steps`` denoising steps (early stopping off) so both sides do the same denoising work; cold and warm runs are
interleaved and medians reported. Token ids are random: the figures depend only on the lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: a random --preset checkpoint)")
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--prefix", type=int, default=2000, help="shared prefix tokens")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per canvas")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefix-cache-bytes", type=int, default=1 << 30)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from blockdiff import SamplingParams, load_model
    from blockdiff.bench.checkpoints import write_random_checkpoint
    from blockdiff.engine.engine import Engine

    path = args.model or write_random_checkpoint(tempfile.mkdtemp(prefix="pcbench-"), args.preset)
    model = load_model(path, dtype=torch.float32, device="cpu")
    C, V = model.canvas_length, model.vocab_size
    cold = Engine(model, max_num_seqs=1)
    warm = Engine(model, max_num_seqs=1, prefix_cache_bytes=args.prefix_cache_bytes)
    params = SamplingParams(seed=0, max_new_tokens=C, ignore_eos=True, max_denoising_steps=args.steps,
                            stability_threshold=args.steps + 1)

    def run(engine, prompt):
        """Run one request; returns it and the process CPU seconds to its first block (with one thread, far
        steadier on a shared machine than wall time)."""
        c0 = time.process_time()
        s = engine.add_request(prompt, params)
        cpu = None
        while engine.has_unfinished():
            engine.step()
            if cpu is None and s.metrics.first_block_time is not None:
                cpu = time.process_time() - c0
        return s, cpu

    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(5, V, (n,), generator=g).tolist()  # noqa: E731
    turn1 = ids(args.prefix) + ids(32)
    answer = run(cold, turn1)[0].output_ids
    turn2 = turn1 + answer + ids(32)

    run(cold, turn2)  # warm-up (allocations, first-call overheads)
    times = {"cold": [], "warm": []}
    cpu = {"cold": [], "warm": []}
    cached = 0
    for _ in range(args.repeats):
        s, c = run(cold, turn2)
        times["cold"].append(s.metrics.time_to_first_block)
        cpu["cold"].append(c)
        warm.prefix_cache.clear()
        run(warm, turn1)
        s, c = run(warm, turn2)
        times["warm"].append(s.metrics.time_to_first_block)
        cpu["warm"].append(c)
        cached = s.metrics.cached_tokens
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = None
    report = {
        "model": args.model or f"random {args.preset}", "params": sum(p.numel() for p in model.parameters()),
        "canvas_length": C, "steps": args.steps, "threads": args.threads,
        "turn1_prompt_tokens": len(turn1), "turn2_prompt_tokens": len(turn2), "cached_tokens": cached,
        "encoded_tokens": {"cold": len(turn2), "warm": len(turn2) - cached},
        "ttfb_seconds": times, "ttfb_median_seconds": med, "speedup": med["cold"] / med["warm"],
        "ttfb_cpu_seconds": cpu, "ttfb_median_cpu_seconds": med_cpu,
        "speedup_cpu": med_cpu["cold"] / med_cpu["warm"],
        "prefix_cache_bytes_held": warm.prefix_cache.nbytes(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
