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
    for values (``v = v_norm(k_proj(x))``, without k's norm weight and RoPE)."""

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

    def project_kv(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, hidden] -> k, v [B, Hkv, S, D] (k normed + rotated, v normed)."""
        B, S, _ = x.shape
        k_raw = self.k_proj(x).view(B, S, self.n_kv, self.head_dim)
        v_raw = self.v_proj(x).view(B, S, self.n_kv, self.head_dim) if self.v_proj is not None else k_raw
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (output [B, S, hidden], new keys, new values [B, Hkv, S, D])."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim)
        q = apply_rope(self.q_norm(q), cos, sin).transpose(1, 2)  # [B, H, S, D]
        k_new, v_new = self.project_kv(x, cos, sin)  # [B, Hkv, S, D]
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
        return self.o_proj(out), k_new, v_new
