"""The benchmark harness: every system on the same checkpoint, prompt and fixed step count, in one process.

One warm-up run per system, then ``repeats`` rounds that each time every system once (interleaved, so a
noisy neighbour on a shared machine slows every system alike); the medians are reported. Ratios are only
meaningful within one run of the harness.

Peak memory is the largest growth over the run's starting point: of the process's resident set on CPU
(sampled every few milliseconds from /proc), of ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from .systems import RunResult, ar_system, blockdiff_system, load_oracle, oracle_system

DEFAULT, REFERENCE, ORACLE = "blockdiff-default", "blockdiff-reference", "oracle"


@dataclass
class BenchOptions:
    steps: int = 16
    max_new_tokens: int | None = None  # None: one canvas
    batch: int = 1  # rows of the diffusion systems
    ar_batches: tuple[int, ...] = (1, 8)
    prompt_len: int = 64
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    oracle: bool = True
    dtype: str = "auto"
    device: str = "cpu"
    systems: list[str] | None = None  # None: all of them
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("steps", "batch", "prompt_len", "repeats"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max-new-tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if any(b < 1 for b in self.ar_batches):
            raise ValueError(f"AR batch sizes must be positive, got {self.ar_batches}")


# ---------------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes``: the largest growth during the block."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _rss_bytes()
        self._max = self._base
        self._stop = threading.Event()
        if self._base is None:  # no /proc: fall back to the (monotonic) max RSS of the process
            self._base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return self
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            r = _rss_bytes()
            if r is not None and r > self._max:
                self._max = r

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return False
        if self._base is None:
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._base_maxrss
            self.peak_bytes = max(0, kb) * (1 if platform.system() == "Darwin" else 1024)
            return False
        self._stop.set()
        self._thread.join()
        r = _rss_bytes()
        self.peak_bytes = max(self._max, r or 0) - self._base
        return False


# ---------------------------------------------------------------------------------------------- harness
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lo = min(256, vocab_size // 2)  # keep clear of the special ids at the bottom of the vocabulary
    return [2] + torch.randint(lo, vocab_size, (length - 1,), generator=g).tolist()


def _cut_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids


def run_benchmark(path: str, options: BenchOptions | None = None, log=print) -> dict:
    """Time every system on the checkpoint at ``path``; returns the report (see ``docs/benchmarks.md``)."""
    from .. import __version__
    from ..engine.llm import LLM
    from ..loader import resolve_dtype

    o = options or BenchOptions()
    o.validate()
    device = torch.device(o.device)
    dtype = resolve_dtype(o.dtype, device)
    llm = LLM(path, dtype=dtype, device=o.device)
    model = llm.model
    C = model.canvas_length
    n = o.max_new_tokens or C
    prompt = make_prompt(model.vocab_size, o.prompt_len, o.seed)
    prompts = [prompt] * o.batch

    systems = {
        DEFAULT: (o.batch, blockdiff_system(llm, prompts, n, o.steps, "default")),
        REFERENCE: (o.batch, blockdiff_system(llm, prompts, n, o.steps, "reference")),
    }
    wanted = set(o.systems) if o.systems else None
    if o.oracle and (wanted is None or ORACLE in wanted):
        log("loading the transformers oracle ...")
        ref = load_oracle(llm.model_path, dtype, o.device)
        systems[ORACLE] = (o.batch, oracle_system(ref, prompts, n, o.steps, C))
    for b in o.ar_batches:
        systems[f"ar-b{b}"] = (b, ar_system(model, prompt, b, n))
    if wanted is not None:
        unknown = wanted - set(systems) - {ORACLE}
        if unknown:
            raise ValueError(f"unknown systems {sorted(unknown)}; choose from {sorted(set(systems) | {ORACLE})}")
        systems = {k: v for k, v in systems.items() if k in wanted}

    for name, (_, fn) in systems.items():
        for _ in range(o.warmup):
            log(f"warm-up: {name}")
            fn(o.seed)
    runs: dict[str, list[tuple[float, int, RunResult]]] = {k: [] for k in systems}
    for r in range(o.repeats):
        for name, (_, fn) in systems.items():
            with PeakMemory(device) as mem:
                _sync(device)
                t0 = time.perf_counter()
                res = fn(o.seed)
                _sync(device)
                secs = time.perf_counter() - t0
            runs[name].append((secs, mem.peak_bytes, res))
            log(f"round {r + 1}/{o.repeats}: {name:<20} {secs:8.3f} s  {res.tokens / secs:9.1f} tok/s")

    results = {}
    for name, rs in runs.items():
        batch = systems[name][0]
        secs = statistics.median(x[0] for x in rs)
        res = rs[0][2]
        results[name] = {
            "batch": batch,
            "tokens": res.tokens,
            "forwards_per_row": res.forwards,
            "seconds": round(secs, 4),
            "tok_per_s": round(res.tokens / secs, 2),
            "ms_per_step": round(1000 * secs / res.forwards, 3),
            "tokens_per_forward": round(res.tokens / batch / res.forwards, 3),
            "peak_mem_mb": round(max(x[1] for x in rs) / 2 ** 20, 1),
            "runs_s": [round(x[0], 4) for x in rs],
        }

    def ratio(a, b):
        if a in results and b in results and results[b]["tok_per_s"] > 0:
            return round(results[a]["tok_per_s"] / results[b]["tok_per_s"], 3)
        return None

    ratios = {k: v for k, v in {
        "default_vs_oracle": ratio(DEFAULT, ORACLE),
        "reference_vs_oracle": ratio(REFERENCE, ORACLE),
        "default_vs_reference": ratio(DEFAULT, REFERENCE),
        **{f"default_vs_ar_b{b}": ratio(DEFAULT, f"ar-b{b}") for b in o.ar_batches},
    }.items() if v is not None}
    parity = None
    if ORACLE in runs and REFERENCE in runs and o.batch == 1:
        # Same seed, same checkpoint: the reference mode must reproduce the oracle token for token.
        eos = set(llm.defaults.eos_token_ids)
        parity = _cut_at_eos(runs[REFERENCE][0][2].first_row, eos) == _cut_at_eos(runs[ORACLE][0][2].first_row, eos)

    t = model.text
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "checkpoint": o.extra.get("checkpoint_name", path),
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "hidden_size": t.hidden_size,
                  "layers": t.num_hidden_layers, "layer_types": list(t.layer_types),
                  "attention_heads": t.num_attention_heads, "experts": t.num_experts, "top_k": t.top_k_experts,
                  "moe_intermediate_size": t.moe_intermediate_size, "intermediate_size": t.intermediate_size,
                  "vocab_size": t.vocab_size, "canvas_length": C},
        "settings": {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "batch": o.batch,
                     "max_new_tokens": n, "steps": o.steps, "stability_threshold": o.steps + 1,
                     "prompt_len": o.prompt_len, "repeats": o.repeats, "warmup": o.warmup, "seed": o.seed,
                     "threads": torch.get_num_threads()},
        "environment": {"blockdiff": __version__, "torch": torch.__version__, "transformers": tf_version,
                        "python": platform.python_version(), "machine": platform.machine(),
                        "cpu_count": os.cpu_count(),
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "results": results,
        "ratios": ratios,
        "reference_matches_oracle": parity,
        "options": {k: v for k, v in asdict(o).items() if k != "extra"},
    }


def format_table(report: dict) -> str:
    res = report["results"]
    base = res.get(ORACLE, {}).get("tok_per_s")
    head = f"{'system':<20} {'batch':>5} {'tok/s':>9} {'ms/step':>9} {'tok/fwd':>8} {'peak MB':>8} {'x oracle':>9}"
    lines = [head, "-" * len(head)]
    for name, r in res.items():
        x = f"{r['tok_per_s'] / base:.2f}" if base else "-"
        lines.append(f"{name:<20} {r['batch']:>5} {r['tok_per_s']:>9.1f} {r['ms_per_step']:>9.1f} "
                     f"{r['tokens_per_forward']:>8.2f} {r['peak_mem_mb']:>8.1f} {x:>9}")
    s = report["settings"]
    lines.append(f"({s['device']}, {s['dtype']}, {s['threads']} threads, {s['max_new_tokens']} new tokens, "
                 f"{s['steps']} steps per canvas, prompt {s['prompt_len']}, median of {s['repeats']})")
    if report.get("reference_matches_oracle") is not None:
        lines.append(f"reference mode == oracle tokens: {report['reference_matches_oracle']}")
    return "\n".join(lines)
