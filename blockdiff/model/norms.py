"""Norms, rotary position embeddings and the activations (``hidden_activation``) of the DiffusionGemma blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


# RoPE types of the reference's rope code that blockdiff computes. "longrope" switches its frequencies with the
# sequence length at run time and is refused.
ROPE_TYPES = ("default", "proportional", "linear", "dynamic", "yarn", "llama3")


def _exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def _yarn_inv_freq(params: dict, dim: int, theta: float, max_positions: int | None) -> torch.Tensor:
    """YaRN: interpolated frequencies (/ factor) below the correction range, the original ones above, a linear ramp
    between (the range from ``beta_fast`` / ``beta_slow`` rotations over ``original_max_position_embeddings``)."""
    factor, original = params.get("factor"), params["original_max_position_embeddings"]
    if factor is None:
        factor = max_positions / original
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    # truncated to whole dimensions: the reference looks "truncate" up in the whole per-layer-type rope dict,
    # where it never is, so it always truncates
    low, high = max(math.floor(correction_dim(beta_fast)), 0), min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = theta ** _exponents(dim)
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_inv_freq(params: dict, head_dim: int, max_positions: int | None = None) -> torch.Tensor:
    """Inverse frequencies (length head_dim // 2) for the RoPE types of ``ROPE_TYPES``. ``max_positions``: the
    config's ``max_position_embeddings`` (read by "dynamic", and by "yarn" without a factor)."""
    rope_type = params.get("rope_type", "default")
    theta = float(params["rope_theta"])
    partial = float(params.get("partial_rotary_factor", 1.0))
    if not theta > 0:
        raise ValueError(f"rope_theta must be positive, got {theta}")
    if not 0 < partial <= 1:  # the share of each head that rotates
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial}")
    if rope_type == "proportional":
        # The first partial*D/2 frequencies rotate (exponent over the full head dim), the rest are identity.
        angles = int(partial * head_dim // 2)
        inv = 1.0 / (theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
        inv = torch.cat([inv, torch.zeros(head_dim // 2 - angles)])
        return inv / float(params.get("factor", 1.0))
    dim = int(head_dim * partial)
    if rope_type == "default":
        inv = 1.0 / (theta ** _exponents(dim))
    elif rope_type == "linear":
        inv = 1.0 / (theta ** _exponents(dim)) / params["factor"]
    elif rope_type == "dynamic":
        # NTK-aware base at the model's full length; the reference grows it only past max_position_embeddings,
        # which the engine never reaches (it refuses requests that do not fit the context)
        f = params["factor"]
        base = theta * ((f * max_positions / max_positions) - (f - 1)) ** (dim / (dim - 2))
        inv = 1.0 / (base ** _exponents(dim))
    elif rope_type == "yarn":
        inv = _yarn_inv_freq(params, dim, theta, max_positions)
    elif rope_type == "llama3":
        inv = 1.0 / (theta ** _exponents(dim))
        f, lo_f, hi_f = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        original = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > original / lo_f, inv / f, inv)  # long wavelengths: interpolated
        smooth = (original / wavelen - lo_f) / (hi_f - lo_f)
        medium = ~(wavelen < original / hi_f) * ~(wavelen > original / lo_f)
        inv = torch.where(medium, (1 - smooth) * scaled / f + smooth * scaled, scaled)
    else:
        raise ValueError(f"unsupported rope_type {rope_type!r} (blockdiff runs {', '.join(ROPE_TYPES)})")
    if dim < head_dim:  # rotate_half pairs i with i + D/2: pad with identity rotations
        inv = torch.cat([inv, torch.zeros(head_dim // 2 - inv.numel())])
    return inv


def rope_scaling(params: dict, max_positions: int | None = None) -> float:
    """The factor the reference multiplies cos and sin by (YaRN's attention factor; 1 for every other type)."""
    if params.get("rope_type") != "yarn":
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])

    def mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    f = params.get("factor")
    if f is None:
        f = max_positions / params["original_max_position_embeddings"]
    m, m_all = params.get("mscale"), params.get("mscale_all_dim")
    return float(mscale(f, m) / mscale(f, m_all)) if m and m_all else mscale(f)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """positions [B, S] -> cos, sin [B, S, D] (times ``scale``, see ``rope_scaling``)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    if scale != 1.0:
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D]; cos/sin [B, S, D]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation written out (the formula behind transformers' "gelu_new"), which rounds a little
    differently from torch's fused tanh-GeLU."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# text_config.hidden_activation -> the function every GeGLU of the text model (dense MLP, experts,
# self-conditioning) applies to its gate. "gelu" is the exact (erf) GeLU, not the tanh approximation.
ACTIVATIONS = {"gelu_pytorch_tanh": gelu_tanh, "gelu": gelu_erf, "gelu_new": gelu_new,
               "silu": F.silu, "swish": F.silu, "relu": F.relu}


def activation(name: str):
    """The activation function named by ``hidden_activation``; ValueError naming the key for any other."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_activation {name!r} (blockdiff runs {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]
