"""Where and in what precision a model lives: ``--device`` and ``--dtype`` resolved for every loader (safetensors in
loader.py, GGUF in quant/gguf.py) and every command."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device(device):
    """``"auto"`` (or None): ``"cuda"`` when a CUDA device is present, else ``"cpu"``; anything else unchanged once
    it names a device this machine has (else a ``ValueError`` saying why, not torch's assertion from deep inside
    the load)."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as e:  # torch's own words, under the argument's name
        raise ValueError(f"unknown device {device!r} ({e}); use auto, cpu, cuda or cuda:N") from None
    why = unavailable(device)
    if why is not None:
        raise ValueError(f"device {device!r}: {why} (use device='cpu' or 'auto')")
    return device


def unavailable(device) -> str | None:
    """Why this machine cannot use ``device`` (a backend torch lacks or that finds no device, an index past the
    devices there are), or None when it can."""
    dev = torch.device(device)
    if dev.type in ("cpu", "meta"):
        return None
    backend = getattr(torch, dev.type, None)
    if dev.type == "mps":
        available = torch.backends.mps.is_available()
    else:
        is_available = getattr(backend, "is_available", None)
        available = bool(is_available and is_available())
    if not available:
        return f"{dev.type.upper()} is not available on this machine"
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        return f"this machine has {count()} {dev.type} device(s)"
    return None


def describe_device(device) -> str:
    """One line for the start-up message: which device, and why when ``auto`` chose it."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def resolve_dtype(dtype, device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point or dtype.itemsize < 2:  # an int8 model is quantization='int8', not dtype
            raise ValueError(f"dtype {dtype} is not a compute dtype; use torch.float32, torch.bfloat16, "
                             "torch.float16 or 'auto' (quantized weights: quantization='int8' / 'int4' / 'fp8')")
        return dtype
    if dtype in (None, "auto"):
        # bf16 matmul is ~100x slower than fp32 on CPUs: compute in fp32 there.
        return torch.bfloat16 if torch.device(resolve_device(device)).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))} or 'auto'")
    return DTYPES[dtype]
