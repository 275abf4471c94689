"""``blockdiff bench --structured``: what structured output costs per denoising step, and end to end.

Two measurements on one checkpoint (it needs a tokenizer.json; ``--random-config mid-v262k`` writes one with the
released model's 262,144 entries), batch 1, one prompt:

1. **per step**: one canvas, exactly ``--steps`` steps (early stopping off), unconstrained (``ignore_eos``) against
   a JSON Schema whose value is one long string, so every step's mask is computed inside a JSON string, where
   nearly the whole vocabulary is allowed (the expensive case). Reports ms per step, the overhead, and the host
   time spent computing masks and settling the canvas.
2. **end to end**: the checkpoint's sampler settings with early stopping on (steps capped at ``--steps``),
   unconstrained against a bounded record schema: steps per canvas, tokens, tok/s and finish reasons.

Wall and process-CPU times are both reported; on a shared machine the CPU figures are the steadier ones.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

LONG_STRING = {"type": "object", "properties": {"text": {"type": "string", "minLength": 4000, "maxLength": 8000}},
               "required": ["text"], "additionalProperties": False}
RECORD = {"type": "object", "additionalProperties": False, "required": ["id", "name", "tags", "score"],
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                         "name": {"type": "string", "maxLength": 16},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
                         "score": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100}, {"type": "null"}]}}}


def _run(llm, prompt: list[int], params) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, finished state). CPU time is the steadier figure on a shared box."""
    state = llm.engine.make_state(prompt, params)
    t0, c0 = time.perf_counter(), time.process_time()
    llm._run([state], [None], False)
    return time.perf_counter() - t0, time.process_time() - c0, state


# A tool whose call spends every step inside one long string argument: the expensive mask, as for JSON above.
LONG_ARGUMENT_TOOL = {"type": "function", "function": {"name": "write_file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string", "maxLength": 32},
                                     "text": {"type": "string", "minLength": 4000, "maxLength": 8000}},
    "required": ["path", "text"], "additionalProperties": False}}}


def tool_systems(llm, fixed: dict) -> dict:
    """Per-step systems for tool calls (the tokenizer must hold Gemma 4's markers): tool_choice "required" (the
    call grammar, inside a long string argument) and "auto" (free text that may open a constrained call)."""
    from ..sampling.params import SamplingParams
    from ..tools.render import ToolPlan

    out = {}
    for name, choice in (("tool call (required, in a string)", "required"), ("tool choice auto (free text)", "auto")):
        plan = ToolPlan.from_request([LONG_ARGUMENT_TOOL], choice)
        p = plan.constrain(SamplingParams(**fixed), llm.tokenizer)
        if p.structured_outputs is None:
            raise ValueError("--tools: the tokenizer lacks Gemma 4's tool markers (<|tool_call>, <|\"|>, ...)")
        out[name] = p
    return out


def run_structured_benchmark(path: str, steps: int = 16, repeats: int = 3, prompt_len: int = 64, seed: int = 0,
                             dtype: str = "auto", device: str = "cpu", log=print, tools: bool = False,
                             json_rows: bool = True) -> dict:
    """``tools``: also time tool calls (``tool_systems``); ``json_rows=False``: only those (no JSON rows)."""
    from ..engine.llm import LLM
    from ..sampling.params import SamplingParams
    from .harness import make_prompt

    llm = LLM(path, dtype=dtype, device=device)
    if llm.tokenizer is None:
        raise ValueError(f"{path}: structured output needs a tokenizer.json (use --random-config mid-v262k)")
    V, C = llm.model.vocab_size, llm.model.canvas_length
    prompt = make_prompt(V, prompt_len, seed)
    fixed = dict(max_denoising_steps=steps, stability_threshold=steps + 1, max_new_tokens=C, seed=seed)
    systems = {"unconstrained": SamplingParams(ignore_eos=True, **fixed)}
    if json_rows:
        systems["json (in a string)"] = SamplingParams(structured_outputs={"json": LONG_STRING}, **fixed)
    if tools:
        systems.update(tool_systems(llm, fixed))
    t0 = time.perf_counter()
    llm.engine.make_state(prompt, list(systems.values())[1])  # builds the 262k-entry grammar tokenizer once
    setup_s = time.perf_counter() - t0
    log(f"grammar tokenizer for {V} entries built in {setup_s:.2f} s")
    per_step: dict[str, dict] = {}
    for name, p in systems.items():  # warm-up: one step each (a step of a 262k model is seconds on a CPU)
        _run(llm, prompt, dataclasses.replace(p, max_denoising_steps=1, stability_threshold=2))
    rounds: dict[str, list] = {n: [] for n in systems}
    for r in range(repeats):  # interleaved, so a noisy neighbour slows both alike
        for name, p in systems.items():
            dt, cpu, st = _run(llm, prompt, p)
            rounds[name].append((dt, cpu, st))
            log(f"round {r + 1}/{repeats} {name}: {dt:.2f} s wall, {cpu:.2f} s CPU, {st.metrics.denoise_steps} steps")
    for name, rs in rounds.items():
        n = rs[0][2].metrics.denoise_steps
        row = {"ms_per_step": round(statistics.median(1000 * dt / n for dt, _, _ in rs), 2),
               "cpu_ms_per_step": round(statistics.median(1000 * cpu / n for _, cpu, _ in rs), 2),
               "steps": n, "rounds_wall_s": [round(dt, 3) for dt, _, _ in rs],
               "rounds_cpu_s": [round(cpu, 3) for _, cpu, _ in rs]}
        c = rs[-1][2].constraint
        if c is not None:
            row.update(masks=c.masks, mask_ms_per_step=round(1000 * c.mask_seconds / n, 3),
                       settle_ms_per_canvas=round(1000 * c.settle_seconds / max(1, rs[-1][2].metrics.canvases), 2))
        per_step[name] = row
    base, base_cpu = per_step["unconstrained"]["ms_per_step"], per_step["unconstrained"]["cpu_ms_per_step"]
    for row in per_step.values():
        row["overhead"] = round(row["ms_per_step"] / base - 1, 4)
        row["cpu_overhead"] = round(row["cpu_ms_per_step"] / base_cpu - 1, 4)

    # End to end: the checkpoint's sampler settings with early stopping on, steps capped at --steps.
    e2e = {}
    for name, p in {} if not json_rows else {"unconstrained": SamplingParams(seed=seed, max_new_tokens=2 * C, max_denoising_steps=steps),
                    "json (record schema)": SamplingParams(seed=seed, max_new_tokens=2 * C, max_denoising_steps=steps,
                                                          structured_outputs={"json": RECORD})}.items():
        dt, cpu, st = _run(llm, prompt, p)
        m = st.metrics
        e2e[name] = {"seconds": round(dt, 2), "tokens": len(st.output_ids), "canvases": m.canvases,
                     "steps_per_canvas": round(m.denoise_steps / max(1, m.canvases), 2),
                     "tok_per_s": round(len(st.output_ids) / dt, 2),
                     "tok_per_cpu_s": round(len(st.output_ids) / cpu, 2),
                     "finish_reason": st.finish_reason,
                     "ms_per_step": round(1000 * dt / max(1, m.denoise_steps), 2)}
        log(f"end to end {name}: {e2e[name]}")
    return {"checkpoint": path, "vocab_size": V, "canvas_length": C, "steps": steps, "repeats": repeats,
            "threads": torch.get_num_threads(), "grammar_tokenizer_seconds": round(setup_s, 2),
            "per_step": per_step, "end_to_end": e2e}


def format_structured(report: dict) -> str:
    lines = [f"vocab {report['vocab_size']}, canvas {report['canvas_length']}, {report['steps']} steps, "
             f"{report['threads']} thread(s); grammar tokenizer built in {report['grammar_tokenizer_seconds']} s",
             "", "| per step | ms/step | overhead | CPU ms/step | CPU overhead | masks | mask ms/step | "
             "settle ms/canvas |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["per_step"].items():
        lines.append(f"| {name} | {r['ms_per_step']} | {100 * r['overhead']:+.1f}% | {r['cpu_ms_per_step']} | "
                     f"{100 * r['cpu_overhead']:+.1f}% | {r.get('masks', '-')} | {r.get('mask_ms_per_step', '-')} | "
                     f"{r.get('settle_ms_per_canvas', '-')} |")
    lines += ["", "| end to end | tokens | canvases | steps/canvas | tok/s | tok/cpu-s | ms/step | finish |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in report["end_to_end"].items():
        lines.append(f"| {name} | {r['tokens']} | {r['canvases']} | {r['steps_per_canvas']} | {r['tok_per_s']} | "
                     f"{r['tok_per_cpu_s']} | {r['ms_per_step']} | {r['finish_reason']} |")
    return "\n".join(lines)
