"""Quantized weights: int8 / int4 weight-only and fp8, applied tensor by tensor while loading.

``load_model(path, quantization="int8" | "int4" | "int4-g32" | "int4-g128" | "fp8")`` (also ``LLM(...)`` and
``--quantization`` on the CLI) quantizes attention, dense-MLP, self-conditioning and expert weights as they are
read, and the tied embedding / LM head in int8 unless ``quantize_embedding=False``. Checkpoints written by
``blockdiff quantize`` (method in config.json), compressed-tensors FP8 checkpoints and llama.cpp GGUF files of
the ``diffusion-gemma`` architecture load with no flag. See docs/quantization.md.
"""

from __future__ import annotations

import json
import logging

import torch

from .plan import METHODS, QuantizationError, QuantPlan, check_device, int4_scope, parse_method

log = logging.getLogger("blockdiff")

__all__ = ["METHODS", "QuantizationError", "QuantPlan", "check_device", "parse_method", "plan_for_checkpoint"]


def _fp8_capable(device) -> bool:
    try:
        check_device("fp8", device)
        return True
    except QuantizationError:
        return False


def plan_for_checkpoint(config, quantization, device, dtype: torch.dtype, embedding: bool = True,
                        source: str = "config.json") -> QuantPlan | None:
    """The loading plan for a checkpoint's config and the requested method; None when nothing is quantized.
    ``source``: the config file, named in the errors about its ``quantization_config``."""
    parsed = parse_method(quantization)
    if parsed:
        check_device(parsed[0], device)
    qc = config.raw.get("quantization_config") if config.raw else None
    if qc:
        kind = qc.get("quant_method") if isinstance(qc, dict) else None
        if kind == "blockdiff":
            stored, group, stored_embedding, scope = _stored_method(qc, source)
            # the whole spelling, not the method alone: "int4-g128" or "int4-all" on an int4 (g64, experts) file
            # loaded the file's layout without a word; a plain "int4" names the method only, and takes any layout
            spelled = stored if stored == "int8" else \
                "int4" + ("-all" if scope == "all" else "") + (f"-g{group}" if group != 64 else "")
            other_layout = parsed and stored == "int4" and str(quantization).lower() != "int4" \
                and (parsed[1], int4_scope(quantization)) != (group, scope)
            if parsed and (parsed[0] != stored or other_layout):
                raise QuantizationError(f"this checkpoint is already quantized to {spelled}; load it without "
                                        f"quantization (asked for {quantization})")
            if stored_embedding and not embedding:
                # was ignored: the int8 embedding of the file loaded as it is
                raise QuantizationError("this checkpoint's tied embedding is stored in int8 (blockdiff quantize "
                                        "without --keep-embedding): it cannot load in full precision; quantize the "
                                        "full-precision checkpoint with --keep-embedding instead")
            return QuantPlan(config.text, stored, group, stored_embedding, device, dtype, stored=stored, scope=scope)
        if kind != "compressed-tensors":
            raise QuantizationError(f"unsupported quantization_config quant_method {kind!r}: blockdiff reads its "
                                    "own int8/int4 checkpoints and compressed-tensors FP8 ones")
        _check_compressed_tensors(qc, source)
        if not parsed:  # an FP8 checkpoint: keep FP8 where the GPU runs it, else dequantize per tensor
            if _fp8_capable(device):
                parsed = ("fp8", 64)
            else:
                log.info("FP8 checkpoint on %s: weights are dequantized to %s while loading", device, dtype)
                return QuantPlan(config.text, None, device=device, dtype=dtype)
    if not parsed:
        return None
    return QuantPlan(config.text, parsed[0], parsed[1], embedding, device, dtype, scope=int4_scope(quantization))


def _stored_method(qc: dict, source: str) -> tuple[str, int, bool, str]:
    """(method, group size, embedding quantized, int4 scope) of a ``blockdiff quantize`` quantization_config,
    each value checked: a hand-edited ``"group_size": "64"`` was "invalid literal for int()" naming nothing, and
    ``"embedding": "false"`` read as true."""
    def bad(key, want):
        return QuantizationError(f"{source}: quantization_config.{key} must be {want}, got {json.dumps(qc[key])}")

    stored = qc.get("method")
    if stored not in ("int8", "int4"):
        raise QuantizationError(f"{source}: quantization_config has an unknown method {stored!r} (blockdiff "
                                "quantize writes int8 or int4)")
    group = qc.get("group_size", 64)
    if isinstance(group, bool) or group not in (32, 64, 128):
        raise bad("group_size", "32, 64 or 128")
    emb = qc.get("embedding", True)
    if not isinstance(emb, bool):
        raise bad("embedding", "true or false")
    # files written before the int4 scope existed hold every linear in int4: "all" when absent
    scope = qc.get("int4_scope", "all")
    if scope not in ("experts", "all"):
        raise bad("int4_scope", '"experts" or "all"')
    return stored, int(group), emb, scope


# compressed-tensors formats whose weights are stored as plain tensors (FP8 ones with their scales)
_CT_FORMATS = (None, "float-quantized", "naive-quantized", "dense")


def _check_compressed_tensors(qc: dict, source: str) -> None:
    """A compressed-tensors checkpoint blockdiff reads holds FP8 weights; any other (int4 / int8 packed, NVFP4,
    sparse) failed as "does not match the DiffusionGemma config: missing tensors ...weight, unexpected tensors
    ...weight_packed, ...weight_scale" after reading every tensor."""
    fmt = qc.get("format")
    groups = qc.get("config_groups")
    weights = [g.get("weights") for g in groups.values() if isinstance(g, dict)] if isinstance(groups, dict) else []
    other = next((w for w in weights if isinstance(w, dict) and (w.get("type"), w.get("num_bits")) != ("float", 8)),
                 None)
    if other is None and fmt in _CT_FORMATS:
        return
    what = f"{other.get('num_bits')}-bit {other.get('type')} weights" if other else "weights"
    raise QuantizationError(f"{source}: a compressed-tensors checkpoint of {what} (format {fmt!r}): blockdiff reads "
                            "compressed-tensors FP8 (8-bit float weights) only; load the full-precision checkpoint "
                            "with --quantization int8 / int4, or write a copy with blockdiff quantize")
