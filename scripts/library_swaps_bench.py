"""Before/after timings of the hand-written parts issue 22 replaced with libraries, in one process (ratios only
mean something within one run; the machine may be shared).

    python scripts/library_swaps_bench.py

1. latency histogram: the former dataclass histogram vs ``prometheus_client.Histogram.observe`` (per observation);
2. learning-rate schedule: the former ``lr_at`` formula written into the param groups vs
   ``torch.optim.lr_scheduler`` (``make_scheduler`` + ``advance_scheduler``) per training step;
3. streaming detokenizing: the former decode-everything-per-canvas stream vs ``TextStream`` on tokenizers'
   ``DecodeStream``, for one output of N tokens committed 256 at a time (a 32k byte-level BPE vocabulary);
4. the resident-set probe of ``blockdiff bench``: parsing ``/proc/self/statm`` vs ``psutil``.

Prints a markdown table: the least process CPU time of 5 repeats of each, per operation, one torch thread.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blockdiff.bench.checkpoints import write_tokenizer  # noqa: E402
from blockdiff.bench.harness import _rss_bytes  # noqa: E402
from blockdiff.engine.async_engine import STEP_BUCKETS, _histogram  # noqa: E402
from blockdiff.server.text import TextStream  # noqa: E402
from blockdiff.tokenizer import Tokenizer  # noqa: E402
from blockdiff.train.loop import TrainOptions, advance_scheduler, make_optimizer, make_scheduler  # noqa: E402


def best(fn, repeats=5) -> float:
    """Least process CPU time of ``repeats`` runs: on a shared machine CPU time moves far less than wall time."""
    out = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        out.append(time.process_time() - t)
    return min(out)


# ---------------------------------------------------------------------------------------------- 1. histogram
@dataclass
class OldHistogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self):
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, v: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += v
        self.count += 1


def histogram(n=100_000):
    values = [0.0005 * 1.1 ** (i % 100) for i in range(n)]  # spread over the buckets (0.5 ms .. 6 s)
    old, new = OldHistogram(STEP_BUCKETS), _histogram("x_seconds", "x", STEP_BUCKETS)

    def run(h):
        def f():
            for v in values:
                h.observe(v)
        return f
    return best(run(old)) / n * 1e9, best(run(new)) / n * 1e9, "ns per observe"


# ---------------------------------------------------------------------------------------------- 2. lr schedule
def lr_at(step: int, o: TrainOptions) -> float:
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        frac = min(1.0, (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps))
        return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
    if o.decay_start and step >= o.decay_start:
        frac = min(1.0, (step - o.decay_start) / max(1, o.max_steps - o.decay_start))
        return o.lr * (1 - (1 - o.min_lr_ratio) * frac)
    return o.lr


def lr_schedule(n=20_000):
    o = TrainOptions(out_dir="x", max_steps=n, warmup_steps=100, schedule="cosine")
    model = torch.nn.Linear(4, 4)

    def old():
        opt = make_optimizer(model, o)
        for s in range(n):
            for g in opt.param_groups:
                g["lr"] = lr_at(s, o)

    def new():
        opt = make_optimizer(model, o)
        sched = make_scheduler(opt, o)
        opt._opt_called = True  # as after the first optimizer.step(): no "step order" warning in this timing
        for s in range(n):
            advance_scheduler(sched, s)
    return best(old) / n * 1e6, best(new) / n * 1e6, "us per training step"


def train_step_context(n=10):
    """What the schedule's microseconds are measured against: one training step of the smallest recipe."""
    from blockdiff.train.loop import Trainer
    from blockdiff.train.recipes import RECIPES, model_config
    from blockdiff.train.tasks import CopyTask
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(CopyTask(vocab_size=32, canvas_length=8),
                     TrainOptions(out_dir=d, max_steps=10 ** 6, batch_size=8, save_every=0, log_every=10 ** 6),
                     config=model_config(32, 8, **RECIPES["tiny"]), log=lambda s: None)
        tr.train_step()

        def f():
            for _ in range(n):
                tr.train_step()
        t = best(f) / n * 1e6
    return t, t, "us per training step (tiny recipe, batch 8, copy task): the scale of the row above"


# ---------------------------------------------------------------------------------------------- 3. detokenizing
class OldTextStream:
    def __init__(self, tok):
        self.tok, self.ids, self.sent = tok, [], 0

    def push(self, ids, final=False):
        self.ids.extend(ids)
        text = self.tok.decode(self.ids)
        end = len(text) if final else len(text.rstrip("\ufffd"))
        delta = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta


def detokenize(n_tokens, canvas=256):
    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(d, 32768)
        tok = Tokenizer.from_dir(d)
    text = "Streaming text: naïve café, 中文字符, emoji 🙂👍🏽 and JSON {\"a\": [1, 2.5, true]}. " * 4000
    ids = tok.encode(text, add_special_tokens=False)[:n_tokens]

    def run(make):
        def f():
            s = make()
            out = [s.push(ids[i:i + canvas]) for i in range(0, len(ids), canvas)]
            out.append(s.push([], final=True))
            assert "".join(out) == tok.decode(ids)
        return f
    return (best(run(lambda: OldTextStream(tok))) * 1e3, best(run(lambda: TextStream(tok))) * 1e3,
            f"ms per {len(ids)}-token output in canvases of {canvas}")


# ---------------------------------------------------------------------------------------------- 4. RSS probe
def old_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_probe(n=20_000):
    def run(fn):
        def f():
            for _ in range(n):
                fn()
        return f
    return best(run(old_rss)) / n * 1e6, best(run(_rss_bytes)) / n * 1e6, "us per probe"


def main():
    torch.set_num_threads(1)
    print("| replaced | before (hand-written) | after (library) | unit |\n|---|---:|---:|---|")
    for name, fn in [("latency histogram -> prometheus_client.Histogram", histogram),
                     ("LR schedule -> torch.optim.lr_scheduler", lr_schedule),
                     ("(context) one training step", train_step_context),
                     ("streaming detokenize -> tokenizers DecodeStream", lambda: detokenize(1024)),
                     ("streaming detokenize -> tokenizers DecodeStream", lambda: detokenize(4096)),
                     ("streaming detokenize -> tokenizers DecodeStream", lambda: detokenize(32768)),
                     ("/proc/self/statm -> psutil.Process().memory_info()", rss_probe)]:
        before, after, unit = fn()
        print(f"| {name} | {before:.2f} | {after:.2f} | {unit} |", flush=True)


if __name__ == "__main__":
    main()
