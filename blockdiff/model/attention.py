"""Attention over a batch of canvases/prompts, each against its own cached prefix, in one call per layer.

Keys of a call are ``[prefix (gathered from the cache, padded to the batch's longest); new tokens]``; a boolean
mask per row hides padding (and, in the causal encode pass, the future and what lies outside a sliding window).
GQA never expands K/V: the query heads that share a KV head are folded into that head's query rows.

``AttnMeta.per_row`` selects the batch-invariant path: one call per row against exactly that row's visible keys,
so a row's result is the one it would get alone (the deterministic mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerSpec, TextConfig
from .norms import RMSNorm, apply_rope


@dataclass
class AttnMeta:
    """Masks of one attention span (sliding window or full) for one encode/denoise call."""

    mask: torch.Tensor  # bool [B, 1, S or 1, P + S]: True = attend
    rows: list | None = None  # host, per row: (lo, hi) - the slice of the gathered prefix this row sees
    row_masks: list | None = None  # per-row path: bool [S, hi - lo + S] or None (attend to everything)
    per_row: bool = False


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, S, D]; k, v [B, Hkv, L, D]; mask bool [B, 1, S or 1, L] or None -> [B, H, S, D]. Scale 1."""
    B, H, S, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    if rep > 1:  # head h reads KV head h // rep: fold the rep heads of a group into rep * S query rows
        q = q.reshape(B, Hkv, rep * S, D)
        if mask is not None and mask.shape[2] > 1:
            L = mask.shape[-1]
            mask = mask[:, :, None].expand(B, 1, rep, S, L).reshape(B, 1, rep * S, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    return out.reshape(B, H, S, v.shape[-1])


class Attention(torch.nn.Module):
    """Gemma-4 attention: q/k norms, unscaled v norm, scale 1.0, GQA; full layers reuse the key projection
    for values (``v = v_norm(k_proj(x))``, without k's norm weight and RoPE).

    With ``attention_bias`` the encode (causal) pass adds biases of its own: the reference ties every encoder
    weight to the decoder's but not the biases (``model.encoder.language_model.layers.N.self_attn.*.bias``), so
    the two passes share the projection weights and differ in their biases (``encoder_bias``)."""

    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.n_heads = cfg.num_attention_heads
        self.n_kv = spec.num_kv_heads
        self.head_dim = spec.head_dim
        h, d, b = cfg.hidden_size, spec.head_dim, cfg.attention_bias
        self.q_proj = torch.nn.Linear(h, self.n_heads * d, bias=b)
        self.k_proj = torch.nn.Linear(h, self.n_kv * d, bias=b)
        self.v_proj = torch.nn.Linear(h, self.n_kv * d, bias=b) if spec.has_v_proj else None
        self.o_proj = torch.nn.Linear(self.n_heads * d, h, bias=b)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(d, cfg.rms_norm_eps, with_scale=False)
        self.encoder_bias = nn.ParameterDict({
            name: nn.Parameter(torch.zeros(getattr(self, name).out_features))
            for name in ("q_proj", "k_proj", "v_proj", "o_proj") if getattr(self, name) is not None}) if b else None

    def _proj(self, name: str, x: torch.Tensor, causal: bool) -> torch.Tensor:
        """The projection ``name`` of x, with the encoder's bias in the causal pass."""
        proj = getattr(self, name)
        if not causal or self.encoder_bias is None:
            return proj(x)
        if isinstance(proj, nn.Linear):
            return F.linear(x, proj.weight, self.encoder_bias[name])
        # quantized or split projections: their own bias swapped for the encoder's
        return proj(x) + (self.encoder_bias[name] - proj.bias).to(x.dtype)

    def project_kv(self, x: torch.Tensor, cos, sin, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, hidden] -> k, v [B, Hkv, S, D] (k normed + rotated, v normed)."""
        B, S, _ = x.shape
        k_raw = self._proj("k_proj", x, causal).view(B, S, self.n_kv, self.head_dim)
        v_raw = self._proj("v_proj", x, causal).view(B, S, self.n_kv, self.head_dim) if self.v_proj is not None \
            else k_raw
        k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)
        v = self.v_norm(v_raw).transpose(1, 2)
        return k, v

    def forward(
        self,
        x: torch.Tensor,  # [B, S, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        prefix: tuple[torch.Tensor, torch.Tensor],  # cached keys/values [B, Hkv, P, D] (padded, see meta)
        meta: AttnMeta,
        causal: bool = False,  # the encode pass (its own biases, see the class docstring)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (output [B, S, hidden], new keys, new values [B, Hkv, S, D])."""
        B, S, _ = x.shape
        q = self._proj("q_proj", x, causal).view(B, S, self.n_heads, self.head_dim)
        q = apply_rope(self.q_norm(q), cos, sin).transpose(1, 2)  # [B, H, S, D]
        k_new, v_new = self.project_kv(x, cos, sin, causal)  # [B, Hkv, S, D]
        pk, pv = prefix
        if meta.per_row:
            outs = []
            for b, (lo, hi) in enumerate(meta.rows):
                k = torch.cat([pk[b:b + 1, :, lo:hi], k_new[b:b + 1]], dim=2)
                v = torch.cat([pv[b:b + 1, :, lo:hi], v_new[b:b + 1]], dim=2)
                m = None if meta.row_masks is None or meta.row_masks[b] is None else meta.row_masks[b][None, None]
                outs.append(attend(q[b:b + 1], k, v, m))
            out = torch.cat(outs) if B > 1 else outs[0]
        else:
            out = attend(q, torch.cat([pk, k_new], dim=2), torch.cat([pv, v_new], dim=2), meta.mask)
        out = out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)
        return self._proj("o_proj", out, causal), k_new, v_new
