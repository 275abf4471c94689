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

    def stored(self, layer: int) -> int:
        k = self.keys[layer]
        return 0 if k is None else k.shape[1]

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

    def fork(self) -> "SequenceCache":
        """A cheap copy sharing storage: appends to either never affect the other (append makes new tensors)."""
        out = SequenceCache(self.specs)
        out.keys, out.values, out.length = list(self.keys), list(self.values), self.length
        return out


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

    def prefix(self, layer: int, device, dtype, n_kv: int, head_dim: int):
        """Padded keys/values of every row for one layer: ([B, Hkv, P, D], same, valid [B, P] or None,
        positions [B, P] or None). Rows are left-aligned; valid marks real entries. Batch 1 is returned as a view."""
        rows_k = [s.keys[layer] for s in self.seqs]
        rows_v = [s.values[layer] for s in self.seqs]
        sizes = [0 if k is None else k.shape[1] for k in rows_k]
        P = max(sizes)
        B = len(self.seqs)
        if P == 0:
            return None, None, None, None
        if B == 1:
            return rows_k[0][None], rows_v[0][None], None, None
        pk = torch.zeros(B, n_kv, P, head_dim, device=device, dtype=dtype)
        pv = torch.zeros_like(pk)
        valid = torch.zeros(B, P, dtype=torch.bool, device=device)
        pos = torch.zeros(B, P, dtype=torch.long, device=device)
        for b, (k, v, n) in enumerate(zip(rows_k, rows_v, sizes)):
            if n:
                pk[b, :, :n] = k
                pv[b, :, :n] = v
                valid[b, :n] = True
                start = self.seqs[b].length - n
                pos[b, :n] = torch.arange(start, start + n, device=device)
        return pk, pv, valid, pos
