"""The engine: admits requests as ``ModelState``s and runs one tick at a time.

A tick = the scheduler's decision, then one batched ``encode`` over every request that reads a prompt or
commits a canvas (per request in deterministic mode), then one batched ``denoise`` over every request refining a canvas (each against its own
prefix, at its own step, with its own sampling parameters and generator), then the sampler per request.
"""

from __future__ import annotations

import itertools
import time

import torch

from ..config import GenerationDefaults
from ..kv_cache import KVCache
from ..model import DiffusionGemma
from ..sampling.params import SamplingParams
from ..sampling.sampler import fast_step, reference_step
from .model_state import ModelState, Phase
from .scheduler import Scheduler


class Engine:
    def __init__(self, model: DiffusionGemma, defaults: GenerationDefaults | None = None, tokenizer=None,
                 max_num_seqs: int = 16, max_encode_tokens: int = 8192):
        self.model = model
        self.defaults = defaults or GenerationDefaults.from_dict({}, model.text.eos_ids)
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(max_num_seqs, max_encode_tokens)
        self._ids = itertools.count()
        self.stats = {"ticks": 0, "denoise_steps": 0, "encode_tokens": 0, "last_tick_seconds": 0.0}

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
        C = self.canvas_length
        ctx = self.model.text.max_position_embeddings
        needed = len(prompt_ids) + -(-params.max_new_tokens // C) * C
        if needed > ctx:
            raise ValueError(f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({params.max_new_tokens},"
                             f" in canvases of {C}) needs {needed} positions; the model's context is {ctx}")

    def make_state(self, prompt_ids: list[int], params: SamplingParams | None = None, on_event=None,
                   request_id: str | None = None, request_index: int = 0) -> ModelState:
        params = params or SamplingParams()
        params.validate(self.model.vocab_size, self.canvas_length)
        params = params.resolved(self.defaults)
        self.validate_prompt(prompt_ids, params)
        stop_checker = self._stop_checker(params.stop) if params.stop else None
        state = ModelState(request_id or f"req-{next(self._ids)}", request_index, prompt_ids, params,
                           self.model.text.layers, self.canvas_length, self.model.vocab_size,
                           self.defaults.eos_token_ids, on_event=on_event, stop_checker=stop_checker,
                           device=self.model.device, cache=self.model.new_sequence())
        return state

    def add_request(self, prompt_ids, params=None, on_event=None, request_id=None, request_index=0) -> ModelState:
        state = self.make_state(prompt_ids, params, on_event, request_id, request_index)
        self.scheduler.add(state)
        return state

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def _stop_checker(self, stops: list[str]):
        if self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        tok = self.tokenizer

        def check(ids: list[int]) -> int | None:
            text = tok.decode(ids)
            if not any(s in text for s in stops):
                return None
            for k in range(1, len(ids) + 1):  # the shortest prefix that contains a stop string
                t = tok.decode(ids[:k])
                if any(s in t for s in stops):
                    return k
            return len(ids)
        return check

    # ------------------------------------------------------------------ one tick
    @torch.no_grad()
    def step(self) -> list[ModelState]:
        """Run one tick; returns the requests that finished in it."""
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        if out.encode:
            self._encode(out.encode)
        dn = [s for s in out.denoise if s.phase is Phase.DENOISING]
        if dn:
            self._denoise(dn)
        self.stats["ticks"] += 1
        self.stats["last_tick_seconds"] = time.perf_counter() - t0
        return self.scheduler.collect_finished()

    def _encode(self, states: list[ModelState]) -> None:
        """One batched encode over every prompt / finished canvas of the tick (right-padded to the longest)."""
        model = self.model
        if model.batch_invariant:
            # Deterministic mode: a request's cache must not depend on what it was encoded with (padding changes
            # the matmul shapes), so each request reads its tokens alone. Encodes run once per canvas.
            for s in states:
                ids = s.tokens_to_encode()
                model.encode(torch.tensor([ids]), KVCache([s.cache]))
                self.stats["encode_tokens"] += len(ids)
                s.encoded()
            return
        seqs = [s.tokens_to_encode() for s in states]
        lengths = [len(t) for t in seqs]
        width = max(lengths)
        ids = torch.tensor([t + [0] * (width - len(t)) for t in seqs])  # host ids: validated, moved once
        model.encode(ids, KVCache([s.cache for s in states]), lengths=lengths)
        self.stats["encode_tokens"] += sum(lengths)
        for s in states:
            s.encoded()

    def _denoise(self, states: list[ModelState]) -> None:
        model = self.model
        dev = model.device
        canvas = torch.stack([s.canvas for s in states]).to(dev)  # [B, C]
        have_sc = [s.sc_embeds is not None for s in states]
        sc = mask = None
        if any(have_sc):
            H = model.text.hidden_size
            sc = torch.stack([s.sc_embeds if s.sc_embeds is not None
                              else torch.zeros(self.canvas_length, H, device=dev, dtype=model.dtype)
                              for s in states])
            mask = torch.tensor(have_sc, device=dev)
        logits = model.denoise(canvas, KVCache([s.cache for s in states]),
                               self_conditioning_embeds=sc, self_conditioning_mask=mask)  # [B, C, V]
        results = []
        for b, s in enumerate(states):
            p = s.params
            if p.rng == "reference":
                res = reference_step(logits[b], s.canvas, s.step, p.max_denoising_steps, p.t_min, p.t_max,
                                     p.entropy_bound, s.generator)
                logits[b].copy_(res.probs)  # the buffer now holds every row's tempered distribution
            else:
                res = fast_step(logits[b], s.canvas, s.step, p.max_denoising_steps, p.t_min, p.t_max,
                                p.entropy_bound, s.generator, fixed=s.fixed, template=s.template,
                                disallowed=s.disallowed)
            results.append(res)
        soft = model.soft_embeddings(logits)  # [B, C, H]: self-conditioning for the next step
        for b, (s, res) in enumerate(zip(states, results)):
            s.apply_step(res, soft[b])
        self.stats["denoise_steps"] += len(states)
