"""Weights and resident memory per rank of a model split over N CPU ranks (gloo), against one process.

    PYTHONPATH=. python scripts/tp_memory.py [--config mid] [--sizes 2,4]

Builds a random checkpoint of the bench preset (blockdiff/bench/checkpoints.py) in a temp dir, loads it in one process,
then split over each N; prints per rank the weight bytes it holds (text weights; the vision tower is replicated) and
its RSS after loading. One process group per run: each N runs in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile


def one(path: str, n: int) -> None:
    import torch

    from blockdiff import load_model
    from blockdiff.distributed import start, weight_bytes
    from blockdiff.distributed.runtime import _rss

    torch.set_num_threads(1)
    if n == 1:
        m = load_model(path, dtype=torch.float32)
        print(json.dumps([{"rank": 0, "weight_bytes": weight_bytes(m), "text_weight_bytes": weight_bytes(m, True),
                           "rss_bytes": _rss()}]))
        return
    m = start(path, n, dtype=torch.float32)
    try:
        print(json.dumps(m.rank_stats()))
    finally:
        m.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="mid")
    ap.add_argument("--sizes", default="2,4")
    ap.add_argument("--one", nargs=2)
    a = ap.parse_args()
    if a.one:
        one(a.one[0], int(a.one[1]))
        return
    from blockdiff.bench.checkpoints import write_random_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(tmp, a.config, seed=0)
        base = None
        for n in [1] + [int(x) for x in a.sizes.split(",")]:
            out = subprocess.run([sys.executable, __file__, "--one", path, str(n)], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            stats = json.loads(out)
            if base is None:
                base = stats[0]
            for s in stats:
                print(f"N={n} rank {s['rank']}: text weights {s['text_weight_bytes'] / 2**20:7.1f} MiB "
                      f"({s['text_weight_bytes'] / base['text_weight_bytes']:.3f} of one process), all weights "
                      f"{s['weight_bytes'] / 2**20:7.1f} MiB, RSS {s['rss_bytes'] / 2**20:7.1f} MiB "
                      f"({s['rss_bytes'] / base['rss_bytes']:.3f})", flush=True)


if __name__ == "__main__":
    main()
