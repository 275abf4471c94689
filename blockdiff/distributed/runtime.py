"""Rank 0 leads, the other ranks follow: one message per model call, then the call runs on every rank at once.

Rank 0 owns the scheduler, the API, the KV page bookkeeping and the sampler. Before each ``encode`` / ``denoise``
it reserves the pages the call needs and broadcasts the call: its inputs plus every row's page lists, length and
prefix-cache capture pages, and the pool's capacity. A follower holds a KV pool with the same page numbering (its
own KV heads) and rebuilds the batch from those lists (``_Mirror``): it never allocates or frees a page. The
prefix cache's page copies are broadcast the same way.

Logits: every rank computes its vocabulary slice; the slices are *gathered to rank 0 only*, where the unchanged
sampler runs (the reference rng path included, so generation is token-equal to one process). Rank 0 then holds one
[B, C, V] buffer, exactly what one process holds; no other rank ever builds a full-vocabulary tensor. The sampled
distributions go back as vocabulary slices (scatter) for the self-conditioning product ``probs @ E``, a local
partial product plus an all-reduce. Given raw self-conditioning logits, ``denoise`` softmaxes them across ranks with
two scalar-per-position all-reduces (``vocab_parallel_softmax``).

Messages: a pickled header (``broadcast_object_list``) with tensors replaced by their shape/dtype, then one
``broadcast`` per tensor (device tensors on NCCL, host tensors on gloo).
"""

from __future__ import annotations

import datetime
import functools
import logging
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..kv_cache import KVCache
from ..prefix_cache import PrefixCache
from .shard import vocab_parallel_softmax

log = logging.getLogger("blockdiff.distributed")


@dataclass
class _T:
    """A tensor's place in a header: sent by ``broadcast`` after the header."""

    index: int
    shape: tuple
    dtype: torch.dtype


FAREWELL_S = 30.0  # how long "stop" waits for every rank to have read it (a rank already gone: not longer)


def farewell() -> None:
    """Both sides of "stop": each rank waits here until every rank has read it. Without it rank 0 could tear the
    group down (and exit) while a follower was still reading its last broadcast; gloo then aborts that follower's
    process (SIGABRT) instead of letting it leave its loop. A rank that is already gone only costs the wait."""
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=FAREWELL_S))
    except Exception as e:  # a rank gone or a group broken: nothing left to protect
        logging.getLogger(__name__).warning("ranks did not all acknowledge stop: %s", e)


class Channel:
    """Rank 0 -> all: ``send(op, **payload)`` on rank 0, ``recv()`` on the others. ``device``: where tensors travel
    (the rank's CUDA device under NCCL, the host under gloo)."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.ranges: list = []
        self.sent = 0  # messages sent (rank 0): a call that raises after sending left the followers mid-call

    def share_ranges(self, mine: tuple[int, int] | str) -> list[tuple[int, str]]:
        """After a load, on every rank: learn every rank's vocabulary slice. ``mine``: this rank's slice, or why it
        could not load (a str): every rank comes here either way, so a rank that failed leaves none of the others
        waiting. Returns the ranks that failed and why ([] when every rank loaded)."""
        ranges = [None] * self.world
        dist.all_gather_object(ranges, mine)
        failed = [(r, why) for r, why in enumerate(ranges) if isinstance(why, str)]
        if not failed:
            self.ranges = ranges
            self.width = max(hi - lo for lo, hi in ranges)  # slices padded to one width for gather/scatter
        return failed

    def send(self, op: str, **payload) -> None:
        self.sent += 1
        tensors = []

        def strip(v):
            if isinstance(v, torch.Tensor):
                tensors.append(v)
                return _T(len(tensors) - 1, tuple(v.shape), v.dtype)
            return v
        header = [(op, {k: strip(v) for k, v in payload.items()})]
        dist.broadcast_object_list(header, src=0, device=self._obj_device())
        for t in tensors:  # bool as uint8: not every backend broadcasts bool
            dist.broadcast(t.to(self.device, torch.uint8 if t.dtype == torch.bool else t.dtype).contiguous(), src=0)

    def recv(self) -> tuple[str, dict]:
        header = [None]
        dist.broadcast_object_list(header, src=0, device=self._obj_device())
        op, payload = header[0]
        slots = sorted((v for v in payload.values() if isinstance(v, _T)), key=lambda t: t.index)
        got = {}
        for t in slots:
            buf = torch.empty(t.shape, dtype=torch.uint8 if t.dtype == torch.bool else t.dtype, device=self.device)
            dist.broadcast(buf, src=0)
            got[t.index] = buf.to(t.dtype)
        return op, {k: got[v.index] if isinstance(v, _T) else v for k, v in payload.items()}

    def _obj_device(self):
        return self.device if self.device.type == "cuda" else None

    # ------------------------------------------------------------------ vocabulary slices
    def gather_vocab(self, local: torch.Tensor) -> torch.Tensor | None:
        """Every rank's slice [..., v_r] -> the whole [..., V] on rank 0 (None elsewhere)."""
        lead = local.shape[:-1]
        pad = torch.zeros(*lead, self.width, dtype=local.dtype, device=self.device)
        pad[..., :local.shape[-1]] = local
        if self.rank != 0:
            dist.gather(pad, None, dst=0)
            return None
        bufs = [torch.empty_like(pad) for _ in range(self.world)]
        dist.gather(pad, bufs, dst=0)
        V = self.ranges[-1][1]
        out = torch.empty(*lead, V, dtype=local.dtype, device=local.device)
        for (lo, hi), b in zip(self.ranges, bufs):
            out[..., lo:hi] = b[..., :hi - lo].to(local.device)
        return out

    def scatter_vocab(self, full: torch.Tensor | None, lead: tuple, dtype, out_device) -> torch.Tensor:
        """Rank 0's [..., V] -> each rank's slice [..., v_r] (``lead``/``dtype`` known on every rank)."""
        lo, hi = self.ranges[self.rank]
        buf = torch.empty(*lead, self.width, dtype=dtype, device=self.device)
        parts = None
        if self.rank == 0:
            parts = []
            for a, b in self.ranges:
                p = torch.zeros(*lead, self.width, dtype=dtype, device=self.device)
                p[..., :b - a] = full[..., a:b]
                parts.append(p)
        dist.scatter(buf, parts, src=0)
        return buf[..., :hi - lo].to(out_device)


# ---------------------------------------------------------------------------------------------- cache mirrors
def _rows(cache: KVCache) -> list:
    return [(s.pages, s.length, s.capture) for s in cache.seqs]


class _Mirror:
    """A follower's stand-in for one rank-0 ``SequenceCache``: the same page lists, in the follower's pool."""

    def __init__(self, pool, pages: dict, length: int, capture: dict):
        self.pool, self.pages, self.length, self.capture = pool, pages, length, capture
        self.freed = False

    def reserve(self, new_tokens: int) -> None:  # rank 0 reserved before sending
        pass


def _mirror(pool, rows: list, capacity: dict) -> KVCache:
    pool.capacity = dict(capacity)
    return KVCache([_Mirror(pool, *r) for r in rows])


# ---------------------------------------------------------------------------------------------- one call, every rank
def _encode(model, channel: Channel, cache: KVCache, kw: dict):
    out = model.encode(kw["ids"], cache, lengths=kw["lengths"], logits=kw["logits"],
                       pixel_values=kw.get("pixel_values"), image_position_ids=kw.get("image_position_ids"),
                       mm_token_type_ids=kw.get("mm_token_type_ids"), image_keys=kw.get("image_keys"),
                       image_memo=kw.get("image_memo"))
    return None if out is None else channel.gather_vocab(out)


def _denoise(model, channel: Channel, cache: KVCache, kw: dict, sc_logits: torch.Tensor | None):
    B, C = kw["ids"].shape
    sc = kw.get("sc_embeds")
    if kw["has_sc_logits"]:
        local = channel.scatter_vocab(sc_logits, (B, C), torch.float32, model.device)
        sc = model.soft_embeddings(vocab_parallel_softmax(local))
    out = model.denoise(kw["ids"], cache, self_conditioning_embeds=sc, self_conditioning_mask=kw.get("sc_mask"),
                        return_hidden=kw["return_hidden"])
    return out if kw["return_hidden"] else channel.gather_vocab(out)


def _soft(model, channel: Channel, probs: torch.Tensor | None, lead: tuple, dtype) -> torch.Tensor:
    return model.soft_embeddings(channel.scatter_vocab(probs, lead, dtype, model.device))


def _stats(model, channel: Channel) -> list[dict] | None:
    from .shard import weight_bytes
    mine = {"rank": channel.rank, "weight_bytes": weight_bytes(model),
            "text_weight_bytes": weight_bytes(model, text_only=True), "rss_bytes": _rss()}
    out = [None] * channel.world if channel.rank == 0 else None
    dist.gather_object(mine, out, dst=0)
    return out


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            import os
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class GroupFailedError(RuntimeError):
    """A rank of the split model is gone, or a call failed midway through its collectives: the ranks no longer
    move in step, so no later call can run (restart the process)."""


def _one_at_a_time(method):
    """One call at a time over the channel: each call is a message plus its collectives, and two engines (threads)
    sharing one split model must not interleave theirs. A call that raises after its message went out (a rank died,
    a collective broke) leaves the followers mid-call: the group is marked failed and every later call refuses at
    once, instead of feeding the followers a message they would read as the rest of the old call."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            if self.failure is not None:
                raise GroupFailedError(self.failure)
            sent = self._channel.sent
            try:
                return method(self, *args, **kwargs)
            except ValueError:  # input refused: the followers refuse the same and stay in step (``follow``)
                raise
            except Exception as e:
                if self._channel.sent != sent and self.failure is None:  # (``failure`` names a rank found dead)
                    # Clients read ``failure`` (the 503's message): what broke, in words. The exception's own text
                    # (gloo's "Connection closed by peer [10.0.0.5]:29517") names internal hosts and ports: it goes
                    # to the server log only.
                    object.__setattr__(self, "_failure", f"the split model failed during a {method.__name__} call "
                                       f"({type(e).__name__}): a rank stopped answering or a collective broke")
                    log.error("%s: the ranks are out of step, no further calls (%s: %s)", self._failure,
                              type(e).__name__, str(e).strip()[:2000])
                raise
    return run


class LeaderModel:
    """Rank 0's view of the split model: the rank's shard, whose ``encode``/``denoise``/``soft_embeddings`` bring
    the followers along and return whole-vocabulary results. Everything else is the shard's."""

    # Fast mode (engine/fast.py) runs the layers, embedding and LM head one by one, which on a split model would
    # leave the followers waiting: its requests run exact here.
    runs_fast_mode = False

    def __init__(self, model, channel: Channel, group=None):
        object.__setattr__(self, "_lock", threading.RLock())
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "group", group)  # the launcher's ``Group``: close() ends it
        object.__setattr__(self, "_failure", None)

    def __getattr__(self, name):
        return getattr(self._model, name)

    @property
    def failure(self) -> str | None:
        """Why this split model can no longer run (a rank gone, a call broken midway), or None while it can. The
        server reads it: its engine stops and /health answers 503 instead of failing every request one by one."""
        if self._failure is None and self.group is not None:
            gone = self.group.dead_ranks()
            if gone:
                object.__setattr__(self, "_failure", f"the split model lost {gone}")
                log.error("%s: no further calls", self._failure)
        return self._failure

    def __setattr__(self, name, value):
        setattr(self._model, name, value)

    @property
    def shard(self):
        return self._model

    def _reserve(self, cache: KVCache, lengths: list[int]) -> None:
        for s, n in zip(cache.seqs, lengths):
            s.reserve(n)

    @_one_at_a_time
    def encode(self, input_ids, cache, lengths=None, logits=None, pixel_values=None, image_position_ids=None,
               mm_token_type_ids=None, image_keys=None, image_memo=None):
        ids = self._model._check_ids(input_ids, "input_ids").cpu()
        n = [ids.shape[1]] * ids.shape[0] if lengths is None else [int(x) for x in lengths]
        if len(n) == ids.shape[0] and all(1 <= x <= ids.shape[1] for x in n):
            self._reserve(cache, n)
        kw = dict(ids=ids, lengths=lengths, logits=logits, pixel_values=pixel_values,
                  image_position_ids=image_position_ids, mm_token_type_ids=mm_token_type_ids)
        self._channel.send("encode", rows=_rows(cache), capacity=dict(cache.pool.capacity),
                           batch_invariant=self._model.batch_invariant, threads=torch.get_num_threads(), **kw)
        # the followers run their own (replicated) vision tower without the memo: the same values
        return _encode(self._model, self._channel, cache, dict(kw, image_keys=image_keys, image_memo=image_memo))

    @_one_at_a_time
    def denoise(self, canvas_ids, cache, self_conditioning_logits=None, self_conditioning_embeds=None,
                self_conditioning_mask=None, return_hidden: bool = False):
        if self_conditioning_logits is not None and self_conditioning_embeds is not None:
            raise ValueError("pass self_conditioning_logits or self_conditioning_embeds, not both")
        ids = self._model._check_ids(canvas_ids, "canvas_ids").cpu()
        kw = dict(ids=ids, sc_embeds=self_conditioning_embeds, sc_mask=self_conditioning_mask,
                  has_sc_logits=self_conditioning_logits is not None, return_hidden=bool(return_hidden))
        self._channel.send("denoise", rows=_rows(cache), capacity=dict(cache.pool.capacity),
                           batch_invariant=self._model.batch_invariant, threads=torch.get_num_threads(), **kw)
        return _denoise(self._model, self._channel, cache, kw, self_conditioning_logits)

    @_one_at_a_time
    def soft_embeddings(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [..., V] (whole distributions, rank 0) -> probs @ E [..., H], each rank over its slice."""
        lead = tuple(probs.shape[:-1])
        self._channel.send("soft", lead=lead, dtype=probs.dtype)
        return _soft(self._model, self._channel, probs, lead, probs.dtype)

    @_one_at_a_time
    def copy_pages(self, g, src: list[int], dst: list[int]) -> None:
        """Tell the followers about a prefix-cache page copy (rank 0 does its own)."""
        self._channel.send("copy", group=g, src=list(src), dst=list(dst), capacity=dict(self._model.kv_pool.capacity))

    @_one_at_a_time
    def rank_stats(self) -> list[dict]:
        """Per rank: the bytes of weights it holds and its resident memory (RSS), for memory accounting."""
        self._channel.send("stats")
        return _stats(self._model, self._channel)

    def make_prefix_cache(self, capacity_bytes: int) -> "ParallelPrefixCache":
        """The engine's prefix cache for this model (``Engine`` asks)."""
        return ParallelPrefixCache(self, capacity_bytes)

    def close(self) -> None:
        """Release the followers (they leave their loop) and the process group (a failed group too)."""
        with self._lock:
            if self.group is not None:
                self.group.close(failed=self.failure)
                object.__setattr__(self, "group", None)


class ParallelPrefixCache(PrefixCache):
    """The prefix cache of a split model: its page copies run on every rank (the followers' pools mirror rank 0's
    page numbering)."""

    def __init__(self, leader: LeaderModel, capacity_bytes: int):
        super().__init__(leader.kv_pool, capacity_bytes)
        self.leader = leader

    def _copy_pages(self, g, src: list[int], dst: list[int]) -> None:
        self.leader.copy_pages(g, src, dst)
        super()._copy_pages(g, src, dst)


def follow(channel: Channel, load) -> None:
    """A follower's loop: load what rank 0 loads (``load(**kw)`` -> the rank's shard), run every call it announces,
    until it says stop."""
    model = pool = pages = None
    with torch.no_grad():
        while True:
            op, kw = channel.recv()
            if op == "stop":
                farewell()
                return
            if op == "load":
                model = pool = pages = None
                try:
                    model = load(**kw)
                except Exception as exc:  # rank 0 says it (and its own, if it failed too); this rank waits for stop
                    log.debug("rank %d could not load %s", channel.rank, kw.get("path"), exc_info=True)
                    channel.share_ranges(f"{type(exc).__name__}: {exc}")
                    continue
                if not channel.share_ranges(model.vocab_range):
                    pool = model.kv_pool
                    pages = PrefixCache(pool, 0)  # only for its page-copy routine
                else:
                    model = None
                continue
            try:
                if op == "encode" or op == "denoise":
                    model.batch_invariant = kw["batch_invariant"]
                    if kw["threads"] != torch.get_num_threads():  # rank 0 decides (blockdiff --threads / auto)
                        torch.set_num_threads(kw["threads"])
                    cache = _mirror(pool, kw["rows"], kw["capacity"])
                    if op == "encode":
                        _encode(model, channel, cache, kw)
                    else:
                        _denoise(model, channel, cache, kw, None)
                elif op == "soft":
                    _soft(model, channel, None, kw["lead"], kw["dtype"])
                elif op == "stats":
                    _stats(model, channel)
                elif op == "copy":
                    pool.capacity = dict(kw["capacity"])
                    pages._copy_pages(kw["group"], kw["src"], kw["dst"])
                else:
                    raise RuntimeError(f"unknown operation {op!r} from rank 0")
            except ValueError as exc:  # input errors: rank 0 raised the same before any collective
                log.debug("rank %d: %s refused: %s", channel.rank, op, exc)
