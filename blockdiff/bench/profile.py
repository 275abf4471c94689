"""Where a denoising step's time goes: blockdiff (default mode) next to the transformers oracle.

``blockdiff bench MODEL --profile`` runs one generation of each (after a warm-up) with wall-clock timers
wrapped around the parts of the step (model forward by layer kind, LM head, sampler, self-conditioning), then
one more under ``torch.profiler`` for the op-level table. Figures are milliseconds per denoising step.
The timers patch methods for the duration of the profile only; nothing is left changed afterwards.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager

import torch


class RegionTimer:
    """Wall time of wrapped callables, exclusive: a region counts only when called directly from one of its
    ``parents`` (the innermost counted region), so nested regions never count twice."""

    STEP, FORWARD = "step (total)", "model forward"

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.stack: list[str] = []
        self._patches: list[tuple[object, str, object, bool]] = []

    def patch(self, owner, attr: str, label: str, parents: tuple[str, ...] | None = ("step (total)",)) -> None:
        """``parents=None``: a root region (the step itself)."""
        had_own = attr in getattr(owner, "__dict__", {})
        original = getattr(owner, attr)
        timer = self
        self.totals.setdefault(label, 0.0)  # reports list regions in patch order

        @functools.wraps(original)  # keeps the signature: transformers inspects processors' __call__
        def wrapped(*args, **kwargs):
            top = timer.stack[-1] if timer.stack else None
            if not (parents is None or top in parents):
                return original(*args, **kwargs)
            timer.stack.append(label)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timer.totals[label] += time.perf_counter() - t0
                timer.stack.pop()
        setattr(owner, attr, wrapped)
        self._patches.append((owner, attr, original, had_own))

    def patch_modules(self, root: torch.nn.Module, kinds: dict[type, str], parents=("model forward",)) -> None:
        for m in root.modules():
            for cls, label in kinds.items():
                if type(m) is cls:
                    self.patch(m, "forward", label, parents)

    def restore(self) -> None:
        for owner, attr, original, had_own in reversed(self._patches):
            if had_own or not isinstance(owner, torch.nn.Module):
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)  # back to the class's method
        self._patches.clear()


@contextmanager
def timed(timer: RegionTimer):
    try:
        yield timer
    finally:
        timer.restore()


FWD = (RegionTimer.FORWARD,)


def _blockdiff_timer(llm) -> RegionTimer:
    from ..engine import engine as engine_mod
    from ..model import layers

    t = RegionTimer()
    model = llm.model
    t.patch(llm.engine, "_denoise", RegionTimer.STEP, parents=None)
    t.patch(model, "denoise", RegionTimer.FORWARD)
    t.patch_modules(model, {layers.SelfConditioning: "self-conditioning block", layers.Attention: "attention",
                            layers.DenseMLP: "dense MLP", layers.Router: "router", layers.Experts: "experts",
                            layers.RMSNorm: "norms (layer level)"})
    t.patch(model, "lm_head", "LM head + soft-cap", FWD)
    t.patch(engine_mod, "default_step", "sampler: default_step")
    t.patch(engine_mod, "reference_step", "sampler: reference_step")
    t.patch(model, "soft_embeddings", "self-conditioning input: probs @ E")
    return t


def _oracle_timer(ref) -> RegionTimer:
    from transformers.models.diffusion_gemma import generation_diffusion_gemma as gen
    from transformers.models.diffusion_gemma import modeling_diffusion_gemma as mdl

    t = RegionTimer()
    t.patch(ref, "_denoising_step", RegionTimer.STEP, parents=None)
    t.patch(ref, "forward", RegionTimer.FORWARD)
    t.patch_modules(ref.model.decoder, {
        mdl.DiffusionGemmaSelfConditioning: "self-conditioning block", mdl.DiffusionGemmaDecoderTextAttention:
        "attention", mdl.DiffusionGemmaText4MLP: "dense MLP", mdl.DiffusionGemmaTextRouter: "router",
        mdl.DiffusionGemmaTextExperts: "experts", mdl.DiffusionGemmaRMSNorm: "norms (layer level)"})
    t.patch(ref.lm_head, "forward", "LM head", FWD)
    t.patch(gen.LinearTemperatureScheduleLogitsProcessor, "__call__", "temperature (logits processor)")
    t.patch(torch, "softmax", "torch.softmax [C, V]")
    t.patch(torch, "multinomial", "torch.multinomial (every position, full vocab)")
    t.patch(torch, "argmax", "torch.argmax")
    t.patch(gen.EntropyBoundSampler, "accept_canvas", "accept_canvas (Categorical entropy, sort)")
    t.patch(gen.EntropyBoundSampler, "renoise_canvas", "renoise_canvas (randint, where)")
    t.patch(gen.StableAndConfidentStoppingCriteria, "__call__", "stopping criteria (Categorical entropy again)")
    return t


def _breakdown(name: str, timer: RegionTimer, steps: int) -> list[str]:
    tot = timer.totals
    total = tot.get(RegionTimer.STEP, 0.0)

    def row(label, secs, indent=""):
        share = 100 * secs / total if total else 0.0
        return f"  {indent + label:<50} {1000 * secs / steps:8.2f} ms  {share:5.1f}%"

    lines = [f"{name}: {1000 * total / steps:.2f} ms per denoising step ({steps} steps), exclusive times:"]
    top = [k for k in tot if k not in (RegionTimer.STEP,) and not _in_forward(k)]
    inner = [k for k in tot if _in_forward(k)]
    for label in top:
        if tot[label] == 0 and label != RegionTimer.FORWARD:
            continue
        lines.append(row(label, tot[label]))
        if label == RegionTimer.FORWARD:
            for k in inner:
                lines.append(row(k, tot[k], "  "))
            lines.append(row("other (embedding, RoPE, masks, residuals, ...)",
                             tot[label] - sum(tot[k] for k in inner), "  "))
    lines.append(row("other (step bookkeeping)", total - sum(tot[k] for k in top)))
    return lines


_FORWARD_PARTS = {"self-conditioning block", "attention", "dense MLP", "router", "experts", "norms (layer level)",
                  "LM head + soft-cap", "LM head"}


def _in_forward(label: str) -> bool:
    return label in _FORWARD_PARTS


def _op_table(fn, steps: int, rows: int = 15) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:rows]
    out = [f"  {'op':<40} {'ms/step':>8} {'calls/step':>10}"]
    for e in events:
        out.append(f"  {e.key[:40]:<40} {e.self_cpu_time_total / 1000 / steps:8.2f} {e.count / steps:10.1f}")
    return out


def profile_report(path: str, options, log=print) -> str:
    from ..engine.llm import LLM
    from ..placement import resolve_dtype
    from .harness import bench_prompt
    from .systems import blockdiff_system, load_oracle, oracle_system

    o = options
    dtype = resolve_dtype(o.dtype, torch.device(o.device))
    llm = LLM(path, dtype=dtype, device=o.device, quantization=o.quantization)
    C = llm.model.canvas_length
    n = o.max_new_tokens or C
    prompts = [bench_prompt(llm, o.prompt_len, o.seed)] * o.batch
    wanted = o.systems or ["blockdiff-default", "oracle"]
    unknown = set(wanted) - {"blockdiff-default", "blockdiff-reference", "oracle"}
    if unknown:
        raise ValueError(f"--profile covers blockdiff-default, blockdiff-reference and oracle, not {sorted(unknown)}")
    systems = {}
    for name in ("blockdiff-default", "blockdiff-reference"):
        if name in wanted:
            rng = name.split("-")[1]
            systems[name] = (blockdiff_system(llm, prompts, n, o.steps, rng), lambda: _blockdiff_timer(llm))
    if o.oracle and "oracle" in wanted:
        ref = load_oracle(llm.model_path, dtype, o.device)
        systems["oracle"] = (oracle_system(ref, prompts, n, o.steps, C), lambda: _oracle_timer(ref))
    lines = []
    for name, (fn, make_timer) in systems.items():
        log(f"profiling {name} ...")
        fn(o.seed)  # warm-up
        with timed(make_timer()) as timer:
            res = fn(o.seed)
        steps = res.forwards
        lines += _breakdown(name, timer, steps)
        lines.append(f"  top ops by self CPU time (torch.profiler, one more run; whole run / {steps} steps):")
        lines += _op_table(lambda: fn(o.seed), steps)
        lines.append("")
    return "\n".join(lines)
