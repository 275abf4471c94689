"""DiffusionGemma: one weight set, two passes.

- ``encode(input_ids, cache)``: causal; reads the prompt or a committed canvas, appends its keys/values to
  the cache (positions continue after what the cache holds). Uses the encoder ``layer_scalar``s.
- ``denoise(canvas_ids, cache, ...)``: bidirectional over the canvas, read-only over the cached prefix
  (sliding layers see the last ``sliding_window - 1`` cached positions). Canvas embeddings first pass
  through the self-conditioning block. Returns soft-capped fp32 logits ``[B, C, V]``. Uses the decoder
  ``layer_scalar``s.

The model computes only: it never samples, schedules or tokenizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SLIDING, ModelConfig
from ..kv_cache import KVCache
from .layers import DecoderLayer, RMSNorm, SelfConditioning, rope_cos_sin, rope_inv_freq


class DiffusionGemma(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        t = self.text = config.text
        self.canvas_length = config.canvas_length
        self.vocab_size = t.vocab_size
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(t, spec) for spec in t.layers])
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.self_conditioning = SelfConditioning(t)
        self.softcap = t.final_logit_softcapping
        # Compute every row as it would be computed alone (per-row attention and experts), so a seeded
        # request's output does not depend on its batch. Training turns it off for speed.
        self.batch_invariant = True
        # One inverse-frequency table per layer type (head dims differ between sliding and full layers).
        for lt in sorted(set(t.layer_types)):
            spec = next(s for s in t.layers if s.layer_type == lt)
            self.register_buffer(f"inv_freq_{lt}", rope_inv_freq(t.rope_parameters[lt], spec.head_dim),
                                 persistent=False)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        # The final norm's weight is in the compute dtype even when the embedding is quantized.
        return self.norm.weight.dtype

    def new_cache(self, batch_size: int = 1) -> KVCache:
        return KVCache.empty(self.text.layers, batch_size)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.embed_tokens, nn.Embedding):  # quantized table (blockdiff/quant)
            return self.embed_tokens.lookup(ids, self.dtype) * torch.tensor(self.text.hidden_size ** 0.5).to(self.dtype)
        w = self.embed_tokens.weight
        return F.embedding(ids, w) * torch.tensor(self.text.hidden_size ** 0.5).to(w.dtype)

    def soft_embeddings(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [..., V] (a distribution per position) -> expected scaled embedding [..., H]."""
        if not isinstance(self.embed_tokens, nn.Embedding):
            return self.embed_tokens.mix(probs, self.dtype) * torch.tensor(self.text.hidden_size ** 0.5).to(self.dtype)
        w = self.embed_tokens.weight
        return torch.matmul(probs.to(w.dtype), w) * torch.tensor(self.text.hidden_size ** 0.5).to(w.dtype)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., H] -> soft-capped fp32 logits [..., V] (tied embeddings)."""
        if isinstance(self.embed_tokens, nn.Embedding):
            logits = F.linear(h, self.embed_tokens.weight).float()
        else:
            logits = self.embed_tokens.project(h).float()
        if self.softcap:
            if torch.is_grad_enabled():
                logits = torch.tanh(logits / self.softcap) * self.softcap
            else:  # in place: one [.., V] buffer instead of three
                logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def _rope(self, positions: torch.Tensor, dtype):
        return {lt: rope_cos_sin(getattr(self, f"inv_freq_{lt}"), positions, dtype)
                for lt in set(self.text.layer_types)}

    def _check_ids(self, ids: torch.Tensor, name: str) -> None:
        if ids.dim() != 2:
            raise ValueError(f"{name} must be [batch, length], got shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"{name} holds ids outside [0, {self.vocab_size})")

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        input_ids: torch.Tensor,  # [B, S], right-padded when lengths is given
        cache: KVCache,
        lengths: list[int] | None = None,
        logits: str | None = None,  # None | "last" | "all"
    ) -> torch.Tensor | None:
        """Causal pass over new tokens; appends their K/V to each cache row.

        ``logits="last"`` returns [B, V] for each row's last real token (the next-token head),
        ``"all"`` returns [B, S, V]; default returns nothing.
        """
        self._check_ids(input_ids, "input_ids")
        B, S = input_ids.shape
        if cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} rows but input_ids has {B}")
        lengths = [S] * B if lengths is None else list(lengths)
        if len(lengths) != B or any(n < 1 or n > S for n in lengths):
            raise ValueError(f"lengths must give 1..{S} tokens for each of {B} rows, got {lengths}")
        dev = self.device
        start = torch.tensor(cache.lengths, device=dev)
        positions = start[:, None] + torch.arange(S, device=dev)[None]  # [B, S]
        new_valid = torch.arange(S, device=dev)[None] < torch.tensor(lengths, device=dev)[:, None]  # [B, S]
        x = self.embed(input_ids.to(dev))
        rope = self._rope(positions, x.dtype)
        masks_by_key: dict = {}
        for i, layer in enumerate(self.layers):
            spec = layer.self_attn.spec
            kvs = cache.layer_kv(i)
            masks = []
            for b in range(B):
                P = 0 if kvs[b] is None else kvs[b][0].shape[1]
                key = (spec.layer_type, b, P)
                if key not in masks_by_key:  # [S, P + S]: causal (and windowed) over stored + new positions
                    kpos = torch.cat([start[b] - P + torch.arange(P, device=dev), positions[b]])
                    kvalid = torch.cat([torch.ones(P, dtype=torch.bool, device=dev), new_valid[b]])
                    q, k = positions[b][:, None], kpos[None, :]
                    m = kvalid[None, :] & (k <= q)
                    if spec.layer_type == SLIDING:
                        m = m & (k > q - spec.sliding_window)
                    masks_by_key[key] = m
                masks.append(masks_by_key[key])
            cos, sin = rope[spec.layer_type]
            x, k_new, v_new = layer(x, cos, sin, kvs, masks, causal=True, moe_per_row=self.batch_invariant)
            for b, seq in enumerate(cache.seqs):
                seq.append(i, k_new[b, :, :lengths[b]], v_new[b, :, :lengths[b]])
        for b, seq in enumerate(cache.seqs):
            seq.length += lengths[b]
        if logits is None:
            return None
        h = self.norm(x)
        if logits == "all":
            return self.lm_head(h)
        if logits == "last":
            idx = torch.tensor([n - 1 for n in lengths], device=dev)
            return self.lm_head(h[torch.arange(B, device=dev), idx])
        raise ValueError(f"logits must be None, 'last' or 'all', got {logits!r}")

    # ------------------------------------------------------------------ denoise
    def denoise(
        self,
        canvas_ids: torch.Tensor,  # [B, C]
        cache: KVCache,
        self_conditioning_logits: torch.Tensor | None = None,  # [B, C, V]
        self_conditioning_embeds: torch.Tensor | None = None,  # [B, C, H], = soft_embeddings(softmax(logits))
        self_conditioning_mask: torch.Tensor | None = None,  # [B] bool: rows without a signal get zeros
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Bidirectional pass over each row's canvas against its cached prefix; never writes the cache.

        Returns soft-capped fp32 logits [B, C, V] (or the final normed hidden states [B, C, H]).
        """
        self._check_ids(canvas_ids, "canvas_ids")
        B, C = canvas_ids.shape
        if cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} rows but the canvas batch has {B}")
        if self_conditioning_logits is not None and self_conditioning_embeds is not None:
            raise ValueError("pass self_conditioning_logits or self_conditioning_embeds, not both")
        dev = self.device
        x = self.embed(canvas_ids.to(dev))
        if self_conditioning_logits is not None:
            soft = self.soft_embeddings(self_conditioning_logits.softmax(dim=-1, dtype=torch.float32))
        elif self_conditioning_embeds is not None:
            soft = self_conditioning_embeds.to(x.dtype)
        else:
            soft = torch.zeros_like(x)
        if self_conditioning_mask is not None:
            soft = soft * self_conditioning_mask.to(device=dev, dtype=soft.dtype)[:, None, None]
        x = self.self_conditioning(x, soft)
        start = torch.tensor(cache.lengths, device=dev)
        positions = start[:, None] + torch.arange(C, device=dev)[None]
        rope = self._rope(positions, x.dtype)
        no_masks = [None] * B  # every canvas position sees its row's whole visible prefix and whole canvas
        for i, layer in enumerate(self.layers):
            cos, sin = rope[layer.self_attn.spec.layer_type]
            x, _, _ = layer(x, cos, sin, cache.layer_kv(i), no_masks, causal=False,
                            moe_per_row=self.batch_invariant)
        h = self.norm(x)
        return h if return_hidden else self.lm_head(h)
