"""GGUF files of llama.cpp's ``diffusion-gemma`` architecture: configuration, weights and tokenizer from one file.

The tensor names follow llama.cpp's DiffusionGemma converter, which is NOT merged upstream yet (it lives in
pull requests and forks); ``TENSOR_TABLE`` below is the one place that mapping is written down. The metadata keys
are the Gemma 4 ones llama.cpp uses (``{arch}.attention.head_count_kv`` per layer,
``attention.sliding_window_pattern``, ``attention.key_length`` / ``key_length_swa``, ``rope.freq_base`` /
``freq_base_swa``, ...). No norm shift and no Q/K permutation are applied by that converter, so none is undone.

Every tensor type the ``gguf`` package can dequantize is read (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
Q2_K..Q6_K, IQ*). A weight the quantize-while-loading plan targets goes straight from the file's blocks to
blockdiff's int8 / int4 parts (``gguf_repack``: Q4_0 / Q4_K repacked, other types a few rows at a time), never whole
in fp32; every other tensor (norms, scalars, router) is dequantized on its own. Without a
``quantization`` argument a quantized file keeps about its size: int8 when every quantized weight has 6 bits or
more (Q8_0, Q6_K), else int4 with groups of 32 (the block size of the Q4/Q5 formats).
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import torch

from ..checks import check_weight
from ..config import FULL, SLIDING, GenerationDefaults, ModelConfig
from ..placement import resolve_dtype
from ..heap import lean_heap
from ..hub import SPLIT_GGUF_NAME, split_gguf_parts
from ..progress import progress
from .plan import QuantizationError, QuantPlan, check_device, int4_scope, parse_method

log = logging.getLogger("blockdiff")
ARCH = "diffusion-gemma"

# GGUF tensor name -> blockdiff model name ({i} = layer index). Alternatives a converter may write are listed
# after a "|" (the first is the converter's name in REFERENCE.md). A trailing ".weight" is optional for scalars.
TENSOR_TABLE: dict[str, str] = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "self_cond_pre_norm.weight|self_cond_norm.weight": "self_conditioning.pre_norm.weight",
    "self_cond_gate.weight": "self_conditioning.gate_proj.weight",
    "self_cond_up.weight": "self_conditioning.up_proj.weight",
    "self_cond_down.weight": "self_conditioning.down_proj.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.input_layernorm.weight",
    "blk.{i}.post_attention_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "layers.{i}.post_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm_1.weight": "layers.{i}.post_feedforward_layernorm_1.weight",
    "blk.{i}.pre_ffw_norm_2.weight": "layers.{i}.pre_feedforward_layernorm_2.weight",
    "blk.{i}.post_ffw_norm_2.weight": "layers.{i}.post_feedforward_layernorm_2.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
    "blk.{i}.ffn_gate_inp.weight": "layers.{i}.router.proj.weight",
    "blk.{i}.ffn_gate_inp.scale": "layers.{i}.router.scale",
    "blk.{i}.ffn_down_exps.scale": "layers.{i}.router.per_expert_scale",
    "blk.{i}.ffn_gate_up_exps.weight": "layers.{i}.experts.gate_up_proj",
    "blk.{i}.ffn_down_exps.weight": "layers.{i}.experts.down_proj",
    "blk.{i}.layer_output_scale.weight|blk.{i}.layer_output_scale": "layers.{i}.layer_scalar",
    "blk.{i}.enc_layer_output_scale.weight|blk.{i}.enc_layer_output_scale": "layers.{i}.encoder_layer_scalar",
}
IGNORED = ("rope_freqs.weight", "output.weight")  # derived RoPE factors; the LM head is tied to token_embd

_BITS = {"Q8_0": 8, "Q8_1": 8, "Q8_K": 8, "Q6_K": 6, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q4_0": 4, "Q4_1": 4,
         "Q4_K": 4, "IQ4_NL": 4, "IQ4_XS": 4, "Q3_K": 3, "IQ3_S": 3, "IQ3_XXS": 3, "Q2_K": 2, "IQ2_XXS": 2,
         "IQ2_XS": 2, "IQ2_S": 2, "IQ1_S": 1, "IQ1_M": 1, "TQ1_0": 2, "TQ2_0": 2, "MXFP4": 4}
_FLOAT = ("F32", "F16", "BF16", "F64")


def _compile_table() -> list[tuple[re.Pattern, str]]:
    out = []
    for names, ours in TENSOR_TABLE.items():
        for name in names.split("|"):
            out.append((re.compile(re.escape(name).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), ours))
    return out


_PATTERNS = _compile_table()


def gguf_to_model_name(name: str) -> str | None:
    for pat, ours in _PATTERNS:
        m = pat.match(name)
        if m:
            return ours.format(i=m.group("i")) if "{i}" in ours else ours
    return None


def model_to_gguf_name(ours: str) -> str:
    """The converter's (first) GGUF name for a blockdiff tensor name (for error messages)."""
    m = re.match(r"layers\.(\d+)\.(.*)", ours)
    for names, target in TENSOR_TABLE.items():
        first = names.split("|")[0]
        if m and target == "layers.{i}." + m.group(2):
            return first.format(i=m.group(1))
        if target == ours:
            return first
    return ours


# ---------------------------------------------------------------------------------------------- reading
def open_gguf(path: str):
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading .gguf files needs the gguf package: pip install gguf==0.19.0") from e
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise QuantizationError(f"no GGUF file at {path}")
    reader = _read(gguf, path)
    count = _field(reader, "split.count", 1)
    if isinstance(count, (int, np.integer)) and count > 1:
        reader = _open_parts(gguf, path, reader, int(count))
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise QuantizationError(f"{path}: GGUF architecture {arch!r} is not supported; blockdiff reads "
                                f"'{ARCH}' files (llama.cpp's DiffusionGemma converter)")
    return reader


def _read(gguf, path: str):
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # bad magic, truncated header, ...
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError:
            magic = b""
        if magic == b"GGUF":  # a GGUF cut short (an interrupted download) failed as "cannot reshape array of size
            # 8448 into shape (128,68)" or "index 0 is out of bounds": say what is most likely wrong
            raise QuantizationError(f"{path} is a GGUF file that cannot be read ({os.path.getsize(path)} bytes): "
                                    f"it is truncated or corrupt (did the download or copy finish?): {e}") from None
        raise QuantizationError(f"{path} is not a readable GGUF file: {e}") from None




class _SplitReader:
    """The parts of a split GGUF (``llama-gguf-split``) read as one file: the first part's metadata (the others hold
    only ``split.*``) and every part's tensors."""

    def __init__(self, readers):
        self.fields = readers[0].fields
        self.tensors = [t for r in readers for t in r.tensors]


def _open_parts(gguf, path: str, first, count: int):
    """``path`` is a part of a split GGUF: all ``count`` parts, as llama.cpp loads them from the first one (the
    first part alone was "lacks tensors ...", a later one "architecture None is not supported")."""
    m = SPLIT_GGUF_NAME.search(path)
    no = _field(first, "split.no", 0)
    if m is None or int(m.group(2)) != count:
        raise QuantizationError(f"{path} is part {no + 1} of a GGUF split in {count} parts, but its name does not "
                                f"end in -{no + 1:05d}-of-{count:05d}.gguf (the names llama-gguf-split gives them)")
    names = split_gguf_parts(path)
    if no != 0:
        raise QuantizationError(f"{path} is part {no + 1} of {count} of a split GGUF: pass the first part, "
                                f"{os.path.basename(names[0])}")
    missing = [os.path.basename(n) for n in names[1:] if not os.path.isfile(n)]
    if missing:
        raise QuantizationError(f"{path} is the first of {count} parts of a split GGUF; missing beside it: "
                                f"{', '.join(missing)}")
    readers = [first] + [_read(gguf, n) for n in names[1:]]
    total = _field(first, "split.tensors.count")
    if total is not None and total != sum(len(r.tensors) for r in readers):
        raise QuantizationError(f"{path}: the {count} parts of this split GGUF hold "
                                f"{sum(len(r.tensors) for r in readers)} tensors, the first says {total}")
    return _SplitReader(readers)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def _need(reader, key):
    v = _field(reader, key)
    if v is None:
        raise QuantizationError(f"GGUF metadata has no {key!r} (needed for the model configuration)")
    return v


def _int(reader, key, default=None, minimum: int = 1) -> int:
    """An integer metadata value (``_need`` when no default), checked: a string or a non-positive count failed
    later as "invalid literal for int()" naming no key, or (a zero canvas length) fell back to a default."""
    v = _need(reader, key) if default is None else _field(reader, key, default)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise QuantizationError(f"GGUF metadata {key!r} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _float(reader, key, default=None) -> float | None:
    """A number of the metadata (an integer is taken too), checked: a string failed as "could not convert string to
    float" naming no key."""
    v = _field(reader, key, default)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))):
        raise QuantizationError(f"GGUF metadata {key!r} must be a number, got {v!r}")
    return None if v is None else float(v)


def _per_layer(reader, key, values, n: int) -> list:
    """A per-layer metadata array: one entry per block (``block_count``)."""
    if len(values) != n:
        raise QuantizationError(f"GGUF metadata {key!r} has {len(values)} entries for {n} layers "
                                f"('{ARCH}.block_count')")
    return values


def config_from_gguf(reader) -> ModelConfig:
    a = ARCH
    n = _int(reader, f"{a}.block_count")
    kv = _need(reader, f"{a}.attention.head_count_kv")
    kv = [int(x) for x in _per_layer(reader, f"{a}.attention.head_count_kv", kv, n)] if isinstance(kv, list) \
        else [_int(reader, f"{a}.attention.head_count_kv")] * n
    pattern = _field(reader, f"{a}.attention.sliding_window_pattern")
    if pattern is None:
        pattern = [(i + 1) % 6 != 0 for i in range(n)]
    layer_types = [SLIDING if bool(s) else FULL for s in _per_layer(reader, f"{a}.attention.sliding_window_pattern",
                                                                     list(pattern), n)]
    head_full = _int(reader, f"{a}.attention.key_length")
    head_swa = _int(reader, f"{a}.attention.key_length_swa", head_full)
    swa_kv = next((k for k, t in zip(kv, layer_types) if t == SLIDING), kv[0])
    full_kv = next((k for k, t in zip(kv, layer_types) if t == FULL), kv[-1])
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, f"{a}.vocab_size") or (len(tokens) if tokens else 0)) or None
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is not None:
        vocab = int(emb.shape[1])  # GGML order: [hidden, vocab]
    if not vocab:
        raise QuantizationError("GGUF file has neither token_embd.weight nor a vocabulary")
    text = {
        "vocab_size": vocab,
        "hidden_size": _int(reader, f"{a}.embedding_length"),
        "intermediate_size": _int(reader, f"{a}.feed_forward_length"),
        "num_hidden_layers": n,
        "num_attention_heads": _int(reader, f"{a}.attention.head_count"),
        "num_key_value_heads": swa_kv, "head_dim": head_swa,
        "global_head_dim": head_full, "num_global_key_value_heads": full_kv,
        "max_position_embeddings": _int(reader, f"{a}.context_length", 131072),
        "rms_norm_eps": _float(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-6),
        "sliding_window": _int(reader, f"{a}.attention.sliding_window", 1024),
        "final_logit_softcapping": _float(reader, f"{a}.final_logit_softcapping", 30.0),
        "num_experts": _int(reader, f"{a}.expert_count"),
        "top_k_experts": _int(reader, f"{a}.expert_used_count"),
        "moe_intermediate_size": _int(reader, f"{a}.expert_feed_forward_length"),
        "layer_types": layer_types,
        "rope_parameters": {
            SLIDING: {"rope_type": "default", "rope_theta": _float(reader, f"{a}.rope.freq_base_swa", 1e4)},
            FULL: {"rope_type": "proportional", "rope_theta": _float(reader, f"{a}.rope.freq_base", 1e6),
                   "partial_rotary_factor": _float(reader, f"{a}.rope.partial_rotary_factor", 0.25)},
        },
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", 2),
        "eos_token_id": _eos_ids(reader) or 1,
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id", 0),
    }
    canvas_key, canvas = _diffusion_key(reader, "canvas_length")
    if canvas is None:
        canvas_key = f"{a}.canvas_length"
    canvas = _int(reader, canvas_key, 256)
    return ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": canvas,
                                  "tie_word_embeddings": True, "text_config": text})


# Sampler defaults: GenerationDefaults field -> the key suffix llama.cpp's DiffusionGemma converter writes under
# "diffusion." (no architecture prefix: ``diffusion.eb_max_steps`` ...). Files written before that spelling, with
# ``diffusion-gemma.diffusion.<field>``, are still read.
DIFFUSION_KEYS = {"max_denoising_steps": "eb_max_steps", "t_min": "eb_t_min", "t_max": "eb_t_max",
                  "entropy_bound": "eb_entropy_bound", "stability_threshold": "eb_stability_threshold",
                  "confidence_threshold": "eb_confidence_threshold"}


def _diffusion_key(reader, name: str, legacy: str | None = None) -> tuple[str, object]:
    """(key, value) of ``diffusion.<name>`` as the converter writes it, else of the older
    ``diffusion-gemma.diffusion.<legacy>``; value None when neither is there."""
    for key in (f"diffusion.{name}", f"{ARCH}.diffusion.{legacy or name}"):
        v = _field(reader, key)
        if v is not None:
            return key, v
    return f"diffusion.{name}", None


def generation_from_gguf(reader) -> dict:
    """The generation-config dict (GenerationDefaults.from_dict's input) held in the file's metadata."""
    gen = {"eos_token_id": _eos_ids(reader) or None}
    # Integers must be integers (a string was "invalid literal for int()" naming no key, a float cut silently, zero
    # steps a NaN at generation time); floats numbers.
    minimum = {"max_denoising_steps": 1, "stability_threshold": 0, "max_new_tokens": 1}
    keys = {}  # ours -> the key the value came from
    for ours, name in list(DIFFUSION_KEYS.items()) + [("max_new_tokens", "max_new_tokens")]:
        key, v = _diffusion_key(reader, name, legacy=ours)
        if v is None:
            continue
        keys[ours] = key
        if ours in minimum:
            gen[ours] = _int(reader, key, minimum=minimum[ours])
        else:
            # Floats are stored as float32: take the shortest decimal that round-trips (0.3, not 0.30000001192...),
            # so the sampler sees the value the checkpoint's generation_config.json held.
            gen[ours] = float(str(np.float32(_float(reader, key))))
    if gen.get("t_min") is not None and gen.get("t_max") is not None and gen["t_max"] <= gen["t_min"]:
        # (found at the first request, this named the run command's --t-max / --t-min, which nobody had typed)
        raise QuantizationError(f"GGUF metadata {keys['t_max']} = {gen['t_max']} must be greater than "
                                f"{keys['t_min']} = {gen['t_min']} (the first denoising step's temperature is above "
                                "the last's)")
    eb = gen.pop("entropy_bound", None)
    if eb is not None:
        gen["sampler_config"] = {"entropy_bound": eb}
    return gen


def _eos_ids(reader) -> list[int]:
    ids = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _tensor(t) -> torch.Tensor:
    """One GGUF tensor -> fp32 torch tensor in PyTorch dimension order (dequantized on its own)."""
    from gguf import quants
    name = t.tensor_type.name
    if name in ("F32", "F16", "F64"):
        arr = np.asarray(t.data, dtype=np.float32)
    else:
        try:
            arr = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise QuantizationError(f"GGUF tensor {t.name} has type {name}, which blockdiff cannot read") from None
    shape = tuple(int(x) for x in reversed(list(t.shape)))
    arr = np.ascontiguousarray(arr).reshape(shape).astype(np.float32, copy=False)
    if not arr.flags.writeable:  # an F32 tensor is a view of the read-only memory map; torch wants writable memory
        arr = arr.copy()
    return torch.from_numpy(arr)


_READABLE: dict[str, bool] = {}


def readable(qtype) -> bool:
    """Whether the gguf package dequantizes tensors of this GGML type (F32/F16/F64 are read directly)."""
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES

    if qtype.name not in _READABLE:
        ok = qtype.name in ("F32", "F16", "F64")
        if not ok and qtype in GGML_QUANT_SIZES:
            try:  # one all-zero block
                quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
                ok = True
            except NotImplementedError:
                pass
        _READABLE[qtype.name] = ok
    return _READABLE[qtype.name]


def check_tensor_types(reader, path: str) -> None:
    """Every tensor blockdiff reads has a type it can read: said before the load, in one line naming each type and
    a tensor of it (a quantized weight of another type ended the load in a NotImplementedError traceback)."""
    bad: dict[str, list[str]] = {}
    for t in reader.tensors:
        if t.name not in IGNORED and not readable(t.tensor_type):
            bad.setdefault(t.tensor_type.name, []).append(t.name)
    if bad:
        kinds = "; ".join(f"{k} ({names[0]}" + (f" and {len(names) - 1} more)" if len(names) > 1 else ")")
                          for k, names in bad.items())
        raise QuantizationError(f"{path} has tensors of types blockdiff cannot read: {kinds}; it reads F32, F16, "
                                "BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q2_K..Q6_K and the IQ types")


def default_method(reader, plan_targets: set[str]) -> str | None:
    bits = [_BITS.get(t.tensor_type.name, 4) for t in reader.tensors
            if t.tensor_type.name not in _FLOAT and gguf_to_model_name(t.name) in plan_targets]
    if not bits:
        return None
    return "int8" if min(bits) >= 6 else "int4-g32"


def load_gguf_model(path: str, dtype="auto", device="cpu", quantization=None, quantize_embedding: bool = True):
    from ..model import DiffusionGemma
    from .gguf_repack import tensor_parts
    from .plan import target_shapes

    reader = open_gguf(path)
    try:
        config = config_from_gguf(reader)
    except ValueError as e:  # QuantizationError or ModelConfig's own checks: say which file
        raise QuantizationError(f"{path}: {e}") from None
    check_tensor_types(reader, path)
    dtype = resolve_dtype(dtype, device)
    if quantization is None:
        quantization = default_method(reader, set(target_shapes(config.text, False)))
        if quantization:
            log.info("GGUF %s holds quantized weights: re-quantizing them to %s while loading", path, quantization)
    parsed = parse_method(quantization)
    if parsed:
        check_device(parsed[0], device)
    plan = QuantPlan(config.text, parsed[0] if parsed else None, parsed[1] if parsed else 64, quantize_embedding,
                     device, dtype, scope=int4_scope(quantization))
    with torch.device("meta"):
        model = DiffusionGemma(config)
    expected = {n: tuple(p.shape) for n, p in list(model.named_parameters()) + list(model.named_buffers())
                if not n.startswith("inv_freq_")}
    what = f"loading {os.path.basename(path)}" + (f", quantizing to {quantization}" if quantization else "")
    with lean_heap(device), progress(what, total=len(reader.tensors)) as bar:
        unexpected = []
        for t in reader.tensors:
            bar.advance()
            if t.name in IGNORED:
                continue
            ours = gguf_to_model_name(t.name)
            if ours is None or ours not in expected:
                unexpected.append(t.name)
                continue
            shape = tuple(reversed([int(x) for x in t.shape]))
            if shape != expected[ours] and not (int(np.prod(shape)) == 1 and expected[ours] == (1,)):
                # (was the plan's "tensor X has shape ..., the config implies ...": no file, and no config.json)
                raise QuantizationError(f"{path}: tensor {t.name} has shape {shape}, the GGUF metadata implies "
                                        f"{expected[ours]}")
            if ours in plan.targets:
                # Straight from the file's blocks to int8 / int4 parts: never the whole tensor in fp32.
                parts = tensor_parts(t, plan.tensor_method(ours), plan.tensor_group(ours))
                _check_parts(path, t.name, parts)
                plan.add_parts(ours, parts, expected[ours], t.name)
                continue
            w = _tensor(t)
            check_weight(t.name, w, path)  # as the safetensors loader does: a NaN loaded and failed every request
            if w.numel() == 1 and len(expected[ours]) == 1:
                w = w.reshape(expected[ours])
            plan.add(ours, None, w, expected[ours], t.name)
        missing = sorted(set(expected) - plan.sources)
        if missing:
            names = [model_to_gguf_name(n) for n in missing]
            more = f" (+{len(names) - 12} more)" if len(names) > 12 else ""
            raise QuantizationError(f"{path} lacks tensors blockdiff needs: {', '.join(names[:12])}{more}")
        if unexpected:
            raise QuantizationError(f"{path} has tensors blockdiff does not know: {', '.join(unexpected[:8])}")
        plan.install(model)
        model.load_state_dict(plan.state, strict=False, assign=True)
        plan.finalize(model)
    from ..model.layers import rope_inv_freq
    for lt in set(config.text.layer_types):
        spec = next(s for s in config.text.layers if s.layer_type == lt)
        setattr(model, f"inv_freq_{lt}", rope_inv_freq(config.text.rope_parameters[lt], spec.head_dim,
                                                          config.text.max_position_embeddings).to(device))
    model.eval()
    return model


def _check_parts(path: str, name: str, parts: dict[str, torch.Tensor]) -> None:
    """A NaN or infinity in a quantized weight (a block's scale, or a value of a float tensor being quantized)
    ends up in the scales or zeros of its parts: refused as the safetensors loader refuses non-finite weights."""
    for v in parts.values():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise QuantizationError(f"{path}: tensor {name} holds NaN or infinite values (in its weights or its "
                                    "blocks' scales); the file is corrupt")


def load_gguf(path: str, dtype="auto", device="cpu", quantization=None, quantize_embedding: bool = True):
    """(model, tokenizer or None, GenerationDefaults) from one .gguf file."""
    reader = open_gguf(path)
    try:  # the sampler defaults are checked before the (slow) load of the weights
        generation = generation_from_gguf(reader)
    except QuantizationError as e:
        raise QuantizationError(f"{path}: {e}") from None
    model = load_gguf_model(path, dtype, device, quantization, quantize_embedding)
    tokenizer = tokenizer_from_gguf(reader)
    return model, tokenizer, GenerationDefaults.from_dict(generation, model.text.eos_ids)


def tokenizer_from_gguf(reader):
    """A blockdiff Tokenizer from tokenizer.ggml.* metadata: byte-level BPE ("gpt2"), SentencePiece-style BPE with
    merges ("gemma4", "llama" with merges) or a unigram vocabulary with scores ("llama"). None without a vocab."""
    from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE, Unigram

    from ..tokenizer import Tokenizer

    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        return None
    kind = _field(reader, "tokenizer.ggml.model", "gpt2")
    merges = _field(reader, "tokenizer.ggml.merges")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges] if merges else []
    if kind == "gpt2":
        tok = HFTokenizer(BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
    elif merges:
        tok = HFTokenizer(BPE(vocab=vocab, merges=pairs, byte_fallback=True, fuse_unk=False))
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = _field(reader, "tokenizer.ggml.unknown_token_id", 0)
        tok = HFTokenizer(Unigram([(t, float(s)) for t, s in zip(tokens, scores)], unk_id=unk, byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Control (3) and user-defined (4) tokens are specials: always one id, dropped by decode.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (3, 4)])

    def name(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {"bos_token": name("bos"), "eos_token": name("eos"), "pad_token": name("padding"),
              "unk_token": name("unknown")}
    return Tokenizer(tok, config, _field(reader, "tokenizer.chat_template"), _eos_ids(reader))
