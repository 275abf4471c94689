"""Quantized weights: int8 / int4 weight-only and fp8, applied tensor by tensor while loading.

``load_model(path, quantization="int8" | "int4" | "int4-g32" | "int4-g128" | "fp8")`` (also ``LLM(...)`` and
``--quantization`` on the CLI) quantizes attention, dense-MLP, self-conditioning and expert weights as they are
read, and the tied embedding / LM head in int8 unless ``quantize_embedding=False``. Checkpoints written by
``blockdiff quantize`` (method in config.json), compressed-tensors FP8 checkpoints and llama.cpp GGUF files of
the ``diffusion-gemma`` architecture load with no flag. See docs/quantization.md.
"""

from __future__ import annotations

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


def plan_for_checkpoint(config, quantization, device, dtype: torch.dtype, embedding: bool = True) -> QuantPlan | None:
    """The loading plan for a checkpoint's config and the requested method; None when nothing is quantized."""
    parsed = parse_method(quantization)
    if parsed:
        check_device(parsed[0], device)
    qc = config.raw.get("quantization_config") if config.raw else None
    if qc:
        kind = qc.get("quant_method") if isinstance(qc, dict) else None
        if kind == "blockdiff":
            stored = qc.get("method")
            if stored not in ("int8", "int4"):
                raise QuantizationError(f"config.json quantization_config has an unknown method {stored!r}")
            if parsed and parsed[0] != stored:
                raise QuantizationError(f"this checkpoint is already quantized to {stored}; load it without "
                                        f"quantization (asked for {parsed[0]})")
            # files written before the int4 scope existed hold every linear in int4: "all" when absent
            return QuantPlan(config.text, stored, int(qc.get("group_size", 64)), bool(qc.get("embedding", True)),
                             device, dtype, stored=stored, scope=str(qc.get("int4_scope", "all")))
        if kind != "compressed-tensors":
            raise QuantizationError(f"unsupported quantization_config quant_method {kind!r}: blockdiff reads its "
                                    "own int8/int4 checkpoints and compressed-tensors FP8 ones")
        if not parsed:  # an FP8 checkpoint: keep FP8 where the GPU runs it, else dequantize per tensor
            if _fp8_capable(device):
                parsed = ("fp8", 64)
            else:
                log.info("FP8 checkpoint on %s: weights are dequantized to %s while loading", device, dtype)
                return QuantPlan(config.text, None, device=device, dtype=dtype)
    if not parsed:
        return None
    return QuantPlan(config.text, parsed[0], parsed[1], embedding, device, dtype, scope=int4_scope(quantization))
