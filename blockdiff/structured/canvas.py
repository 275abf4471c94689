"""Grammar constraints enforced on a denoising canvas (see docs/structured-output.md for the design).

Per request, a ``CanvasConstraint`` holds an llguidance matcher advanced through every token already fixed for
the output, and the *frozen prefix* of the current canvas: positions ``[0, F)`` whose tokens, after the committed
output, form a valid prefix of the grammar. One denoising step (``CanvasConstraint.step``):

1. the first undecided position ``F`` is masked to the tokens the grammar allows there (one mask per step) and
   is always accepted, so it is sampled from its masked distribution (cut by the request's top_k / top_p /
   min_p like every accepted position's, as in the default sampler; temperature 0 takes its argmax);
2. every other position runs the ordinary entropy-bound accept / renoise step (frozen positions are kept, like
   template positions, and leave the entropy budget);
3. the run of positions accepted this step that starts at ``F`` is fed to the matcher; its longest valid prefix
   is frozen (``F`` grows), the first token that breaks the grammar is renoised, never frozen;
4. once the grammar is complete (no more bytes possible) an end token is frozen and the output is over; where it
   is complete but could go on, the end ids are in the mask and the model chooses.

When the canvas finishes (all positions frozen, the output complete, convergence or the step cap),
``complete`` fills the still undecided positions left to right from the last argmax canvas, taking the model's
most likely allowed token wherever its argmax would break the grammar: every committed canvas is valid.

Grammar state lives on the host, so a constrained request takes this per-request path (a handful of small host
reads per step) while unconstrained rows of the same batch keep the batched sampler.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict

import torch

from ..sampling.sampler import ROW_CHUNK, StepResult, acceptance_mask, inverse_cdf_draw, temperature
from ..sampling.truncation import truncate
from ..engine.failures import RequestFault
from .spec import compile_spec, compiling_for, kind


# Admission budget: binding a grammar to the tokenizer and computing its first mask must fit in ADMIT_SECONDS, or
# the request is refused (400); at run time one mask over ``STEP_SECONDS`` ends its request alone. llguidance's
# own limits (``LLParserLimits``: lexer fuel, Earley items, lexer states, grammar size) bound most work; they do
# not bound everything (``a{1000}{1000}`` took 5 s for its first mask under the defaults), hence the clock too.
ADMIT_SECONDS = 1.0
STEP_SECONDS = 1.0
ADMITTED_CACHE = 64  # specs whose verdict (a ready matcher, or the refusal) is kept
MAX_FORCED_BYTES = 16384  # a constraint may force at most this much text before the model chooses anything


class ConstraintFailed(RequestFault, RuntimeError):
    """The request's own constraint failed while it ran (a matcher error such as llguidance's lexer limit on a
    pathological regex, or one grammar step over the budget): its input's fault, so the server answers 400."""


def _clean(msg: str) -> str:
    """llguidance's error text without its parser-state dump: the first line, bounded."""
    first = (msg or "invalid").strip().splitlines()[0].replace("<non-verbose/>", "").strip()
    return first[:200] or "invalid"


MAX_SETTLE_TRIES = 64  # allowed tokens tried, most likely first, where the argmax breaks the grammar


class GrammarCompiler:
    """Binds grammars to one checkpoint's tokenizer (the llguidance tokenizer is built once: ~1 s at 262k) and
    admits them: ``prepared(spec)`` compiles, binds and computes the first mask within the limits and the time
    budget, or raises ``ValueError`` naming the field (a grammar with no finite sentence, such as ``start: start``
    or a JSON Schema that is only ``{"$ref": "#"}``, admits no first token). The verdict is cached per spec;
    each request gets a copy of the admitted matcher."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        import llguidance

        self._llg = llguidance
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} entries but the model only "
                             f"{vocab_size}: structured outputs need every token id to be a model id")
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)
        self.lltok = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size,
                                            eos_token=self.eos_ids or None)
        self.admit_seconds = ADMIT_SECONDS
        self.step_seconds = STEP_SECONDS
        self._admitted: OrderedDict[str, object] = OrderedDict()  # spec key -> matcher | refusal message
        self._lock = threading.Lock()

    def limits(self):
        # verbose_errors=False: an error never carries the parser's state (it can quote the schema or the text).
        return self._llg.LLParserLimits(verbose_errors=False)

    def prepared(self, spec: dict, salt: str | None = None):
        """The admitted matcher for ``spec`` (shared: copy it before use), or ``ValueError``. Verdicts are kept per
        ``salt`` (the request's prefix-cache salt): a tenant's admission never runs faster because another tenant
        sent the same constraint."""
        key = json.dumps([salt, spec])  # not sorted: the order of a schema's properties is the order of the output
        with self._lock:
            hit = self._admitted.get(key)
            if hit is not None:
                self._admitted.move_to_end(key)
        if hit is None:
            try:
                with compiling_for(salt):
                    hit = self._admit(spec)
            except ValueError as e:
                hit = str(e)
            with self._lock:
                self._admitted[key] = hit
                while len(self._admitted) > ADMITTED_CACHE:
                    self._admitted.popitem(last=False)
        if isinstance(hit, str):
            raise ValueError(hit)
        return hit

    def _admit(self, spec: dict):
        where = f"structured_outputs.{kind(spec)}"
        grammar = compile_spec(spec)  # ValueError naming the problem
        t0 = time.perf_counter()
        m = self._llg.LLMatcher(self.lltok, grammar, log_level=0, limits=self.limits())
        if not m.is_error():
            first = m.compute_bitmask()  # the first step's work, done once here
        seconds = time.perf_counter() - t0
        if m.is_error():
            err = m.get_error() or ""
            if "NoExtensionBias" in err:
                raise ValueError(f"{where}: {NO_OUTPUT}")
            raise ValueError(f"{where}: the constraint cannot be enforced: {_clean(err)}")
        if not m.is_accepting():
            first = bytearray(first)  # end ids are no way forward where the grammar is not complete
            named = [t for t in self.eos_ids if first[t // 8] >> (t % 8) & 1]
            for t in named:
                first[t // 8] &= ~(1 << (t % 8)) & 0xFF
            if not any(first):
                raise ValueError(f"{where}: {END_TOKEN if named else NO_OUTPUT}")
        # Bytes the grammar forces before any choice: a rule that only repeats itself ('start: "a" start', a
        # required property whose $ref leads back to itself) forces an endless run, cut by llguidance's item
        # limit at tens of KB; at run time the same walk fails the request a few steps in.
        if len(m.deep_copy().compute_ff_bytes()) > MAX_FORCED_BYTES:
            raise ValueError(f"{where}: {NO_OUTPUT}: it forces more than {MAX_FORCED_BYTES} bytes before any "
                             "choice")
        if seconds > self.admit_seconds:
            raise ValueError(f"{where}: the constraint is too costly to enforce: preparing it took {seconds:.1f} s "
                             f"(the budget is {self.admit_seconds:g} s); simplify it (e.g. smaller repetition "
                             "counts or fewer alternatives)")
        return m

    def matcher(self, spec: dict, salt: str | None = None):
        return self.prepared(spec, salt).deep_copy()

    def constraint(self, spec: dict, end_ids: list[int], canvas_length: int, seed: int | None = None,
                   device=None, salt: str | None = None) -> "CanvasConstraint":
        c = CanvasConstraint(self.matcher(spec, salt), end_ids or self.eos_ids, self.vocab_size, canvas_length,
                             seed, device)
        c.step_seconds = self.step_seconds
        return c


# An end id (the EOS ids, and a request's stop_token_ids) ends the output, and only where the grammar is complete:
# it is never fed to the matcher. Where the grammar is not complete it is out of the mask, even when the grammar
# names it (``<[1]>``: llguidance's mask then allows the id, but its matcher never consumes an EOS there) or would
# take it as text (a stop_token_ids id such as ";": the text would be cut at it, short of a valid output).
END_TOKEN = ("it asks for an end token (EOS, or one of stop_token_ids) where the output is not complete: an end "
             "token only ends the output, where the grammar is complete")
NO_OUTPUT = ("no finite output satisfies it (a rule that only refers back to itself, e.g. 'start: start', "
             "'start: \"a\" start', left recursion without a base case, or a JSON Schema whose $ref cycle "
             "has no way out)")


class CanvasConstraint:
    def __init__(self, matcher, end_ids: list[int], vocab_size: int, canvas_length: int, seed: int | None = None,
                 device=None):
        if not end_ids:
            raise ValueError("structured outputs need an end token: the model has no EOS id")
        self.matcher = matcher
        self.end_ids = list(end_ids)
        self.end_set = set(end_ids)
        self.vocab_size = vocab_size
        self.canvas_length = canvas_length
        self.frozen: list[int] = []  # the current canvas's grammar-valid prefix
        self.ended = False  # the output is complete (an end token frozen, or the grammar cannot go on)
        self.masks = 0  # masks computed, and host seconds spent on them and on settling (for benchmarks)
        self.mask_seconds = 0.0
        self.settle_seconds = 0.0
        self.step_seconds = STEP_SECONDS  # one mask longer than this ends the request (GrammarCompiler sets it)
        self._probs: torch.Tensor | None = None  # [C, V] this step's distribution, until the canvas is settled
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self._shifts = torch.arange(32, dtype=torch.int32)
        # Its own generator (seeded from the request's seed): the constrained step draws per request.
        self.generator = torch.Generator(device=torch.device(device or "cpu"))
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    # ------------------------------------------------------------------ grammar
    def start_canvas(self) -> None:
        self.frozen = []

    @property
    def settled(self) -> bool:
        """Nothing left to decide in this canvas."""
        return self.ended or len(self.frozen) >= self.canvas_length

    def allowed(self) -> torch.Tensor:
        """[V] bool: tokens the grammar allows next (the end ids where the grammar is complete)."""
        t0 = time.perf_counter()
        b = self._bits
        self.matcher.unsafe_compute_mask_ptr(b.data_ptr(), b.numel() * 4)
        self.masks += 1
        if self.matcher.is_error():
            raise ConstraintFailed(f"grammar matcher failed: {_clean(self.matcher.get_error())}")
        took = time.perf_counter() - t0
        if took > self.step_seconds:  # it would slow every tick of the batch: end this request (engine rule)
            raise ConstraintFailed(f"the constraint is too costly to enforce: one grammar step took {took:.1f} s "
                                   f"(the budget is {self.step_seconds:g} s)")
        out = ((b.view(-1, 1) >> self._shifts) & 1).view(-1)[:self.vocab_size].bool()
        if self.matcher.is_accepting():
            out[self.end_ids] = True
        elif bool(out[self.end_ids].any()):  # a grammar that names an end id where it is not complete (END_TOKEN)
            out[self.end_ids] = False
            if not bool(out.any()):
                raise ConstraintFailed(f"the grammar cannot go on: {END_TOKEN}")
        self.mask_seconds += time.perf_counter() - t0
        return out

    def consume(self, tokens: list[int]) -> int:
        """Freeze the longest grammar-valid prefix of ``tokens``; returns how many were taken."""
        if self.settled or not tokens:
            return 0
        tokens = tokens[:self.canvas_length - len(self.frozen)]
        end = next((i for i, t in enumerate(tokens) if t in self.end_set), len(tokens))  # never fed (END_TOKEN)
        n = self.matcher.try_consume_tokens(tokens[:end]) if end else 0
        if self.matcher.is_error():
            raise ConstraintFailed(f"grammar matcher failed: {_clean(self.matcher.get_error())}")
        self.frozen.extend(tokens[:n])
        if n == end < len(tokens) and self.matcher.is_accepting():
            self.frozen.append(tokens[n])  # the model ended the output where the grammar allows it
            self.ended = True
            return n + 1
        if self.matcher.is_stopped():  # complete, nothing may follow: end it now
            self.ended = True
            if len(self.frozen) < self.canvas_length:
                self.frozen.append(self.end_ids[0])
        return n

    # ------------------------------------------------------------------ denoising
    def step(self, logits: torch.Tensor, step: int, max_steps: int, t_min: float, t_max: float,
             entropy_bound: float, confidence_threshold: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None, greedy: bool = False) -> StepResult:
        """One constrained denoising step over ``logits`` [C, V] (overwritten with the tempered probabilities).

        As in the default sampler (``sampling.sampler.default_step``): ``top_k`` / ``top_p`` / ``min_p`` cut the
        distribution each accepted position draws from (``truncation.truncate``, after the grammar mask, so the
        masked position keeps at least its most likely allowed token); ``greedy`` (temperature 0) takes the argmax
        there instead of a draw. Entropy, acceptance, the argmax and the returned probabilities use the whole
        tempered (masked) distribution."""
        C, V = logits.shape
        generator = self.generator
        dev = logits.device
        F = len(self.frozen)
        open_ = not self.settled
        if open_:  # the first undecided position: only what the grammar allows
            logits[F].masked_fill_(~self.allowed().to(dev), float("-inf"))
        logits.div_(temperature(step, max_steps, t_min, t_max))
        argmax = logits.argmax(dim=-1)
        h = torch.empty(C, dtype=torch.float32, device=dev)
        for i in range(0, C, ROW_CHUNK):  # entropy in fp32 whatever the logits dtype (bf16 on GPU)
            p = torch.softmax(logits[i:i + ROW_CHUNK], dim=-1, dtype=torch.float32)
            h[i:i + ROW_CHUNK] = torch.special.entr(p).sum(-1)
            logits[i:i + ROW_CHUNK] = p
        probs = logits
        fixed = torch.arange(C, device=dev) < F  # [C]
        accepted = acceptance_mask(h.masked_fill(fixed, 0.0)[None], entropy_bound)[0] | fixed
        if open_:
            accepted[F] = True  # progress every step: the masked position is always sampled
        new_canvas = torch.randint(0, V, (C,), generator=generator, device=dev)
        rows = (accepted & ~fixed).nonzero().view(-1)
        if rows.numel():
            n = rows.numel()
            # drawn even when greedy: the generator's later draws (renoising) do not depend on it
            u = torch.rand(n, 1, generator=generator, device=dev, dtype=torch.float32)
            if greedy:
                new_canvas[rows] = argmax[rows]
            else:
                drawn = probs[rows].float()
                cuts = [None if v is None else torch.full((n,), v, dtype=dtype, device=dev)
                        for v, dtype in ((top_k, torch.int64), (top_p, torch.float32), (min_p, torch.float32))]
                if any(t is not None for t in cuts):
                    drawn = truncate(drawn, *cuts)
                new_canvas[rows] = inverse_cdf_draw(drawn, u)
        if open_:
            acc = accepted[F:].tolist()
            k = acc.index(False) if False in acc else len(acc)  # the accepted run that starts at F
            run = new_canvas[F:F + k].tolist()
            n = self.consume(run)
            if n < k and not self.settled:  # it breaks the grammar: never kept
                new_canvas[F + n] = torch.randint(0, V, (1,), generator=generator, device=dev)[0]
                accepted[F + n] = False
        F2 = len(self.frozen)
        if F2:
            frozen = torch.tensor(self.frozen, device=dev)
            new_canvas[:F2] = frozen
            argmax[:F2] = frozen
            accepted[:F2] = True
        mean_h = h[F2:].mean() if F2 < C else torch.zeros((), device=dev)  # over the undecided positions
        self._probs = probs
        return StepResult(new_canvas, argmax, accepted, h, probs, mean_h, mean_h < confidence_threshold)

    def complete(self, argmax: list[int]) -> list[int]:
        """Settle the canvas: fill the undecided positions left to right with the argmax token where the grammar
        allows it, else the most likely allowed token. Returns the canvas's tokens (all C, or up to and
        including the end token)."""
        t0 = time.perf_counter()
        F = len(self.frozen)
        if not self.settled:
            draft = list(argmax)
            probs = self._probs
            for p in range(F, self.canvas_length):
                if self.consume([draft[p]]) == 0 and not self.settled:
                    allowed = self.allowed()
                    if probs is not None:
                        row = torch.where(allowed, probs[p].to("cpu", torch.float32), torch.tensor(-1.0))
                    else:
                        row = allowed.float()
                    # llguidance's mask may over-approximate (a lexeme that allows any text lets through tokens
                    # with bytes that are never valid UTF-8, which consuming then refuses): take the most likely
                    # allowed token the matcher really accepts.
                    for tok in row.topk(min(MAX_SETTLE_TRIES, int(allowed.sum()))).indices.tolist():
                        if self.consume([tok]) or self.settled:
                            break
                    else:  # the constraint's own doing (its grammar, through llguidance's mask): a 400
                        raise ConstraintFailed(f"grammar matcher refused the {MAX_SETTLE_TRIES} most likely tokens "
                                               "its own mask allowed")
                if self.settled:
                    break
        self._probs = None
        self.settle_seconds += time.perf_counter() - t0
        return list(self.frozen)
