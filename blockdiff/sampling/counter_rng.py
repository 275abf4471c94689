"""Counter-based random numbers for ``rng="default"``: a pure function of (seed, canvas, step, position, kind).

A request's draws are hashes of where they are used, not the next values of a stream, so they cannot depend
on the batch the request runs in, its row, or what other requests drew before it: reproducible by
construction. Everything is int64 tensor arithmetic on the logits' device (no generator, no host sync),
vectorised over rows with a per-row seed tensor.

The mixer is the 32-bit "lowbias32" integer hash (Wellons) chained over the key fields. Products stay
inside int64: a 32-bit value times a constant in [-2**31, 2**31) cannot overflow, and the low 32 bits of
the product are the same as with the unsigned constant.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_C1 = 0x7FEB352D
_C2 = 0x846CA68B - (1 << 32)  # the same constant mod 2**32, as a signed value (no int64 overflow)
_GOLDEN = 0x9E3779B9

# Draw kinds: separate streams for the initial canvas, the renoise tokens and the sampling uniforms.
INIT, RENOISE, SAMPLE = 1, 2, 3


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """x: int64 in [0, 2**32) -> int64 in [0, 2**32); a bijection with good avalanche."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def hash_keys(seed: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, kind: int, positions: int,
              word: int = 0) -> torch.Tensor:
    """seed, canvas, step: int64 [B] -> int64 [B, positions] of independent 32-bit hashes.

    ``seed`` may use all 63 bits: its low and high halves enter the chain separately."""
    dev = seed.device
    h = _mix32((seed & _M32) ^ _GOLDEN)
    h = _mix32(h ^ ((seed >> 32) & _M32))
    h = _mix32(h ^ (canvas & _M32))
    h = _mix32(h ^ ((step + 1) & _M32))  # step -1 is the initial canvas
    h = _mix32(h ^ (kind * 0x10001 + word * 0x3C6EF372))[:, None]  # [B, 1]
    pos = torch.arange(positions, device=dev, dtype=torch.int64)[None]
    return _mix32(_mix32(h ^ pos) ^ (pos * _GOLDEN & _M32))  # [B, P]


def uniform(seed, canvas, step, kind: int, positions: int, dtype=torch.float32) -> torch.Tensor:
    """[B, positions] uniforms in [0, 1) with 24 random bits (exact in fp32)."""
    h = hash_keys(seed, canvas, step, kind, positions)
    return (h >> 8).to(dtype) * (1.0 / (1 << 24))


def randint(seed, canvas, step, kind: int, positions: int, high: int) -> torch.Tensor:
    """[B, positions] integers in [0, high): 62 random bits reduced mod ``high`` (bias < high / 2**62)."""
    hi = hash_keys(seed, canvas, step, kind, positions, word=1) >> 2  # 30 bits
    lo = hash_keys(seed, canvas, step, kind, positions, word=2)  # 32 bits
    return ((hi << 32) | lo) % high


def as_seed_tensor(seeds: list[int], device) -> torch.Tensor:
    return torch.tensor(seeds, dtype=torch.int64, device=device)
