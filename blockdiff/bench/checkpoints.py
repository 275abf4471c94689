"""Random DiffusionGemma checkpoints for benchmarking, built with blockdiff's own code.

``write_random_checkpoint(path, "mid")`` writes ``config.json`` (with a tiny vision tower, so the transformers
reference loads it too), ``model.safetensors`` and ``generation_config.json`` (the released sampler values).
Weights are the reference's initialisation: normal(0, 0.02) for every matrix (experts included), norms and
scalars at one. Throughput does not depend on the values, only on the shapes.
"""

from __future__ import annotations

import json
import os

import torch

from ..tokenizer import byte_symbols  # noqa: F401  (tests/fixtures.py imports it from here)

TINY_VISION_CONFIG = {"model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32,
                      "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8}

# Text configs. Layer geometry follows the released model's pattern: five sliding layers then one full,
# full layers with twice the head dim and fewer KV heads.
# ~110M parameters: the size the speed target is stated for.
_MID = dict(vocab_size=32768, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
            num_attention_heads=8, num_key_value_heads=4, head_dim=64, global_head_dim=128,
            num_global_key_value_heads=1, num_experts=32, top_k_experts=4, moe_intermediate_size=256,
            sliding_window=512, canvas_length=128)

PRESETS: dict[str, dict] = {
    "mid": _MID,
    # "mid" with the released model's 262,144-entry vocabulary (written with a byte-level BPE tokenizer.json of
    # that size): the structured-output benchmark's checkpoint, where token masks cost what they cost for real.
    "mid-v262k": {**_MID, "vocab_size": 262144},
    # The released vocabulary (262,144) and canvas (256) on a tiny body: the sampler's [B, C, V] memory at real
    # size on CPU (`--tick-memory --batch 16`).
    "vocab-full": dict(vocab_size=262144, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                       num_global_key_value_heads=1, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                       sliding_window=1024, canvas_length=256),
    # The released 26B-A4B shape (~25.8B parameters): only built in memory, quantized tensor by tensor
    # (``blockdiff bench --random-config full --quantization int4``, see blockdiff/bench/full_shape_quantized.py).
    "full": dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                 num_global_key_value_heads=2, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
                 sliding_window=1024, canvas_length=256),
    # A few hundred KB: for tests of the harness itself.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                 num_global_key_value_heads=1, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                 sliding_window=64, canvas_length=16),
}

GENERATION_CONFIG = {
    "max_denoising_steps": 48, "max_new_tokens": 256,
    "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "t_max": 0.8, "t_min": 0.4, "stability_threshold": 1, "confidence_threshold": 0.005,
    "eos_token_id": [1, 106, 50], "pad_token_id": 0,
}


def config_dict(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown random config {preset!r}; choose from {sorted(PRESETS)}")
    text = dict(PRESETS[preset])
    canvas = text.pop("canvas_length")
    return released_layout(text, canvas, max_positions=4096)


def released_layout(text: dict, canvas: int, max_positions: int) -> dict:
    """A config.json dict in the released layout around ``text`` (sizes): the released model's fixed settings,
    five sliding layers then one full (the last always full), its RoPE, and a tiny vision config."""
    text = dict(text)
    n = text["num_hidden_layers"]
    text.update({
        "model_type": "diffusion_gemma_text", "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": max_positions, "rms_norm_eps": 1e-6, "final_logit_softcapping": 30.0,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True,
        "attention_bias": False, "enable_moe_block": True,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 or i == n - 1 else "sliding_attention"
                        for i in range(n)],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                               "rope_theta": 1_000_000.0},
        },
    })
    return {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
            "canvas_length": canvas, "tie_word_embeddings": True, "text_config": text,
            "vision_config": dict(TINY_VISION_CONFIG), "eos_token_id": [1, 106], "pad_token_id": 0,
            "bos_token_id": 2}


@torch.no_grad()
def write_random_checkpoint(path: str, preset: str = "mid", seed: int = 0, with_tokenizer: bool = False) -> str:
    from ..config import ModelConfig
    from ..loader import save_model
    from ..model import DiffusionGemma

    if preset == "full":
        raise ValueError("the 'full' shape is never written to disk (~100 GB in fp32); benchmark it in memory "
                         "with --quantization int4 (or int8)")
    config = ModelConfig.from_dict(config_dict(preset))
    torch.manual_seed(seed)
    model = DiffusionGemma(config)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:  # linears, embeddings, experts, routers
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        else:  # norm scales, router scales
            p.fill_(1.0)
    save_model(model, path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(GENERATION_CONFIG, f, indent=2)
    if with_tokenizer:
        write_tokenizer(path, config.text.vocab_size)
    return path


# Gemma's specials; with Gemma 4's tool and thinking markers (<|"|> and <|think|> at their released ids 52 and 98,
# the others at free small ids), so tool-call grammars can be timed at the released vocabulary size.
SPECIALS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 46: "<|tool>", 47: "<tool|>",
            48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>", 51: "<tool_response|>", 52: '<|"|>',
            98: "<|think|>", 100: "<|channel>", 101: "<channel|>", 105: "<|turn>", 106: "<turn|>"}


def write_tokenizer(path: str, vocab_size: int) -> None:
    """A byte-level BPE ``tokenizer.json`` with exactly ``vocab_size`` entries (Gemma's specials at their ids):
    the 256 bytes, then byte pairs and triples, printable ASCII first, so a large vocabulary is full of tokens
    that JSON strings and numbers can use (what makes a token mask expensive)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    byte_chr = byte_symbols()
    ascii_first = [byte_chr[b] for b in range(32, 127)] + [byte_chr[b] for b in range(256) if not 32 <= b < 127]
    n_merges = vocab_size - 256 - len(SPECIALS)
    merges: list[tuple[str, str]] = []
    for a in ascii_first:
        for b in ascii_first:
            merges.append((a, b))
    pairs = [a + b for a, b in merges]
    for ab in pairs:  # then pair + byte, until the vocabulary is full
        if len(merges) >= n_merges:
            break
        for c in ascii_first[:95]:
            merges.append((ab, c))
    merges = merges[:n_merges]
    ids = (i for i in range(vocab_size) if i not in SPECIALS)
    vocab = dict((t, i) for i, t in SPECIALS.items())
    for t in ascii_first + [a + b for a, b in merges]:
        vocab[t] = next(ids)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(SPECIALS[i], special=True, normalized=False) for i in sorted(SPECIALS)])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)
