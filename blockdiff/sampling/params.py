"""``SamplingParams``: what a request asks of the denoising loop, validated at the edge.

Fields left as ``None`` take the checkpoint's ``generation_config.json`` values (else the reference's
defaults) when the engine resolves them with ``resolved(defaults)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import GenerationDefaults

RNG_MODES = ("default", "reference")
MAX_LOGPROBS = 20  # top alternatives per output token


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    max_new_tokens: int | None = None
    max_denoising_steps: int | None = None
    entropy_bound: float | None = None
    t_min: float | None = None
    t_max: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    seed: int | None = None
    # "reference": draw random numbers exactly as the transformers reference does (full-vocabulary sample at
    # every position), so a seeded run equals `torch.manual_seed(seed); model.generate(...)`.
    # "default": the same distribution with far less work: the whole batch in one pass, with counter-based random
    # numbers keyed by (seed, canvas, step, position), so a request's draws do not depend on its batch.
    rng: str = "default"
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # Infilling / templates: token ids for the first canvas, -1 where the model is free. Fixed positions are
    # never renoised and are always part of the committed canvas.
    canvas_template: list[int] | None = None
    # Infilling through text (blockdiff/structured/infill.py): a template with holes written <|hole|> or
    # <|hole:N|>, or a suffix the output must lead into (fill in the middle). Either one fills the first canvas
    # and ends the request.
    text_template: str | None = None
    suffix: str | None = None
    # Constrained decoding: canvas tokens are drawn only from these ids.
    allowed_token_ids: list[int] | None = None
    # Structured output: {"json": schema} | {"json_object": True} | {"regex": ...} | {"choice": [...]} |
    # {"grammar": ...}, optionally "allow_whitespace" (see blockdiff/structured and docs/structured-output.md).
    structured_outputs: dict | None = None
    # Truncation of the tempered distribution before a token is drawn at an accepted position (None: off):
    # keep the top_k most likely tokens, the tokens with p >= min_p * max p, then the smallest set of the
    # remaining (renormalised) mass >= top_p. Entropy, acceptance and the committed argmax use the whole distribution.
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    # Log-probabilities of the output tokens (see docs/serving.md): None = off; N >= 0 also returns the N most
    # likely tokens of each position's distribution.
    logprobs: int | None = None
    stream_drafts: bool = False
    # Fast mode (approximate, engine/fast.py): reuse the keys/values of settled canvas positions across steps and
    # recompute only the undecided ones. None: the engine's default (``blockdiff serve --fast``), else exact.
    fast: bool | None = None
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self, vocab_size: int | None = None, canvas_length: int | None = None) -> None:
        def pos_int(name, v, lo=1, hi=None):
            if v is None:
                return
            if not _is_int(v) or v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise ValueError(f"{name} must be an integer {rng}, got {v!r}")

        pos_int("max_new_tokens", self.max_new_tokens, 1, 1_000_000)
        pos_int("max_denoising_steps", self.max_denoising_steps, 1, 10_000)
        pos_int("stability_threshold", self.stability_threshold, 0, 10_000)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2 ** 63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        for name in ("entropy_bound", "confidence_threshold"):
            v = getattr(self, name)
            if v is not None and (not _is_num(v) or not v > 0 or v != v or v == float("inf")):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("t_min", "t_max"):
            v = getattr(self, name)
            if v is not None and (not _is_num(v) or not 0 <= v < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.t_min is not None and self.t_max is not None and self.t_max <= self.t_min:
            raise ValueError(f"t_max must be greater than t_min (got t_max={self.t_max}, t_min={self.t_min})")
        if self.rng not in RNG_MODES:
            raise ValueError(f"rng must be one of {RNG_MODES}, got {self.rng!r}")
        if self.stop is not None:
            if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
                raise ValueError("stop must be a non-empty string or a list of non-empty strings")
            if len(self.stop) > 16:
                raise ValueError(f"at most 16 stop strings, got {len(self.stop)}")
        for name in ("stop_token_ids", "allowed_token_ids"):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in v):
                raise ValueError(f"{name} must be a list of non-negative token ids")
            if vocab_size is not None and any(t >= vocab_size for t in v):
                raise ValueError(f"{name} holds ids outside the vocabulary [0, {vocab_size})")
        if self.allowed_token_ids is not None and len(self.allowed_token_ids) == 0:
            raise ValueError("allowed_token_ids must not be empty")
        if self.canvas_template is not None:
            t = self.canvas_template
            if not isinstance(t, (list, tuple)) or not all(_is_int(x) and x >= -1 for x in t):
                raise ValueError("canvas_template must be a list of token ids, -1 for free positions")
            if canvas_length is not None and len(t) > canvas_length:
                raise ValueError(f"canvas_template has {len(t)} entries but the canvas holds {canvas_length}")
            if vocab_size is not None and any(x >= vocab_size for x in t):
                raise ValueError(f"canvas_template holds ids outside the vocabulary [0, {vocab_size})")
        for name in ("text_template", "suffix"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{name} must be a non-empty string")
        if self.text_template is not None and self.suffix is not None:
            raise ValueError("give text_template or suffix, not both")
        if (self.text_template is not None or self.suffix is not None) and self.canvas_template is not None:
            raise ValueError(f"{'text_template' if self.text_template is not None else 'suffix'} builds the "
                             "canvas_template itself; do not give both")
        if self.structured_outputs is not None:
            self._validate_structured()
        if self.top_p is not None and (not _is_num(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and (not _is_num(self.min_p) or not 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be a number in [0, 1], got {self.min_p!r}")
        pos_int("top_k", self.top_k, 1, 2 ** 31 - 1)
        pos_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.fast is not None and not isinstance(self.fast, bool):
            raise ValueError(f"fast must be true or false, got {self.fast!r}")
        if self.rng == "reference" and self.truncates:
            raise ValueError("rng='reference' reproduces the reference sampler, which has no top_p, top_k or "
                             "min_p; use rng='default' with them")
        if self.structured_outputs is not None or self.text_template is not None or self.suffix is not None:
            what = "structured_outputs" if self.structured_outputs is not None else \
                "text_template" if self.text_template is not None else "suffix"
            if self.truncates:
                raise ValueError(f"top_p, top_k and min_p cannot be combined with {what}: its canvas is drawn under "
                                 "its own constraint")
            if self.logprobs is not None:
                raise ValueError(f"logprobs cannot be combined with {what}: its output is not the argmax canvas")
        if self.rng == "reference" and (self.canvas_template is not None or self.allowed_token_ids is not None
                                        or self.text_template is not None or self.suffix is not None):
            raise ValueError("rng='reference' reproduces the reference sampler, which has no canvas_template "
                             "or allowed_token_ids; use rng='default' with them")

    def _validate_structured(self) -> None:
        from ..structured.spec import compile_spec, normalize

        self.structured_outputs = normalize(self.structured_outputs)
        compile_spec(self.structured_outputs)  # ValueError naming the problem in the schema / pattern / grammar
        for name in ("canvas_template", "allowed_token_ids", "text_template", "suffix"):
            if getattr(self, name) is not None:
                raise ValueError(f"structured_outputs cannot be combined with {name}")
        if self.rng == "reference":
            raise ValueError("structured_outputs needs rng='default' (the reference sampler has no constraints)")
        if self.ignore_eos:
            raise ValueError("structured_outputs cannot be combined with ignore_eos: the output ends where the "
                             "grammar is complete")

    @property
    def truncates(self) -> bool:
        """Whether top_p / top_k / min_p cut anything (top_p = 1 and min_p = 0 keep every token)."""
        return ((self.top_p is not None and self.top_p < 1) or self.top_k is not None
                or (self.min_p is not None and self.min_p > 0))

    def resolved(self, d: GenerationDefaults) -> "SamplingParams":
        """A copy with every unset field filled from the checkpoint's generation defaults."""
        out = dataclasses.replace(self)
        for name in ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max",
                     "stability_threshold", "confidence_threshold"):
            if getattr(out, name) is None:
                setattr(out, name, getattr(d, name))
        if out.t_max <= out.t_min:
            raise ValueError(f"t_max must be greater than t_min (got t_max={out.t_max}, t_min={out.t_min})")
        return out
