"""Building blocks of the DiffusionGemma transformer: the dense MLP, one decoder layer, the self-conditioning block.

Norms and RoPE live in ``norms.py``, attention in ``attention.py``, the router and routed experts in ``moe.py``
(all re-exported here). Every module computes; none samples, schedules or owns a cache. Attention receives the
cached prefix as plain tensors and returns the new keys/values, so the same layer serves the causal encode pass,
the bidirectional denoise pass and training (autograd flows through everything).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import FULL, LayerSpec, TextConfig
from .attention import Attention, AttnMeta, attend
from . import cpu_threads
from .moe import Experts, Router, Routing, combine, grouped_mm_usable, route
from .norms import RMSNorm, activation, apply_rope, gelu_tanh, rope_cos_sin, rope_inv_freq, rope_scaling

__all__ = ["Attention", "AttnMeta", "DecoderLayer", "DenseMLP", "Experts", "RMSNorm", "Router", "Routing",
           "SelfConditioning", "apply_rope", "attend", "combine", "gelu_tanh", "grouped_mm_usable", "is_full",
           "route", "rope_cos_sin", "rope_inv_freq", "rope_scaling"]


class DenseMLP(nn.Module):
    """GeGLU: down(act(gate(x)) * up(x)); ``act``: the config's ``hidden_activation`` (tanh GeLU by default)."""

    def __init__(self, hidden: int, inter: int, act=gelu_tanh):
        super().__init__()
        self.act = act
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One transformer layer: attention, then a dense MLP and routed experts in parallel, each with its own norms.

    The encoder (causal) and denoiser (bidirectional) share every weight but ``layer_scalar``: the
    caller passes the one for its pass.
    """

    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, spec)
        self.mlp = DenseMLP(h, cfg.intermediate_size, activation(cfg.hidden_activation))
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.register_buffer("layer_scalar", torch.ones(1))  # decoder (denoise) scalar
        self.register_buffer("encoder_layer_scalar", torch.ones(1))  # encoder (causal) scalar

    def forward(self, x, cos, sin, prefix, meta: AttnMeta, causal: bool, moe_per_row: bool = False):
        """x [B, S, H]; prefix: cached (k, v) [B, Hkv, P, D]; meta: masks -> (x, new keys, new values)."""
        attn, k_new, v_new = self.self_attn(self.input_layernorm(x), cos, sin, prefix, meta, causal)
        x = x + self.post_attention_layernorm(attn)
        residual = x
        dense_in = self.pre_feedforward_layernorm(x)
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self.router(flat)
        pre = self.pre_feedforward_layernorm_2(flat)
        dense = None
        macs = 3 * self.mlp.gate_proj.in_features * self.mlp.gate_proj.out_features  # per row of the dense MLP
        n = flat.shape[0]
        if not (moe_per_row and x.shape[0] > 1) and x.device.type == "cpu" and n * macs >= cpu_threads.MIN_WORK \
                and cpu_threads.workers() > 1 and hasattr(self.experts, "forward_with"):
            # CPU with several threads: the dense MLP (independent of the experts) in two halves of its rows, dealt
            # to the worker threads with the experts (model/cpu_threads.py), instead of its ~128-row GEMMs split
            # by torch's own threads after them. (Split experts, blockdiff.distributed, have no forward_with.)
            rows, half = dense_in.reshape(-1, x.shape[-1]), n // 2
            side = [(half * macs, lambda: self.mlp(rows[:half])), ((n - half) * macs, lambda: self.mlp(rows[half:]))]
            moe, parts = self.experts.forward_with(pre, w, idx, side if half else side[1:])
            dense = self.post_feedforward_layernorm_1(torch.cat(parts).reshape(x.shape))
        elif moe_per_row and x.shape[0] > 1:
            # Expert matmul shapes depend on how many tokens hit an expert; per row they are what the row
            # alone would see, so results do not depend on the batch.
            S = x.shape[1]
            moe = torch.cat([self.experts(pre[i:i + S], w[i:i + S], idx[i:i + S]) for i in range(0, flat.shape[0], S)])
        else:
            moe = self.experts(pre, w, idx)
        if dense is None:
            dense = self.post_feedforward_layernorm_1(self.mlp(dense_in))
        moe = self.post_feedforward_layernorm_2(moe.reshape(x.shape))
        x = residual + self.post_feedforward_layernorm(dense + moe)
        x = x * (self.encoder_layer_scalar if causal else self.layer_scalar)
        return x, k_new, v_new


class SelfConditioning(nn.Module):
    """post_norm(embeds + GeGLU(pre_norm(soft_embeddings))): the previous step's belief fed back to the canvas."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.act = activation(cfg.hidden_activation)
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.pre_norm = RMSNorm(h, eps)
        self.post_norm = RMSNorm(h, eps, with_scale=False)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)

    def forward(self, embeds: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        n = self.pre_norm(soft)
        sc = self.down_proj(self.act(self.gate_proj(n)) * self.up_proj(n))
        return self.post_norm(embeds + sc)


def is_full(spec: LayerSpec) -> bool:
    return spec.layer_type == FULL
