"""The approximate denoise pass of fast mode: recompute only some canvas positions, reuse the others' keys/values.

Exact denoising recomputes every canvas position at every step. Once a position has settled, its keys/values
change little from one step to the next, so fast mode keeps them (the canvas's "K/V store", one [B, Hkv, C, D]
pair per layer) and runs only the positions it still needs: the undecided ones, the ones whose input token changed
since their keys/values were computed, and their neighbourhood; a periodic full pass refreshes everything. This is
the dual-cache approximation of Fast-dLLM (prefix and settled positions served from a cache, the active positions
recomputed) with dInfer-style vicinity refresh; ``engine/fast.py`` decides which positions run.

``denoise_active`` computes, for each row, the positions ``index`` [B, A] (padded with repeats of a real one where
``valid`` is False). Every active query sees: the row's cached prefix (as in ``denoise``), the stored keys/values of
the canvas positions not recomputed now (``store_valid``), and the fresh keys/values of this call's positions. The
fresh keys/values are written into the store. Uses the model's layers as they are (the stored canvas entries ride
along as extra "prefix" keys), so nothing here duplicates the layer code.
"""

from __future__ import annotations

import torch

from ..kv_cache import gather_prefix
from .attention import AttnMeta


@torch.no_grad()
def denoise_active(model, ids: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, soft: torch.Tensor | None,
                   cache, store: list, store_valid: torch.Tensor, store_width: int | None = None) -> torch.Tensor:
    """ids [B, A] the active positions' input tokens; index [B, A] their canvas positions; valid [B, A] False on
    padding; soft [B, A, H] their self-conditioning embeddings (None: none yet, zeros); store: per layer
    (k, v) [B, Hkv, C, D], updated in place at ``index``; store_valid [B, C]: stored entries the queries may read
    (False for positions recomputed now and for rows without a store yet); ``store_width``: the most True of a row
    in ``store_valid`` (None: read here; a smaller value would drop stored keys). Only those stored entries are
    attended to, packed per row (a row's first, padded and masked): attention sees the prefix, the stored positions
    and this call's ones, never the stale entries of the positions being recomputed. Returns logits [B, A, V] (fp32, soft-capped), the same kind
    of logits ``denoise`` returns for those positions."""
    B, A = ids.shape
    dev = model.device
    view = cache.begin(None, A, dev, model.dtype)
    prefixes = [view.prefix(g) for g in model.spans]
    positions = view.start[:, None] + index  # [B, A]: each position at its own canvas offset
    # The denoise masks read the canvas's first position (sliding windows end there): the row start, whatever is active.
    masks = model._masks(view.start[:, None].expand(B, A), [p.pos for p in prefixes], [p.valid for p in prefixes], None)
    W = int(store_valid.sum(-1).max()) if store_width is None else store_width
    # the stored positions each row reads, first in each row (in canvas order), padded to W and masked
    stored_at = torch.argsort((~store_valid).to(torch.int8), dim=-1, stable=True)[:, :W]  # [B, W]
    canvas_keys = (torch.arange(W, device=dev)[None] < store_valid.sum(-1)[:, None])[:, None, None, :]  # [B,1,1,W]
    gather_at = stored_at[:, None, :, None]  # [B, 1, W, 1]
    new_keys = valid[:, None, None, :]  # [B, 1, 1, A]: padding repeats are never read
    metas = []
    for m in masks:  # [B, 1, 1, P + A] -> [B, 1, 1, P + W + A]: prefix, stored canvas, this call's positions
        P = m.shape[-1] - A
        metas.append(AttnMeta(torch.cat([m[..., :P], canvas_keys, new_keys], dim=-1), None))
    if soft is None:
        soft = torch.zeros(B, A, model.text.hidden_size, device=dev, dtype=model.dtype)
    x = model.self_conditioning(model.embed(ids), soft.to(model.dtype))
    rope = model._rope(positions, x.dtype)
    scatter_at = index[:, None, :, None]  # [B, 1, A, 1]
    for i, layer in enumerate(model.layers):
        cos, sin = rope[layer.self_attn.spec.layer_type]
        pk, pv = gather_prefix(*view.sources(i))
        sk, sv = store[i]
        if W:
            at = gather_at.expand(-1, sk.shape[1], -1, sk.shape[3])
            pk, pv = torch.cat([pk, sk.gather(2, at)], dim=2), torch.cat([pv, sv.gather(2, at)], dim=2)
        x, k_new, v_new = layer(x, cos, sin, (pk, pv), metas[model._span_index[i]], causal=False)
        # Padding repeats write (near-)identical values to the position they repeat.
        sk.scatter_(2, scatter_at.expand(-1, sk.shape[1], -1, sk.shape[3]), k_new.to(sk.dtype))
        sv.scatter_(2, scatter_at.expand(-1, sv.shape[1], -1, sv.shape[3]), v_new.to(sv.dtype))
    return model.lm_head(model.norm(x))


def empty_store(model, batch: int, canvas_length: int) -> list:
    """Per layer (k, v) zeros [B, Hkv, C, D] in the model's dtype: a store before the first full pass."""
    out = []
    for layer in model.layers:
        a = layer.self_attn
        shape = (batch, a.n_kv, canvas_length, a.head_dim)
        out.append((torch.zeros(shape, device=model.device, dtype=model.dtype),
                    torch.zeros(shape, device=model.device, dtype=model.dtype)))
    return out
