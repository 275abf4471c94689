"""Prefix caching: prompts that start with tokens an earlier request already encoded reuse their keys/values.

The cache holds *blocks* of ``page_size`` prompt tokens (one KV page). A block is keyed by a chained hash of every
token up to its end (``key_j = hash((key_{j-1}, tokens of block j))``), and stores the block's tokens and its parent
key too, so a lookup verifies each link: a hit is exact, never a hash collision.

What a block holds, per attention span of the model (``KVPool`` groups):

- full-attention layers: the page the encoding request wrote, *shared* (``KVPool.share``): the request keeps
  using it and it stays when the request ends;
- sliding-window layers: a page of its own. A request's sliding layers keep only a ring of the last window, so
  the encode that writes a block also copies the block's keys/values into this capture page (one extra
  ``index_copy_`` per sliding layer, only in encodes that capture). Reusing a prefix of ``k`` blocks copies the
  blocks that lie within the window of position ``k * page_size`` into the new request's ring.

A lookup attaches the longest cached chain to an empty ``SequenceCache`` (its length becomes the hit) and the
engine encodes only the rest; the prompt's remaining whole blocks are captured by that encode and inserted after
it. At least one prompt token is always encoded. A request's ``cache_salt`` roots its chain at a key of the salt:
blocks cached under one salt are never found under another (or unsalted), so tenants with different salts cannot
learn from ``cached_tokens`` or the time to first token what the others sent. Only prompt blocks are cached (the
canvases a request commits start wherever the prompt ended, not on a block boundary); in a multi-turn chat, turn
``n + 1`` reuses turn ``n``'s whole prompt, and re-encodes the previous answer once.

Prompts with images key each image token by a digest of its image (``ImageInputs.cache_keys``): the same images
after the same text reuse the keys/values (and skip the vision tower), other images never do, and the text before
the first image is shared with text-only prompts. A reuse never ends inside an image (its tokens attend to each
other both ways, so they are encoded together); the engine cuts it back to the image's start.

Memory: ``capacity_bytes`` bounds the bytes of the pages the cache holds (pages still shared with running
requests count too); past it the least recently used blocks are evicted, deepest first (a chain's later blocks are
touched before its earlier ones, so eviction never strands a child whose parent is gone for long).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .kv_cache import KVPool, SequenceCache


@dataclass
class Block:
    key: int
    parent: int | None
    tokens: tuple
    pages: dict  # group -> page


class PrefixCache:
    def __init__(self, pool: KVPool, capacity_bytes: int):
        if not isinstance(capacity_bytes, int) or isinstance(capacity_bytes, bool) or capacity_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be an integer >= 0, got {capacity_bytes!r}")
        self.pool = pool
        self.block_size = pool.page_size
        # Groups a block stores: every full-attention group, and the sliding groups whose ring holds anything.
        self.groups = [g for g in pool.groups if pool.ring_pages(g) != 0]
        self.sliding = [g for g in self.groups if pool.ring_pages(g) is not None]
        self.block_bytes = sum(pool.page_bytes(g) for g in self.groups)
        self.capacity_bytes = capacity_bytes
        self.max_blocks = capacity_bytes // self.block_bytes if self.block_bytes else 0
        self.blocks: OrderedDict[int, Block] = OrderedDict()  # least recently used first
        self.hit_tokens = 0
        self.query_tokens = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def nbytes(self) -> int:
        return len(self.blocks) * self.block_bytes

    # ------------------------------------------------------------------ keys
    @staticmethod
    def root(salt: str | None):
        """The parent key of a chain's first block: None unsalted, else a key of the salt (so chains under
        different salts share no block: their first blocks already differ in ``parent``)."""
        return None if salt is None else hash(("cache_salt", salt))

    def _chain(self, tokens: list[int], n_blocks: int, salt: str | None = None):
        """(key, parent key, block tokens) of the first n_blocks blocks of tokens."""
        bs, parent = self.block_size, self.root(salt)
        for j in range(n_blocks):
            t = tuple(tokens[j * bs:(j + 1) * bs])
            key = hash((parent, t))
            yield key, parent, t
            parent = key

    def match(self, tokens: list[int], salt: str | None = None) -> list[Block]:
        """The longest cached chain of whole blocks (under ``salt``) that leaves at least one token of ``tokens``
        to encode."""
        found = []
        for key, parent, t in self._chain(tokens, (len(tokens) - 1) // self.block_size, salt):
            b = self.blocks.get(key)
            if b is None or b.parent != parent or b.tokens != t:
                break
            found.append(b)
        return found

    def _touch(self, blocks: list[Block]) -> None:
        for b in reversed(blocks):  # the root ends most recent: evicted last
            self.blocks.move_to_end(b.key)

    # ------------------------------------------------------------------ reuse
    @torch.no_grad()
    def attach(self, seq: SequenceCache, tokens: list, salt: str | None = None, splits_at=None) -> int:
        """Point an empty ``seq`` at the longest cached prefix of ``tokens`` cached under ``salt``; returns the
        tokens reused (its new length). Counts the query and the hit. ``splits_at(r)``: whether the encode may start
        at position ``r`` (a prompt with images: not inside an image); the reuse is cut back to the longest one
        that may. A token may be any hashable (an image's tokens key by the image: ``ImageInputs.cache_keys``)."""
        if seq.length or any(seq.pages.values()):
            raise ValueError("a prefix can only be attached to an empty sequence")
        self.query_tokens += len(tokens)
        blocks = self.match(tokens, salt) if self.max_blocks else []
        while blocks and splits_at is not None and not splits_at(len(blocks) * self.block_size):
            blocks.pop()
        if not blocks:
            return 0
        self._touch(blocks)
        pool, bs, k = self.pool, self.block_size, len(blocks)
        for g in pool.groups:
            ring = pool.ring_pages(g)
            if ring is None:  # full attention: share the pages
                pages = [b.pages[g] for b in blocks]
                pool.share(g, pages)
                seq.pages[g].extend(pages)
            elif ring:  # sliding: copy the blocks within the window into the request's ring
                seq.pages[g].extend(pool.allocate(g, pool.pages_needed(g, k * bs)))
                src, dst = [], []
                for j in range(max(0, k - ring), k):
                    src.append(blocks[j].pages[g])
                    dst.append(seq.pages[g][j % ring])
                self._copy_pages(g, src, dst)
        seq.length = k * bs
        self.hit_tokens += k * bs
        return k * bs

    def _copy_pages(self, g, src: list[int], dst: list[int]) -> None:
        pool, bs = self.pool, self.block_size
        off = torch.arange(bs)
        s = (torch.tensor(src)[:, None] * bs + off).reshape(-1)
        d = (torch.tensor(dst)[:, None] * bs + off).reshape(-1)
        for i in pool.layers_of[g]:
            keys, values = pool.storage(i, pool.device, pool.dtype)
            si, di = s.to(keys.device), d.to(keys.device)
            keys.index_copy_(0, di, keys.index_select(0, si))
            values.index_copy_(0, di, values.index_select(0, si))

    # ------------------------------------------------------------------ capture and insert
    def prepare(self, seq: SequenceCache, tokens: list[int]) -> None:
        """Before ``seq`` encodes the rest of ``tokens`` (from ``seq.length``, a block boundary): ask that encode to
        capture the sliding-layer keys/values of the whole blocks it writes."""
        if not self.max_blocks:
            return
        first = seq.length // self.block_size
        n = min(len(tokens) // self.block_size - first, self.max_blocks)
        if n <= 0:
            return
        for g in self.sliding:
            seq.capture[g] = (first, self.pool.allocate(g, n))

    def insert(self, seq: SequenceCache, tokens: list[int], reused: int, salt: str | None = None) -> None:
        """After the encode of ``tokens[reused:]`` (``reused`` = what ``attach`` returned): cache the whole blocks it
        wrote, up to the budget (evicting the least recently used)."""
        capture = {g: seq.capture.pop(g) for g in list(seq.capture)}
        if not self.max_blocks or any(g not in capture for g in self.sliding):
            self._release_capture(capture)
            return
        bs = self.block_size
        start = reused // bs
        end = min(len(tokens) // bs, start + self.max_blocks)
        chain = list(self._chain(tokens, end, salt))
        touched = []
        for j in range(start, end):
            key, parent, t = chain[j]
            b = self.blocks.get(key)
            if b is not None:
                touched.append(b)
                continue
            if j > 0 and chain[j - 1][0] not in self.blocks:
                break  # its parent was evicted meanwhile: a child could never be found
            pages = {}
            for g in self.groups:
                if g in capture:
                    cf, cp = capture[g]
                    pages[g] = cp[j - cf]
                    cp[j - cf] = None  # taken over by the cache
                else:
                    page = seq.pages[g][j]
                    self.pool.share(g, [page])
                    pages[g] = page
            b = Block(key, parent, t, pages)
            self.blocks[key] = b
            touched.append(b)
            self._evict(keep=key)
        self._release_capture(capture)  # the capture pages the cache did not take (already cached, over budget)
        self._touch([b for b in touched if b.key in self.blocks])

    def _release_capture(self, capture: dict) -> None:
        for g, (_, cp) in capture.items():
            self.pool.release(g, [p for p in cp if p is not None])

    def _evict(self, keep: int) -> None:
        while len(self.blocks) > self.max_blocks:
            key = next(iter(self.blocks))
            if key == keep:
                self.blocks.move_to_end(key)
                key = next(iter(self.blocks))
            self._drop(self.blocks.pop(key))

    def _drop(self, b: Block) -> None:
        for g, page in b.pages.items():
            self.pool.release(g, [page])

    def clear(self) -> None:
        """Evict everything (pages still used by running requests stay with them)."""
        while self.blocks:
            self._drop(self.blocks.popitem(last=False)[1])
