"""Prefix caching: a prompt that starts with blocks an earlier prompt encoded reuses their keys/values, exactly
(fp32: the same tokens as a cold run, logits equal to rounding), within its byte budget, without leaking pages.

Models: the tiny checkpoint's layout (full + sliding layers) with windows shorter and longer than a block, and
pools with small pages so prompts span many blocks and the sliding ring holds several of them.
"""

from __future__ import annotations

import pytest
import torch

from blockdiff import SamplingParams, load_model
from blockdiff.engine.engine import Engine
from blockdiff.kv_cache import KVCache, KVPool
from blockdiff.prefix_cache import PrefixCache
from fixtures import make_checkpoint

REL_TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    # window 8 (a ring of one page of 16, two of 4) and 23 (a ring of 2 / 6 pages: blocks copied from several)
    return {w: make_checkpoint(tmp_path_factory.mktemp(f"pc{w}"), text_overrides={"sliding_window": w})
            for w in (8, 23)}


def _model(path, page_size):
    m = load_model(path, dtype=torch.float32, device="cpu")
    m._kv_pool = KVPool(m.text.layers, page_size=page_size)
    return m


def _prompts(n_shared=45, tails=(7, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(5, 500, (n_shared,), generator=g).tolist()
    return [shared + torch.randint(5, 500, (t,), generator=g).tolist() for t in tails]


def _encode_and_denoise(engine, prompt, canvas):
    """Encode a prompt through the engine's encode path (prefix cache included), then one denoise of ``canvas``."""
    s = engine.make_state(prompt, SamplingParams(seed=0, max_new_tokens=16))
    engine._encode([s])
    logits = engine.model.denoise(canvas, KVCache([s.cache]))[0]  # [C, V]
    return s, logits


def _close(a, b):
    return (a - b).abs().max().item() <= REL_TOL * a.abs().max().item()


@pytest.mark.parametrize("window,page_size", [(8, 16), (8, 4), (23, 4), (23, 5)])
def test_reused_prefix_gives_the_cold_logits(checkpoints, window, page_size):
    cold = Engine(_model(checkpoints[window], page_size))
    warm = Engine(_model(checkpoints[window], page_size), prefix_cache_bytes=1 << 24)
    a, b = _prompts()
    canvas = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    _encode_and_denoise(warm, a, canvas)  # fills the cache
    s_cold, want = _encode_and_denoise(cold, b, canvas)
    s_warm, got = _encode_and_denoise(warm, b, canvas)
    assert s_warm.metrics.cached_tokens == 45 // page_size * page_size > 0
    assert s_cold.metrics.cached_tokens == 0
    assert _close(want, got)
    # the stored keys/values of every layer match too (full layers: the whole prefix; sliding: the window)
    for layer in range(len(cold.model.layers)):
        (kc, vc), = KVCache([s_cold.cache]).layer_kv(layer)
        (kw, vw), = KVCache([s_warm.cache]).layer_kv(layer)
        assert kc.shape == kw.shape
        assert _close(kc, kw) and _close(vc, vw)


@pytest.mark.parametrize("window,page_size", [(8, 4), (23, 5)])
def test_multi_turn_outputs_equal_a_cold_run_token_for_token(checkpoints, window, page_size):
    """Turn 2 = turn 1's prompt + its answer + a new message; run batched with another request sharing the prefix."""
    def run(engine, prompts, seed):
        states = [engine.add_request(p, SamplingParams(seed=seed + i, max_new_tokens=32, ignore_eos=True))
                  for i, p in enumerate(prompts)]
        while engine.has_unfinished():
            engine.step()
        return [s.output_ids for s in states], [s.metrics.cached_tokens for s in states]

    a, b = _prompts(tails=(7, 12))
    outs = {}
    for name, nbytes in (("cold", 0), ("warm", 1 << 24)):
        eng = Engine(_model(checkpoints[window], page_size), prefix_cache_bytes=nbytes)
        t1, _ = run(eng, [a], 0)
        turn2 = a + t1[0] + [105, 7, 8, 9]
        outs[name] = run(eng, [turn2, b], 10)
    assert outs["cold"][0] == outs["warm"][0]
    assert outs["cold"][1] == [0, 0]
    cached = outs["warm"][1]
    assert cached[0] == len(a) // page_size * page_size and cached[1] == 45 // page_size * page_size


def test_a_block_is_keyed_by_its_whole_prefix(checkpoints):
    """Equal tokens after a different earlier block never hit; a hit always leaves one token to encode."""
    eng = Engine(_model(checkpoints[8], 4), prefix_cache_bytes=1 << 24)
    x = list(range(10, 30))
    eng._encode([eng.make_state(x, None)])
    y = [11] + x[1:]  # block 0 differs, blocks 1.. equal
    s = eng.make_state(y, None)
    eng._encode([s])
    assert s.metrics.cached_tokens == 0
    s = eng.make_state(x[:16], None)  # whole prompt cached: the last block is encoded again
    eng._encode([s])
    assert s.metrics.cached_tokens == 12
    pc = eng.prefix_cache
    assert pc.query_tokens == 20 + 20 + 16 and pc.hit_tokens == 12


def test_blocks_under_different_cache_salts_are_never_shared(checkpoints):
    eng = Engine(_model(checkpoints[8], 4), prefix_cache_bytes=1 << 24)
    x = list(range(10, 30))

    def cached(salt):
        s = eng.make_state(x, SamplingParams(seed=0, max_new_tokens=16, cache_salt=salt))
        eng._encode([s])
        return s.metrics.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0 and cached(None) == 0  # another salt, or none, sees nothing of tenant-a's
    assert cached("tenant-a") == 16 and cached("tenant-b") == 16 and cached(None) == 16  # each its own chain
    assert len(eng.prefix_cache) == 3 * 5  # three chains of the prompt's 5 whole blocks, none shared


def test_budget_bounds_blocks_and_evicts_least_recently_used(checkpoints):
    model = _model(checkpoints[8], 4)
    pool = model.kv_pool
    block_bytes = sum(pool.page_bytes(g) for g in pool.groups)
    eng = Engine(model, prefix_cache_bytes=5 * block_bytes + block_bytes // 2)  # room for 5 blocks
    pc = eng.prefix_cache
    assert pc.max_blocks == 5
    p1, p2 = list(range(10, 23)), list(range(100, 113))  # 3 whole blocks each
    for p in (p1, p2):
        s = eng.make_state(p, None)
        eng._encode([s])
        s.finish("abort")
        assert len(pc) <= 5 and pc.nbytes() <= pc.capacity_bytes
    # p1's deepest block went first (least recent, leaves before roots): p1 still hits 2 blocks, p2 all 3
    s = eng.make_state(p2, None)
    eng._encode([s])
    assert s.metrics.cached_tokens == 12
    s.finish("abort")
    s = eng.make_state(p1, None)
    eng._encode([s])
    assert s.metrics.cached_tokens == 8
    s.finish("abort")
    # with every request finished, the pool holds exactly the cache's pages; clear() returns them all
    assert all(pool.used_pages(g) == len(pc) for g in pool.groups)
    pc.clear()
    assert all(pool.used_pages(g) == 0 for g in pool.groups) and pool.nbytes() == 0


def test_no_pages_leak_and_shared_pages_outlive_eviction(checkpoints):
    model = _model(checkpoints[23], 4)
    pool = model.kv_pool
    eng = Engine(model, max_num_seqs=4, prefix_cache_bytes=1 << 24)
    a, b = _prompts()
    first = eng.add_request(a, SamplingParams(seed=0, max_new_tokens=16))
    eng.step()
    running = eng.add_request(b, SamplingParams(seed=1, max_new_tokens=48, ignore_eos=True))
    eng.step()
    assert running.metrics.cached_tokens == 44
    eng.prefix_cache.clear()  # the running request keeps the pages it shares
    while eng.has_unfinished():
        eng.step()
    assert first.finished and running.finished
    assert all(pool.used_pages(g) == 0 for g in pool.groups)


def test_deterministic_mode_does_not_reuse_prefixes(checkpoints):
    """Reuse changes encode shapes (so rounding); batch-invariant outputs must not depend on the cache state."""
    model = _model(checkpoints[8], 4)
    model.batch_invariant = True
    eng = Engine(model, prefix_cache_bytes=1 << 24)
    a, _ = _prompts()
    for _ in range(2):
        s = eng.make_state(a, None)
        eng._encode([s])
        assert s.metrics.cached_tokens == 0


def test_prefix_cache_bytes_is_validated(checkpoints):
    model = _model(checkpoints[8], 4)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="prefix_cache_bytes"):
            PrefixCache(model.kv_pool, bad)


def test_serve_refuses_a_negative_prefix_cache_budget(checkpoints, capsys):
    from blockdiff.cli import main as cli_main

    assert cli_main(["serve", checkpoints[8], "--prefix-cache-bytes", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--prefix-cache-bytes" in err


def test_an_engine_dropped_while_its_model_lives_returns_its_cache_pages(checkpoints):
    """Engines made again and again over one model (``LLM.from_model`` per job) each left their cached blocks'
    pages taken in the model's pool, so the pool only grew. Now a dropped engine's cache is cleared by the next
    engine over the model (under the model's lock, never from the garbage collector), and close() returns them
    at once."""
    import gc

    from blockdiff import LLM
    model = _model(checkpoints[8], 4)
    pool = model.kv_pool
    prompt = list(range(10, 23))  # 3 whole blocks
    for _ in range(3):
        llm = LLM.from_model(model, prefix_cache_bytes=1 << 24)
        llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(seed=0, max_new_tokens=4, max_denoising_steps=2))
        assert len(llm.engine.prefix_cache) == 3
        assert all(pool.used_pages(g) == 3 for g in pool.groups)  # only this engine's blocks: the last ones went
        del llm
        gc.collect()
    Engine(model)  # any engine over the model returns them (a new one, with no cache of its own)
    assert all(pool.used_pages(g) == 0 for g in pool.groups)
    llm = LLM.from_model(model, prefix_cache_bytes=1 << 24)
    llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(seed=0, max_new_tokens=4, max_denoising_steps=2))
    llm.close()
    assert len(llm.engine.prefix_cache) == 0 and all(pool.used_pages(g) == 0 for g in pool.groups)
