"""The batched execution core: one pass per batch whatever its size, no host syncs, a paged KV cache that frees
and bounds its memory, and an opt-in batch-invariant mode.

Every test runs the tiny checkpoint (fp32, CPU). Rows get different prefix lengths so padding and masks matter.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blockdiff import SamplingParams, load_model
from blockdiff.engine.engine import Engine
from blockdiff.engine.model_state import Phase
from blockdiff.kv_cache import KVCache, KVPool, SequenceCache
from blockdiff.model.moe import grouped_mm_usable

REL_TOL = 1e-5  # a row in a batch vs the same row alone, relative to the row's largest logit


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    m = load_model(tiny_checkpoint, dtype=torch.float32, device="cpu")
    assert m.batch_invariant is False  # batched is the default
    return m


def _ids(g, n, V, rows=1):
    return torch.randint(0, V, (rows, n), generator=g)


def _prefixed_cache(model, lengths, g):
    """A cache whose rows hold prompts of the given lengths, each encoded alone (so rows are bit-comparable)."""
    seqs = [model.new_sequence() for _ in lengths]
    for s, n in zip(seqs, lengths):
        model.encode(_ids(g, n, model.vocab_size), KVCache([s]))
    return KVCache(seqs)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------- one pass per batch
@torch.no_grad()
def test_op_count_of_encode_and_denoise_does_not_grow_with_batch_size(model):
    g = torch.Generator().manual_seed(0)
    V, C = model.vocab_size, model.canvas_length
    assert grouped_mm_usable(torch.zeros(1, dtype=torch.float32), model.text.hidden_size,
                             model.text.moe_intermediate_size)

    def count(fn):
        with _OpLog() as log:
            fn()
        return log.ops

    counts = {}
    for name, prefix_lengths, new_lengths in (("B=1 short", [5], [12]), ("B=1 long", [37], [3]),
                                             ("B=4", [5, 37, 1, 20], [12, 3, 7, 1])):
        cache = _prefixed_cache(model, prefix_lengths, g)
        canvas = _ids(g, C, V, len(prefix_lengths))
        sc = torch.randn(len(prefix_lengths), C, model.text.hidden_size, generator=g)
        den = count(lambda: model.denoise(canvas, cache, self_conditioning_embeds=sc))
        S = max(new_lengths)
        enc = count(lambda: model.encode(_ids(g, S, V, len(new_lengths)), cache, lengths=new_lengths, logits="last"))
        counts[name] = (den, enc)
    base_den, base_enc = counts["B=1 short"]
    grouped = sum(n for op, n in base_den.items() if "grouped_mm" in op)
    assert sum(base_den.values()) > 100 and grouped
    for name, (den, enc) in counts.items():
        assert den == base_den, f"denoise ops differ for {name}: {(den - base_den) + (base_den - den)}"
        assert enc == base_enc, f"encode ops differ for {name}: {(enc - base_enc) + (base_enc - enc)}"
    # One grouped GEMM per expert matrix per layer, one attention call per layer.
    L = len(model.layers)
    assert grouped == 2 * L
    sdpa = sum(n for op, n in base_den.items() if "scaled_dot_product" in op and "backward" not in op)
    assert sdpa == L


# ---------------------------------------------------------------------------------------------- no host syncs
_SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.bincount", "aten.masked_select", "aten.unique",
             "aten._unique", "aten.is_nonzero", "aten.equal", "aten.item", "aten.repeat_interleave.Tensor",
             "aten.masked_scatter")


class _NoSync(TorchDispatchMode):
    """Fails on every op that reads device values back to the host or makes a shape depend on them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(_SYNC_OPS):
            raise AssertionError(f"host sync op {name}")
        if name.startswith(("aten.index.Tensor", "aten.index_put")):
            idx = args[1] if len(args) > 1 else kwargs.get("indices")
            if any(i is not None and i.dtype == torch.bool for i in idx):
                raise AssertionError(f"boolean-mask indexing ({name}): a data-dependent shape")
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_encode_and_denoise_make_no_host_syncs(model, monkeypatch):
    g = torch.Generator().manual_seed(1)
    V, C = model.vocab_size, model.canvas_length
    cache = _prefixed_cache(model, [9, 30, 2], g)
    inputs = [_ids(g, 6, V, 3), _ids(g, C, V, 3), _ids(g, C, V, 3)]
    numpy_reads = []
    real_numpy = torch.Tensor.numpy

    def numpy(self, *a, **k):  # the entry check reads host ids through numpy: allowed once, on an input only
        assert any(self is t for t in inputs), "numpy() on a tensor that is not a call's input ids"
        numpy_reads.append(1)
        return real_numpy(self, *a, **k)

    def refuse(name):
        def f(*a, **k):
            raise AssertionError(f"Tensor.{name}() inside encode/denoise")
        return f

    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    monkeypatch.setattr(torch.Tensor, "numpy", numpy)
    with _NoSync():
        model.encode(inputs[0], cache, lengths=[6, 1, 4], logits="last")
        model.denoise(inputs[1], cache)
        model.denoise(inputs[2], cache, self_conditioning_logits=torch.randn(3, C, V),
                      self_conditioning_mask=torch.tensor([True, False, True]))
    assert len(numpy_reads) == 3  # one validation per call


# ---------------------------------------------------------------------------------------------- batched == alone
@torch.no_grad()
def test_batched_logits_equal_each_rows_solo_logits(model):
    g = torch.Generator().manual_seed(2)
    V, C = model.vocab_size, model.canvas_length
    prompts = [_ids(g, n, V) for n in (3, 25, 11, 40)]
    canvas, commit = _ids(g, C, V, 4), _ids(g, C, V, 4)
    sc = torch.randn(4, C, V, generator=g) * 3
    width = max(p.shape[1] for p in prompts)
    padded = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in prompts])

    def close(ours, ref):
        assert (ours - ref).abs().max() <= REL_TOL * ref.abs().max()

    batch = model.new_cache(4)  # everything batched: prompts (padded), denoise, commit, denoise
    b_first = model.encode(padded, batch, lengths=[p.shape[1] for p in prompts], logits="last")
    b_den = model.denoise(canvas, batch, self_conditioning_logits=sc)
    b_commit = model.encode(commit, batch, logits="all")
    b_after = model.denoise(canvas, batch)
    for b in range(4):
        row = model.new_cache(1)
        close(b_first[b], model.encode(prompts[b], row, logits="last")[0])
        close(b_den[b], model.denoise(canvas[b:b + 1], row, self_conditioning_logits=sc[b:b + 1])[0])
        close(b_commit[b], model.encode(commit[b:b + 1], row, logits="all")[0])
        close(b_after[b], model.denoise(canvas[b:b + 1], row)[0])


@torch.no_grad()
def test_batch_invariant_flag_gives_bit_identical_rows(model):
    g = torch.Generator().manual_seed(3)
    V, C = model.vocab_size, model.canvas_length
    model.batch_invariant = True
    try:
        batch = _prefixed_cache(model, [4, 33, 17, 1], g)
        canvas = _ids(g, C, V, 4)
        sc = torch.randn(4, C, model.text.hidden_size, generator=g)
        mask = torch.tensor([True, False, True, True])
        together = model.denoise(canvas, batch, self_conditioning_embeds=sc, self_conditioning_mask=mask)
        for b in range(4):
            alone = model.denoise(canvas[b:b + 1], KVCache([batch.seqs[b]]), self_conditioning_embeds=sc[b:b + 1],
                                  self_conditioning_mask=mask[b:b + 1])
            assert torch.equal(together[b], alone[0]), f"row {b} differs alone vs batched"
    finally:
        model.batch_invariant = False
    # The default batched path is not required to be bit-identical, only close: it must at least run the rows
    # through a different (batched) computation than the per-row one.
    batched = model.denoise(canvas, batch, self_conditioning_embeds=sc, self_conditioning_mask=mask)
    assert (batched - together).abs().max() <= REL_TOL * together.abs().max()


# ---------------------------------------------------------------------------------------------- the paged cache
@torch.no_grad()
def test_cache_frees_memory_on_finish_and_abort(tiny_checkpoint):
    model = load_model(tiny_checkpoint, dtype=torch.float32, device="cpu")
    engine = Engine(model)
    pool = model.kv_pool
    params = SamplingParams(max_new_tokens=2 * model.canvas_length, seed=0, ignore_eos=True, max_denoising_steps=2)
    a = engine.add_request(list(range(5, 40)), params)
    b = engine.add_request(list(range(5, 12)), params)
    engine.step()
    assert a.phase is b.phase is Phase.DENOISING
    held_a, held_b = a.cache.nbytes(), b.cache.nbytes()
    assert held_a > held_b > 0 and pool.used_bytes() == held_a + held_b
    cache_a = a.cache
    assert engine.abort(a.request_id)
    assert a.cache is None and cache_a.freed and cache_a.nbytes() == 0
    assert pool.used_bytes() == held_b  # a's pages are back in the pool at once
    while engine.has_unfinished():
        engine.step()
    assert b.finished and b.cache is None
    assert pool.used_bytes() == 0 and pool.nbytes() == 0  # nothing in use: the storage itself is released
    # A pool sized up front keeps its storage (a captured step's shapes never change).
    pool.reserve(8)
    c = engine.add_request(list(range(5, 12)), params)
    engine.step()
    size = pool.nbytes()
    assert size >= 9 * sum(pool.page_bytes(g) for g in pool.groups) and pool.used_bytes() == c.cache.nbytes() > 0
    engine.abort(c.request_id)
    assert pool.used_bytes() == 0 and pool.nbytes() == size


def test_dropping_a_sequence_returns_its_pages_and_pool_growth_keeps_contents(model):
    g = torch.Generator().manual_seed(4)
    pool = model.kv_pool
    before = pool.used_bytes()
    keep = model.new_cache(1)
    with torch.no_grad():
        model.encode(_ids(g, 20, model.vocab_size), keep)
        seen = [keep.layer_kv(i) for i in range(len(model.layers))]
        for _ in range(6):  # enough new sequences to grow the pool several times
            tmp = model.new_cache(3)
            model.encode(_ids(g, 50, model.vocab_size, 3), tmp)
    assert all(torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1])
               for a, b in zip(seen, [keep.layer_kv(i) for i in range(len(model.layers))]))
    del tmp
    assert pool.used_bytes() == before + keep.nbytes()
    other = KVCache.empty(model.text.layers, 1)
    with pytest.raises(ValueError, match="share one KVPool"):
        KVCache([keep.seqs[0], other.seqs[0]])
    keep.seqs[0].free()
    assert pool.used_bytes() == before and keep.nbytes() == 0
    with pytest.raises(ValueError, match="freed"):
        model.denoise(_ids(g, model.canvas_length, model.vocab_size), keep)


@torch.no_grad()
def test_sliding_layers_stay_bounded_at_the_window_and_full_layers_grow_by_pages(model):
    pool = KVPool(model.text.layers, page_size=4)
    seq = SequenceCache(model.text.layers, pool)
    cache = KVCache([seq])
    g = torch.Generator().manual_seed(5)
    windows = {s.sliding_window for s in model.text.layers if s.layer_type == "sliding_attention"}
    (W,) = windows
    ring_pages = -(-(W - 1) // 4)
    for n in (3, 9, 16, 16, 16):
        model.encode(_ids(g, n, model.vocab_size), cache)
        L = seq.length
        assert len(seq.pages[W]) == min(-(-L // 4), ring_pages)  # bounded by the window
        assert len(seq.pages[None]) == -(-L // 4)  # one page per 4 positions, nothing preallocated
        for i, spec in enumerate(model.text.layers):
            k, v = cache.layer_kv(i)[0]
            assert k.shape[1] == (min(L, W - 1) if spec.layer_type == "sliding_attention" else L)
    # The ring holds exactly the last W - 1 positions: the logits equal those of the default pool's cache.
    ref = model.new_cache(1)
    g = torch.Generator().manual_seed(5)
    for n in (3, 9, 16, 16, 16):
        model.encode(_ids(g, n, model.vocab_size), ref)
    canvas = _ids(g, model.canvas_length, model.vocab_size)
    a, b = model.denoise(canvas, cache), model.denoise(canvas, ref)
    assert (a - b).abs().max() <= REL_TOL * b.abs().max()
    per_page = {grp: pool.page_bytes(grp) for grp in pool.groups}
    assert seq.nbytes() == len(seq.pages[W]) * per_page[W] + len(seq.pages[None]) * per_page[None]


# ---------------------------------------------------------------------------------------------- graph capture
@torch.no_grad()
def test_denoise_step_captures_as_one_static_graph_per_bucket(model):
    """The batched denoise step traces into one graph (``fullgraph``: no graph break, no host read, no
    data-dependent shape), through fake tensors and AOT autograd; a later tick with other prefix lengths in the
    same bucket (batch size, prefix pages) reuses it. (Inductor's C++ compile of it takes minutes on these CPUs:
    aot_eager proves capture without it.)"""
    from torch._dynamo.backends.debugging import aot_eager

    g = torch.Generator().manual_seed(6)
    V, C, H = model.vocab_size, model.canvas_length, model.text.hidden_size
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    step = torch.compile(model.denoise_step, fullgraph=True, dynamic=False, backend=backend)

    def args(cache, canvas, soft):
        view = cache.begin(None, C, model.device, model.dtype)
        pre = [view.prefix(s) for s in model.spans]
        return (canvas, soft, view.start, [p.pos for p in pre], [p.valid for p in pre],
                [view.sources(i) for i in range(len(model.layers))])

    # Two ticks with other prefix lengths, both within one page (16 positions). The caches are built first: the
    # pool's storage size is a shape too (a server sizes its pool once; growth would mean one more graph).
    caches = [_prefixed_cache(model, lengths, g) for lengths in ([12, 5], [14, 9])]
    for cache in caches:
        canvas, soft = _ids(g, C, V, 2), torch.randn(2, C, H, generator=g)
        eager = model.denoise(canvas, cache, self_conditioning_embeds=soft)
        captured = step(*args(cache, canvas, soft))
        assert (captured - eager).abs().max() <= REL_TOL * eager.abs().max()
    assert len(compiles) == 1
    torch._dynamo.reset()
    assert model.compile_denoise is None and model._compiled_step() is None  # CPU default: eager


def test_engine_encodes_a_ticks_prompts_in_one_batched_call(tiny_checkpoint, monkeypatch):
    model = load_model(tiny_checkpoint, dtype=torch.float32, device="cpu")
    engine = Engine(model)
    calls = []
    real = model.encode
    monkeypatch.setattr(model, "encode", lambda ids, cache, **kw: (calls.append((ids.shape, kw)), real(ids, cache, **kw))[1])
    params = SamplingParams(max_new_tokens=4, seed=0, max_denoising_steps=2)
    states = [engine.add_request(list(range(5, 5 + n)), params) for n in (9, 3, 14, 6)]
    engine.step()
    assert len(calls) == 1 and calls[0][0] == (4, 14) and calls[0][1]["lengths"] == [14, 9, 6, 3]
    assert [s.cache.length for s in states] == [9, 3, 14, 6]
    model.batch_invariant = True  # deterministic mode: one encode per request, unpadded
    calls.clear()
    more = [engine.add_request(list(range(5, 5 + n)), params) for n in (4, 7)]
    engine.step()
    assert [c[0] for c in calls] == [(1, 4), (1, 7)] and [s.cache.length for s in more] == [4, 7]
