"""The benchmark harness: every system on the same checkpoint, prompt and fixed step count, in one process.

One warm-up run per system, then ``repeats`` rounds that each time every system once (interleaved, so a
noisy neighbour on a shared machine slows every system alike); the minimum and the median are reported.
Ratios are only meaningful within one run of the harness.

Besides wall time, each run's process CPU time (user + system) is recorded: on a machine shared with other jobs
it moves far less than wall time (with one torch thread, it is the wall time an idle machine would show).

Timed runs are never watched by a memory poller (on one pinned core a 1 ms polling thread turned a 403 ms step
into 723 ms). Peak memory is the largest growth over the run's starting point of the bytes allocated: on CUDA
``torch.cuda.max_memory_allocated`` (allocator statistics, read in the timed run); on CPU, malloc's in-use bytes
(glibc ``mallinfo2``, sampled every millisecond, so a lower bound; the resident set where glibc is missing) in a
separate, untimed run of each system after the timed rounds. The model weights are not included.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import platform
import resource
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

import psutil
import torch

from .systems import RunResult, ar_system, blockdiff_system, load_oracle, oracle_system

DEFAULT, REFERENCE, ORACLE, FAST = "blockdiff-default", "blockdiff-reference", "oracle", "blockdiff-fast"


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
    quantization: str | None = None  # blockdiff's weights (the oracle always runs full precision)
    memory_run: bool = True  # CPU: one extra untimed run per system for peak memory
    tick_memory: bool = False  # measure one default-mode denoising tick at `batch` (logits vs temporaries)
    tensor_parallel_size: int = 1  # blockdiff split over this many processes (blockdiff.distributed)
    expert_parallel: bool = False
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
class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def _malloc_in_use() -> int | None:
    """Bytes handed out by malloc right now (heap + mmapped chunks): the CPU analogue of
    torch.cuda.memory_allocated, blind to what malloc keeps cached (which makes RSS deltas unreliable)."""
    if _MALLINFO2 is None:
        return None
    m = _MALLINFO2()
    return m.uordblks + m.hblkhd


_PROCESS = psutil.Process()


def _rss_bytes() -> int | None:
    """Resident set size (psutil: /proc on Linux, the OS's own call elsewhere)."""
    try:
        return _PROCESS.memory_info().rss
    except psutil.Error:
        return None


def memory_metric(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated growth (in the timed runs)"
    if _MALLINFO2 is not None:
        return "malloc in-use bytes growth (glibc mallinfo2, sampled every 1 ms, in a separate untimed run)"
    return "resident set size growth (sampled every 1 ms, in a separate untimed run)"


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes``: the largest growth during the block."""

    def __init__(self, device: torch.device, interval_s: float = 0.001):
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._probe = _malloc_in_use if _MALLINFO2 is not None else _rss_bytes

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._probe()
        self._max = self._base
        self._stop = threading.Event()
        if self._base is None:  # neither glibc nor /proc: the (monotonic) max RSS of the process
            self._base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return self
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            r = self._probe()
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
        self.peak_bytes = max(self._max, self._probe() or 0) - self._base
        return False


# ---------------------------------------------------------------------------------------------- harness
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lo = min(256, vocab_size // 2)  # keep clear of the special ids at the bottom of the vocabulary
    return [2] + torch.randint(lo, vocab_size, (length - 1,), generator=g).tolist()


def bench_prompt(llm, length: int, seed: int) -> list[int]:
    """The benchmark's prompt: ``length`` random ids, unless the checkpoint reads only one kind of prompt (the
    Sudoku model: a puzzle, ``Tokenizer.example_prompt``)."""
    tok = llm.tokenizer
    return (tok.example_prompt(length, seed) if tok is not None else None) \
        or make_prompt(llm.model.vocab_size, length, seed)


def _cpu_seconds() -> float:
    """User + system CPU time of this process: steadier than wall time on a machine shared with other jobs."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cut_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i + 1]
    return ids


def run_benchmark(path: str, options: BenchOptions | None = None, log=print) -> dict:
    """Time every system on the checkpoint at ``path``; returns the report (see ``docs/benchmarks.md``)."""
    from ..engine.llm import LLM
    from ..placement import resolve_dtype

    o = options or BenchOptions()
    o.validate()
    device = torch.device(o.device)
    dtype = resolve_dtype(o.dtype, device)
    unreadable = oracle_cannot_read(path) if o.oracle and o.systems and ORACLE in o.systems else None
    if unreadable:  # before the load (minutes for the real model); a hub id is checked once it is fetched
        raise ValueError(f"--systems oracle: {unreadable}")
    llm = LLM(path, dtype=dtype, device=o.device, quantization=o.quantization,
              tensor_parallel_size=o.tensor_parallel_size, expert_parallel=o.expert_parallel)
    try:
        return _run_systems(llm, path, o, device, dtype, log)
    finally:
        llm.close()


def oracle_cannot_read(path: str | None) -> str | None:
    """Why the transformers reference cannot load ``path`` (a .gguf file, a checkpoint quantized by blockdiff),
    or None."""
    from ..checks import read_json
    from ..hub import is_gguf

    if not path:
        return None
    if is_gguf(path, None):
        return f"the transformers reference cannot read the GGUF file {path}"
    cfg = os.path.join(path, "config.json")
    qc = read_json(cfg).get("quantization_config") if os.path.isfile(cfg) else None
    if isinstance(qc, dict) and qc.get("quant_method") == "blockdiff":
        return (f"the transformers reference cannot read {path}, quantized by blockdiff ({qc.get('method')}); "
                "bench the full-precision checkpoint with --quantization to compare against it")
    return None


def _run_systems(llm, path: str, o: BenchOptions, device, dtype, log) -> dict:
    from .. import __version__

    model = llm.model
    C = model.canvas_length
    n = o.max_new_tokens or C
    prompt = bench_prompt(llm, o.prompt_len, o.seed)
    prompts = [prompt] * o.batch

    systems = {
        DEFAULT: (o.batch, blockdiff_system(llm, prompts, n, o.steps, "default")),
        REFERENCE: (o.batch, blockdiff_system(llm, prompts, n, o.steps, "reference")),
        FAST: (o.batch, blockdiff_system(llm, prompts, n, o.steps, "default", fast=True)),
    }
    wanted = set(o.systems) if o.systems else None
    unreadable = oracle_cannot_read(llm.model_path) if o.oracle else None
    if unreadable and wanted is not None and ORACLE in wanted:
        raise ValueError(f"--systems oracle: {unreadable}")
    if unreadable and wanted is None:
        # transformers loaded a blockdiff-quantized checkpoint with its weights missing (random), and the report
        # then blamed fp32 rounding for 0% agreement
        log(f"no oracle: {unreadable}")
    elif o.oracle and (wanted is None or ORACLE in wanted):
        log("loading the transformers oracle ...")
        ref = load_oracle(llm.model_path, dtype, o.device)
        systems[ORACLE] = (o.batch, oracle_system(ref, prompts, n, o.steps, C))
    for b in (o.ar_batches if o.tensor_parallel_size == 1 else ()):  # the AR baseline runs one process only
        systems[f"ar-b{b}"] = (b, ar_system(model, prompt, b, n))
    if wanted is not None:
        check_systems(wanted, o.ar_batches if o.tensor_parallel_size == 1 else ())
        systems = {k: v for k, v in systems.items() if k in wanted}

    skipped, called = {}, set()

    def refused(name: str, e: ValueError) -> bool:
        """A system whose requests this checkpoint refuses (the Sudoku model and rng="reference") is left out
        with its reason, unless it was asked for by name (then the refusal is the answer). Only its first call
        can be a refusal: an error after a request went through once is a failure, and raises."""
        if wanted is not None or name in called:
            return False
        log(f"skipping {name}: {e}")
        skipped[name] = str(e)
        del systems[name]
        return True

    for name, (_, fn) in list(systems.items()):
        for _ in range(o.warmup):
            log(f"warm-up: {name}")
            try:
                fn(o.seed)
            except ValueError as e:
                if not refused(name, e):
                    raise
                break
            called.add(name)
    runs: dict[str, list[tuple[float, int, RunResult, float]]] = {k: [] for k in systems}
    for r in range(o.repeats):
        for name, (_, fn) in list(systems.items()):
            # No poller beside a timed run; on CUDA the allocator's own peak statistics cost nothing.
            mem = PeakMemory(device) if device.type == "cuda" else None
            if mem is not None:
                mem.__enter__()
            _sync(device)
            c0, t0 = _cpu_seconds(), time.perf_counter()
            try:
                res = fn(o.seed)
            except ValueError as e:  # without a warm-up the first timed run is the first request
                if mem is not None:
                    mem.__exit__(None, None, None)
                if not refused(name, e):
                    raise
                del runs[name]
                continue
            called.add(name)
            _sync(device)
            secs, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            if mem is not None:
                mem.__exit__(None, None, None)
            runs[name].append((secs, mem.peak_bytes if mem is not None else 0, res, cpu))
            log(f"round {r + 1}/{o.repeats}: {name:<20} {secs:8.3f} s  {res.tokens / secs:9.1f} tok/s  "
                f"(cpu {cpu:.3f} s)")
    if device.type != "cuda" and o.memory_run:
        for name, (_, fn) in systems.items():  # peak memory from a separate, untimed run with the poller
            with PeakMemory(device) as mem:
                fn(o.seed)
            runs[name] = [(x[0], mem.peak_bytes, x[2], x[3]) for x in runs[name]]
            log(f"memory run: {name:<20} peak {mem.peak_bytes / 2 ** 20:.1f} MB")
    tick = tick_memory(llm, o) if o.tick_memory else None

    results = {}
    for name, rs in runs.items():
        batch = systems[name][0]
        secs = statistics.median(x[0] for x in rs)
        cpu = statistics.median(x[3] for x in rs)
        best = min(x[0] for x in rs)
        res = rs[0][2]
        results[name] = {
            "batch": batch,
            "tokens": res.tokens,
            "forwards_per_row": res.forwards,
            "seconds": round(secs, 4),
            "tok_per_s": round(res.tokens / secs, 2),
            "cpu_seconds": round(cpu, 4),
            "tok_per_cpu_s": round(res.tokens / cpu, 2) if cpu > 0 else None,
            "ms_per_step": round(1000 * secs / res.forwards, 3),
            "min_seconds": round(best, 4),
            "min_ms_per_step": round(1000 * best / res.forwards, 3),
            "max_tok_per_s": round(res.tokens / best, 2),
            "tokens_per_forward": round(res.tokens / batch / res.forwards, 3),
            "peak_mem_mb": round(max(x[1] for x in rs) / 2 ** 20, 1),
            "runs_s": [round(x[0], 4) for x in rs],
            "runs_cpu_s": [round(x[3], 4) for x in rs],
        }

    def ratio(a, b, key):
        if a in results and b in results and results[a][key] and results[b][key]:
            return round(results[a][key] / results[b][key], 3)
        return None

    pairs = {"default_vs_oracle": (DEFAULT, ORACLE), "reference_vs_oracle": (REFERENCE, ORACLE),
             "default_vs_reference": (DEFAULT, REFERENCE), "fast_vs_default": (FAST, DEFAULT),
             **{f"default_vs_ar_b{b}": (DEFAULT, f"ar-b{b}") for b in o.ar_batches}}
    ratios = {k: v for k, v in {name: ratio(a, b, "tok_per_s") for name, (a, b) in pairs.items()}.items()
              if v is not None}
    cpu_ratios = {k: v for k, v in {name: ratio(a, b, "tok_per_cpu_s") for name, (a, b) in pairs.items()}.items()
                  if v is not None}
    parity = agreement = None
    if ORACLE in runs and REFERENCE in runs and o.batch == 1:
        # Same seed, same checkpoint: the reference mode reproduces the oracle token for token, up to fp32
        # rounding: on near-uniform distributions (random weights) a 1e-6 logit difference can change which
        # position has the lowest entropy, and the canvases part ways from there.
        eos = set(llm.defaults.eos_token_ids)
        a = _cut_at_eos(runs[REFERENCE][0][2].first_row, eos)
        b = _cut_at_eos(runs[ORACLE][0][2].first_row, eos)
        parity = a == b
        agreement = round(sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1), 4)

    fast_agreement = None
    if FAST in runs and DEFAULT in runs:  # same seeds: how many tokens fast mode shares with exact (approximate)
        a, b = runs[FAST][0][2].first_row, runs[DEFAULT][0][2].first_row
        fast_agreement = round(sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1), 4)

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
                     "prompt_len": len(prompt), "repeats": o.repeats, "warmup": o.warmup, "seed": o.seed,
                     "threads": torch.get_num_threads(), "peak_memory": memory_metric(device),
                     "quantization": o.quantization, "tensor_parallel_size": o.tensor_parallel_size,
                     "expert_parallel": o.expert_parallel},
        "environment": {"blockdiff": __version__, "torch": torch.__version__, "transformers": tf_version,
                        "python": platform.python_version(), "machine": platform.machine(),
                        "cpu_count": os.cpu_count(),
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "results": results,
        "ratios": ratios,
        "cpu_time_ratios": cpu_ratios,
        "tick_memory": tick,
        "reference_matches_oracle": parity,
        "reference_oracle_token_agreement": agreement,
        "fast_default_token_agreement": fast_agreement,
        "skipped": skipped,  # system -> why this checkpoint refused its requests
        "options": {k: v for k, v in asdict(o).items() if k != "extra"},
    }


def format_table(report: dict) -> str:
    res = report["results"]
    base = res.get(ORACLE, {}).get("tok_per_s")
    cbase = res.get(ORACLE, {}).get("tok_per_cpu_s")
    head = (f"{'system':<20} {'batch':>5} {'tok/s':>8} {'x oracle':>8} {'tok/cpu-s':>9} {'x oracle':>8} "
            f"{'ms/step':>8} {'min ms':>8} {'tok/fwd':>7} {'peak MB':>8}")
    lines = [head, "-" * len(head)]
    for name, r in res.items():
        x = f"{r['tok_per_s'] / base:.2f}" if base else "-"
        cx = f"{r['tok_per_cpu_s'] / cbase:.2f}" if cbase and r["tok_per_cpu_s"] else "-"
        lines.append(f"{name:<20} {r['batch']:>5} {r['tok_per_s']:>8.1f} {x:>8} {r['tok_per_cpu_s'] or 0:>9.1f} "
                     f"{cx:>8} {r['ms_per_step']:>8.1f} {r['min_ms_per_step']:>8.1f} {r['tokens_per_forward']:>7.2f} "
                     f"{r['peak_mem_mb']:>8.1f}")
    s = report["settings"]
    lines.append(f"({s['device']}, {s['dtype']}, {s['threads']} threads, {s['max_new_tokens']} new tokens, "
                 f"{s['steps']} steps per canvas, prompt {s['prompt_len']}, median and min of {s['repeats']})")
    t = report.get("tick_memory")
    if t:
        lines.append(f"one denoising tick at batch {t['batch']}: logits {t['logits_mb']:.1f} MB, peak growth "
                     f"{t['tick_peak_mb']:.1f} MB, temporaries beyond the logits {t['temporaries_mb']:.1f} MB "
                     f"({t['temporaries_over_logits']:.1%} of the logits; {t['metric']})")
    if report.get("fast_default_token_agreement") is not None:
        r = report.get("ratios", {}).get("fast_vs_default")
        lines.append(f"fast mode (approximate): {r if r is not None else '-'}x the default mode's tok/s, "
                     f"{report['fast_default_token_agreement']:.1%} of its tokens equal to the default mode's "
                     "(same seeds)")
    for name, why in (report.get("skipped") or {}).items():
        lines.append(f"{name}: skipped, the checkpoint refused its requests ({why})")
    if report.get("reference_matches_oracle") is not None:
        lines.append(f"reference mode == oracle tokens: {report['reference_matches_oracle']} "
                     f"(agreement {report['reference_oracle_token_agreement']:.1%})")
        if not report["reference_matches_oracle"]:
            lines.append(reference_mismatch_note(report))
    return "\n".join(lines)


def reference_mismatch_note(report: dict) -> str:
    """One line on why the reference mode and the oracle parted ways, instead of a bare False."""
    random_weights = str(report.get("checkpoint", "")).startswith("random:")
    if random_weights:
        return ("  expected on random weights: their distributions are near-uniform, so a 1e-6 fp32 rounding "
                "difference changes which position has the lowest entropy and the canvases part ways from there; "
                "on a trained checkpoint the two match (tests/test_generation.py proves it on seeded runs)")
    return ("  fp32 rounding can flip a near-tie between positions of equal entropy; on a trained checkpoint a "
            "mismatch early in the output is unexpected: rerun with --dtype float32 --device cpu and report it")


def tick_memory(llm, o: BenchOptions, log=None) -> dict:
    """Peak memory of one default-mode denoising tick at ``o.batch`` requests (in an untimed run): the
    [B, C, V] logits buffer and everything else the tick allocates beyond it (the model's activations, the
    sampler's temporaries, the self-conditioning product)."""
    from ..sampling.params import SamplingParams

    device = llm.model.device
    engine = llm.engine
    model = llm.model
    C, V = model.canvas_length, model.vocab_size
    prompt = bench_prompt(llm, o.prompt_len, o.seed)
    params = SamplingParams(max_new_tokens=C, max_denoising_steps=4, stability_threshold=5, ignore_eos=True)
    states = [engine.add_request(list(prompt), dataclasses.replace(params, seed=o.seed + i)) for i in range(o.batch)]
    try:
        engine.step()  # prefill + the first step (no self-conditioning yet)
        engine.step()  # every request holds a canvas and a self-conditioning signal
        with PeakMemory(device) as mem:
            engine.step()
    finally:
        for s in states:
            engine.abort(s.request_id)
    logits = o.batch * C * V * 4
    extra = max(0, mem.peak_bytes - logits)
    return {"batch": o.batch, "canvas_length": C, "vocab_size": V, "logits_mb": round(logits / 2 ** 20, 1),
            "tick_peak_mb": round(mem.peak_bytes / 2 ** 20, 1), "temporaries_mb": round(extra / 2 ** 20, 1),
            "temporaries_over_logits": round(extra / logits, 4), "metric": memory_metric(device)}


def check_systems(names, ar_batches) -> None:
    """A ``ValueError`` naming the systems in ``names`` that a run with these AR batch sizes does not have."""
    known = {DEFAULT, FAST, REFERENCE, ORACLE} | {f"ar-b{b}" for b in ar_batches}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"unknown systems {unknown}; choose from {sorted(known)}")
