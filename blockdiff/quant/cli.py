"""``blockdiff quantize SRC DST --method int8|int4|fp8``: write a quantized checkpoint that loads with no flag.

int8 / int4 use blockdiff's layout (``NAME.qweight`` / ``.qscale`` / ``.qzero``; config.json
``quantization_config = {"quant_method": "blockdiff", "method": ..., "group_size": ..., "embedding": ...}``).
fp8 writes the compressed-tensors layout (``NAME`` in float8_e4m3fn + ``NAME_scale`` [N, 1], per-channel weights,
dynamic per-token activations), which vLLM and other FP8 readers also understand.
The source is read one tensor at a time; only the quantized output is held in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil

# What `blockdiff train` keeps beside the checkpoint in its run folder (blockdiff/train/loop.py): not part of the
# model. Copied into DST, the optimizer state (twice the fp32 weights) outweighed the quantized model, and DST
# passed for a training run that `train --out DST` resumed.
RUN_FILES = ("trainer_state.pt", "train_log.jsonl")
_TMP_FILE = re.compile(r"\.tmp\d+$")  # blockdiff/files.py atomic_path's temporary name, left by a killed save

FP8_CONFIG = {
    "quant_method": "compressed-tensors", "format": "float-quantized",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True},
    }},
    "ignore": ["lm_head"],
}


def quantize_checkpoint(src: str, dst: str, method: str, quantize_embedding: bool = True, log=print,
                        revision: str | None = None, download_dir: str | None = None) -> str:
    """Write the quantized checkpoint of ``src`` to ``dst``; returns ``dst``. A run that fails or is interrupted
    removes ``dst`` again when it created it and nothing was written there yet."""
    existed = os.path.isdir(dst)
    try:
        return _quantize(src, dst, method, quantize_embedding, log, revision, download_dir)
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):  # not empty: a re-run reuses it (no config.json was written)
                os.rmdir(dst)
        raise


def _quantize(src: str, dst: str, method: str, quantize_embedding: bool, log, revision: str | None,
              download_dir: str | None) -> str:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..config import ModelConfig
    from ..files import atomic_path, write_json
    from ..checks import check_weight, read_tensor
    from ..loader import (CheckpointError, _all_tensor_names, _weight_files, check_checkpoint_tensors,
                          check_tied, checkpoint_to_model_name, drop_sharded_weights,
                          no_config_message,
                          resolve_path)
    from ..progress import progress
    from .plan import QuantizationError, QuantPlan, int4_scope, parse_method
    from .tensors import quantize

    scope = int4_scope(method)
    choices = "--method takes int8, int4 (int4-g32, int4-g128, int4-all) or fp8"
    try:
        parsed = parse_method(method)
    except QuantizationError as e:  # its list of choices ends in "none", which --method refuses
        raise QuantizationError(f"{str(e).split(';')[0]}; {choices}") from None
    if parsed is None:
        raise ValueError(f"--method {method!r} writes nothing; {choices}")
    method, group = parsed
    from ..hub import is_gguf
    if is_gguf(src):  # was "SRC is a file; pass the checkpoint folder", which a GGUF user does not have
        raise ValueError(f"{src}: blockdiff quantize writes a copy of a safetensors checkpoint; a .gguf file needs "
                         "none: run, chat and serve load it quantized as it is (--quantization picks the method)")
    path = resolve_path(src, revision=revision, download_dir=download_dir)
    if os.path.abspath(path) == os.path.abspath(dst):
        raise ValueError("DST must differ from SRC")
    if os.path.exists(os.path.join(dst, "config.json")):
        raise ValueError(f"{dst} already holds a checkpoint; choose an empty folder")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(no_config_message(path))  # (with the .gguf file to pass instead, when it holds one)
    config = ModelConfig.from_file(cfg_path)
    qc = config.raw.get("quantization_config")
    if qc:
        raise ValueError(f"{src} is already quantized ({qc.get('quant_method') if isinstance(qc, dict) else qc!r})")
    files = _weight_files(path)
    # Before the (long) quantization: a source missing a tensor, holding one the model has no place for, or one of
    # another shape was quantized and written, and DST then failed to load.
    check_tied(config, cfg_path)
    check_checkpoint_tensors(path, config, files)
    # Made before the (long) quantization: a DST that is a file or cannot be created fails now, not at the end.
    try:
        os.makedirs(dst, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output folder {dst}: {e.strerror or e}") from None
    embedding = quantize_embedding and method != "fp8"  # compressed-tensors keeps embeddings full precision
    plan = QuantPlan(config.text, method, group, embedding, scope=scope)
    out: dict[str, torch.Tensor] = {}
    n_quant = 0
    name = os.path.basename(os.path.normpath(path))
    with progress(f"quantizing {name} to {method}", total=len(_all_tensor_names(files))) as bar:
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    bar.advance()
                    ours = checkpoint_to_model_name(name)  # (check_checkpoint_tensors refused unknown names)
                    if ours is None:
                        continue  # tied aliases (lm_head, the encoder's shared weights): never read by the loader
                    t = read_tensor(f, file, name)
                    # as the loader does: a NaN quantized into the scales became a checkpoint that loads and
                    # fails every request
                    check_weight(name, t, file)
                    if ours not in plan.targets:
                        out[name] = t
                        continue
                    if tuple(t.shape) != plan.targets[ours]:
                        raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, the config implies "
                                              f"{plan.targets[ours]}")
                    parts = quantize(t, plan.tensor_method(ours), group)
                    if method == "fp8":
                        out[name] = parts["qweight"]
                        out[name + "_scale"] = parts["qscale"][..., None].contiguous()
                    else:
                        for k, v in parts.items():
                            out[f"{name}.{k}"] = v.contiguous()
                    n_quant += 1
    # config.json is written last, and every file replaced whole (blockdiff/files.py): a quantize cut short
    # (Ctrl-C, a full disk) leaves no config.json, so DST does not load as a checkpoint and a re-run may reuse it.
    with atomic_path(os.path.join(dst, "model.safetensors")) as tmp:
        save_file(out, tmp, metadata={"format": "pt"})
    # A model.safetensors.index.json left in DST (a copy of a sharded checkpoint that never got its config.json)
    # is read before model.safetensors: DST loaded those stale weights, quantized while loading, without a word.
    drop_sharded_weights(dst)
    for entry in os.listdir(path):  # tokenizer, generation config, chat template, README...
        full = os.path.join(path, entry)
        # not a training run's own files (its optimizer state, learning curve) nor a save cut short
        if os.path.isfile(full) and entry != "config.json" and not entry.startswith("model") and \
                not entry.endswith(".safetensors") and entry not in RUN_FILES and not _TMP_FILE.search(entry):
            with atomic_path(os.path.join(dst, entry)) as tmp:
                shutil.copy2(full, tmp)
    raw = dict(config.raw)
    raw["quantization_config"] = FP8_CONFIG if method == "fp8" else {
        "quant_method": "blockdiff", "method": method, "group_size": group, "embedding": embedding,
        "int4_scope": plan.scope}
    write_json(os.path.join(dst, "config.json"), raw)
    size = os.path.getsize(os.path.join(dst, "model.safetensors"))
    log(f"quantized {n_quant} tensors to {method}; wrote {dst} ({size / 2 ** 20:.1f} MiB)")
    return dst


def cmd_quantize(args) -> int:
    quantize_checkpoint(args.src, args.dst, args.method, quantize_embedding=not args.keep_embedding,
                        revision=args.revision, download_dir=args.download_dir)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="write an int8 / int4 / fp8 copy of a checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint folder (or hub id)")
    p.add_argument("dst", help="output folder (created)")
    p.add_argument("--method", required=True, help="int8 | int4 (experts in 4 bits, other linears int8; int4-g32, int4-g128) | int4-all (every linear in 4 bits) | fp8")
    p.add_argument("--keep-embedding", action="store_true",
                   help="keep the tied embedding / LM head in full precision (default: int8 for int8/int4)")
    p.add_argument("--revision", help="with a hub id: branch, tag or commit (default: main)")
    p.add_argument("--download-dir", help="with a hub id: where to download (default: huggingface_hub's cache)")
    p.set_defaults(func=cmd_quantize)
