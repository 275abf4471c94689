"""The engine: admits requests as ``ModelState``s and runs one tick at a time.

A tick = the scheduler's decision, then one batched ``encode`` over every request that reads a prompt or
commits a canvas (per request in deterministic mode), then one batched ``denoise`` over every request refining
a canvas (each against its own prefix, at its own step, with its own sampling parameters), then one batched
sampler step over all default-mode rows (per-row parameters as tensors, counter-based random numbers, no host
sync) and the reference-mode rows one by one (their generators draw in the reference's order). The host reads
back once per tick, in one transfer: the argmax canvases, acceptance, the stop flags and whether each row's
logits were finite.

Failure is per request (``failures.py``): whatever fails for one request inside a tick (its encode or image, its
sampler settings, its constraint, its stop check, non-finite logits) ends that request with
``finish_reason="error"``; a batched call that raises is retried row by row where that is exact (encode, the
forward, building the sampler's row parameters) to find the request it was; the tick goes on for the others.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from functools import partial

import torch

from ..config import GenerationDefaults
from ..kv_cache import KVCache, to_device
from ..model import DiffusionGemma
from ..model.vision_tower import FeatureMemo
from ..prefix_cache import PrefixCache
from ..sampling.fields import ParamError
from ..sampling.params import SamplingParams
from ..sampling.sampler import RowParams, default_step, reference_step, same_as_previous
from ..sampling.truncation import logprob_columns, split_logprob_row
from .failures import NON_FINITE, fail_request, guarded, one_line
from .fast import fast_tick, uses_fast
from .model_state import ModelState, Phase, StepRow
from .scheduler import Scheduler



def check_fits(prompt_tokens: int, max_new_tokens: int, canvas_length: int, context: int,
               at_least: bool = False) -> None:
    """ValueError unless a prompt of ``prompt_tokens`` plus ``max_new_tokens`` (whole canvases) fits ``context``.
    ``at_least``: ``prompt_tokens`` is a lower bound (``blockdiff run`` checks before the prompt is tokenized)."""
    C = canvas_length
    needed = prompt_tokens + -(-max_new_tokens // C) * C
    if needed > context:
        more = "at least " if at_least else ""
        tokens = f"{prompt_tokens} token{'s' if prompt_tokens != 1 else ''}"
        raise ValueError(f"the prompt ({more}{tokens}) plus max_new_tokens ({max_new_tokens}, in canvases of {C}) "
                         f"needs {more}{needed} positions; the model's context is {context}")


_MODEL_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.RLock:
    """The tick lock of every engine over ``model`` (see ``Engine.lock``)."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


class Engine:
    def __init__(self, model: DiffusionGemma, defaults: GenerationDefaults | None = None, tokenizer=None,
                 max_num_seqs: int = 16, max_encode_tokens: int = 8192, prefix_cache_bytes: int = 0,
                 fast: bool = False):
        self.model = model
        self.fast = bool(fast)  # fast mode for requests that do not say (``blockdiff serve --fast``)
        self.fast_capable = getattr(model, "runs_fast_mode", True)  # False: split over ranks, fast requests run exact
        # Prompt blocks already encoded, reused by later prompts that start with them (0 bytes: off). A model split
        # over ranks (blockdiff.distributed) makes its own: its page copies run on every rank.
        make = getattr(model, "make_prefix_cache", None)
        self.prefix_cache = make(prefix_cache_bytes) if make else PrefixCache(model.kv_pool, prefix_cache_bytes)
        # Beside it, the vision tower's output of recent images (1/8 of the budget): an image whose tokens the
        # prefix cache cannot serve (they end in a prompt's last, partial block) skips the tower when resent.
        self.image_memo = FeatureMemo(prefix_cache_bytes // 8) \
            if self.prefix_cache.max_blocks and getattr(model, "vision", None) is not None else None
        self.defaults = defaults or GenerationDefaults.from_dict({}, model.text.eos_ids)
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(max_num_seqs, max_encode_tokens)
        self._ids = itertools.count()
        self._grammars = None  # structured.GrammarCompiler, built on the first constrained request
        self._grammars_lock = threading.Lock()
        # Held while the scheduler's queues change or a tick runs. Several drivers may share one engine: the
        # server's engine thread (AsyncEngine, build_app(llm)) and direct LLM.generate calls on the same LLM; each
        # tick runs everyone's requests, so whoever holds the lock advances them all. One lock per model: engines
        # over the same model (its KV pool, its buffers) never tick at once either. Reentrant: an on_event
        # callback runs inside the tick.
        self.lock = model_lock(model)
        self.stats = {"ticks": 0, "denoise_steps": 0, "encode_tokens": 0, "last_tick_seconds": 0.0}
        if make is None and self.prefix_cache.max_blocks:
            # An engine dropped while its model lives on (LLM.from_model called again over one model) leaves its
            # cached blocks' pages taken in the model's pool. Returned then, but not from the garbage collector's
            # thread (it may run inside another engine's tick, or on a worker that tick waits for): the cache is
            # handed to the pool, and the next tick of any engine over the model, under the lock, clears it.
            pool = self.prefix_cache.pool
            if not hasattr(pool, "orphaned_caches"):
                pool.orphaned_caches = []
            weakref.finalize(self, pool.orphaned_caches.append, self.prefix_cache)
        with self.lock:
            self._release_orphans()

    def _release_orphans(self) -> None:
        """Clear the prefix caches of dropped engines over this model (under the lock)."""
        orphans = getattr(getattr(self.model, "kv_pool", None), "orphaned_caches", None)
        while orphans:
            orphans.pop().clear()

    def close(self) -> None:
        """Return the prefix cache's pages to the model's pool now (the engine stays usable, its cache empty)."""
        with self.lock:
            self.prefix_cache.clear()

    @property
    def deterministic(self) -> bool:
        """Deterministic mode: the model computes every row as it would alone (``model.batch_invariant``) and
        so does the sampler, so a seeded request's output is bit-identical alone or in any batch."""
        return bool(getattr(self.model, "batch_invariant", False))

    @property
    def canvas_length(self) -> int:
        return self.model.canvas_length

    # ------------------------------------------------------------------ admission
    def validate_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        V = self.model.vocab_size
        if not isinstance(prompt_ids, (list, tuple)) or len(prompt_ids) == 0:
            raise ValueError("the prompt must hold at least one token")
        if not all(isinstance(t, int) and 0 <= t < V for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {V})")
        check_fits(len(prompt_ids), params.max_new_tokens, self.canvas_length,
                   self.model.text.max_position_embeddings)

    def make_state(self, prompt_ids: list[int], params: SamplingParams | None = None, on_event=None,
                   request_id: str | None = None, request_index: int = 0, images=None) -> ModelState:
        """``images``: the prompt's ``ImageInputs`` (``blockdiff.vision.prompt``), its image tokens expanded."""
        params = params or SamplingParams()
        if self.tokenizer is not None and hasattr(self.tokenizer, "task_params"):
            params = self.tokenizer.task_params(prompt_ids, params)  # e.g. the Sudoku model's fixed givens
        params.validate(self.model.vocab_size, self.canvas_length)
        asked_max = params.max_new_tokens  # before the defaults fill it: a template checks only an explicit one
        params = params.resolved(self.defaults)
        if params.fast is None:
            params.fast = self.fast
        self.validate_prompt(prompt_ids, params)
        stop_checker = self._stop_checker(params.stop) if params.stop else None
        constraint = self._constraint(params) if params.structured_outputs is not None else None
        infill = None
        if params.text_template is not None or params.suffix is not None:
            from ..structured.infill import plan_suffix, plan_template
            field = "text_template" if params.text_template is not None else "suffix"
            try:
                infill = (plan_template(self.tokenizer, params.text_template, self.canvas_length)
                          if params.text_template is not None else
                          plan_suffix(self.tokenizer, params.suffix, params.max_new_tokens, self.canvas_length))
            except ValueError as e:  # the template's own problem: name the field it came in
                raise ParamError(str(e), field) from None
            try:
                infill.check_budget(asked_max if params.text_template is not None else None)
            except ValueError as e:
                raise ParamError(str(e), "max_new_tokens") from None
            params.canvas_template = infill.template  # params is the engine's resolved copy
        state = ModelState(request_id or f"req-{next(self._ids)}", request_index, prompt_ids, params,
                           self.model.text.layers, self.canvas_length, self.model.vocab_size,
                           self.defaults.eos_token_ids, on_event=on_event, stop_checker=stop_checker,
                           device=self.model.device, cache=self.model.new_sequence(), constraint=constraint,
                           infill=infill, answer_length=getattr(self.tokenizer, "answer_length", None))
        if images is not None:
            self._check_images(prompt_ids, images)
            state.images = images
        return state

    def _check_images(self, prompt_ids: list[int], images) -> None:
        if self.model.vision is None:
            raise ValueError("the model has no vision tower (a text-only checkpoint): it cannot take images")
        image_id = self.model.config.image_token_id
        n = sum(1 for t in prompt_ids if t == image_id)
        if n != sum(images.num_soft_tokens):
            raise ValueError(f"the prompt holds {n} image tokens but its images give {sum(images.num_soft_tokens)} "
                             "soft tokens")

    def grammars(self):
        """The checkpoint's grammar compiler (its token table takes ~5 s to build at 262k entries: the server
        builds it in the background at start-up; any thread may call this)."""
        if self.tokenizer is None:
            raise ValueError("structured_outputs needs the checkpoint's tokenizer; this model has none")
        if getattr(self.tokenizer, "structured_output_refusal", None):
            raise ValueError(self.tokenizer.structured_output_refusal)
        with self._grammars_lock:
            if self._grammars is None:
                from ..structured import GrammarCompiler
                try:
                    self._grammars = GrammarCompiler(self.tokenizer, self.model.vocab_size,
                                                     self.defaults.eos_token_ids)
                except Exception as e:  # noqa: BLE001 - kept: every later request gets the same one-line 400
                    self._grammars = ValueError(f"structured_outputs is not available with this checkpoint: the "
                                                f"grammar engine cannot read its tokenizer ({one_line(e)})")
        if isinstance(self._grammars, ValueError):
            raise ValueError(str(self._grammars))
        return self._grammars

    def check_structured(self, params: SamplingParams) -> None:
        """Admission of a request's ``structured_outputs``: compiled, bound to the tokenizer and its first mask
        computed within llguidance's limits and a time budget, or ``ValueError`` naming the field. The verdict is
        cached, so ``make_state`` (on the server's event loop) only copies the admitted matcher. The server calls
        this while preparing a request, off the event loop."""
        if params.structured_outputs is not None:
            self.grammars().prepared(params.structured_outputs, params.cache_salt)

    def _constraint(self, params: SamplingParams):
        end_ids = list(dict.fromkeys(list(self.defaults.eos_token_ids) + list(params.stop_token_ids or [])))
        return self.grammars().constraint(params.structured_outputs, end_ids, self.canvas_length, params.seed,
                                          self.model.device, salt=params.cache_salt)

    def add_request(self, prompt_ids, params=None, on_event=None, request_id=None, request_index=0,
                    images=None) -> ModelState:
        state = self.make_state(prompt_ids, params, on_event, request_id, request_index, images=images)
        self.add(state)
        return state

    def add(self, state: ModelState) -> None:
        """Queue a state made by ``make_state`` (thread-safe: waits for a running tick)."""
        with self.lock:
            self.scheduler.add(state)

    def abort(self, request_id: str) -> bool:
        with self.lock:
            return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def _stop_checker(self, stops: list[str]):
        if self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        tok = self.tokenizer
        clean = [0]  # the longest output (a prefix of every later one) already checked to hold no stop string

        def holds(ids: list[int]) -> bool:
            text = tok.decode(ids)
            return any(s in text for s in stops)

        def check(ids: list[int]) -> int | None:
            """The shortest prefix of ``ids`` whose text holds a stop string, or None. It runs on the engine thread
            once per canvas: the search bisects the tokens added since the last clean check (a longer prefix
            keeps the stop string), a few decodes, not one per output token (seconds per request at 8k tokens,
            with every other request's tick waiting)."""
            if not holds(ids):
                clean[0] = len(ids)
                return None
            lo, hi = clean[0], len(ids)  # ids[:lo] holds none, ids[:hi] holds one
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if holds(ids[:mid]) else (mid, hi)
            return hi
        return check

    # ------------------------------------------------------------------ one tick
    @torch.no_grad()
    def step(self) -> list[ModelState]:
        """Run one tick; returns the requests that finished in it (whoever added them: see ``lock``)."""
        with self.lock:
            return self._tick()

    def _tick(self) -> list[ModelState]:
        t0 = time.perf_counter()
        self._release_orphans()
        out = self.scheduler.schedule()
        if out.encode:
            self._encode(out.encode)
        dn = [s for s in out.denoise if s.phase is Phase.DENOISING]
        fast = [s for s in dn if self.fast_capable and uses_fast(s, self.deterministic)]  # approximate: engine/fast.py
        if fast:
            dn = [s for s in dn if all(s is not f for f in fast)]
            self._fast(fast)
        if dn:
            self._denoise(dn)
        self.stats["ticks"] += 1
        self.stats["last_tick_seconds"] = time.perf_counter() - t0
        return self.scheduler.collect_finished()

    def _fast(self, states: list[ModelState]) -> None:
        """Fast mode's tick over ``states``. If it raises before any request's step was applied (the steps are
        applied last, each guarded), each request is run alone so that only the one it was fails."""
        try:
            return fast_tick(self, states)
        except Exception as e:
            if len(states) == 1:
                return fail_request(states[0], "its fast-mode denoising step failed", e)
        for s in states:
            guarded(s, "its fast-mode denoising step failed", fast_tick, self, [s])

    def _encode(self, states: list[ModelState]) -> None:
        """One batched encode over every prompt / finished canvas of the tick (right-padded to the longest). A
        request whose encode fails (its image, its tokens) ends alone: a failed batched call is retried row by row
        to find it (the cache rows were not committed: a second encode rewrites the same positions). Not a row
        whose sliding-window ring the failed call already wrapped onto positions it still reads: those keys/values
        are gone, so that row fails too rather than run on with a wrong cache."""
        model = self.model
        # Deterministic mode: a request's cache must not depend on what it was encoded with (padding changes
        # the matmul shapes), so each request reads its tokens alone. Encodes run once per canvas. A prompt with
        # images is read alone too (its vision pass and image masks are its own).
        alone = [s for s in states if model.batch_invariant or (s.images is not None and s.phase is Phase.WAITING)]
        for s in alone:
            guarded(s, "encoding its prompt" if s.phase is Phase.WAITING else "committing its canvas",
                    self._encode_alone, s, None)
        if alone:
            states = [s for s in states if all(s is not a for a in alone)]
            if not states:
                return
        pc = self.prefix_cache  # (image prompts were read alone above, through the cache too: _encode_alone)
        items, prompts = [], []  # prompts: (state, its prompt, tokens reused from the prefix cache)
        for s in states:
            ids = s.tokens_to_encode()
            if s.phase is Phase.WAITING and pc.max_blocks:
                reused = pc.attach(s.cache, ids, s.params.cache_salt)
                pc.prepare(s.cache, ids)
                prompts.append((s, ids, reused))
                s.metrics.cached_tokens = reused
                ids = ids[reused:]
            items.append((len(ids), s, ids))
        for group in _encode_groups(items):
            lengths = [n for n, _, _ in group]
            width = max(lengths)
            ids = torch.tensor([t + [0] * (width - len(t)) for _, _, t in group])  # host ids: validated, moved once
            cache = KVCache([s.cache for _, s, _ in group])
            try:
                model.encode(ids, cache, lengths=lengths)
                self.stats["encode_tokens"] += sum(lengths)
            except Exception as e:
                if len(group) == 1:
                    fail_request(group[0][1], "encoding failed", e)
                    continue
                for _, s, t in group:  # find the request it was: each alone, where a second encode is exact
                    if cache.rings_written and s.cache.encode_overwrites(len(t)):
                        # the failed call already wrote over sliding-window keys/values this row still reads:
                        # run again, it would read the failed call's keys there and go on with a wrong cache
                        fail_request(s, "encoding failed (a batched encode holding it failed after overwriting "
                                        "its sliding-window keys/values)", e)
                    else:
                        guarded(s, "encoding failed", self._encode_ids, s, t)
        for s, prompt, reused in prompts:
            if not s.finished:
                pc.insert(s.cache, prompt, reused, s.params.cache_salt)
        for s in states:
            if not s.finished:
                guarded(s, "starting its canvas", s.encoded)

    def _encode_alone(self, s: ModelState, ids: list[int] | None) -> None:
        ids = s.tokens_to_encode() if ids is None else ids
        if s.images is not None and s.phase is Phase.WAITING and self.prefix_cache.max_blocks \
                and not self.model.batch_invariant:
            return self._encode_image_prompt(s, ids)
        self.model.encode(torch.tensor([ids]), KVCache([s.cache]), **self._image_kwargs(s, ids))
        self.stats["encode_tokens"] += len(ids)
        s.encoded()

    def _encode_image_prompt(self, s: ModelState, ids: list[int]) -> None:
        """A prompt with images through the prefix cache: its image tokens keyed by their image's digest, the reuse
        cut back so that it never ends inside an image; only the rest is encoded, and the vision tower reads only
        the images in the rest, those the feature memo holds not even those. (Deterministic mode, which reuses
        nothing, never comes here: its promise is an output that depends on the request alone.)"""
        pc, im, image_id = self.prefix_cache, s.images, self.model.config.image_token_id
        keys, salt = im.cache_keys(ids, image_id), s.params.cache_salt
        reused = pc.attach(s.cache, keys, salt, splits_at=partial(im.splits_at, ids, image_id))
        pc.prepare(s.cache, keys)
        s.metrics.cached_tokens = reused
        rest, s.images = ids[reused:], None
        left = im.after(ids, image_id, reused)
        kwargs = {} if left is None else {"pixel_values": left.pixel_values,
                                          "image_position_ids": left.image_position_ids,
                                          "mm_token_type_ids": left.mm_token_type_ids(rest, image_id),
                                          "image_keys": _salted(left.digests(), salt), "image_memo": self.image_memo}
        self.model.encode(torch.tensor([rest]), KVCache([s.cache]), **kwargs)
        self.stats["encode_tokens"] += len(rest)
        pc.insert(s.cache, keys, reused, salt)
        s.encoded()

    def _encode_ids(self, s: ModelState, ids: list[int]) -> None:
        """Re-run one row of a failed batched encode (its prefix-cache blocks already attached)."""
        self.model.encode(torch.tensor([ids]), KVCache([s.cache]))
        self.stats["encode_tokens"] += len(ids)

    def _image_kwargs(self, s: ModelState, ids: list[int]) -> dict:
        """The prompt's images for its prefill encode (then dropped: later encodes are canvases)."""
        if s.images is None or s.phase is not Phase.WAITING:
            return {}
        im, s.images = s.images, None
        return {"pixel_values": im.pixel_values, "image_position_ids": im.image_position_ids,
                "mm_token_type_ids": im.mm_token_type_ids(ids, self.model.config.image_token_id)}

    def _denoise(self, states: list[ModelState]) -> None:
        model = self.model
        dev = model.device
        # Default-mode rows first, then reference-mode rows, then constrained rows (structured output: grammar
        # state lives on the host, so each takes its own step): each group is a contiguous view of the logits.
        states = sorted(states, key=_row_group)
        # Each default row's sampler parameters, built before the forward: a request whose row cannot be built
        # ends here, alone, and costs nobody a forward.
        rows = {}
        for s in states:
            if _row_group(s) == 0:
                rows[id(s)] = guarded(s, "its sampler settings failed", s.sampler_row)
        states = [s for s in states if not s.finished]
        if not states:
            return
        states, logits = self._denoise_logits(states)  # [B, C, V]
        if not states:
            return
        nd = sum(_row_group(s) == 0 for s in states)
        nr = nd + sum(_row_group(s) == 1 for s in states)
        B, C = len(states), self.canvas_length
        canvas = torch.stack([s.canvas for s in states]).to(dev)  # [B, C]
        parts = []  # (row indices, (canvas, argmax, accepted, confident, finite)) in row order
        if nd:
            parts += self._default_rows(logits[:nd], canvas[:nd], states[:nd], [rows[id(s)] for s in states[:nd]])
        for b in range(nd, nr):  # the reference's generator draws: one canvas at a time
            s, p = states[b], states[b].params
            res = guarded(s, "its sampler failed", reference_step, logits[b], canvas[b], s.step,
                          p.max_denoising_steps, p.t_min, p.t_max, p.entropy_bound, s.generator,
                          p.confidence_threshold)
            if res is not None:
                logits[b].copy_(res.probs)  # the buffer now holds every row's tempered distribution
                parts.append(([b], _unsqueeze(res)))
        for b in range(nr, B):  # constrained rows: a grammar mask at the first undecided position (structured/)
            s, p = states[b], states[b].params
            res = guarded(s, "its structured output constraint failed", s.constraint.step, logits[b], s.step,
                          p.max_denoising_steps, p.t_min, p.t_max, p.entropy_bound, p.confidence_threshold,
                          p.top_k, p.top_p, p.min_p, p.greedy)
            if res is not None:
                parts.append(([b], _unsqueeze(res)))
        parts.sort(key=lambda x: x[0][0])
        order = [b for idx, _ in parts for b in idx]
        if not order:
            return
        if len(order) < B:  # rows that failed in the sampler leave the tick (a copy, on failure only)
            logits, states = logits[order], [states[b] for b in order]
        new_canvas, argmax, accepted, confident, finite, entropy = (torch.cat(x) for x in zip(*(r for _, r in parts)))
        previous = torch.stack([s.argmax for s in states]).to(dev)  # [B, C] last step's argmax canvas
        soft = self._soft_embeddings(logits)  # [B, C, H]: self-conditioning for the next step
        same = same_as_previous(argmax, previous, to_device(torch.tensor([s.step > 0 for s in states]), dev))
        # The one device-to-host transfer of the tick: the stop flags, whether each row's logits were finite, the
        # argmax canvases (committed when a canvas finishes), only when someone listens to draft events the
        # acceptance masks and per-position entropies (in thousandths: one integer tensor), and only when a request
        # asked for them the logprobs (fp32 bit patterns).
        drafts = any(s.on_event is not None for s in states)
        lp_k = max((s.params.logprobs for s in states if s.params.logprobs is not None), default=None)
        cols = [same[:, None].long(), confident[:, None].long(), finite[:, None].long(), argmax]
        if drafts:
            cols += [accepted.long(), (entropy.float().nan_to_num(0.0).clamp(0, 1e3) * 1000).round().long()]
        if lp_k is not None:
            cols.append(logprob_columns(logits, argmax, lp_k))
        host = torch.cat(cols, 1).tolist()
        A = 3  # argmax columns start here
        lp_at = A + C + (2 * C if drafts else 0)
        for b, s in enumerate(states):
            row = host[b]
            if not row[2]:  # non-finite logits: never a success with garbage
                fail_request(s, NON_FINITE.format(step=s.step + 1))
                continue
            guarded(s, "finishing its denoising step failed", self._apply, s, row, new_canvas[b], argmax[b],
                    soft[b], C, A, drafts, lp_k, lp_at)
        self.stats["denoise_steps"] += len(states)

    @staticmethod
    def _apply(s: ModelState, row: list, canvas, argmax, soft, C: int, A: int, drafts: bool, lp_k, lp_at: int):
        """One request's share of the readback: its logprobs, then its step (stop checks, constraint settling and
        its events happen in ``apply_step``)."""
        if lp_k is not None and s.params.logprobs is not None:  # before apply_step: it may commit the canvas
            s.step_logprobs = split_logprob_row(row[lp_at:], C, lp_k, s.params.logprobs)
        s.apply_step(StepRow(canvas, argmax, row[A:A + C], [bool(x) for x in row[A + C:A + 2 * C]] if drafts
                             else None, bool(row[0]), bool(row[1]),
                             [x / 1000 for x in row[A + 2 * C:A + 3 * C]] if drafts else None), soft)

    def _denoise_logits(self, states: list[ModelState]) -> tuple[list[ModelState], torch.Tensor]:
        """The batched denoise forward -> (states, logits [B, C, V]). If it raises, each row is run alone to find
        the request it was; the rows that fail end alone and leave the tick."""
        model, dev, C = self.model, self.model.device, self.canvas_length
        canvas = torch.stack([s.canvas for s in states]).to(dev)  # [B, C]
        have_sc = [s.sc_embeds is not None for s in states]
        sc = mask = None
        if any(have_sc):
            H = model.text.hidden_size
            sc = torch.stack([s.sc_embeds if s.sc_embeds is not None
                              else torch.zeros(C, H, device=dev, dtype=model.dtype) for s in states])
            mask = to_device(torch.tensor(have_sc), dev)
        try:
            return states, model.denoise(canvas, KVCache([s.cache for s in states]),
                                         self_conditioning_embeds=sc, self_conditioning_mask=mask)
        except Exception as e:
            if len(states) == 1:
                fail_request(states[0], "its denoising forward failed", e)
                return [], None
        kept, out = [], []
        for b, s in enumerate(states):
            one = guarded(s, "its denoising forward failed", model.denoise, canvas[b:b + 1], KVCache([s.cache]),
                          None, None if sc is None else sc[b:b + 1], None if mask is None else mask[b:b + 1])
            if one is not None:
                kept.append(s)
                out.append(one)
        return kept, (torch.cat(out) if out else None)

    def _default_rows(self, logits: torch.Tensor, canvas: torch.Tensor, states: list[ModelState],
                      rows: list[dict]) -> list[tuple]:
        """The batched default-mode sampler over ``logits`` [n, C, V] (in place); per request in deterministic
        mode, so each row runs exactly the kernels (and reduction shapes) it would run alone. Rows whose
        parameters cannot be put on the device end alone. The step itself is pure tensor work with no per-row
        host input: it runs in place on the one logits buffer, so a failure inside it cannot be retried and
        ends the rows it ran (a bug, not a request's doing)."""
        dev, C, V = logits.device, self.canvas_length, self.model.vocab_size
        n = len(states)
        groups = [[i] for i in range(n)] if self.deterministic else [list(range(n))]
        out = []
        for g in groups:
            lo, hi = g[0], g[-1] + 1
            try:
                params = RowParams.build(rows[lo:hi], dev, C, V)
            except Exception:  # find the row: each alone (host values only: nothing was touched)
                bad = [b for b in range(lo, hi) if guarded(states[b], "its sampler settings failed",
                                                         RowParams.build, rows[b:b + 1], dev, C, V) is None]
                keep = [b for b in range(lo, hi) if b not in bad]
                out += [r for b in keep for r in self._default_group(logits, canvas, states, rows, b, b + 1)]
                continue
            out += self._default_group(logits, canvas, states, rows, lo, hi, params)
        return out

    def _default_group(self, logits, canvas, states, rows, lo: int, hi: int, params=None) -> list[tuple]:
        try:
            if params is None:
                params = RowParams.build(rows[lo:hi], logits.device, self.canvas_length, self.model.vocab_size)
            res = default_step(logits[lo:hi], canvas[lo:hi], params)
        except Exception as e:
            for b in range(lo, hi):
                fail_request(states[b], "the sampler failed", e)
            return []
        return [(list(range(lo, hi)), (res.canvas, res.argmax, res.accepted, res.confident,
                                       torch.isfinite(res.entropy).all(-1), res.entropy))]

    def _soft_embeddings(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [B, C, V] -> [B, C, H]. In the model dtype: when that is not fp32 the cast happens per chunk of
        rows, so no second [B, C, V] buffer appears; in deterministic mode one canvas per product."""
        model = self.model
        B, C, V = probs.shape
        if model.dtype == probs.dtype and not self.deterministic:
            return model.soft_embeddings(probs)
        out = torch.empty(B, C, model.text.hidden_size, dtype=model.dtype, device=probs.device)
        if self.deterministic:
            for b in range(B):
                out[b] = model.soft_embeddings(probs[b])
            return out
        flat, of = probs.view(B * C, V), out.view(B * C, -1)
        for i in range(0, B * C, SOFT_CHUNK):
            of[i:i + SOFT_CHUNK] = model.soft_embeddings(flat[i:i + SOFT_CHUNK])
        return out


def _encode_groups(items: list) -> list[list]:
    """Split (length, ...) items into as few batched encodes as keep padding at most half of each: one call when
    lengths are alike (commits are all one canvas long), a long prompt apart from short ones."""
    items = sorted(items, key=lambda it: it[0], reverse=True)
    groups, cur = [], []
    for it in items:
        if cur and cur[0][0] * (len(cur) + 1) > 2 * (sum(x[0] for x in cur) + it[0]):
            groups.append(cur)
            cur = []
        cur.append(it)
    return groups + [cur] if cur else groups


SOFT_CHUNK = 256  # rows of probabilities cast to the model dtype at once for the self-conditioning product


def _salted(digests: list, salt: str | None) -> list:
    """The feature memo's keys of a request's images: under its ``cache_salt``, as its prefix-cache blocks are (a
    tenant's time to first token must not tell that another sent the same image)."""
    return digests if salt is None else [(salt, d) for d in digests]


def _row_group(s: ModelState) -> int:
    return 2 if s.constraint is not None else 1 if s.params.rng == "reference" else 0


def _unsqueeze(res):
    return (res.canvas[None], res.argmax[None], res.accepted[None], res.confident.reshape(1),
            torch.isfinite(res.entropy).all().reshape(1), res.entropy[None])
