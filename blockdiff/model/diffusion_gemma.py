"""DiffusionGemma: one weight set, two passes.

- ``encode(input_ids, cache)``: causal; reads the prompt or a committed canvas, appends its keys/values to
  the cache (positions continue after what the cache holds). Uses the encoder ``layer_scalar``s. With
  ``pixel_values`` / ``image_position_ids`` (see ``vision.py``) the vision tower's soft tokens replace the
  embeddings at the image-token positions; with ``mm_token_type_ids`` (1 = image token) and
  ``use_bidirectional_attention == "vision"``, the tokens of one image also attend to each other both ways.
- ``denoise(canvas_ids, cache, ...)``: bidirectional over the canvas, read-only over the cached prefix
  (sliding layers see the last ``sliding_window - 1`` cached positions). Canvas embeddings first pass
  through the self-conditioning block. Returns soft-capped fp32 logits ``[B, C, V]``. Uses the decoder
  ``layer_scalar``s.

Both run the whole batch at once: per layer one attention call (each row against its own cached prefix, padded
and masked) and one grouped GEMM per expert matrix over every row's routed tokens, with a number of dispatched ops
that does not depend on the batch size, and no host read of device values. ``batch_invariant = True`` instead
runs every row alone (its own forward, at batch 1), so a row's result is bit-identical to the row alone whatever
the shapes (deterministic mode).

The model computes only: it never samples, schedules or tokenizes.
"""

from __future__ import annotations

import os
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kv_cache import KVCache, KVPool, SequenceCache, attention_span, gather_prefix, to_device
from .attention import AttnMeta
from .cpu_threads import each_slice, split
from .layers import DecoderLayer, RMSNorm, SelfConditioning, rope_cos_sin, rope_inv_freq, rope_scaling
from .vision_tower import VisionEncoder, image_blocks, same_image, scatter_image_features


# The tied LM head on the CPU (inference), a block of the table at a time, each block's product written straight
# into its columns of the logits: one [M, V] product per thread streamed its whole table slice through MKL's
# packing, and the parts were then concatenated (twice). Mid checkpoint, [128 x 512] x [512 x 32,768]: 72 -> 59 ms
# on one thread, 48 -> 33 ms on two (docs/benchmarks.md "Every core, round five").
HEAD_BLOCK_BYTES = 1 << 20


def _head_blocks(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor, a: int, b: int) -> None:
    """out[:, a:b] = h @ w[a:b].T, a block of ~HEAD_BLOCK_BYTES of the table at a time."""
    rows = max(64, HEAD_BLOCK_BYTES // (w.shape[1] * w.element_size()))
    for i in range(a, b, rows):
        j = min(i + rows, b)
        torch.mm(h, w[i:j].t(), out=out[:, i:j])


class DiffusionGemma(nn.Module):
    def __init__(self, config: ModelConfig, with_vision: bool = False):
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
        # The vision tower (images in the prompt); None for a text-only model. The loader builds it when the
        # checkpoint holds its tensors.
        self.vision = VisionEncoder(config.vision, t.hidden_size) if with_vision and config.vision else None
        # False: one batched pass (fast; a row's logits match the row alone to rounding). True: each row runs its
        # own batch-1 forward, so a row's result never depends on its batch (bit-identical; deterministic mode).
        self.batch_invariant = False
        self._kv_pool: KVPool | None = None
        self.spans = sorted({attention_span(s) for s in t.layers}, key=lambda w: -1 if w is None else w)
        self._span_index = [self.spans.index(attention_span(s)) for s in t.layers]
        # Compile the batched denoise step: None = automatic (CUDA only), True / False = force on / off.
        self.compile_denoise: bool | None = None
        self._compiled = None
        self._compile_failed = False
        # One inverse-frequency table per layer type (head dims differ between sliding and full layers).
        for lt in sorted(set(t.layer_types)):
            spec = next(s for s in t.layers if s.layer_type == lt)
            self.register_buffer(f"inv_freq_{lt}", rope_inv_freq(t.rope_parameters[lt], spec.head_dim,
                                                                 t.max_position_embeddings), persistent=False)
        # cos/sin factor per layer type (YaRN's attention factor; 1.0 otherwise): host floats, not buffers
        self._rope_scale = {lt: rope_scaling(t.rope_parameters[lt], t.max_position_embeddings)
                            for lt in set(t.layer_types)}

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
        flat = probs.to(w.dtype).reshape(-1, probs.shape[-1])
        # on the CPU the vocabulary dealt to its threads, the partial products summed
        mixed = split(lambda a, b: flat[:, a:b] @ w[a:b], w.shape[0], flat.numel() * w.shape[1], dim=None,
                      device=w.device).reshape(*probs.shape[:-1], w.shape[1])
        return mixed * torch.tensor(self.text.hidden_size ** 0.5).to(w.dtype)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., H] -> soft-capped fp32 logits [..., V] (tied embeddings)."""
        if isinstance(self.embed_tokens, nn.Embedding):
            w = self.embed_tokens.weight
            if w.device.type == "cpu" and not torch.is_grad_enabled() and h.dtype == w.dtype:
                # on the CPU the vocabulary dealt to its threads, each writing its columns of the logits
                flat = h.reshape(-1, h.shape[-1])
                out = torch.empty(flat.shape[0], w.shape[0], dtype=w.dtype)
                each_slice(partial(_head_blocks, flat, w, out), w.shape[0], flat.numel() * w.shape[0])
                logits = out.reshape(*h.shape[:-1], w.shape[0]).float()
            else:
                logits = F.linear(h, w).float()
        else:
            logits = self.embed_tokens.project(h).float()
        if self.softcap:
            if torch.is_grad_enabled():
                logits = torch.tanh(logits / self.softcap) * self.softcap
            else:  # in place, one [.., V] buffer: tanh(x) = 2 sigmoid(2x) - 1, 3x faster than tanh_ on CPU (abs. error
                # < 2e-7 on tanh, i.e. < 1e-5 on a logit at soft-cap 30)
                logits.mul_(2.0 / self.softcap).sigmoid_().mul_(2.0 * self.softcap).sub_(self.softcap)
        return logits

    def _rope(self, positions: torch.Tensor, dtype):
        return {lt: rope_cos_sin(getattr(self, f"inv_freq_{lt}"), positions, dtype, self._rope_scale[lt])
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

    def _masks(self, positions: torch.Tensor, span_pos: list, span_valid: list,
               new_valid: torch.Tensor | None, blocks: torch.Tensor | None = None) -> list:
        """Attention masks per span (``self.spans`` order). positions [B, S]; span_pos/valid [B, P] per span;
        new_valid [B, S] (encode: False on padding) or None (denoise: every canvas position sees the row's visible
        prefix and the whole canvas); blocks [B, S] (encode with images: the image each new token belongs to, -1
        for text) or None. Pure tensor ops: no host values."""
        B, S = positions.shape
        masks = []
        for g, ppos, pvalid in zip(self.spans, span_pos, span_valid):
            if new_valid is not None:  # causal (and windowed) over stored + new positions
                kpos = torch.cat([ppos, positions], dim=1)[:, None, :]  # [B, 1, P + S]
                q = positions[:, :, None]  # [B, S, 1]
                m = torch.cat([pvalid, new_valid], dim=1)[:, None, :] & (kpos <= q)  # [B, S, P + S]
                if g is not None:
                    m = m & (kpos > q - g)
                if blocks is not None:  # bidirectional within an image (past the window too, as the reference)
                    P = ppos.shape[1]
                    m = torch.cat([m[:, :, :P], m[:, :, P:] | same_image(blocks, new_valid)], dim=2)
                masks.append(m[:, None])  # [B, 1, S, P + S]
            else:
                if g is not None:  # a cache that keeps every position still shows only the window
                    pvalid = pvalid & (ppos > positions[:, :1] - g)
                kvalid = torch.cat([pvalid, torch.ones(B, S, dtype=torch.bool, device=pvalid.device)], dim=1)
                masks.append(kvalid[:, None, None, :])  # [B, 1, 1, P + S]
        return masks

    def _metas(self, masks: list, prefixes: list) -> list:
        """AttnMeta per span; in batch-invariant mode with each row's visible slice and mask."""
        metas = []
        for m, pre in zip(masks, prefixes):
            rows = None
            if self.batch_invariant and m.shape[2] > 1:  # causal: per-row [S, P_b + S] masks
                P = pre.pos.shape[1]
                rows = [torch.cat([m[b, 0, :, lo:hi], m[b, 0, :, P:]], dim=-1) for b, (lo, hi) in enumerate(pre.rows)]
            metas.append(AttnMeta(m, None if pre is None else pre.rows, rows, self.batch_invariant))
        return metas

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, metas: list, sources: list, causal: bool,
                view=None) -> torch.Tensor:
        """Run every layer; ``sources[i]`` feeds ``gather_prefix`` for layer i; encode writes new K/V to ``view``."""
        rope = self._rope(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            spec = layer.self_attn.spec
            cos, sin = rope[spec.layer_type]
            x, k_new, v_new = layer(x, cos, sin, gather_prefix(*sources[i]), metas[self._span_index[i]],
                                    causal=causal, moe_per_row=self.batch_invariant)
            if view is not None:
                view.write(i, k_new, v_new)
        return x

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        input_ids: torch.Tensor,  # [B, S], right-padded when lengths is given
        cache,  # KVCache (or a TrainCache)
        lengths: list[int] | None = None,
        logits: str | None = None,  # None | "last" | "all"
        pixel_values: torch.Tensor | None = None,  # [N, P, 3 * ps^2]: the images of all rows, in order
        image_position_ids: torch.Tensor | None = None,  # [N, P, 2] (x, y) per patch, (-1, -1) = padding
        mm_token_type_ids: torch.Tensor | None = None,  # [B, S]: 1 = image token, 0 = text
        image_keys: list | None = None,  # a digest per image, with image_memo: vision_tower.FeatureMemo
        image_memo=None,
    ) -> torch.Tensor | None:
        """Causal pass over new tokens; appends their K/V to each cache row.

        ``logits="last"`` returns [B, V] for each row's last real token (the next-token head),
        ``"all"`` returns [B, S, V]; default returns nothing. Images: see the module docstring.
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
        if self.batch_invariant and B > 1 and isinstance(cache, KVCache) and pixel_values is None:
            return self._encode_rows(ids, cache, lengths, logits, mm_token_type_ids)
        dev = self.device
        view = cache.begin(lengths, S, dev, self.dtype)
        steps = torch.arange(S, device=dev)[None]  # [1, S]
        positions = view.start[:, None] + steps  # [B, S]
        new_valid = steps < to_device(torch.tensor(lengths), dev)[:, None]  # [B, S]
        x = self.embed(ids)
        # --- images: soft tokens into the image-token positions; same-image tokens see each other ---
        if pixel_values is not None:
            x = scatter_image_features(self, x, ids, pixel_values, image_position_ids, image_keys, image_memo)
        blocks = image_blocks(self.text, mm_token_type_ids, (B, S), dev)  # [B, S] image index or -1; or None
        prefixes = [view.prefix(g) for g in self.spans]
        metas = self._metas(self._masks(positions, [p.pos for p in prefixes], [p.valid for p in prefixes],
                                        new_valid, blocks), prefixes)
        x = self._layers(x, positions, metas, [view.sources(i) for i in range(len(self.layers))],
                         causal=True, view=view)
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
        for name, sc, last in (("self_conditioning_logits", self_conditioning_logits, self.vocab_size),
                               ("self_conditioning_embeds", self_conditioning_embeds, self.text.hidden_size)):
            if sc is not None and tuple(sc.shape) != (B, C, last):  # else a matmul's shape error, deep inside
                raise ValueError(f"{name} must be [batch, canvas, {last}] = [{B}, {C}, {last}] like the canvas, got "
                                 f"{list(sc.shape)}")
        if self.batch_invariant and B > 1 and isinstance(cache, KVCache):
            return self._denoise_rows(ids, cache, self_conditioning_logits, self_conditioning_embeds,
                                      self_conditioning_mask, return_hidden)
        dev = self.device
        if self_conditioning_logits is not None:
            soft = self.soft_embeddings(self_conditioning_logits.softmax(dim=-1, dtype=torch.float32))
        elif self_conditioning_embeds is not None:
            soft = self_conditioning_embeds.to(self.dtype)
        else:
            soft = torch.zeros(B, C, self.text.hidden_size, device=dev, dtype=self.dtype)
        if self_conditioning_mask is not None:
            soft = soft * to_device(self_conditioning_mask, dev).to(soft.dtype)[:, None, None]
        view = cache.begin(None, C, dev, self.dtype)
        prefixes = [view.prefix(g) for g in self.spans]
        sources = [view.sources(i) for i in range(len(self.layers))]
        span_pos, span_valid = [p.pos for p in prefixes], [p.valid for p in prefixes]
        if self.batch_invariant:  # per-row attention needs each row's host-side slice: eager
            positions = view.start[:, None] + torch.arange(C, device=dev)[None]
            metas = self._metas(self._masks(positions, span_pos, span_valid, None), prefixes)
            x = self.self_conditioning(self.embed(ids), soft)
            h = self.norm(self._layers(x, positions, metas, sources, causal=False))
            return h if return_hidden else self.lm_head(h)
        return self._run_step(ids, soft, view.start, span_pos, span_valid, sources, return_hidden)

    # ------------------------------------------------------------------ batch-invariant (deterministic) mode
    # Every matmul (projections, dense MLP, experts, LM head), norm and attention call of a row runs with exactly
    # the shapes it has when the row is alone: a GEMM's blocking, and so its rounding, depends on the row count
    # (measured: hidden 200 gave logits 8e-6 apart between a row alone and the same row in a batch of 4).
    # Reads the weights once per row: the price of bit-identical outputs in any batch.
    def _denoise_rows(self, ids, cache, sc_logits, sc_embeds, sc_mask, return_hidden: bool) -> torch.Tensor:
        out = None
        for b, seq in enumerate(cache.seqs):
            one = self.denoise(ids[b:b + 1], KVCache([seq]),
                               self_conditioning_logits=None if sc_logits is None else sc_logits[b:b + 1],
                               self_conditioning_embeds=None if sc_embeds is None else sc_embeds[b:b + 1],
                               self_conditioning_mask=None if sc_mask is None else sc_mask[b:b + 1],
                               return_hidden=return_hidden)  # [1, C, V or H]
            if out is None:  # one output buffer, filled row by row
                out = one.new_empty((ids.shape[0],) + tuple(one.shape[1:]))
            out[b] = one[0]
        return out

    def _encode_rows(self, ids, cache, lengths: list[int], logits, mm_token_type_ids):
        """Each row unpadded, alone (text rows; a prompt with images is encoded alone by the engine)."""
        outs = []
        for b, (seq, n) in enumerate(zip(cache.seqs, lengths)):
            outs.append(self.encode(ids[b:b + 1, :n], KVCache([seq]), logits=logits,
                                    mm_token_type_ids=None if mm_token_type_ids is None
                                    else mm_token_type_ids[b:b + 1, :n]))
        if logits is None:
            return None
        if logits == "last":
            return torch.cat(outs)  # [B, V]
        S = ids.shape[1]
        out = outs[0].new_zeros(len(outs), S, outs[0].shape[-1])  # [B, S, V]: padding positions stay 0
        for b, (o, n) in enumerate(zip(outs, lengths)):
            out[b, :n] = o[0]
        return out

    def denoise_step(self, ids, soft, start, span_pos: list, span_valid: list, sources: list,
                     return_hidden: bool = False) -> torch.Tensor:
        """The batched denoise forward on tensors only (what ``torch.compile`` / graph capture sees): canvas ids
        [B, C], self-conditioning embeddings [B, C, H], row starts [B], per span the gathered prefix's positions
        and validity [B, P], per layer the ``gather_prefix`` sources."""
        C = ids.shape[1]
        positions = start[:, None] + torch.arange(C, device=ids.device)[None]  # [B, C]
        metas = [AttnMeta(m, None) for m in self._masks(positions, span_pos, span_valid, None)]
        x = self.self_conditioning(self.embed(ids), soft)
        h = self.norm(self._layers(x, positions, metas, sources, causal=False))
        return h if return_hidden else self.lm_head(h)

    def _run_step(self, *args) -> torch.Tensor:
        fn = self._compiled_step()
        if fn is not None:
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: run eager from now on
                self._compile_failed = True
                warnings.warn(f"torch.compile of the denoise step failed, running eager: {exc!r:.300}")
        return self.denoise_step(*args)

    def _compiled_step(self):
        """The compiled denoise step, or None. ``compile_denoise``: True/False = force on/off; None = the environment
        variable ``BLOCKDIFF_COMPILE`` (0/1), else automatic: on CUDA only, where kernel launch overhead dominates
        small batches. Unmeasured on GPUs so far: see docs/benchmarks.md ("Graph capture")."""
        want = self.compile_denoise
        if want is None:
            env = os.environ.get("BLOCKDIFF_COMPILE", "auto").lower()
            want = self.device.type == "cuda" if env == "auto" else env not in ("0", "false", "off", "no")
        if not want or self._compile_failed or torch.is_grad_enabled():
            return None
        if self._compiled is None:
            # fullgraph: the step has no graph breaks (no host reads, no Python-side data-dependent branches);
            # dynamic=None: specialise first, then one dynamic-shape graph once batch or prefix sizes change.
            self._compiled = torch.compile(self.denoise_step, fullgraph=True)
        return self._compiled
