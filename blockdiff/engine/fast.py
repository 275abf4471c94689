"""Fast mode (approximate): one denoising tick for the requests that asked for ``fast``.

Per request and canvas a ``FastState`` holds the keys/values of every canvas position from the last pass that
computed it (the K/V store, see ``model/fast_denoise.py``), the tokens they were computed from, and which
positions are *frozen*. A position freezes when it was accepted with its argmax token and that argmax did not
change since the previous step; from then on its token is kept (entropy 0, always accepted, like an unmasked
token of a masked-diffusion model) and its keys/values are reused. Each step recomputes only:

- every position that is not frozen (the undecided ones),
- every position whose input token differs from the one its stored keys/values were computed from,
- the neighbours (``VICINITY`` either side) of the positions that froze at the previous step (dInfer's vicinity
  refresh: the tokens next to a newly decided one are the ones whose context changed most),

and every ``REFRESH``-th step the whole canvas (a refresh also unfreezes a position whose fresh argmax disagrees
with its kept token). Frozen positions also skip the sampler's vocabulary-sized work and feed back their token's
embedding as self-conditioning.

What is approximate: stale keys/values of positions not recomputed (they see the canvas as it was when they
were), kept tokens between refreshes, and the mean entropy of a canvas counting a frozen position as 0 (so a
canvas may stop earlier). Exact mode is untouched. Rows that need the exact per-position distributions run exact
even when they ask for fast: ``rng="reference"``, structured output, ``logprobs``, and deterministic mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kv_cache import KVCache
from ..model.fast_denoise import denoise_active, empty_store
from ..sampling import counter_rng
from ..sampling.penalties import apply_penalties
from ..sampling.sampler import (ROW_CHUNK, RowParams, accept_and_renoise, entropy_and_draw, row_temperature,
                                same_as_previous)
from .failures import NON_FINITE, fail_request, guarded
from .model_state import ModelState, StepRow

REFRESH = 2  # every REFRESH-th step of a canvas recomputes every position (step 0 included)
VICINITY = 1  # neighbours either side of a newly frozen position recomputed at the next step
FREEZE_AFTER = 1  # consecutive steps a position must be accepted with an unchanged argmax before it freezes


@dataclass
class FastState:
    """One request's fast-mode state for its current canvas (reset by each new canvas)."""

    store: list  # per layer (k, v) [Hkv, C, D]: each position's keys/values from the last pass that computed it
    kv_tokens: torch.Tensor  # [C] the input tokens those keys/values were computed from (-1: never)
    frozen: torch.Tensor  # bool [C]
    newly_frozen: torch.Tensor  # bool [C] froze at the previous step
    streak: torch.Tensor  # int [C] consecutive steps accepted with an unchanged argmax


def uses_fast(s: ModelState, deterministic: bool) -> bool:
    p = s.params
    return bool(p.fast) and not deterministic and p.rng != "reference" and s.constraint is None \
        and p.logprobs is None


def _fresh(model, C: int) -> FastState:
    store = [(k[0], v[0]) for k, v in empty_store(model, 1, C)]
    dev = model.device
    z = torch.zeros(C, dtype=torch.bool, device=dev)
    return FastState(store, torch.full((C,), -1, dtype=torch.long, device=dev), z, z.clone(),
                     torch.zeros(C, dtype=torch.int32, device=dev))


def _dilate(mask: torch.Tensor, w: int) -> torch.Tensor:
    """bool [B, C] -> the positions within ``w`` of a True one."""
    if w <= 0:
        return mask
    m = mask[:, None].float()  # [B, 1, C]
    k = torch.ones(1, 1, 2 * w + 1, dtype=m.dtype, device=m.device)
    return torch.nn.functional.conv1d(m, k, padding=w)[:, 0] > 0


@torch.no_grad()
def fast_tick(engine, states: list[ModelState]) -> None:
    """One approximate denoising step for ``states`` (all in fast mode), then each request's ``apply_step``."""
    model = engine.model
    dev, C, V = model.device, engine.canvas_length, model.vocab_size
    B = len(states)
    for s in states:
        if s.fast is None or s.step == 0:
            s.fast = _fresh(model, C)
    fs = [s.fast for s in states]
    canvas = torch.stack([s.canvas for s in states]).to(dev)  # [B, C]
    previous = torch.stack([s.argmax for s in states]).to(dev)
    frozen = torch.stack([f.frozen for f in fs])  # [B, C]
    params = RowParams.build([s.sampler_row() for s in states], dev, C, V)
    kept = frozen if params.fixed is None else frozen | params.fixed  # template tokens never change either
    refresh = params.step % REFRESH == 0  # [B], from the step column already on the device
    kv_tokens = torch.stack([f.kv_tokens for f in fs])  # [B, C]
    stale = canvas != kv_tokens
    active = ~kept | stale | _dilate(torch.stack([f.newly_frozen for f in fs]), VICINITY) | refresh[:, None]
    active[:, 0] |= ~active.any(-1)  # a row with everything kept (a full template, all frozen) still runs one
    # --- pack the active positions: [B, A], a row's real ones first, padded with repeats of its first one ---
    counts = active.sum(-1)
    order = torch.argsort((~active).to(torch.int8), dim=-1, stable=True)  # active positions first, in order
    store_valid = ~active & (kv_tokens >= 0)  # stored keys/values the active queries read
    # the tick's one host read before the forward: the packed widths (active positions, stored ones)
    counts_host, stored_host = torch.stack([counts, store_valid.sum(-1)]).tolist()
    A = max(counts_host)
    index = order[:, :A]
    valid = torch.arange(A, device=dev)[None] < counts[:, None]
    index = torch.where(valid, index, index[:, :1])
    ids = canvas.gather(1, index)
    soft = None
    if any(s.sc_embeds is not None for s in states):
        H = model.text.hidden_size
        full = torch.stack([s.sc_embeds if s.sc_embeds is not None else torch.zeros(C, H, device=dev, dtype=model.dtype)
                            for s in states])  # [B, C, H]
        soft = full.gather(1, index[..., None].expand(-1, -1, H))
    store = [(torch.stack([f.store[i][0] for f in fs]), torch.stack([f.store[i][1] for f in fs]))
             for i in range(len(model.layers))]
    logits = denoise_active(model, ids, index, valid, soft, KVCache([s.cache for s in states]), store,
                            store_valid, max(stored_host))  # [B, A, V]
    # --- the sampler on the active positions only; frozen ones keep their token with entropy 0 ---
    if params.rep is not None or params.bias is not None:  # penalties and logit_bias, as in exact mode
        apply_penalties(logits, params.rep, params.bias, ROW_CHUNK)
    if params.disallowed is not None:
        logits.masked_fill_(params.disallowed[:, None, :], float("-inf"))
    logits.div_(row_temperature(params)[:, None, None])
    arg_a = logits.argmax(dim=-1)  # [B, A]
    h_a, sampled_a = entropy_and_draw(  # logits now hold the probabilities
        logits, lambda: counter_rng.uniform(params.seed, params.canvas_index, params.step.long(), counter_rng.SAMPLE,
                                            C).gather(1, index), params, arg_a)
    h = torch.zeros(B, C, dtype=torch.float32, device=dev).scatter_(1, index, h_a)
    fresh_argmax = canvas.clone().scatter_(1, index, arg_a)
    # A refresh re-decides a frozen position whose fresh argmax disagrees with its kept token.
    frozen = frozen & ~(refresh[:, None] & active & (fresh_argmax != canvas))
    h.masked_fill_(frozen, 0.0)
    argmax = torch.where(frozen, canvas, fresh_argmax)
    sampled = torch.where(frozen, canvas, canvas.clone().scatter_(1, index, sampled_a))
    noise = counter_rng.randint(params.seed, params.canvas_index, params.step.long(), counter_rng.RENOISE, C, V)
    new_canvas, argmax, accepted, mean_h = accept_and_renoise(h, argmax, sampled, noise, params)
    confident = mean_h < params.confidence
    has_prev = params.step > 0
    settled = accepted & (sampled == argmax) & (argmax == previous) & has_prev[:, None]
    streak = torch.where(settled, torch.stack([f.streak for f in fs]) + 1, 0)
    newly = ~frozen & (streak >= FREEZE_AFTER)
    if params.fixed is not None:
        newly &= ~params.fixed  # template positions are kept by the sampler already
    # --- self-conditioning for the next step: the active positions' distributions, frozen ones their token ---
    soft_a = model.soft_embeddings(logits)  # [B, A, H]
    H = soft_a.shape[-1]
    soft_next = model.embed(canvas).to(soft_a.dtype)  # [B, C, H]: a one-hot distribution's soft embedding
    soft_next = torch.where(frozen[..., None], soft_next,
                            soft_next.scatter(1, index[..., None].expand(-1, -1, H), soft_a))
    kv_tokens = kv_tokens.scatter_(1, index, ids)
    same = same_as_previous(argmax, previous, has_prev)
    # The tick's one readback, as in exact mode: stop flags, finite logits, argmax, and for draft listeners the
    # acceptance masks and entropies (thousandths).
    drafts = any(s.on_event is not None for s in states)
    finite = torch.isfinite(h).all(-1)
    parts = [same[:, None].long(), confident[:, None].long(), finite[:, None].long(), argmax]
    if drafts:
        parts += [accepted.long(), (h.nan_to_num(0.0).clamp(0, 1e3) * 1000).round().long()]
    host = torch.cat(parts, 1).tolist()
    for b, s in enumerate(states):
        f = s.fast
        f.store = [(k[b], v[b]) for k, v in store]
        f.kv_tokens, f.frozen, f.newly_frozen, f.streak = kv_tokens[b], frozen[b] | newly[b], newly[b], streak[b]
        row = host[b]
        if not row[2]:  # non-finite logits: never a success with garbage
            fail_request(s, NON_FINITE.format(step=s.step + 1))
            continue
        guarded(s, "finishing its denoising step failed", s.apply_step,
                StepRow(new_canvas[b], argmax[b], row[3:3 + C],
                        [bool(x) for x in row[3 + C:3 + 2 * C]] if drafts else None, bool(row[0]), bool(row[1]),
                        [x / 1000 for x in row[3 + 2 * C:3 + 3 * C]] if drafts else None), soft_next[b])
    engine.stats["denoise_steps"] += B
    # How much of the canvas work fast mode did: positions computed / canvas positions of its steps.
    engine.stats["fast_positions"] = engine.stats.get("fast_positions", 0) + sum(counts_host)
    engine.stats["fast_canvas_positions"] = engine.stats.get("fast_canvas_positions", 0) + B * C
