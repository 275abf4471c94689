"""The CPU fan-out of experts and vocabulary products over worker threads (blockdiff/model/cpu_threads.py)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from blockdiff.model import cpu_threads
from blockdiff.model.cpu_threads import run_tasks, spans_of, split


def map_experts(fn, spans, macs_per_row, side=()):
    """The experts (fn(e, a, b) per span) and the side tasks through run_tasks: (the experts' rows, side results)."""
    from functools import partial
    ys = run_tasks([((b - a + 4) * macs_per_row, partial(fn, e, a, b)) for e, a, b in spans] + list(side))
    return torch.cat(ys[:len(spans)]), ys[len(spans):]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _experts(E=8, H=64, I=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=g) / H ** 0.5, torch.randn(E, H, I, generator=g) / I ** 0.5


def _expert(xs, gu, dn, e, a, b):
    gate, up = F.linear(xs[a:b], gu[e]).chunk(2, -1)
    return F.linear(F.gelu(gate, approximate="tanh") * up, dn[e])


def test_each_expert_writes_each_experts_rows_into_one_output():
    """One mm per expert on views made by one split, each writing its rows of one output (out=): the same rows as
    a product per expert; experts without rows are skipped."""
    gu, _ = _experts()
    counts = [5, 0, 9, 1, 7, 3, 0, 11]
    xs = torch.randn(sum(counts), 64)
    out = torch.full((sum(counts), gu.shape[1]), float("nan"))
    got = cpu_threads.each_expert(torch.mm, xs, counts, gu.transpose(1, 2).unbind(0), out)
    assert got is out
    want = torch.cat([xs[a:b] @ gu[e].t() for e, a, b in spans_of(counts)])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_expert_blocks_are_consecutive_runs_of_about_equal_cost(n):
    counts = [5, 0, 9, 1, 7, 3, 0, 11, 2, 2]
    spans = spans_of(counts)
    blocks = cpu_threads.expert_blocks(spans, n)
    assert [s for blk in blocks for s in blk] == spans  # every expert with rows once, in order
    assert len(blocks) == min(n, len(spans)) and all(blocks)
    costs = [sum(b - a + 4 for _, a, b in blk) for blk in blocks]
    biggest = max(b - a + 4 for _, a, b in spans)
    assert max(costs) - min(costs) <= 2 * biggest  # balanced to within about one expert's cost
    assert cpu_threads.expert_blocks([], 2) == [] and cpu_threads.expert_blocks(spans[:1], 2) == [spans[:1]]


def test_spans_skip_experts_without_rows():
    assert spans_of([2, 0, 3, 0, 1]) == [(0, 0, 2), (2, 2, 5), (4, 5, 6)]
    assert spans_of([0, 0]) == []


def test_experts_are_dealt_to_worker_threads_and_come_back_in_order(two_threads, monkeypatch):
    monkeypatch.setattr(cpu_threads, "MIN_WORK", 0)
    gu, dn = _experts()
    counts = [5, 0, 9, 1, 7, 3, 0, 11]
    xs = torch.randn(sum(counts), 64)
    spans = spans_of(counts)
    ran_on = {}
    both = threading.Barrier(2, timeout=20)  # each worker's first expert waits for the other's: they run at once
    local = threading.local()

    def fn(e, a, b):
        ran_on[e] = threading.current_thread().name
        if not getattr(local, "met", False):
            local.met = True
            both.wait()
        return _expert(xs, gu, dn, e, a, b)
    with torch.inference_mode():
        got = map_experts(fn, spans, 1)[0]
        want = torch.cat([_expert(xs, gu, dn, *s) for s in spans])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    workers = set(ran_on.values())
    assert len(workers) == 2 and all(n.startswith("blockdiff-experts") for n in workers), ran_on
    assert torch.get_num_threads() == 2  # the pool's start-up left the caller's count alone


def test_side_tasks_run_beside_the_experts_and_come_back_separately(two_threads, monkeypatch):
    """The layer's dense MLP rides in the experts' fan-out: its results come back apart from the experts' rows,
    and the biggest task is dealt first (to a worker of its own when it outweighs the rest)."""
    monkeypatch.setattr(cpu_threads, "MIN_WORK", 0)
    def fn(e, a, b):
        return torch.full((b - a, 1), float(e))

    def big():
        return torch.ones(3)
    spans = spans_of([2, 1, 3])
    with torch.no_grad():
        y, side = map_experts(fn, spans, 1, [(1000, big), (1, lambda: torch.zeros(2))])
    assert torch.equal(y[:, 0], torch.tensor([0.0, 0, 1, 2, 2, 2]))
    assert torch.equal(side[0], torch.ones(3)) and torch.equal(side[1], torch.zeros(2))
    # the dealing: largest first, each to the least-loaded worker (1000 outweighs every expert together)
    assert cpu_threads._deal([3 + 4, 2 + 4, 4 + 4, 1000, 1], 2) == [[3], [2, 0, 1, 4]]
    assert cpu_threads._deal([5, 5, 5, 5], 2) == [[0, 2], [1, 3]]


def test_workers_run_their_ops_single_threaded(two_threads, monkeypatch):
    monkeypatch.setattr(cpu_threads, "MIN_WORK", 0)
    seen = []

    def fn(e, a, b):
        seen.append(torch.get_num_threads())
        return torch.zeros(b - a, 1)
    with torch.no_grad():
        map_experts(fn, spans_of([1, 1, 1, 1]), 1)
    assert seen == [1, 1, 1, 1]


def test_small_work_and_autograd_stay_on_the_calling_thread(two_threads):
    me = threading.current_thread().name
    names = []

    def fn(e, a, b):
        names.append(threading.current_thread().name)
        return torch.ones(b - a, 2, requires_grad=True) * 2
    with torch.no_grad():
        map_experts(fn, spans_of([3, 4]), 1)  # 7 rows x 1 multiply-add: under MIN_WORK
    out = map_experts(fn, spans_of([3, 4]), 1 << 30)[0]  # big enough, but autograd is recording
    assert set(names) == {me} and out.requires_grad


def test_a_worker_failure_reaches_the_caller(two_threads, monkeypatch):
    monkeypatch.setattr(cpu_threads, "MIN_WORK", 0)

    def fn(e, a, b):
        if e == 3:
            raise RuntimeError("expert 3 broke")
        return torch.zeros(b - a, 1)
    with torch.no_grad(), pytest.raises(RuntimeError, match="expert 3 broke"):
        map_experts(fn, spans_of([2, 2, 2, 2]), 1)


@pytest.mark.parametrize("dim", [0, -1, None])
def test_split_concatenates_or_sums_the_parts(two_threads, monkeypatch, dim):
    monkeypatch.setattr(cpu_threads, "MIN_WORK", 0)
    h, w = torch.randn(6, 16), torch.randn(40, 16)
    p = torch.softmax(torch.randn(6, 40), -1)
    slices = []

    def seen(a, b, y):
        slices.append((a, b))
        return y
    with torch.no_grad():
        if dim == 0:
            got, want = split(lambda a, b: seen(a, b, h[a:b] @ w.t()), 6, 1, dim=0), h @ w.t()
        elif dim == -1:
            got, want = split(lambda a, b: seen(a, b, F.linear(h, w[a:b])), 40, 1, dim=-1), F.linear(h, w)
        else:
            got, want = split(lambda a, b: seen(a, b, p[:, a:b] @ w[a:b]), 40, 1, dim=None), p @ w
    assert sorted(slices) == ([(0, 3), (3, 6)] if dim == 0 else [(0, 20), (20, 40)])  # one slice per worker
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    slices.clear()  # work on another device (here: "meta" stands for it) is never dealt to the CPU's threads
    with torch.no_grad():
        split(lambda a, b: seen(a, b, h), 40, 1, dim=0, device=torch.device("meta"))
    assert slices == [(0, 40)]


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_model_logits_do_not_depend_on_the_thread_count(tmp_path, monkeypatch, quant):
    """A model big enough to fan out (experts, LM head, probs @ E) gives the same logits on 1 and 2 threads."""
    from blockdiff.bench.checkpoints import write_random_checkpoint
    from blockdiff.engine.llm import LLM
    monkeypatch.setattr(cpu_threads, "MIN_WORK", 1 << 12)  # the fan-out on this small model's products
    # Table blocks that divide each thread's half of the 512-word vocabulary, as the real vocabularies' 1,024-row
    # blocks divide theirs: where probs @ E runs in bf16 (CPUs with AVX512-BF16), each block's product is rounded
    # to bf16, so the same blocks must be computed at both thread counts (only their fp32 sum's order differs).
    from blockdiff.quant.modules import QuantEmbedding
    monkeypatch.setattr(QuantEmbedding, "ROWS", 128)
    write_random_checkpoint(str(tmp_path), "tiny")
    llm = LLM(str(tmp_path), dtype=torch.float32, device="cpu", quantization=quant)
    m = llm.model
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, m.vocab_size, (2, 12), generator=g)
    canvas = torch.randint(3, m.vocab_size, (2, 16), generator=g)
    real = cpu_threads.fan_out
    fan_outs = {1: 0, 2: 0}
    kinds = set()

    def spy(fn, shares, n):
        fan_outs[torch.get_num_threads()] += 1
        kinds.add("experts" if fn is cpu_threads._call else "split")  # run_tasks hands over _call
        return real(fn, shares, n)
    monkeypatch.setattr(cpu_threads, "fan_out", spy)
    before = torch.get_num_threads()
    outs = {}
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            with torch.inference_mode():
                cache = m.new_cache(2)
                m.encode(prompt, cache)
                logits = m.denoise(canvas, cache)
                outs[t] = (logits, m.soft_embeddings(logits.softmax(-1)))
    finally:
        torch.set_num_threads(before)
    # one thread: nothing fans out; two: each layer's experts (with its dense MLP) in encode and in denoise,
    # probs @ E, and the LM head unless it is one int8 torch._int_mm product (threaded by torch itself)
    head = 0 if getattr(m.embed_tokens, "int_mm", False) else 1
    assert fan_outs[1] == 0 and fan_outs[2] >= 2 * len(m.layers) + 1 + head, fan_outs
    assert kinds == {"experts", "split"}
    torch.testing.assert_close(outs[2][0], outs[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[2][1], outs[1][1], rtol=1e-4, atol=1e-4)


def test_a_forked_child_gets_fresh_workers(two_threads, monkeypatch):
    """The pools' threads do not survive a fork (multiprocessing's default start method on Linux): a child that
    runs experts after its parent did must not wait on them forever."""
    import os
    monkeypatch.setattr(cpu_threads, "MIN_WORK", 0)
    spans = spans_of([2, 3, 1])

    def fn(e, a, b):
        return torch.full((b - a, 1), float(e))
    with torch.no_grad():
        want = map_experts(fn, spans, 1)[0]  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if the fan-out ran and was right
        code = 1
        try:
            with torch.no_grad():
                code = 0 if torch.equal(map_experts(fn, spans, 1)[0], want) else 1
        finally:
            os._exit(code)
    deadline = 60
    import time
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung on the parent's worker threads")


@pytest.mark.parametrize("threads", [1, 2])
def test_each_slice_covers_the_range_once(monkeypatch, threads):
    monkeypatch.setattr(cpu_threads, "MIN_WORK", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    out, slices = torch.zeros(40), []

    def fill(a, b):
        slices.append((a, b))
        out[a:b] += 1
    try:
        with torch.no_grad():
            cpu_threads.each_slice(fill, 40, 1)
    finally:
        torch.set_num_threads(before)
    assert sorted(slices) == ([(0, 40)] if threads == 1 else [(0, 20), (20, 40)])
    assert torch.equal(out, torch.ones(40))


@pytest.mark.parametrize("quant", [None, "int8"])
def test_lm_head_in_blocks_equals_one_product(tmp_path, monkeypatch, two_threads, quant):
    """The CPU LM head writes each block of the table's product into its columns of the logits (several blocks
    per worker here): the same logits as one product over the whole (dequantized) table."""
    from blockdiff.bench.checkpoints import write_random_checkpoint
    from blockdiff.engine.llm import LLM
    from blockdiff.model import diffusion_gemma
    from blockdiff.quant.modules import QuantEmbedding
    monkeypatch.setattr(cpu_threads, "MIN_WORK", 0)
    monkeypatch.setattr(diffusion_gemma, "HEAD_BLOCK_BYTES", 1)  # 64-row blocks
    monkeypatch.setattr(QuantEmbedding, "ROWS", 48)
    write_random_checkpoint(str(tmp_path), "tiny")
    m = LLM(str(tmp_path), dtype=torch.float32, device="cpu", quantization=quant).model
    h = torch.randn(2, 5, m.text.hidden_size, generator=torch.Generator().manual_seed(0))
    e = m.embed_tokens
    table = e.weight if quant is None else e.weight.qweight.float() * e.weight.qscale.float()[:, None]
    assert table.shape[0] > 4 * 64  # several blocks in each worker's slice
    with torch.inference_mode():
        got = m.lm_head(h)
    want = F.linear(h, table)
    if quant and e.int_mm:  # a CPU with VNNI: the hidden states are quantized per row, an exact int8 product
        from blockdiff.quant.modules import quantize_rows
        xq, xs = quantize_rows(h.reshape(-1, h.shape[-1]))
        want = (torch._int_mm(xq, e.weight.qweight.t()).float() * e.weight.qscale.float() * xs).reshape(want.shape)
    if m.softcap:
        want = torch.tanh(want / m.softcap) * m.softcap
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
