"""Building blocks of the DiffusionGemma transformer: norms, RoPE, attention, dense MLP, routed experts.

Every module computes; none samples, schedules or owns a cache. Attention receives the keys/values of
the cached prefix as plain tensors and returns the new keys/values, so the same layer serves the causal
encode pass, the bidirectional denoise pass and training (autograd flows through everything).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FULL, LayerSpec, TextConfig

_GROUPED_MM = hasattr(torch, "_grouped_mm")
_GROUPED_MM_UNSUPPORTED: set = set()  # (device type, dtype) pairs whose grouped-mm kernel raised once


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32: x * (mean(x^2) + eps)^-0.5 [* weight]."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            h = h * self.weight.float()
        return h.type_as(x)


def rope_inv_freq(params: dict, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (length head_dim // 2) for the 'default' and 'proportional' RoPE types."""
    rope_type = params.get("rope_type", "default")
    theta = float(params["rope_theta"])
    partial = float(params.get("partial_rotary_factor", 1.0))
    if rope_type == "default":
        dim = int(head_dim * partial)
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        if dim < head_dim:  # rotate_half pairs i with i + D/2: pad with identity rotations
            inv = torch.cat([inv, torch.zeros(head_dim // 2 - inv.numel())])
        return inv
    if rope_type == "proportional":
        # The first partial*D/2 frequencies rotate (exponent over the full head dim), the rest are identity.
        angles = int(partial * head_dim // 2)
        inv = 1.0 / (theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
        inv = torch.cat([inv, torch.zeros(head_dim // 2 - angles)])
        return inv / float(params.get("factor", 1.0))
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions [B, S] -> cos, sin [B, S, D]."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D]; cos/sin [B, S, D]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class Attention(nn.Module):
    """Gemma-4 attention: q/k norms, unscaled v norm, scale 1.0, GQA; full layers reuse keys as values."""

    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.n_heads = cfg.num_attention_heads
        self.n_kv = spec.num_kv_heads
        self.head_dim = spec.head_dim
        h, d, b = cfg.hidden_size, spec.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=b)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=b)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=b) if spec.has_v_proj else None
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=b)
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
        prefixes: list,  # per row: (k, v) [Hkv, P_b, D] cached keys/values visible to this row, or None
        masks: list,  # per row: bool [S, P_b + S] (True = attend) or None (attend to everything)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim)
        q = apply_rope(self.q_norm(q), cos, sin).transpose(1, 2)  # [B, H, S, D]
        k_new, v_new = self.project_kv(x, cos, sin)  # [B, Hkv, S, D]
        rep = self.n_heads // self.n_kv
        outs = []
        # One attention call per row against that row's own prefix: no padding, and a row's result never
        # depends on what else is in the batch (batch invariance keeps seeded outputs reproducible).
        for b in range(B):
            k, v = k_new[b], v_new[b]
            if prefixes[b] is not None and prefixes[b][0].shape[1] > 0:
                k = torch.cat([prefixes[b][0], k], dim=1)
                v = torch.cat([prefixes[b][1], v], dim=1)
            if rep > 1:  # GQA: [Hkv, L, D] -> [H, L, D]
                k = k[:, None].expand(self.n_kv, rep, *k.shape[1:]).reshape(self.n_heads, *k.shape[1:])
                v = v[:, None].expand(self.n_kv, rep, *v.shape[1:]).reshape(self.n_heads, *v.shape[1:])
            mask = None if masks[b] is None else masks[b][None, None]
            outs.append(F.scaled_dot_product_attention(q[b:b + 1], k[None], v[None], attn_mask=mask, scale=1.0))
        out = torch.cat(outs) if B > 1 else outs[0]
        out = out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)
        return self.o_proj(out), k_new, v_new


class DenseMLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Top-k router on the raw residual: unscaled RMSNorm * scale * hidden^-0.5 -> softmax -> top-k, renormalised,
    times a per-expert scale."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.top_k_experts
        self.root = cfg.hidden_size ** -0.5
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> weights [N, K], expert ids [N, K]."""
        h = self.norm(x) * self.scale * self.root
        probs = F.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, k=self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    """Routed GeGLU experts stored as 3-D tensors: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [N, H]; weights/idx [N, K] -> [N, H]. Sparse: each expert runs only on the tokens routed to it."""
        K = idx.shape[1]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts)
        token_of = order // K
        w_sorted = weights.reshape(-1)[order]
        xs = x[token_of]  # [N*K, H]
        y = None
        kind = (x.device.type, x.dtype)
        if _GROUPED_MM and kind not in _GROUPED_MM_UNSUPPORTED and not torch.is_grad_enabled():
            # Two calls per layer instead of two per expert (each call synchronises the CPU threads).
            offs = torch.cumsum(counts, 0).to(torch.int32)
            try:
                gate, up = torch._grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
                y = torch._grouped_mm(gelu_tanh(gate) * up, self.down_proj.transpose(1, 2), offs=offs)
            except RuntimeError:  # a dtype/device this build's kernel lacks (fp64, some GPUs): loop instead
                _GROUPED_MM_UNSUPPORTED.add(kind)
        if y is None:  # also autograd (training): _grouped_mm has no backward for empty groups
            parts, start = [], 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    gate, up = F.linear(xs[start:start + n], self.gate_up_proj[e]).chunk(2, dim=-1)
                    parts.append(F.linear(gelu_tanh(gate) * up, self.down_proj[e]))
                    start += n
            y = torch.cat(parts)
        # index_add_ over expert-sorted pairs: each token sums its experts in ascending expert order.
        return torch.zeros_like(x).index_add_(0, token_of, (y * w_sorted[:, None]).to(x.dtype))


class DecoderLayer(nn.Module):
    """One transformer layer: attention, then a dense MLP and routed experts in parallel, each with its own norms.

    The encoder (causal) and denoiser (bidirectional) share every weight but ``layer_scalar``: the
    caller passes the one for its pass.
    """

    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, spec)
        self.mlp = DenseMLP(h, cfg.intermediate_size)
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

    def forward(self, x, cos, sin, prefixes, masks, causal: bool, moe_per_row: bool = True):
        attn, k_new, v_new = self.self_attn(self.input_layernorm(x), cos, sin, prefixes, masks)
        x = x + self.post_attention_layernorm(attn)
        residual = x
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self.router(flat)
        pre = self.pre_feedforward_layernorm_2(flat)
        if moe_per_row and x.shape[0] > 1:
            # Expert matmul shapes depend on how many tokens hit an expert; per row they are what the row
            # alone would see, so results do not depend on the batch.
            S = x.shape[1]
            moe = torch.cat([self.experts(pre[i:i + S], w[i:i + S], idx[i:i + S]) for i in range(0, flat.shape[0], S)])
        else:
            moe = self.experts(pre, w, idx)
        moe = self.post_feedforward_layernorm_2(moe.reshape(x.shape))
        x = residual + self.post_feedforward_layernorm(dense + moe)
        x = x * (self.encoder_layer_scalar if causal else self.layer_scalar)
        return x, k_new, v_new


class SelfConditioning(nn.Module):
    """post_norm(embeds + GeGLU(pre_norm(soft_embeddings))): the previous step's belief fed back to the canvas."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.pre_norm = RMSNorm(h, eps)
        self.post_norm = RMSNorm(h, eps, with_scale=False)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)

    def forward(self, embeds: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        n = self.pre_norm(soft)
        sc = self.down_proj(gelu_tanh(self.gate_proj(n)) * self.up_proj(n))
        return self.post_norm(embeds + sc)


def is_full(spec: LayerSpec) -> bool:
    return spec.layer_type == FULL
