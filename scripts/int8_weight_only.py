"""int8 weight-only GEMM kernels against blockdiff's CPU int8 path (cast the int8 weight to fp32, fp32 matmul, scale
the output columns) and the fp32 matmul, at the mid checkpoint's expert (16 rows) and dense-MLP (128 rows) shapes,
1 and 2 threads; microseconds per call, best of 7 x 100 calls (docs/benchmarks.md, issue 20 section 9).

    python scripts/int8_weight_only.py
"""

import time, torch
torch.manual_seed(0)
def bench(fn, *a, n=100):
    for _ in range(5): fn(*a)
    best = 1e9
    for r in range(7):
        t = time.perf_counter()
        for _ in range(n): fn(*a)
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6
K, N = 512, 1024
w = torch.randint(-127, 127, (N, K), dtype=torch.int8); s = torch.rand(N) * 0.01; wf = w.float()
for th in (1, 2):
    torch.set_num_threads(th)
    for M in (16, 128):
        x = torch.randn(M, K); xb = x.bfloat16(); sb = s.bfloat16()
        cur = lambda: (x @ w.float().t()) * s
        print(th, M, "cast+fp32", round(bench(cur)), "fp32", round(bench(lambda: x @ wf.t())),
              "int8pack bf16", round(bench(lambda: torch._weight_int8pack_mm(xb, w, sb))),
              "int8pack fp32", round(bench(lambda: torch._weight_int8pack_mm(x, w, s))), flush=True)
y = torch._weight_int8pack_mm(x, w, s); print("err", (y - (x @ wf.t()) * s).abs().max().item())
