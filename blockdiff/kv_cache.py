"""Per-request KV cache storage and the batched view the model reads.

A ``SequenceCache`` belongs to one request: per layer, the keys/values of every position encoded so far
(sliding layers keep only the last ``sliding_window - 1``, all a later query can see). ``KVCache`` is a
batch of them - the model's ``encode`` appends to each row, ``denoise`` only reads. The scheduler builds a
``KVCache`` over whichever requests run in a tick without copying their storage.
"""

from __future__ import annotations

import torch

from .config import LayerSpec


class SequenceCache:
    def __init__(self, specs: list[LayerSpec]):
        self.specs = specs
        self.keys: list[torch.Tensor | None] = [None] * len(specs)  # [Hkv, L_layer, D]
        self.values: list[torch.Tensor | None] = [None] * len(specs)
        self.length = 0  # positions encoded so far (the next token's position)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [Hkv, S, D] for the next S positions of this layer."""
        if self.keys[layer] is None:
            nk, nv = k, v
        else:
            nk = torch.cat([self.keys[layer], k], dim=1)
            nv = torch.cat([self.values[layer], v], dim=1)
        w = self.specs[layer].sliding_window
        if w is not None and nk.shape[1] > w - 1:  # nothing older is ever visible again
            keep = nk.shape[1] - (w - 1)
            nk, nv = nk[:, keep:].clone(), nv[:, keep:].clone()  # free the dropped positions
        self.keys[layer], self.values[layer] = nk, nv

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


class KVCache:
    """A batch of ``SequenceCache`` rows."""

    def __init__(self, seqs: list[SequenceCache]):
        if not seqs:
            raise ValueError("a KVCache needs at least one sequence")
        self.seqs = seqs

    @classmethod
    def empty(cls, specs: list[LayerSpec], batch_size: int) -> "KVCache":
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return cls([SequenceCache(specs) for _ in range(batch_size)])

    @property
    def batch_size(self) -> int:
        return len(self.seqs)

    @property
    def lengths(self) -> list[int]:
        return [s.length for s in self.seqs]

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.seqs)

    def layer_kv(self, layer: int) -> list:
        """Per row: (keys, values) [Hkv, P_b, D] stored for ``layer`` (sliding layers: the last window - 1), or
        None. Row b's entries sit at positions ``lengths[b] - P_b .. lengths[b] - 1``."""
        out = []
        for s in self.seqs:
            k = s.keys[layer]
            out.append(None if k is None else (k, s.values[layer]))
        return out
