"""Paged per-request KV cache storage and the batched view the model reads.

- ``KVPool``: the storage shared by every request of one model. Per layer, one keys and one values tensor
  ``[slots, Hkv, D]`` cut into pages of ``page_size`` positions. Layers with the same attention span (all full
  layers; all sliding layers of one window) form a *group* and share page numbers, so one page table per
  request and group addresses every layer of the group. Page 0 of each group is a scratch page: padded reads
  point there (and are masked) and padded writes land there.
- ``SequenceCache``: one request's handle - its page lists and its length (the next position). Full layers take
  a new page every ``page_size`` positions (nothing is preallocated for the context limit); sliding layers use a
  ring of ``ceil((window - 1) / page_size)`` pages, all a later query can see. ``free()`` (or dropping the last
  reference) returns the pages to the pool at once.
- ``KVCache``: a batch of sequences of one pool. ``begin()`` gives a ``CacheBatch`` for one ``encode`` or
  ``denoise`` call: it reserves pages on the host, builds the page tables and per-row metadata as device tensors
  with a fixed number of ops (none depends on the batch size or on tensor values: no host syncs), gathers a
  layer's padded prefix ``[B, Hkv, P, D]`` in one ``index_select`` and scatters new keys/values with one
  ``index_copy_``. The scheduler builds a ``KVCache`` over whichever requests run in a tick without copying
  their storage.

The view interface the model uses (``TrainCache`` in ``train/objective.py`` implements it too)::

    view = cache.begin(new_tokens, width, device, dtype)  # new_tokens: per-row counts (encode) or None (denoise)
    view.lengths / view.start        # positions held before this call: host list / device [B]
    view.prefix(window) -> Prefix    # per attention span: key positions, validity, per-row visible ranges
    view.read(layer) -> (k, v)       # [B, Hkv, P, D], rows left-aligned, padding marked invalid in Prefix
    view.write(layer, k_new, v_new)  # encode: [B, Hkv, S, D], row b's first new_tokens[b] positions
    view.commit()                    # encode: lengths += new_tokens
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .config import FULL, LayerSpec

DEFAULT_PAGE_SIZE = 16


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy host metadata to ``device`` without waiting for the device: pinned memory + non-blocking copy on
    CUDA (a pageable host-to-device copy synchronises the stream); a no-op on CPU."""
    if host.device == device:
        return host
    if device.type == "cuda" and host.device.type == "cpu":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass
class Prefix:
    """Metadata of the gathered prefix of one attention span (device tensors unless noted)."""

    pos: torch.Tensor  # [B, P] long: position of each gathered key
    valid: torch.Tensor  # [B, P] bool: False for padding
    rows: list  # host, per row: (lo, hi) - the slice of the gathered prefix that row sees in denoise
    window: int | None  # sliding window of the span (None: full attention)


def attention_span(spec: LayerSpec) -> int | None:
    """The span key of a layer: its sliding window, or None for full attention. Layers with one span share page
    tables and masks."""
    return None if spec.layer_type == FULL else spec.sliding_window


def gather_prefix(keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor | None):
    """-> keys, values [B, Hkv, P, D]. ``slots`` None: the sources already are the prefix (``TrainCache``);
    otherwise ``keys``/``values`` are a pool's storage [slots, Hkv, D] and ``slots`` [B, P] addresses it."""
    if slots is None:
        return keys, values
    B, P = slots.shape
    idx = slots.reshape(-1)
    k = keys.index_select(0, idx).view(B, P, *keys.shape[1:]).transpose(1, 2)
    v = values.index_select(0, idx).view(B, P, *values.shape[1:]).transpose(1, 2)
    return k, v


class KVPool:
    """Paged K/V storage of one model (see the module docstring)."""

    def __init__(self, specs: list[LayerSpec], page_size: int = DEFAULT_PAGE_SIZE,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.specs = specs
        self.page_size = page_size
        self.device = torch.device(device or "cpu")
        self.dtype = dtype or torch.float32
        self.group_of = [attention_span(s) for s in specs]
        self.groups = sorted(set(self.group_of), key=lambda w: -1 if w is None else w)
        self.layers_of = {g: [i for i, w in enumerate(self.group_of) if w == g] for g in self.groups}
        self.capacity = {g: 0 for g in self.groups}  # pages per layer of the group, scratch page included
        self.reserved = {g: 0 for g in self.groups}  # capacity kept even when every page is free
        self.free_pages: dict = {g: [] for g in self.groups}
        self.extra_refs: dict = {g: {} for g in self.groups}  # page -> holders beyond the first (prefix cache)
        self.keys: list[torch.Tensor | None] = [None] * len(specs)  # [capacity * page_size, Hkv, D]
        self.values: list[torch.Tensor | None] = [None] * len(specs)

    # ------------------------------------------------------------------ geometry
    def ring_pages(self, group) -> int | None:
        """Pages a sliding group keeps per request (None: full attention, grows with the sequence)."""
        if group is None:
            return None
        return -(-max(group - 1, 0) // self.page_size)

    def pages_needed(self, group, length: int) -> int:
        n = -(-length // self.page_size)
        ring = self.ring_pages(group)
        return n if ring is None else min(n, ring)

    def visible(self, group, length: int) -> int:
        """Cached positions a query after ``length`` positions can see in this group."""
        return length if group is None else min(length, max(group - 1, 0))

    def overwrites_visible(self, group, length: int, new_tokens: int) -> bool:
        """Whether writing ``new_tokens`` positions after ``length`` overwrites, in this group's ring, a position a
        query after ``length`` still sees (never for full attention: new positions take slots of their own). The
        oldest visible position ``p`` is overwritten by position ``p + ring``, the first that shares its slot."""
        ring = self.ring_pages(group)
        vis = self.visible(group, length)
        return ring is not None and vis > 0 and length - vis + ring * self.page_size < length + new_tokens

    def page_bytes(self, group) -> int:
        el = torch.empty(0, dtype=self.dtype).element_size()
        return sum(2 * self.page_size * self.specs[i].num_kv_heads * self.specs[i].head_dim * el
                   for i in self.layers_of[group])

    # ------------------------------------------------------------------ pages
    def _grow(self, group, new: int) -> None:
        old = self.capacity[group]
        if new > old:
            start = max(old, 1)  # page 0 is the scratch page
            self.free_pages[group][:0] = range(new - 1, start - 1, -1)  # new pages are handed out last
            self.capacity[group] = new

    def reserve(self, pages: int | dict) -> None:
        """Size the pool up front (``pages`` per group, or a dict group -> pages) and keep that storage when every
        page is free: a server's storage then never moves, so a captured step keeps its shapes."""
        for g in self.groups:
            n = pages[g] if isinstance(pages, dict) else pages
            self.reserved[g] = max(self.reserved[g], n + 1)
            self._grow(g, n + 1)

    def allocate(self, group, n: int) -> list[int]:
        free = self.free_pages[group]
        if len(free) < n:
            old = self.capacity[group]
            self._grow(group, max(2 * old, old + n - len(free), 1 + n, 4))
        return [free.pop() for _ in range(n)]

    def share(self, group, pages: list[int]) -> None:
        """One more holder for each page (a page returns to the free list when its last holder releases it)."""
        refs = self.extra_refs[group]
        for p in pages:
            refs[p] = refs.get(p, 0) + 1

    def release(self, group, pages: list[int]) -> None:
        if not pages:
            return
        refs = self.extra_refs[group]
        last = []
        for p in pages:
            if refs.get(p):
                refs[p] -= 1
                if not refs[p]:
                    del refs[p]
            else:
                last.append(p)
        if not last:
            return
        self.free_pages[group].extend(reversed(last))
        if len(self.free_pages[group]) == self.capacity[group] - 1 and not self.reserved[group]:
            # nothing in use: give the memory back
            self.capacity[group] = 0
            self.free_pages[group] = []
            for i in self.layers_of[group]:
                self.keys[i] = self.values[i] = None

    def used_pages(self, group) -> int:
        cap = self.capacity[group]
        return 0 if cap == 0 else cap - 1 - len(self.free_pages[group])

    def nbytes(self) -> int:
        """Bytes of storage held (allocated capacity, free pages included)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def used_bytes(self) -> int:
        return sum(self.used_pages(g) * self.page_bytes(g) for g in self.groups)

    def storage(self, layer: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys/values tensors, (re)allocated to the group's capacity (host-side decision)."""
        g = self.group_of[layer]
        if (device, dtype) != (self.device, self.dtype):
            if any(self.used_pages(x) for x in self.groups):
                raise ValueError(f"the KV pool holds {self.dtype} on {self.device}; "
                                 f"the model now runs {dtype} on {device}")
            self.device, self.dtype = device, dtype
            self.keys = [None] * len(self.specs)
            self.values = [None] * len(self.specs)
        slots = max(self.capacity[g], 1) * self.page_size
        k = self.keys[layer]
        if k is None or k.shape[0] < slots:
            spec = self.specs[layer]
            shape = (slots, spec.num_kv_heads, spec.head_dim)
            nk = torch.zeros(shape, device=device, dtype=dtype)
            nv = torch.zeros(shape, device=device, dtype=dtype)
            if k is not None:  # grow: keep what the pages hold
                nk[:k.shape[0]].copy_(k)
                nv[:k.shape[0]].copy_(self.values[layer])
            self.keys[layer], self.values[layer] = nk, nv
        return self.keys[layer], self.values[layer]


class SequenceCache:
    """One request's pages in a ``KVPool`` and its length (the next token's position)."""

    def __init__(self, specs: list[LayerSpec], pool: KVPool | None = None):
        self.pool = pool if pool is not None else KVPool(specs)
        self.specs = specs
        self.pages: dict = {g: [] for g in self.pool.groups}
        self.length = 0
        # Pages the prefix cache asked this request's next encode to fill (sliding groups: group -> (first block,
        # pages)); released with the request unless the cache takes them over.
        self.capture: dict = {}
        self._finalizer = weakref.finalize(self, _release, self.pool, self.pages, self.capture)

    def reserve(self, new_tokens: int) -> None:
        """Take the pages positions ``length .. length + new_tokens - 1`` need."""
        if self.pages is None:
            raise RuntimeError("this sequence's cache was freed")
        for g, pages in self.pages.items():
            need = self.pool.pages_needed(g, self.length + new_tokens) - len(pages)
            if need > 0:
                pages.extend(self.pool.allocate(g, need))

    def free(self) -> None:
        """Return every page to the pool now."""
        self._finalizer()
        self.pages = None

    @property
    def freed(self) -> bool:
        return self.pages is None

    def encode_overwrites(self, new_tokens: int) -> bool:
        """Whether an encode of ``new_tokens`` more positions overwrites keys/values this sequence still reads (its
        sliding rings wrap onto visible positions): an encode that fails after such a write cannot be run again."""
        return any(self.pool.overwrites_visible(g, self.length, new_tokens) for g in self.pages)

    def nbytes(self) -> int:
        if self.pages is None:
            return 0
        return sum(len(p) * self.pool.page_bytes(g) for g, p in self.pages.items())


def _release(pool: KVPool, pages: dict, capture: dict) -> None:
    for g, p in pages.items():
        pool.release(g, p)
        p.clear()
    for g, (_, p) in capture.items():
        pool.release(g, p)
    capture.clear()


class KVCache:
    """A batch of ``SequenceCache`` rows of one pool."""

    def __init__(self, seqs: list[SequenceCache]):
        if not seqs:
            raise ValueError("a KVCache needs at least one sequence")
        if any(s.pool is not seqs[0].pool for s in seqs):
            raise ValueError("the sequences of a KVCache must share one KVPool")
        if any(s.freed for s in seqs):
            raise ValueError("a KVCache cannot hold a freed sequence")
        self.seqs = seqs
        self.pool = seqs[0].pool
        self.rings_written = False  # an encode wrote a sliding ring (set by CacheBatch.write)

    @classmethod
    def empty(cls, specs: list[LayerSpec], batch_size: int, pool: KVPool | None = None) -> "KVCache":
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pool = pool if pool is not None else KVPool(specs)
        return cls([SequenceCache(specs, pool) for _ in range(batch_size)])

    @property
    def batch_size(self) -> int:
        return len(self.seqs)

    @property
    def lengths(self) -> list[int]:
        return [s.length for s in self.seqs]

    def nbytes(self) -> int:
        """Bytes of the pages these rows hold."""
        return sum(s.nbytes() for s in self.seqs)

    def begin(self, new_tokens: list[int] | None, width: int, device, dtype) -> "CacheBatch":
        if any(s.freed for s in self.seqs):
            raise ValueError("this KVCache holds a sequence that was freed (its request finished)")
        return CacheBatch(self, new_tokens, width, torch.device(device), dtype)

    @torch.no_grad()
    def layer_kv(self, layer: int) -> list:
        """Per row: (keys, values) [Hkv, P_b, D] that row's queries see in ``layer`` (copies; for inspection)."""
        pool = self.pool
        view = self.begin(None, 0, pool.device, pool.dtype)
        k, v = view.read(layer)
        g = pool.group_of[layer]
        return [None if hi == lo else (k[b, :, lo:hi].clone(), v[b, :, lo:hi].clone())
                for b, (lo, hi) in enumerate(view.prefix(g).rows)]


class CacheBatch:
    """One call's view over a ``KVCache`` (see the module docstring)."""

    def __init__(self, cache: KVCache, new_tokens: list[int] | None, width: int, device: torch.device, dtype):
        self.cache = cache
        self.pool = pool = cache.pool
        self.device, self.dtype = device, dtype
        self.lengths = cache.lengths
        self.new_tokens = new_tokens
        self.width = width
        if new_tokens is not None:
            for s, n in zip(cache.seqs, new_tokens):
                s.reserve(n)
        # Page tables and lengths: host tensors (one op each, whatever the batch), then one copy each.
        ps = pool.page_size
        B = cache.batch_size
        self.start = to_device(torch.tensor(self.lengths, dtype=torch.long), device)  # [B]
        self._tables = {}
        for g in pool.groups:
            rows = [s.pages[g] for s in cache.seqs]
            width_p = max(1, max(len(r) for r in rows))
            table = torch.tensor([r + [0] * (width_p - len(r)) for r in rows], dtype=torch.long)  # [B, pages]
            self._tables[g] = to_device(table, device)
        self._slots = {}
        self._prefix = {}
        if new_tokens is not None:
            self._n_new = to_device(torch.tensor(new_tokens, dtype=torch.long), device)  # [B]
        for i in range(len(pool.specs)):
            pool.storage(i, device, dtype)
        self._B, self._ps = B, ps
        # Prefix-cache capture (encode only): per sliding group, the slot each new position is also copied to
        # (its block's capture page), scratch slot 0 for positions no one captures. Host-built: no device read.
        self._capture = {}
        if new_tokens is not None and any(s.capture for s in cache.seqs):
            for g in pool.groups:
                if not any(g in s.capture for s in cache.seqs):
                    continue
                slots = []
                for s, start, n in zip(cache.seqs, self.lengths, new_tokens):
                    row = [0] * width
                    if g in s.capture:
                        first, pages = s.capture[g]
                        for j in range(n):
                            blk = (start + j) // ps - first
                            if 0 <= blk < len(pages):
                                row[j] = pages[blk] * ps + (start + j) % ps
                    slots.extend(row)
                self._capture[g] = to_device(torch.tensor(slots, dtype=torch.long), device)  # [B * S]

    # ------------------------------------------------------------------ addressing
    def _slot_of(self, g, pos: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """pos/ok [B, X] -> storage slot of each position (scratch slot 0 where not ok)."""
        ps = self._ps
        ring = self.pool.ring_pages(g)
        r = pos if ring is None else pos % max(ring * ps, 1)
        table = self._tables[g]
        page_idx = (r // ps).clamp(0, table.shape[1] - 1)
        slot = table.gather(1, page_idx) * ps + r % ps
        return torch.where(ok, slot, torch.zeros_like(slot))

    def prefix(self, g) -> Prefix:
        """Gathered-prefix metadata of attention span ``g`` (a sliding window, or None for full layers)."""
        if g not in self._prefix:
            pool = self.pool
            vis = [pool.visible(g, n) for n in self.lengths]
            P = max(vis)
            if P:  # round up to whole pages: fewer distinct shapes for compiled/captured steps
                P = -(-P // self._ps) * self._ps
            n_vis = to_device(torch.tensor(vis, dtype=torch.long), self.device)  # [B]
            j = torch.arange(P, device=self.device)[None]  # [1, P]
            pos = (self.start - n_vis)[:, None] + j  # [B, P]
            valid = j < n_vis[:, None]
            self._slots[g] = self._slot_of(g, pos, valid)  # [B, P]
            self._prefix[g] = Prefix(pos, valid, [(0, n) for n in vis], g)
        return self._prefix[g]

    # ------------------------------------------------------------------ data
    def sources(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What ``gather_prefix`` reads for ``layer``: the keys/values storage and the slots [B, P] of each row's
        visible prefix (plain tensors, so a compiled step can take them as inputs)."""
        g = self.pool.group_of[layer]
        self.prefix(g)
        keys, values = self.pool.storage(layer, self.device, self.dtype)
        return keys, values, self._slots[g]

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values [B, Hkv, P, D] of the visible prefix of every row (one gather each)."""
        return gather_prefix(*self.sources(layer))

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Store row b's first new_tokens[b] keys/values (sliding layers: only the last ring's worth)."""
        if self.new_tokens is None:
            raise RuntimeError("denoise never writes the cache")
        g = self.pool.group_of[layer]
        B, Hkv, S, D = k_new.shape
        if ("w", g) not in self._slots:
            j = torch.arange(S, device=self.device)[None]  # [1, S]
            ok = j < self._n_new[:, None]
            ring = self.pool.ring_pages(g)
            self.cache.rings_written |= ring is not None
            if ring is not None:  # positions older than the ring are overwritten within this call: skip them
                ok = ok & (j >= self._n_new[:, None] - ring * self._ps)
            self._slots[("w", g)] = self._slot_of(g, self.start[:, None] + j, ok).reshape(-1)  # [B * S]
        idx = self._slots[("w", g)]
        keys, values = self.pool.storage(layer, self.device, self.dtype)
        # Padded positions all land on the scratch slot (duplicates there are harmless: it is never read unmasked).
        k_flat = k_new.detach().transpose(1, 2).reshape(B * S, Hkv, D).to(keys.dtype)
        v_flat = v_new.detach().transpose(1, 2).reshape(B * S, Hkv, D).to(values.dtype)
        keys.index_copy_(0, idx, k_flat)
        values.index_copy_(0, idx, v_flat)
        if g in self._capture:  # the prefix cache keeps every position of the blocks it captures
            keys.index_copy_(0, self._capture[g], k_flat)
            values.index_copy_(0, self._capture[g], v_flat)

    def commit(self) -> None:
        for s, n in zip(self.cache.seqs, self.new_tokens):
            s.length += n
