"""GGUF quantized tensors -> blockdiff's int8 / int4 stored parts, without a full-precision copy of the tensor.

Two ways, chosen per tensor:

- **Repacked as they are** (no re-quantization): Q4_0 and Q4_K blocks into int4 with groups of 32. Both formats
  are 4-bit values with a scale (and, for Q4_K, a minimum) per 32 weights, which is blockdiff's int4 layout
  ``w = (q - 8) * scale + zero``: Q4_0 ``d * (q - 8)`` gives scale ``d``, zero 0; Q4_K ``d * sc * q - dmin * m``
  gives scale ``d * sc``, zero ``8 * d * sc - dmin * m``. Only the nibble order changes (GGML keeps elements j and
  j + 16 of a block in one byte, blockdiff elements 2i and 2i + 1) and the scales are rounded to bf16.
- **Converted a few rows at a time**: any other type (Q8_0, Q5_0, Q6_K, ...) or target method, dequantized
  ``ROWS`` rows at a time and re-quantized with ``tensors.quantize``, so the fp32 temporaries stay one chunk.

Either way the result is what the loader's quantize-while-loading plan would hold, and the file's blocks are read
straight from the memory-mapped file.
"""

from __future__ import annotations

import numpy as np
import torch

from .tensors import quantize

ROWS = 4096  # rows of one matrix dequantized at once on the conversion path
REPACKED = ("Q4_0", "Q4_K")  # repacked into int4-g32 without re-quantizing


def tensor_parts(t, method: str, group: int) -> dict[str, torch.Tensor]:
    """GGUF tensor ``t`` (a ``gguf.ReaderTensor``) -> {"qweight", "qscale"[, "qzero"]} of ``method``."""
    kind = t.tensor_type.name
    shape = tuple(int(x) for x in reversed(list(t.shape)))  # PyTorch order [..., N, K]
    *lead, n, k = shape
    data = np.asarray(t.data)
    mats = data.reshape((-1, n) + data.shape[-1:]) if lead else data.reshape((1, n) + data.shape[-1:])
    if method == "int4" and group == 32 and kind in REPACKED:
        parts = [_REPACK[kind](m.reshape(n, -1), k) for m in mats]
    else:
        parts = [_convert(m, kind, t.tensor_type, k, method, group) for m in mats]
    out = {name: torch.stack([p[name] for p in parts]) for name in parts[0]}
    return {name: v.reshape(tuple(lead) + tuple(v.shape[1:])) if lead else v[0] for name, v in out.items()}


def _convert(m: np.ndarray, kind: str, qtype, k: int, method: str, group: int) -> dict[str, torch.Tensor]:
    """One matrix [N, bytes per row] (or [N, K] floats), ``ROWS`` rows at a time through fp32."""
    from gguf import quants

    chunks = []
    for a in range(0, m.shape[0], ROWS):
        rows = m[a:a + ROWS]
        if kind in ("F32", "F16", "F64"):
            w = np.array(rows, dtype=np.float32)  # a copy: the file's memory map is read-only (torch warns)
        else:
            w = quants.dequantize(rows, qtype)
        chunks.append(quantize(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32).reshape(-1, k)), method,
                               group))
    return {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}


def _nibbles_to_pairs(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Values 0..15 [..., 32] (a block's elements in order) -> bytes [..., 16], element 2i low, 2i + 1 high."""
    q = np.concatenate([low, high], axis=-1)
    return q[..., 0::2] | (q[..., 1::2] << np.uint8(4))


def _q4_0(m: np.ndarray, k: int) -> dict[str, torch.Tensor]:
    n = m.shape[0]
    blocks = m.reshape(n, k // 32, 18)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
    qs = blocks[..., 2:]  # [N, K/32, 16]: element j in the low nibble, j + 16 in the high one
    packed = _nibbles_to_pairs(qs & np.uint8(15), qs >> np.uint8(4)).reshape(n, k // 2)
    scale = torch.from_numpy(d).to(torch.bfloat16)
    return {"qweight": torch.from_numpy(np.ascontiguousarray(packed)), "qscale": scale,
            "qzero": torch.zeros_like(scale)}


def _q4_k(m: np.ndarray, k: int) -> dict[str, torch.Tensor]:
    from gguf.quants import Q4_K

    n = m.shape[0]
    nb = k // 256
    blocks = m.reshape(n * nb, 144)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [n*nb, 1]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = Q4_K.get_scale_min(blocks[:, 4:16].copy())  # [n*nb, 8] 6-bit scales and minimums per 32
    qs = blocks[:, 16:].reshape(n * nb, 4, 32)  # per 64 weights: low nibbles the first 32, high the next 32
    sub = np.stack([qs & np.uint8(15), qs >> np.uint8(4)], axis=2).reshape(n * nb, 8, 32)  # 8 groups of 32 in order
    packed = _nibbles_to_pairs(sub[..., :16], sub[..., 16:]).reshape(n, k // 2)
    scale = torch.from_numpy((d * sc.astype(np.float32)).reshape(n, k // 32)).to(torch.bfloat16)
    offset = torch.from_numpy((dmin * mn.astype(np.float32)).reshape(n, k // 32))
    zero = (8 * scale.float() - offset).to(torch.bfloat16)  # against the stored (rounded) scale
    return {"qweight": torch.from_numpy(np.ascontiguousarray(packed)), "qscale": scale, "qzero": zero}


_REPACK = {"Q4_0": _q4_0, "Q4_K": _q4_k}
