"""The int8 tied table on CPU: LM head and probs @ E at several block sizes (QuantEmbedding.ROWS), one thread.

    python scripts/int8_table_blocks.py [--vocab 32768 --hidden 512 --rows 128]

Each block of the table is cast to fp32 then multiplied; a block that fits the core's L2 is read back from there
instead of from memory (docs/benchmarks.md, "Every core, round two"). Medians of 7 calls, ms.
"""

from __future__ import annotations

import argparse
import time

import blockdiff  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads OpenMP)
import torch
import torch.nn.functional as F


def median_ms(fn, n: int = 7) -> float:
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1000 * sorted(ts)[n // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--rows", type=int, default=128, help="canvas positions (activation rows)")
    a = p.parse_args()
    torch.set_num_threads(1)
    V, H, M = a.vocab, a.hidden, a.rows
    q = torch.randint(-127, 128, (V, H), dtype=torch.int8)
    s = torch.rand(V)
    x, probs = torch.randn(M, H), torch.softmax(torch.randn(M, V), -1)
    wf = q.float()
    print(f"fp32 table: LM head {median_ms(lambda: F.linear(x, wf)):.1f} ms, probs @ E {median_ms(lambda: probs @ wf):.1f} ms")
    for R in (16384, 4096, 1024, 512, 256):
        def head():
            return torch.cat([F.linear(x, q[i:i + R].float()).mul_(s[i:i + R]) for i in range(0, V, R)], -1)

        def mix():
            out = None
            for i in range(0, V, R):
                y = (probs[:, i:i + R] * s[i:i + R]) @ q[i:i + R].float()
                out = y if out is None else out.add_(y)
            return out
        print(f"int8 blocks of {R:>5} rows: LM head {median_ms(head):6.1f} ms, probs @ E {median_ms(mix):6.1f} ms")


if __name__ == "__main__":
    main()
