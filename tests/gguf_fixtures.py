"""Write small GGUF files in the layout of llama.cpp's (unmerged) DiffusionGemma converter, from a tiny checkpoint.

The names are spelled out here from the project's REFERENCE.md (llama.cpp names), independently of blockdiff's own table, so a wrong
entry in ``blockdiff.quant.gguf.TENSOR_TABLE`` shows up as a test failure.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.numpy import load_file

DEC = "model.decoder."
ENC = "model.encoder.language_model."

# Released-layout name (after model.decoder.) -> converter name; {i} = layer.
NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "self_conditioning.pre_norm.weight": "self_cond_pre_norm.weight",
    "self_conditioning.gate_proj.weight": "self_cond_gate.weight",
    "self_conditioning.up_proj.weight": "self_cond_up.weight",
    "self_conditioning.down_proj.weight": "self_cond_down.weight",
}
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "router.proj.weight": "ffn_gate_inp.weight", "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight", "experts.down_proj": "ffn_down_exps.weight",
    "layer_scalar": "layer_output_scale.weight",
}


def converter_tensors(ckpt: str) -> dict[str, np.ndarray]:
    """The converter's tensors (fp32 numpy, PyTorch dimension order) for a checkpoint folder."""
    sd = load_file(os.path.join(ckpt, "model.safetensors"))
    out = {}
    for name, arr in sd.items():
        if name.startswith(DEC):
            rest = name[len(DEC):]
            if rest in NAMES:
                out[NAMES[rest]] = arr
                continue
            i, _, leaf = rest[len("layers."):].partition(".")
            out[f"blk.{i}.{LAYER_NAMES[leaf]}"] = arr
        elif name.startswith(ENC) and name.endswith(".layer_scalar"):
            i = name[len(ENC + "layers."):].split(".")[0]
            out[f"blk.{i}.enc_layer_output_scale.weight"] = arr
    return {k: np.ascontiguousarray(v.astype(np.float32)) for k, v in out.items()}


def write_gguf(ckpt: str, out_path: str, types: dict[str, str] | None = None, default_type: str = "F32",
               drop: tuple[str, ...] = (), arch: str = "diffusion-gemma", raw: dict | None = None) -> str:
    """Write ``out_path`` from the checkpoint at ``ckpt``.

    ``types``: substring of a tensor name -> GGML type name for 2-D/3-D weights (first match wins), else
    ``default_type``; 1-D tensors stay F32. ``drop``: substrings of tensors to leave out. ``raw``: name -> bytes
    (uint8 array) to write as-is with the type given in ``types`` (for K-quant types the gguf package cannot
    quantize)."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    from blockdiff.config import ModelConfig
    tc = ModelConfig.from_dict(cfg).text  # the config's values with the reference's defaults filled in
    n = tc.num_hidden_layers
    types = types or {}
    w = gguf.GGUFWriter(out_path, arch)
    a = arch
    w.add_uint32(f"{a}.block_count", n)
    w.add_uint32(f"{a}.context_length", tc.max_position_embeddings)
    w.add_uint32(f"{a}.embedding_length", tc.hidden_size)
    w.add_uint32(f"{a}.feed_forward_length", tc.intermediate_size)
    w.add_uint32(f"{a}.attention.head_count", tc.num_attention_heads)
    specs = tc.layers  # per-layer geometry as the checkpoint's config resolves it
    w.add_array(f"{a}.attention.head_count_kv", [s.num_kv_heads for s in specs])
    w.add_array(f"{a}.attention.sliding_window_pattern", [s.layer_type == "sliding_attention" for s in specs])
    w.add_uint32(f"{a}.attention.key_length", next(s.head_dim for s in specs if s.layer_type == "full_attention"))
    w.add_uint32(f"{a}.attention.key_length_swa", tc.head_dim)
    w.add_uint32(f"{a}.attention.sliding_window", tc.sliding_window)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", tc.rms_norm_eps)
    w.add_float32(f"{a}.final_logit_softcapping", tc.final_logit_softcapping)
    w.add_float32(f"{a}.rope.freq_base", tc.rope_parameters["full_attention"]["rope_theta"])
    w.add_float32(f"{a}.rope.freq_base_swa", tc.rope_parameters["sliding_attention"]["rope_theta"])
    w.add_uint32(f"{a}.expert_count", tc.num_experts)
    w.add_uint32(f"{a}.expert_used_count", tc.top_k_experts)
    w.add_uint32(f"{a}.expert_feed_forward_length", tc.moe_intermediate_size)
    w.add_bool(f"{a}.attention.causal", False)
    _add_diffusion_keys(w, ckpt, cfg["canvas_length"])
    _add_tokenizer(w, ckpt)
    for name, arr in converter_tensors(ckpt).items():
        if any(d in name for d in drop):
            continue
        if raw and name in raw:
            w.add_tensor(name, raw[name], raw_dtype=T[types[name]])
            continue
        kind = next((t for key, t in types.items() if key in name), default_type) if arr.ndim > 1 else "F32"
        if kind == "F32":
            w.add_tensor(name, arr)
        elif kind == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quants.quantize(arr, T[kind]), raw_dtype=T[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def _add_diffusion_keys(w, ckpt: str, canvas_length: int) -> None:
    """What llama.cpp's DiffusionGemma converter (``set_gguf_parameters``) writes: ``diffusion.canvas_length`` and the
    entropy-bound sampler defaults from generation_config.json, under ``diffusion.`` with NO architecture prefix,
    integers as uint32 and floats as float32; a key absent from the generation config is not written."""
    w.add_uint32("diffusion.canvas_length", int(canvas_length))
    path = os.path.join(ckpt, "generation_config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        gen = json.load(f)
    sampler = gen.get("sampler_config") or {}
    if "max_denoising_steps" in gen:
        w.add_uint32("diffusion.eb_max_steps", int(gen["max_denoising_steps"]))
    for key in ("t_min", "t_max"):
        if key in gen:
            w.add_float32(f"diffusion.eb_{key}", float(gen[key]))
    if "entropy_bound" in sampler:
        w.add_float32("diffusion.eb_entropy_bound", float(sampler["entropy_bound"]))
    if "stability_threshold" in gen:
        w.add_uint32("diffusion.eb_stability_threshold", int(gen["stability_threshold"]))
    if "confidence_threshold" in gen:
        w.add_float32("diffusion.eb_confidence_threshold", float(gen["confidence_threshold"]))


def _add_tokenizer(w, ckpt: str) -> None:
    tj = os.path.join(ckpt, "tokenizer.json")
    if not os.path.exists(tj):
        return
    with open(tj) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    specials = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_eot_token_id(106)
    w.add_pad_token_id(0)
    tpl = os.path.join(ckpt, "chat_template.jinja")
    if os.path.exists(tpl):
        with open(tpl) as f:
            w.add_chat_template(f.read())


def denoise_logits(model, seed=5):
    """Denoise logits of a fixed random prompt and canvas (two rows): the model comparison used by the
    quantization and GGUF tests."""
    g = torch.Generator().manual_seed(seed)
    V = model.vocab_size
    cache = model.new_cache(2)
    with torch.no_grad():
        model.encode(torch.randint(0, V, (2, 6), generator=g), cache)
        return model.denoise(torch.randint(0, V, (2, 16), generator=g), cache)
