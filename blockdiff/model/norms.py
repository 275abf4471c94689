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
