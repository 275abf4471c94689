"""Quantized tensor formats: pure functions from a full-precision weight to its stored parts and back.

Every format quantizes along the last dimension (the input features of a linear, of an expert matrix, or the
hidden size of an embedding row) and keeps any leading dimensions (``[N, K]`` linears, ``[E, N, K]`` experts):

- ``int8``: symmetric per output row: ``qweight`` int8 ``[..., N, K]``, ``qscale`` fp32 ``[..., N]``;
  ``w ~= qweight * qscale``.
- ``int4``: asymmetric per group of ``G`` inputs: ``qweight`` uint8 ``[..., N, K/2]`` (two values per byte, the
  even index in the low nibble), ``qscale`` and ``qzero`` bf16 ``[..., N, K/G]``; ``w ~= (q - 8) * qscale + qzero``
  (the convention of torch's int4 matmul kernels, so their scales-and-zeros are a stack of these two).
- ``fp8``: float8_e4m3fn per output row: ``qweight`` ``[..., N, K]``, ``qscale`` fp32 ``[..., N]``;
  ``w ~= qweight * qscale`` (the compressed-tensors "channel" layout, with the scale's trailing 1 dropped).

The group size is not stored: it is ``K / qscale.shape[-1]``. Tensors are quantized a block of at most
``CHUNK_ROWS`` rows (of one expert) at a time, so the fp32 temporaries stay small: quantizing the 262,144 x 2,816
embedding in one go made four 3 GB temporaries.
"""

from __future__ import annotations

import torch

INT4_GROUPS = (128, 64, 32)  # group sizes torch's int4 kernels accept, largest first
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def int4_group(k: int, preferred: int) -> int | None:
    """The group size for a row of ``k`` inputs: ``preferred`` if it divides k, else the largest smaller one."""
    for g in (preferred,) + tuple(g for g in INT4_GROUPS if g < preferred):
        if k % g == 0 and g in INT4_GROUPS:
            return g
    return None


CHUNK_ROWS = 8192


def _slices(w: torch.Tensor, fn) -> tuple[torch.Tensor, ...]:
    """Apply fn to blocks of at most CHUNK_ROWS rows of each leading slice (bounded temporaries)."""
    if w.dim() == 2:
        if w.shape[0] <= CHUNK_ROWS:
            return fn(w)
        outs = [fn(w[i:i + CHUNK_ROWS]) for i in range(0, w.shape[0], CHUNK_ROWS)]
        return tuple(torch.cat([o[j] for o in outs]) for j in range(len(outs[0])))
    outs = [_slices(w[i], fn) for i in range(w.shape[0])]
    return tuple(torch.stack([o[j] for o in outs]) for j in range(len(outs[0])))


def quantize(w: torch.Tensor, method: str, group: int = 64) -> dict[str, torch.Tensor]:
    """Full-precision ``w`` [..., N, K] -> its stored parts ({"qweight", "qscale"[, "qzero"]})."""
    if method == "int8":
        q, s = _slices(w, _int8)
        return {"qweight": q, "qscale": s}
    if method == "int4":
        g = int4_group(w.shape[-1], group)
        if g is None:
            raise ValueError(f"int4 needs the row length ({w.shape[-1]}) to be a multiple of 32")
        q, s, z = _slices(w, lambda m: _int4(m, g))
        return {"qweight": q, "qscale": s, "qzero": z}
    if method == "fp8":
        q, s = _slices(w, _fp8)
        return {"qweight": q, "qscale": s}
    raise ValueError(f"unknown quantization method {method!r}")


def _int8(w: torch.Tensor):
    w = w.float()
    scale = (w.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _int4(w: torch.Tensor, g: int):
    n, k = w.shape
    wg = w.float().reshape(n, k // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)  # stored rounded: quantize against the stored values
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = torch.round((wg - z) / s + 8).clamp(0, 15).to(torch.uint8).reshape(n, k)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, zero


def _fp8(w: torch.Tensor):
    w = w.float()
    scale = (w.abs().amax(dim=-1) / FP8_MAX).clamp(min=1e-12)
    return (w / scale[:, None]).to(torch.float8_e4m3fn), scale


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [..., N, K/2] -> uint8 values 0..15 [..., N, K]."""
    return torch.stack([qweight & 15, qweight >> 4], dim=-1).flatten(-2)


def dequantize(parts: dict[str, torch.Tensor], method: str, dtype=torch.float32) -> torch.Tensor:
    q, s = parts["qweight"], parts["qscale"]
    if method in ("int8", "fp8"):
        return (q.to(torch.float32) * s.float()[..., None]).to(dtype)
    if method == "int4":
        vals = unpack_int4(q).to(torch.float32)  # [..., N, K]
        g = vals.shape[-1] // s.shape[-1]
        vals = vals.unflatten(-1, (s.shape[-1], g))
        w = (vals - 8) * s.float()[..., None] + parts["qzero"].float()[..., None]
        return w.flatten(-2).to(dtype)
    raise ValueError(f"unknown quantization method {method!r}")


def stored_shapes(shape: tuple[int, ...], method: str, group: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What ``quantize`` produces for a weight of ``shape``: {part: (shape, dtype)} (used to validate files)."""
    *lead, n, k = shape
    lead = tuple(lead)
    if method == "int8":
        return {"qweight": (lead + (n, k), torch.int8), "qscale": (lead + (n,), torch.float32)}
    if method == "fp8":
        return {"qweight": (lead + (n, k), torch.float8_e4m3fn), "qscale": (lead + (n,), torch.float32)}
    if method == "int4":
        return {"qweight": (lead + (n, k // 2), torch.uint8), "qscale": (lead + (n, k // group), torch.bfloat16),
                "qzero": (lead + (n, k // group), torch.bfloat16)}
    raise ValueError(f"unknown quantization method {method!r}")
