"""``SamplingParams``: what a request asks of the denoising loop, validated at the edge.

Fields left as ``None`` take the checkpoint's ``generation_config.json`` values (else the reference's
defaults) when the engine resolves them with ``resolved(defaults)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import GenerationDefaults
from .fields import (MAX_LOGPROBS, MIN_TEMPERATURE, ParamError, ParamsFields,  # noqa: F401  (re-exported)
                     check_fields)

RNG_MODES = ("default", "reference")
FIELD_NAMES = tuple(ParamsFields.model_fields)  # the fields whose types and bounds ParamsFields checks


class UnknownFieldError(ParamError, TypeError):
    """A keyword that is no field of ``SamplingParams``."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _plain(v):
    """A NumPy / torch scalar as the Python number it holds (``np.int64(3)`` -> 3), a 1-D array or tensor (or a
    tuple) as a list of them, so ``seed=np.int64(3)`` or ``allowed_token_ids=np.arange(10)`` are checked as the
    numbers and lists they are (they were refused as "must be an integer, got int64"); anything else unchanged."""
    if type(v) in (str, bytes, bool, int, float, dict, type(None)):  # (np.float64 is a float: made one below)
        return v
    ndim = getattr(v, "ndim", None)
    if ndim == 0 and hasattr(v, "item"):
        return v.item()
    if ndim == 1 and hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


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
    # vLLM's name for max_new_tokens (give either; folded into max_new_tokens by validate()).
    max_tokens: int | None = None
    # OpenAI's knobs on the canvas sampler (docs/serving.md "Sampling"): temperature 0 = greedy, else a factor on
    # t_max and t_min; penalties and logit_bias change the logits before tempering (None / neutral values: off).
    temperature: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict | None = None  # token id (int or its decimal string) -> bias in [-100, 100]
    # Prefix-cache blocks are shared only between requests with the same salt (None: the unsalted cache).
    cache_salt: str | None = None

    def __new__(cls, *args, **kwargs):
        # The dataclass's __init__ would raise a bare TypeError; a misspelt field is a ParamError naming it, like every
        # other bad field (and still a TypeError, Python's convention for an unexpected keyword).
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UnknownFieldError(f"SamplingParams has no field {unknown[0]!r} (fields: "
                                    f"{', '.join(f.name for f in dataclasses.fields(cls))})", unknown[0])
        return super().__new__(cls)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self, vocab_size: int | None = None, canvas_length: int | None = None) -> None:
        """Types and bounds from ``ParamsFields`` (the same declarations the HTTP API documents), then the rules
        between fields. Every error is a ``ParamError`` whose ``.param`` names the field at fault."""
        # (tuples, NumPy / torch scalars and 1-D arrays are fine from Python: the declarations say "integer" and
        # "array", which JSON spells as an int and a list)
        values = {name: _plain(getattr(self, name)) for name in FIELD_NAMES if name != "structured_outputs"}
        values["structured_outputs"] = self.structured_outputs
        if isinstance(self.logit_bias, dict):  # the Python API may key it by int
            items = [(_plain(k), _plain(v)) for k, v in self.logit_bias.items()]
            values["logit_bias"] = {str(k) if _is_int(k) else k: v for k, v in items}
        checked = check_fields(ParamsFields, values)
        for name in FIELD_NAMES:
            if name not in ("structured_outputs", "logit_bias"):
                setattr(self, name, getattr(checked, name))
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if checked.logit_bias is not None:
            self.logit_bias = {int(k): float(v) for k, v in checked.logit_bias.items()}
        if self.top_k in (-1, 0):  # vLLM's spelling of "no cut"
            self.top_k = None
        if self.max_tokens is not None:
            if self.max_new_tokens is not None and self.max_new_tokens != self.max_tokens:
                raise ParamError(f"max_tokens ({self.max_tokens}) and max_new_tokens ({self.max_new_tokens}) "
                                 "disagree: give one of them", "max_tokens")
            self.max_new_tokens, self.max_tokens = self.max_tokens, None
        if self.t_min is not None and self.t_max is not None and self.t_max <= self.t_min:
            raise ParamError(f"t_max must be greater than t_min (got t_max={self.t_max}, t_min={self.t_min})",
                             "t_max")
        for name in ("stop_token_ids", "allowed_token_ids", "canvas_template"):
            v = getattr(self, name)
            if v is not None and vocab_size is not None and any(t >= vocab_size for t in v):
                raise ParamError(f"{name} holds ids outside the vocabulary [0, {vocab_size})", name)
        if self.logit_bias and vocab_size is not None and any(t >= vocab_size for t in self.logit_bias):
            raise ParamError(f"logit_bias holds ids outside the vocabulary [0, {vocab_size})", "logit_bias")
        if self.canvas_template is not None and canvas_length is not None and len(self.canvas_template) > canvas_length:
            raise ParamError(f"canvas_template has {len(self.canvas_template)} entries but the canvas holds "
                             f"{canvas_length}", "canvas_template")
        if self.text_template is not None and self.suffix is not None:
            raise ParamError("suffix cannot be combined with text_template: give one of them, not both", "suffix")
        infill = "text_template" if self.text_template is not None else "suffix" if self.suffix is not None else None
        if infill is not None and self.canvas_template is not None:
            raise ParamError(f"{infill} builds the canvas_template itself; do not give both", infill)
        if self.structured_outputs is not None:
            self._validate_structured()
        cut = self.truncating_field
        if self.rng == "reference":
            why = "rng='reference' reproduces the reference sampler, which has no "
            if cut is not None:
                raise ParamError(f"{cut} needs rng='default': {why}top_p, top_k or min_p", cut)
            if self.canvas_template is not None or self.allowed_token_ids is not None or infill is not None:
                raise ParamError(f"{why}canvas_template or allowed_token_ids; use rng='default' with them", "rng")
            knob = self.penalty_field or ("temperature" if self.temperature not in (None, 1) else None)
            if knob is not None:
                raise ParamError(f"{knob} needs rng='default': {why}temperature factor, penalties or "
                                 "logit_bias", knob)
        what = "structured_outputs" if self.structured_outputs is not None else infill
        if what is not None:
            # (a cut applies with both: structured outputs after their grammar mask, infilling at the holes, which
            # the default sampler draws like any canvas position)
            if self.logprobs is not None:
                raise ParamError(f"logprobs cannot be combined with {what}: its output is not the argmax canvas",
                                 "logprobs")
        if self.structured_outputs is not None and self.penalty_field is not None:
            raise ParamError(f"{self.penalty_field} cannot be combined with structured_outputs: its canvas is drawn "
                             "under its own constraint", self.penalty_field)

    def _validate_structured(self) -> None:
        from ..structured.spec import compile_spec, normalize

        try:
            self.structured_outputs = normalize(self.structured_outputs)
            compile_spec(self.structured_outputs)  # ValueError naming the problem in the schema / pattern / grammar
        except ParamError:
            raise
        except ValueError as e:
            raise ParamError(str(e), "structured_outputs") from None
        for name in ("canvas_template", "allowed_token_ids", "text_template", "suffix"):
            if getattr(self, name) is not None:
                raise ParamError(f"structured_outputs cannot be combined with {name}", "structured_outputs")
        if self.rng == "reference":
            raise ParamError("structured_outputs needs rng='default' (the reference sampler has no constraints)",
                             "rng")
        if self.ignore_eos:
            raise ParamError("structured_outputs cannot be combined with ignore_eos: the output ends where the "
                             "grammar is complete", "structured_outputs")

    @property
    def truncates(self) -> bool:
        """Whether top_p / top_k / min_p cut anything (top_p = 1 and min_p = 0 keep every token)."""
        return self.truncating_field is not None

    @property
    def truncating_field(self) -> str | None:
        """The first of top_p / top_k / min_p that cuts anything, or None."""
        if self.top_p is not None and self.top_p < 1:
            return "top_p"
        if self.top_k is not None and self.top_k not in (-1, 0):
            return "top_k"
        if self.min_p is not None and self.min_p > 0:
            return "min_p"
        return None

    @property
    def penalty_field(self) -> str | None:
        """The first penalty / logit_bias field set to a value that changes anything, or None."""
        for name, neutral in (("presence_penalty", 0), ("frequency_penalty", 0), ("repetition_penalty", 1)):
            if getattr(self, name) not in (None, neutral):
                return name
        return "logit_bias" if self.logit_bias else None

    @property
    def greedy(self) -> bool:
        """temperature 0: accepted positions take their most likely token."""
        return self.temperature == 0

    def resolved(self, d: GenerationDefaults) -> "SamplingParams":
        """A copy with every unset field filled from the checkpoint's generation defaults, and the
        ``temperature`` factor applied to t_max and t_min."""
        out = dataclasses.replace(self)
        given = {name for name in ("t_min", "t_max") if getattr(self, name) is not None}
        for name in ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max",
                     "stability_threshold", "confidence_threshold"):
            if getattr(out, name) is None:
                setattr(out, name, getattr(d, name))
        if out.t_max <= out.t_min:
            raise ParamError(f"t_max must be greater than t_min (got t_max={out.t_max}, t_min={out.t_min}; the "
                             "checkpoint's defaults fill the one not given)", "t_min" if given == {"t_min"} else "t_max")
        f = out.temperature
        if f is not None and f not in (0, 1):
            out.t_min, out.t_max = out.t_min * f, out.t_max * f
            if out.t_max < MIN_TEMPERATURE:
                raise ParamError(f"temperature {f} makes the first denoising step's temperature {out.t_max:.3g} "
                                 f"(t_max x temperature), below the floor of {MIN_TEMPERATURE}", "temperature")
            out.temperature = None  # applied: the copy's t_max / t_min are the schedule
        if out.greedy and out.seed is None:  # greedy is deterministic: renoising draws from a fixed seed
            out.seed = 0
        return out
