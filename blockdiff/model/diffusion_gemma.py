"""DiffusionGemma: one weight set, two passes.

- ``encode(input_ids, cache)``: causal; reads the prompt or a committed canvas, appends its keys/values to
  the cache (positions continue after what the cache holds). Uses the encoder ``layer_scalar``s.
- ``denoise(canvas_ids, cache, ...)``: bidirectional over the canvas, read-only over the cached prefix
  (sliding layers see the last ``sliding_window - 1`` cached positions). Canvas embeddings first pass
  through the self-conditioning block. Returns soft-capped fp32 logits ``[B, C, V]``. Uses the decoder
  ``layer_scalar``s.

Both run the whole batch at once: per layer one attention call (each row against its own cached prefix, padded
and masked) and one grouped GEMM per expert matrix over every row's routed tokens, with a number of dispatched ops
that does not depend on the batch size, and no host read of device values. ``batch_invariant = True`` instead
computes attention and experts per row, so a row's result is bit-identical to the row alone (deterministic mode).

The model computes only: it never samples, schedules or tokenizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kv_cache import KVCache, KVPool, SequenceCache, attention_span, to_device
from .attention import AttnMeta
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
        # False: one batched pass (fast; a row's logits match the row alone to rounding). True: attention and
        # experts per row, so a row's result never depends on its batch (bit-identical; deterministic mode).
        self.batch_invariant = False
        self._kv_pool: KVPool | None = None
        self.spans = sorted({attention_span(s) for s in t.layers}, key=lambda w: -1 if w is None else w)
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

    @property
    def kv_pool(self) -> KVPool:
        """The paged KV storage every cache of this model draws from (created on first use)."""
        if self._kv_pool is None:
            self._kv_pool = KVPool(self.text.layers, device=self.device, dtype=self.dtype)
        return self._kv_pool

    def new_sequence(self) -> SequenceCache:
        """An empty cache for one request, in this model's pool (batchable with every other one)."""
        return SequenceCache(self.text.layers, self.kv_pool)

    def new_cache(self, batch_size: int = 1) -> KVCache:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return KVCache([self.new_sequence() for _ in range(batch_size)])

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

    def _check_ids(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        """Validate where the ids enter and move them to the model's device. Host (CPU) ids are range-checked
        through numpy: no dispatched op, no device read. Ids already on an accelerator are not read back (that
        would stall the device): the engine validates prompts as host lists and the sampler only draws valid ids."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(f"{name} must be a [batch, length] tensor, got {getattr(ids, 'shape', type(ids))}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise ValueError(f"{name} must hold integer token ids, got {ids.dtype}")
        if ids.device.type == "cpu":
            a = ids.numpy()  # integer ids never require grad
            if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
                raise ValueError(f"{name} holds ids outside [0, {self.vocab_size})")
        return to_device(ids, self.device) if ids.device != self.device else ids

    def _metas(self, view, positions: torch.Tensor, new_valid: torch.Tensor | None) -> dict:
        """Masks per attention span. positions [B, S]; new_valid [B, S] (encode: False on padding) or None (denoise:
        every canvas position sees the row's visible prefix and the whole canvas)."""
        B, S = positions.shape
        per_row = self.batch_invariant
        metas = {}
        for g in self.spans:
            pre = view.prefix(g)
            P = pre.pos.shape[1]
            if new_valid is not None:  # causal (and windowed) over stored + new positions
                kpos = torch.cat([pre.pos, positions], dim=1)[:, None, :]  # [B, 1, P + S]
                q = positions[:, :, None]  # [B, S, 1]
                m = torch.cat([pre.valid, new_valid], dim=1)[:, None, :] & (kpos <= q)  # [B, S, P + S]
                if g is not None:
                    m = m & (kpos > q - g)
                rows = None
                if per_row:
                    rows = [torch.cat([m[b, :, lo:hi], m[b, :, P:]], dim=-1) for b, (lo, hi) in enumerate(pre.rows)]
                metas[g] = AttnMeta(m[:, None], pre.rows, rows, per_row)
            else:
                valid = pre.valid
                if g is not None:  # a cache that keeps every position still shows only the window
                    valid = valid & (pre.pos > positions[:, :1] - g)
                kvalid = torch.cat([valid, torch.ones(B, S, dtype=torch.bool, device=valid.device)], dim=1)
                metas[g] = AttnMeta(kvalid[:, None, None, :], pre.rows, None, per_row)
        return metas

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        input_ids: torch.Tensor,  # [B, S], right-padded when lengths is given
        cache,  # KVCache (or a TrainCache)
        lengths: list[int] | None = None,
        logits: str | None = None,  # None | "last" | "all"
    ) -> torch.Tensor | None:
        """Causal pass over new tokens; appends their K/V to each cache row.

        ``logits="last"`` returns [B, V] for each row's last real token (the next-token head),
        ``"all"`` returns [B, S, V]; default returns nothing.
        """
        ids = self._check_ids(input_ids, "input_ids")
        B, S = ids.shape
        if cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} rows but input_ids has {B}")
        lengths = [S] * B if lengths is None else [int(n) for n in lengths]
        if len(lengths) != B or any(n < 1 or n > S for n in lengths):
            raise ValueError(f"lengths must give 1..{S} tokens for each of {B} rows, got {lengths}")
        if logits not in (None, "last", "all"):
            raise ValueError(f"logits must be None, 'last' or 'all', got {logits!r}")
        dev = self.device
        view = cache.begin(lengths, S, dev, self.dtype)
        steps = torch.arange(S, device=dev)[None]  # [1, S]
        positions = view.start[:, None] + steps  # [B, S]
        new_valid = steps < to_device(torch.tensor(lengths), dev)[:, None]  # [B, S]
        x = self.embed(ids)
        rope = self._rope(positions, x.dtype)
        metas = self._metas(view, positions, new_valid)
        for i, layer in enumerate(self.layers):
            spec = layer.self_attn.spec
            cos, sin = rope[spec.layer_type]
            x, k_new, v_new = layer(x, cos, sin, view.read(i), metas[attention_span(spec)], causal=True,
                                    moe_per_row=self.batch_invariant)
            view.write(i, k_new, v_new)
        view.commit()
        if logits is None:
            return None
        h = self.norm(x)
        if logits == "all":
            return self.lm_head(h)
        last = to_device(torch.tensor([n - 1 for n in lengths]), dev)
        return self.lm_head(h[torch.arange(B, device=dev), last])

    # ------------------------------------------------------------------ denoise
    def denoise(
        self,
        canvas_ids: torch.Tensor,  # [B, C]
        cache,  # KVCache (or a TrainCache)
        self_conditioning_logits: torch.Tensor | None = None,  # [B, C, V]
        self_conditioning_embeds: torch.Tensor | None = None,  # [B, C, H], = soft_embeddings(softmax(logits))
        self_conditioning_mask: torch.Tensor | None = None,  # [B] bool: rows without a signal get zeros
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Bidirectional pass over each row's canvas against its cached prefix; never writes the cache.

        Returns soft-capped fp32 logits [B, C, V] (or the final normed hidden states [B, C, H]).
        """
        ids = self._check_ids(canvas_ids, "canvas_ids")
        B, C = ids.shape
        if cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} rows but the canvas batch has {B}")
        if self_conditioning_logits is not None and self_conditioning_embeds is not None:
            raise ValueError("pass self_conditioning_logits or self_conditioning_embeds, not both")
        dev = self.device
        x = self.embed(ids)
        if self_conditioning_logits is not None:
            soft = self.soft_embeddings(self_conditioning_logits.softmax(dim=-1, dtype=torch.float32))
        elif self_conditioning_embeds is not None:
            soft = self_conditioning_embeds.to(x.dtype)
        else:
            soft = torch.zeros_like(x)
        if self_conditioning_mask is not None:
            soft = soft * to_device(self_conditioning_mask, dev).to(soft.dtype)[:, None, None]
        x = self.self_conditioning(x, soft)
        view = cache.begin(None, C, dev, self.dtype)
        positions = view.start[:, None] + torch.arange(C, device=dev)[None]  # [B, C]
        rope = self._rope(positions, x.dtype)
        metas = self._metas(view, positions, None)
        for i, layer in enumerate(self.layers):
            spec = layer.self_attn.spec
            cos, sin = rope[spec.layer_type]
            x, _, _ = layer(x, cos, sin, view.read(i), metas[attention_span(spec)], causal=False,
                            moe_per_row=self.batch_invariant)
        h = self.norm(x)
        return h if return_hidden else self.lm_head(h)
