"""Checkpoint loading and saving in the released DiffusionGemma layout.

``load_model(path_or_hub_id, dtype, device)``: reads ``config.json`` and (sharded) safetensors, builds the
model on the meta device and fills it tensor by tensor, so a checkpoint is never held twice in memory.
Strict: missing or unexpected tensors fail with a message naming them. The vision tower
(``model.encoder.vision_tower.*``, ``model.encoder.embed_vision.*``) loads into ``model.vision``; a checkpoint
whose weights hold none of its tensors loads text-only (``model.vision is None``), whatever config.json says.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re

import torch
from safetensors.torch import save_file

from .checks import CheckpointError, check_weight, open_safetensors, read_tensor, weight_map
from .config import ModelConfig
from .files import atomic_files
from .hub import is_gguf, model_ref, no_config_message, resolve_gguf, resolve_path  # noqa: F401 (also re-exported)
from .placement import resolve_device, resolve_dtype  # noqa: F401 (also re-exported: loader.resolve_dtype)
from .model import DiffusionGemma
from .heap import lean_heap
from .progress import progress

log = logging.getLogger("blockdiff")

_VISION = {"model.encoder.vision_tower.": "vision.tower.", "model.encoder.embed_vision.": "vision.embedder."}
_ENC = "model.encoder.language_model."
_DEC = "model.decoder."


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        shards = sorted(set(weight_map(index).values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise CheckpointError(f"{path}: shards named in the index are missing: {missing}")
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def checkpoint_to_model_name(name: str) -> str | None:
    """Map a released tensor name to ours; None for tensors that are tied aliases of ones we load."""
    if name.startswith(_DEC):
        return name[len(_DEC):]
    if name.startswith(_ENC):
        m = re.fullmatch(r"layers\.(\d+)\.layer_scalar", name[len(_ENC):])
        if m:
            return f"layers.{m.group(1)}.encoder_layer_scalar"
        m = re.fullmatch(r"layers\.(\d+)\.self_attn\.([qkvo]_proj)\.bias", name[len(_ENC):])
        if m:  # the reference does not tie attention biases: the encode pass has its own
            return f"layers.{m.group(1)}.self_attn.encoder_bias.{m.group(2)}"
        return None  # the encoder's other text weights are tied to the decoder's
    if name == "lm_head.weight":
        return None  # tied to the embeddings
    for prefix, ours in _VISION.items():
        if name.startswith(prefix):
            return ours + name[len(prefix):]
    raise KeyError(name)


def _has_vision_tensors(files: list[str]) -> bool:
    for file in files:
        with open_safetensors(file) as f:
            if any(n.startswith(tuple(_VISION)) for n in f.keys()):
                return True
    return False


def load_model(path_or_id: str, dtype="auto", device: str | torch.device = "auto", quantization: str | None = None,
               quantize_embedding: bool = True, revision: str | None = None, download_dir: str | None = None,
               gguf_file: str | None = None, prepare_quantized: bool = True) -> DiffusionGemma:
    """``quantization``: None | "int8" | "int4" (| "int4-g32" | "int4-g128") | "fp8", applied tensor by tensor
    while loading (see blockdiff/quant); ``quantize_embedding=False`` keeps the tied embedding in full precision;
    ``prepare_quantized=False`` keeps quantized weights in their stored layout (``blockdiff.distributed`` cuts
    them into shards, then prepares the kernels).
    A ``.gguf`` file (local, ``org/name:file.gguf`` or ``gguf_file=`` with a hub id) loads from its own metadata and
    tensors (text only). ``device="auto"``: CUDA when present, else CPU. ``revision`` / ``download_dir``: for hub
    ids (blockdiff/hub.py)."""
    path_or_id = model_ref(path_or_id, "path_or_id", gguf_file)
    device = resolve_device(device)
    if is_gguf(path_or_id, gguf_file):
        from .quant.gguf import load_gguf_model
        return load_gguf_model(resolve_gguf(path_or_id, gguf_file, revision, download_dir), dtype=dtype,
                               device=device, quantization=quantization, quantize_embedding=quantize_embedding)
    path = resolve_path(path_or_id, revision, download_dir)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(no_config_message(path))
    config = ModelConfig.from_file(cfg_path)
    check_tied(config, cfg_path)
    dtype = resolve_dtype(dtype, device)
    plan = _quant_plan(config, quantization, device, dtype, quantize_embedding, cfg_path)
    # CPU: loading temporaries apart from the kept tensors (blockdiff/heap.py)
    with lean_heap(device), progress(_describe_load(path, quantization)) as bar:
        files = _weight_files(path)
        with_vision = config.vision is not None and _has_vision_tensors(files)
        if config.vision is not None and not with_vision:
            # debug, not info: trained text-only checkpoints (the bundled Sudoku model) carry a placeholder
            # vision_config, and every command on them printed this; a request with an image says it plainly
            log.debug("%s: config.json has a vision_config but the weights hold no vision tower: loading text-only",
                      path)
        with torch.device("meta"):
            model = DiffusionGemma(config, with_vision=with_vision)
        expected = {n: p for n, p in list(model.named_parameters()) + list(model.named_buffers())
                    if not n.startswith("inv_freq_") and n != "vision.tower.inv_freq"}
        loaded: dict[str, torch.Tensor] = {}
        unexpected = []
        all_names = _all_tensor_names(files)  # headers only: cheap
        bar.update(total=len(all_names))
        for file in files:
            with open_safetensors(file) as f:
                for name in f.keys():
                    bar.advance()
                    base, part = name, None
                    if plan is not None:  # quantized layouts: NAME.qweight, NAME_scale, ... belong to NAME
                        base, part = plan.route(name, all_names, lambda n: f.get_slice(n).get_dtype())
                        if base is None:
                            continue
                    ours = _model_name(base, name, expected, unexpected)
                    if ours is None:
                        continue
                    t = read_tensor(f, file, name)
                    # Stored quantized parts: the integer codes (qweight) cannot be wrong; their scales, zeros and
                    # FP8 values can. A NaN there loaded, and every request failed with non-finite logits.
                    if part is None or t.is_floating_point():
                        check_weight(name, t, file)
                    if plan is not None:
                        plan.add(ours, part, t, tuple(expected[ours].shape), name)
                        continue
                    want = tuple(expected[ours].shape)
                    if tuple(t.shape) != want:
                        raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, the config implies {want}")
                    # copy=True: safetensors' CPU buffers are only 4-16-byte aligned, which makes fp32 CPU matmuls
                    # take other paths (logits then depend on the file layout, e.g. sharded or not); torch's
                    # allocator aligns. Moving to another device or dtype copies anyway.
                    loaded[ours] = t.to(device=device, dtype=dtype, copy=True)
        if plan is not None:
            plan.check_complete()
            loaded, have = plan.state, plan.sources
        else:
            have = set(loaded)
        _check_match(path, sorted(set(expected) - have), unexpected)
        if plan is not None:
            plan.install(model)
        model.load_state_dict(loaded, strict=False, assign=True)
        if plan is not None:
            plan.finalize(model, prepare=prepare_quantized)
    # Non-persistent RoPE tables were built on meta: rebuild them on the device.
    from .model.layers import rope_inv_freq
    for lt in set(config.text.layer_types):
        spec = next(s for s in config.text.layers if s.layer_type == lt)
        setattr(model, f"inv_freq_{lt}", rope_inv_freq(config.text.rope_parameters[lt], spec.head_dim,
                                                          config.text.max_position_embeddings).to(device))
    if model.vision is not None:
        model.vision.tower.rebuild_buffers(device)
    model.eval()
    return model


def check_tied(config: ModelConfig, cfg_path: str) -> None:
    if not config.tie_word_embeddings:
        # the reference then unties everything: separate encoder, denoiser and LM-head weights
        raise CheckpointError(f"{cfg_path}: tie_word_embeddings=false is not supported (blockdiff runs one weight set "
                              "shared by the encoder, the denoiser and the LM head)")


def _check_match(path: str, missing: list[str], unexpected: list[str]) -> None:
    """One line naming the tensors the model needs and the checkpoint lacks (``missing``: model names) and the ones
    it holds that the model has no place for (``unexpected``: checkpoint names)."""
    if not missing and not unexpected:
        return

    def show(names):
        return ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
    msg = [f"checkpoint at {path} does not match the DiffusionGemma config:"]
    if missing:
        msg.append(f"missing tensors: {show([_model_to_checkpoint_name(n) for n in missing])}")
    if unexpected:
        msg.append(f"unexpected tensors: {show(sorted(unexpected))}")
    raise CheckpointError(" ".join(msg))


def check_checkpoint_tensors(path: str, config: ModelConfig, files: list[str]) -> None:
    """From the headers alone, that a full-precision checkpoint holds every tensor the model needs, in its shape,
    and nothing else: what ``load_model`` finds only after reading every tensor (``blockdiff quantize`` checks its
    source with this before its long run: it wrote a checkpoint that could not load)."""
    with_vision = config.vision is not None and _has_vision_tensors(files)
    with torch.device("meta"):
        model = DiffusionGemma(config, with_vision=with_vision)
    expected = {n: tuple(p.shape) for n, p in list(model.named_parameters()) + list(model.named_buffers())
                if not n.startswith("inv_freq_") and n != "vision.tower.inv_freq"}
    have, unexpected = set(), []
    for file in files:
        with open_safetensors(file) as f:
            for name in f.keys():
                ours = _model_name(name, name, expected, unexpected)
                if ours is None:
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[ours]:
                    raise CheckpointError(f"tensor {name} has shape {shape}, the config implies {expected[ours]}")
                have.add(ours)
    _check_match(path, sorted(set(expected) - have), unexpected)


def _model_name(base: str, name: str, expected, unexpected: list[str]) -> str | None:
    """The model's name for the checkpoint tensor ``name`` (``base``: its weight's name), or None to skip it: a
    tensor the model does not use (the oracle's extras), or one it does not know, noted in ``unexpected``."""
    try:
        ours = checkpoint_to_model_name(base)
    except KeyError:
        unexpected.append(name)
        return None
    if ours is not None and ours not in expected:
        unexpected.append(name)
        return None
    return ours


def _describe_load(path: str, quantization: str | None) -> str:
    name = os.path.basename(os.path.normpath(path))
    return f"loading {name}" + (f", quantizing to {quantization}" if quantization else "")


def _quant_plan(config, quantization, device, dtype, quantize_embedding, source: str = "config.json"):
    """The quantize-while-loading plan (blockdiff/quant), or None for a plain full-precision load."""
    from .quant import plan_for_checkpoint
    return plan_for_checkpoint(config, quantization, device, dtype, embedding=quantize_embedding, source=source)


def _all_tensor_names(files: list[str]) -> set[str]:
    """Every tensor of the shards (headers only); a tensor stored in two shards is refused (which copy the model
    got depended on the shards' order)."""
    where: dict[str, str] = {}
    for file in files:
        with open_safetensors(file) as f:
            for name in f.keys():
                if name in where:
                    raise CheckpointError(f"{os.path.dirname(file)}: tensor {name} is stored twice, in "
                                          f"{os.path.basename(where[name])} and {os.path.basename(file)}")
                where[name] = file
    return set(where)


def _model_to_checkpoint_name(ours: str) -> str:
    for prefix, mine in _VISION.items():
        if ours.startswith(mine):
            return prefix + ours[len(mine):]
    m = re.fullmatch(r"layers\.(\d+)\.encoder_layer_scalar", ours)
    if m:
        return f"{_ENC}layers.{m.group(1)}.layer_scalar"
    m = re.fullmatch(r"layers\.(\d+)\.self_attn\.encoder_bias\.([qkvo]_proj)", ours)
    if m:
        return f"{_ENC}layers.{m.group(1)}.self_attn.{m.group(2)}.bias"
    return _DEC + ours


def drop_sharded_weights(path: str) -> None:
    """Once a new ``model.safetensors`` is in place, remove the ``model.safetensors.index.json`` of an earlier
    sharded checkpoint in ``path`` (``_weight_files`` reads an index first: the folder kept loading the old
    weights), then the shards it names."""
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        return
    try:
        shards = set(weight_map(index).values())
    except CheckpointError:
        shards = set()
    os.remove(index)
    for shard in shards:
        if os.path.basename(shard) == shard and shard != "model.safetensors":  # only files of this folder
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(path, shard))


def save_model(model: DiffusionGemma, path: str, dtype: torch.dtype | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` in the released layout (loads back with ``load_model``
    and with the transformers reference, which then sees no vision tower: pass a config with one if needed)."""
    os.makedirs(path, exist_ok=True)
    # Both files are replaced together (blockdiff/files.py): an interrupted save leaves the previous checkpoint.
    with atomic_files() as stage:
        stage_model(model, path, stage, dtype)
    drop_sharded_weights(path)


def stage_model(model: DiffusionGemma, path: str, stage, dtype: torch.dtype | None = None) -> None:
    """``save_model``'s two files, written to the temporary names ``stage`` (``files.atomic_files``) gives, so a
    caller can replace them together with files of its own (the trainer's state); call ``drop_sharded_weights``
    once they are in place."""
    tensors = {}
    for name, t in model.state_dict().items():
        if name.startswith("inv_freq_") or name == "vision.tower.inv_freq":
            continue
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[_model_to_checkpoint_name(name)] = t.contiguous()
    save_file(tensors, stage(os.path.join(path, "model.safetensors")), metadata={"format": "pt"})
    config = model.config.to_dict()
    from .quant.modules import has_quantized_modules
    if not has_quantized_modules(model):
        # the tensors written are full precision: a quantization_config kept from the checkpoint loaded (FP8,
        # dequantized while loading) would describe weights this file does not hold
        config.pop("quantization_config", None)
    with open(stage(os.path.join(path, "config.json")), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
