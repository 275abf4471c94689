"""Cost of the penalty / logit_bias and greedy paths of the batched sampler step (docs/benchmarks.md): one
default_step over [4, 32, 32768] logits, best of 7, one thread."""
import time, torch
from blockdiff import SamplingParams
from blockdiff.sampling.penalties import Penalties
from blockdiff.sampling.sampler import RowParams, default_step
torch.set_num_threads(1)
B, C, V = 4, 32, 32768
g = torch.Generator().manual_seed(0)
logits = torch.randn(B, C, V, generator=g)
canvas = torch.zeros(B, C, dtype=torch.long)
base = dict(step=0, max_steps=4, t_min=0.4, t_max=0.8, entropy_bound=0.1, confidence=0.005, seed=0, canvas_index=0)
pen = Penalties(SamplingParams(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2, logit_bias={5: 2.0}),
                list(range(200)), V, "cpu")
pen.commit(list(range(100, 164)))
cases = {"none": [dict(base, seed=b) for b in range(B)],
         "greedy": [dict(base, seed=b, greedy=True) for b in range(B)],
         "penalties (all rows)": [dict(base, seed=b, penalty=pen) for b in range(B)]}
best = {k: float("inf") for k in cases}
for rep in range(7):
    for k, rows in cases.items():
        x = logits.clone()
        t = time.perf_counter()
        default_step(x, canvas, RowParams.build(rows, "cpu", C, V))
        best[k] = min(best[k], time.perf_counter() - t)
for k, v in best.items():
    print(f"{k}: {v*1e3:.1f} ms  ({v / best['none']:.2f}x)")
