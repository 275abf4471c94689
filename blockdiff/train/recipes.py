"""Model configs for small DiffusionGemma-architecture models, and their initial weights.

A recipe is a plain ``config.json`` dict (the released layout, with a tiny vision tower so the transformers
reference loads the checkpoint too). ``init_weights`` gives a freshly built ``DiffusionGemma`` the
reference's initialisation: normal(0, 0.02) matrices and embeddings, norms and scalars at one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# The oracle always builds a vision tower: this one keeps a checkpoint's config loadable at a few KB.
TINY_VISION_CONFIG = {
    "model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
}


def model_config(vocab_size: int, canvas_length: int, hidden_size: int = 128, num_layers: int = 4,
                 num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 32, intermediate_size: int = 256,
                 num_experts: int = 4, top_k_experts: int = 2, moe_intermediate_size: int = 128,
                 sliding_window: int = 512, rope_theta: float = 10_000.0, softcap: float = 30.0,
                 eos_token_id=1, pad_token_id: int = 0, bos_token_id: int = 2) -> dict:
    """A ``config.json`` dict. Every layer's geometry is explicit (``global_head_dim`` = ``head_dim``), so
    blockdiff and the reference read the same model."""
    layer_types = ["full_attention" if (i + 1) % 6 == 0 or i == num_layers - 1 else "sliding_attention"
                   for i in range(num_layers)]
    text = {
        "model_type": "diffusion_gemma_text",
        "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim, "global_head_dim": head_dim, "num_global_key_value_heads": num_kv_heads,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "pad_token_id": pad_token_id, "eos_token_id": eos_token_id, "bos_token_id": bos_token_id,
        "tie_word_embeddings": True,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": rope_theta},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                               "rope_theta": max(rope_theta, 1_000_000.0)},
        },
        "attention_bias": False, "sliding_window": sliding_window, "layer_types": layer_types,
        "final_logit_softcapping": softcap, "num_experts": num_experts, "top_k_experts": top_k_experts,
        "moe_intermediate_size": moe_intermediate_size, "enable_moe_block": True,
    }
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
        "canvas_length": canvas_length, "tie_word_embeddings": True, "text_config": text,
        "vision_config": copy.deepcopy(TINY_VISION_CONFIG), "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id, "bos_token_id": bos_token_id,
    }


RECIPES = {
    # ~0.5M parameters: 4 layers of width 64, 4 experts top-2 beside the dense MLP (sized for 2 CPU cores).
    "sudoku-small": dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                         intermediate_size=128, num_experts=4, top_k_experts=2, moe_intermediate_size=64),
    # ~1.6M parameters: width 128.
    "sudoku-base": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                        intermediate_size=256, num_experts=4, top_k_experts=2, moe_intermediate_size=128),
    # ~6M parameters: a GPU-sized model (8 experts top-2).
    "sudoku-large": dict(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=2, head_dim=32,
                         intermediate_size=512, num_experts=8, top_k_experts=2, moe_intermediate_size=256),
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
                 num_experts=4, top_k_experts=2, moe_intermediate_size=32),
}


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """normal(0, std) for every matrix (linears, embeddings, experts, routers); ones for norm scales and the
    routers' scales; layer scalars stay at one."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=generator) * std)
        elif p.dim() == 1 and "bias" in name:
            p.zero_()
        else:
            p.fill_(1.0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
