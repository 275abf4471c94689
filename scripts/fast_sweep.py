"""Fast mode's settings against exact mode on the bundled Sudoku model: solved % and the share of canvas positions
computed, per clue band, on the held-out puzzles of ``blockdiff.sudoku.eval`` (same puzzles and sample seeds).

    python scripts/fast_sweep.py 300 2:1:1 4:2:1      # per band; then REFRESH:VICINITY:FREEZE_AFTER settings
"""

import sys
import time

import torch

import blockdiff.engine.fast as F
from blockdiff.engine.llm import LLM
from blockdiff.sudoku.eval import held_out, score
from blockdiff.sudoku.solver import BUNDLED_MODEL, solve_diffusion

torch.set_num_threads(2)
llm = LLM(BUNDLED_MODEL, dtype="float32")
n = int(sys.argv[1])
sets = held_out(n, 1000, bands=(">=40", "30-39", "<30"))
configs = [None] + [tuple(map(int, c.split(":"))) for c in sys.argv[2:]]
for band, pairs in sets.items():
    puzzles = [p for p, _ in pairs]
    for cfg in configs:
        if cfg:
            F.REFRESH, F.VICINITY, F.FREEZE_AFTER = cfg
        st = llm.engine.stats
        st["fast_positions"] = st["fast_canvas_positions"] = 0
        t0 = time.perf_counter()
        sols = solve_diffusion(llm, puzzles, seed=0, batch_size=64, fast=cfg is not None)
        r = score(pairs, sols)
        frac = st["fast_positions"] / max(1, st["fast_canvas_positions"])
        print(band, cfg or "exact", f"solved {r['solve_rate']:.3f} steps {r['mean_steps']:.1f} "
              f"wall {time.perf_counter() - t0:.1f}s computed {frac:.2f}", flush=True)
