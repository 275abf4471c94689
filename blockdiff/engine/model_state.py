"""``ModelState``: one request's life as an explicit state machine.

    WAITING --prefill (encode prompt)--> DENOISING (step k of N) --converged or k = N--> canvas done
    canvas done --EOS / budget / stop string--> FINISHED
    canvas done --otherwise--> COMMITTING --encode the canvas--> DENOISING (next canvas)

It owns the request's KV cache row, canvas, self-conditioning signal, stability counter, its seed (and, for
``rng="reference"``, its own ``torch.Generator``) and counters, and emits events: ``draft`` after every step,
``block`` after every finished canvas, ``done`` at the end. It holds no model: the engine runs the forwards
and the batched sampler, reads back once per tick what the host needs (``StepRow``), and calls
``apply_step`` with it.

Random numbers: with ``rng="default"`` every draw is a counter-based hash of (seed, canvas index, step,
position), so a request's draws are the same whatever batch or row it runs in; with ``rng="reference"`` they
come from the request's generator in the reference's order. An unseeded request gets a random seed.
"""

from __future__ import annotations

import enum
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import LayerSpec
from ..kv_cache import SequenceCache, to_device
from ..sampling.params import SamplingParams
from ..sampling.penalties import Penalties
from ..sampling.sampler import initial_canvas


class Phase(enum.Enum):
    WAITING = "waiting"
    DENOISING = "denoising"
    COMMITTING = "committing"
    FINISHED = "finished"


@dataclass
class Event:
    kind: str  # "draft" | "block" | "done"
    request_id: str
    request_index: int
    token_ids: list[int]  # draft: the argmax canvas; block: the committed tokens; done: all output tokens
    step: int = 0
    accepted: list[bool] | None = None
    entropy: list[float] | None = None  # draft: per position, of the tempered distribution (nats; 0 = certain)
    finish_reason: str | None = None
    # block/done with params.logprobs set: per token (logprob, [(token id, logprob), ...] the most likely first)
    logprobs: list | None = None
    error: str | None = None  # done with finish_reason "error": what failed (one line, no internal state)
    error_by_input: bool = False  # that failure was the request's own input's (its constraint): a 400, not a 500


@dataclass
class Metrics:
    denoise_steps: int = 0  # decoder forwards spent on this request
    canvases: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    output_tokens: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    first_block_time: float | None = None
    finish_time: float | None = None

    @property
    def tokens_per_forward(self) -> float:
        return self.output_tokens / self.denoise_steps if self.denoise_steps else 0.0

    @property
    def seconds(self) -> float:
        end = self.finish_time if self.finish_time is not None else time.perf_counter()
        return end - self.arrival_time

    @property
    def time_to_first_block(self) -> float | None:
        return None if self.first_block_time is None else self.first_block_time - self.arrival_time

    def as_dict(self) -> dict:
        return {"denoise_steps": self.denoise_steps, "canvases": self.canvases,
                "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "output_tokens": self.output_tokens,
                "tokens_per_forward": round(self.tokens_per_forward, 3), "seconds": round(self.seconds, 4),
                "time_to_first_block": None if self.time_to_first_block is None
                else round(self.time_to_first_block, 4)}


class InvalidTransition(RuntimeError):
    pass


@dataclass
class StepRow:
    """One request's share of a denoising tick: device tensors it keeps, host values read back in one batch."""

    canvas: torch.Tensor  # [C] next canvas (device)
    argmax: torch.Tensor  # [C] argmax canvas (device)
    argmax_ids: list[int]  # the same, on the host
    accepted: list[bool] | None  # read back only when someone listens to draft events
    same_as_previous: bool  # argmax canvas unchanged from the previous step
    confident: bool  # mean entropy below confidence_threshold
    entropy: list[float] | None = None  # per position (nats), read back only for draft listeners


class ModelState:
    def __init__(self, request_id: str, request_index: int, prompt_ids: list[int], params: SamplingParams,
                 specs: list[LayerSpec], canvas_length: int, vocab_size: int, eos_token_ids: list[int],
                 on_event: Callable[[Event], None] | None = None, stop_checker=None, device=None,
                 cache: SequenceCache | None = None, constraint=None, infill=None, answer_length: int | None = None):
        self.request_id = request_id
        self.request_index = request_index
        self.prompt_ids = list(prompt_ids)
        self.params = params  # resolved: no None diffusion fields
        self.canvas_length = canvas_length
        self.vocab_size = vocab_size
        # ignore_eos drops the model's EOS ids; explicit stop_token_ids always stop.
        self.eos = (set() if params.ignore_eos else set(eos_token_ids)) | set(params.stop_token_ids or [])
        self.on_event = on_event
        self.stop_checker = stop_checker  # fn(output_ids) -> cut index or None (stop strings)
        # structured output (blockdiff.structured.CanvasConstraint): decides the canvas tokens and where the
        # output ends; stop strings never cut a constrained output (that would break its guarantee).
        self.constraint = constraint
        self.infill = infill  # structured.infill.InfillPlan: the first canvas is the whole output
        # a task whose answer has a fixed length (the Sudoku model's 81 digits): reaching it is a "stop"
        self.answer_length = answer_length
        self.phase = Phase.WAITING
        # The request's pages in the model's KV pool (a private pool when built without a model).
        self.cache: SequenceCache | None = cache if cache is not None else SequenceCache(specs)
        self.device = torch.device(device or "cpu")
        self.seed = params.seed if params.seed is not None else secrets.randbits(62)
        self.generator = None
        if params.rng == "reference":
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(self.seed)
        self.canvas: torch.Tensor | None = None  # [C]
        self.argmax: torch.Tensor | None = None  # [C]
        self.argmax_ids: list[int] | None = None  # the argmax canvas on the host (read back by the engine)
        self.sc_embeds: torch.Tensor | None = None  # [C, H] self-conditioning signal for the next step
        self.fast = None  # engine.fast.FastState in fast mode (the canvas's K/V store and frozen positions)
        # The reference's stop rule (argmax canvas equal to each of the last `stability_threshold` ones) as a
        # count of consecutive unchanged steps: stable iff stable_run >= stability_threshold.
        self.stable_run = 0
        self.canvas_index = 0  # counter-based rng key: which canvas of this request is denoising
        self.step = 0  # denoising step within the current canvas
        self.output_ids: list[int] = []
        # params.logprobs set: one (logprob, top alternatives) per output token, from the distribution of the
        # canvas's last denoising step (``step_logprobs``: the latest step's, set by the engine).
        self.output_logprobs: list | None = [] if params.logprobs is not None else None
        self.step_logprobs = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.error_by_input = False  # set by failures.fail_request: the request's own input failed it
        self.metrics = Metrics(prompt_tokens=len(prompt_ids))
        self.images = None  # ImageInputs for the prompt (the engine passes them to the prefill encode, then drops them)
        # Infill template (first canvas only) and constrained vocabulary.
        self.fixed = self.template = None
        if params.canvas_template is not None:
            t = list(params.canvas_template) + [-1] * (canvas_length - len(params.canvas_template))
            tt = torch.tensor(t, device=self.device)
            if bool((tt >= 0).any()):
                self.fixed, self.template = tt >= 0, tt.clamp(min=0)
        # presence / frequency / repetition penalties and logit_bias (None: neutral, the sampler skips them)
        self.penalty = (Penalties(params, prompt_ids, vocab_size, self.device)
                        if params.penalty_field is not None else None)
        self.disallowed = None  # bool [V]: True for tokens this request may never draw
        if params.allowed_token_ids is not None:
            self.disallowed = torch.ones(vocab_size, dtype=torch.bool, device=self.device)
            self.disallowed[torch.tensor(params.allowed_token_ids, device=self.device)] = False

    # ------------------------------------------------------------------ properties
    @property
    def max_canvases(self) -> int:
        return math.ceil(self.params.max_new_tokens / self.canvas_length)

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    def _emit(self, ev: Event) -> None:
        if self.on_event is not None:
            self.on_event(ev)

    def _require(self, *phases: Phase) -> None:
        if self.phase not in phases:
            raise InvalidTransition(f"request {self.request_id}: {self.phase.value} cannot do this "
                                    f"(needs {', '.join(p.value for p in phases)})")

    # ------------------------------------------------------------------ transitions
    def tokens_to_encode(self) -> list[int]:
        """What the next encode pass reads: the prompt (WAITING) or the finished canvas (COMMITTING)."""
        self._require(Phase.WAITING, Phase.COMMITTING)
        return self.prompt_ids if self.phase is Phase.WAITING else list(self.argmax_ids)

    def encoded(self) -> None:
        """The engine appended tokens_to_encode() to this request's cache: start a new canvas."""
        self._require(Phase.WAITING, Phase.COMMITTING)
        if self.phase is Phase.COMMITTING:
            self.fixed = self.template = None  # the template shapes the first canvas only
        C = self.canvas_length
        self.canvas_index = self.metrics.canvases
        if self.generator is not None:  # the reference's draw order: one randint per canvas start
            self.canvas = torch.randint(0, self.vocab_size, (1, C), generator=self.generator,
                                        device=self.device)[0]
        else:
            key = to_device(torch.tensor([[self.seed, self.canvas_index]], dtype=torch.int64), self.device)
            self.canvas = initial_canvas(key[:, 0], key[:, 1], C, self.vocab_size)[0]
        if self.fixed is not None:
            self.canvas = torch.where(self.fixed, self.template, self.canvas)
        self.argmax = self.canvas
        self.argmax_ids = None
        if self.constraint is not None:
            self.constraint.start_canvas()
        self.sc_embeds = None
        self.stable_run = 0
        self.step = 0
        self.phase = Phase.DENOISING

    def sampler_row(self) -> dict:
        """This request's per-row sampler parameters for the batched step (see ``RowParams.build``)."""
        p = self.params
        return {"step": self.step, "max_steps": p.max_denoising_steps, "t_min": p.t_min, "t_max": p.t_max,
                "entropy_bound": p.entropy_bound, "confidence": p.confidence_threshold, "seed": self.seed,
                "canvas_index": self.canvas_index, "fixed": self.fixed, "template": self.template,
                "disallowed": self.disallowed, "top_k": p.top_k,
                "top_p": p.top_p if p.top_p is not None and p.top_p < 1 else None, "min_p": p.min_p or None,
                "greedy": p.greedy, "penalty": self.penalty}

    def apply_step(self, row: StepRow, sc_embeds: torch.Tensor) -> bool:
        """Record one denoising step; returns True when the canvas is finished."""
        self._require(Phase.DENOISING)
        p = self.params
        self.metrics.denoise_steps += 1
        self.canvas, self.argmax, self.argmax_ids, self.sc_embeds = row.canvas, row.argmax, row.argmax_ids, sc_embeds
        # The first step of a canvas has no previous argmax to compare with (the reference's empty history).
        self.stable_run = self.stable_run + 1 if (row.same_as_previous and self.step > 0) else 0
        self.step += 1
        stable = self.stable_run >= p.stability_threshold
        done = (stable and row.confident) or self.step >= p.max_denoising_steps
        if self.on_event is not None:
            self._emit(Event("draft", self.request_id, self.request_index, list(row.argmax_ids), step=self.step,
                             accepted=None if row.accepted is None else list(row.accepted), entropy=row.entropy))
        if self.constraint is not None:  # a settled constrained canvas is done
            done = done or self.constraint.settled
        if done:
            self._finish_canvas()
        return done

    def _finish_canvas(self) -> None:
        entries = self.step_logprobs  # the last step's, read back with its tick
        self.step_logprobs = None
        self.metrics.canvases += 1
        if self.metrics.first_block_time is None:
            self.metrics.first_block_time = time.perf_counter()
        budget = self.params.max_new_tokens - len(self.output_ids)
        reason = None
        if self.constraint is not None:  # every position grammar-valid; "stop" only where the grammar is complete
            tokens = self.constraint.complete(self.argmax_ids)
            if len(tokens) == self.canvas_length:  # what the commit encodes
                self.argmax_ids = list(tokens)
                self.argmax = torch.tensor(tokens, device=self.device)
            reason = "stop" if self.constraint.ended else None
        elif self.infill is not None:  # text template / suffix: the filled canvas ends the request
            canvas, budget = list(self.argmax_ids), None
            tokens, reason = self.infill.output(canvas, self.eos), self.infill.finish_reason(canvas, self.eos)
        else:
            tokens = list(self.argmax_ids)
            for i, t in enumerate(tokens):
                if t in self.eos:
                    tokens, reason = tokens[:i + 1], "stop"
                    break
        if reason is None and self.answer_length is not None \
                and len(self.output_ids) + len(tokens) >= self.answer_length:
            reason = "stop"  # the answer is whole (a budget that cuts it short still says "length" below)
        if budget is not None and len(tokens) >= budget:
            if reason is None or len(tokens) > budget:
                reason = "length"
            tokens = tokens[:budget]
        self.output_ids.extend(tokens)
        if self.penalty is not None:
            self.penalty.commit(tokens)
        # On the last canvas (budget, EOS) too: a stop string wins, except over a constrained output.
        if self.stop_checker is not None and self.constraint is None:
            cut = self.stop_checker(self.output_ids)
            if cut is not None:
                tokens = tokens[:max(0, len(tokens) - (len(self.output_ids) - cut))]
                self.output_ids = self.output_ids[:cut]
                reason = "stop"
        block_logprobs = None
        if entries is not None:
            self.output_logprobs.extend(entries[:len(tokens)])
            del self.output_logprobs[len(self.output_ids):]
            block_logprobs = self.output_logprobs[len(self.output_ids) - len(tokens):]
        self._emit(Event("block", self.request_id, self.request_index, tokens, step=self.step,
                         logprobs=block_logprobs))
        if reason is not None or self.metrics.canvases >= self.max_canvases:
            self.finish(reason or "length")
        else:
            self.phase = Phase.COMMITTING

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.phase is Phase.FINISHED:
            return
        self.phase = Phase.FINISHED
        self.finish_reason = reason
        self.error = error
        self.metrics.output_tokens = len(self.output_ids)
        self.metrics.finish_time = time.perf_counter()
        self.canvas = self.argmax = self.argmax_ids = self.sc_embeds = self.step_logprobs = self.fast = None
        if self.cache is not None:
            self.cache.free()  # its pages go back to the pool now, not when the caller drops the state
        self.cache = None
        self._emit(Event("done", self.request_id, self.request_index, list(self.output_ids),
                         finish_reason=reason, logprobs=self.output_logprobs, error=error,
                         error_by_input=self.error_by_input))
