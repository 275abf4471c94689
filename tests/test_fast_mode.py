"""Fast mode (approximate): the partial denoise pass is exact where nothing changed, the engine computes fewer
positions, requests that need exact distributions stay exact, and exact mode is untouched."""

from __future__ import annotations

import pytest
import torch

from blockdiff.engine.engine import Engine
from blockdiff.kv_cache import KVCache
from blockdiff.model.fast_denoise import denoise_active, empty_store
from blockdiff.sampling.params import SamplingParams


def _prefixed(model, seed=0, B=2):
    g = torch.Generator().manual_seed(seed)
    V, C = model.vocab_size, model.canvas_length
    cache = model.new_cache(B)
    model.encode(torch.randint(0, V, (B, 5), generator=g), cache)
    canvas = torch.randint(0, V, (B, C), generator=g)
    soft = torch.randn(B, C, model.text.hidden_size, generator=g)
    return cache, canvas, soft


@torch.no_grad()
def test_every_position_active_is_the_exact_denoise(tiny_model):
    cache, canvas, soft = _prefixed(tiny_model)
    B, C = canvas.shape
    want = tiny_model.denoise(canvas, cache, self_conditioning_embeds=soft)
    index = torch.arange(C).expand(B, C)
    store = empty_store(tiny_model, B, C)
    got = denoise_active(tiny_model, canvas, index, torch.ones(B, C, dtype=torch.bool), soft, cache, store,
                         torch.zeros(B, C, dtype=torch.bool))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_reused_keys_values_are_exact_when_the_canvas_did_not_change(tiny_model):
    """A full pass fills the store; recomputing a subset (padded rows of different lengths) against it gives the
    full pass's logits at those positions: the approximation is only ever the staleness of changed inputs."""
    cache, canvas, soft = _prefixed(tiny_model, seed=1)
    B, C = canvas.shape
    full = torch.arange(C).expand(B, C)
    store = empty_store(tiny_model, B, C)
    want = denoise_active(tiny_model, canvas, full, torch.ones(B, C, dtype=torch.bool), soft, cache, store,
                          torch.zeros(B, C, dtype=torch.bool))
    index = torch.tensor([[3, 7, 8, 15], [0, 5, 5, 5]])  # row 1: one real position, padded with repeats
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    store_valid = torch.ones(B, C, dtype=torch.bool).scatter_(1, index, False)
    got = denoise_active(tiny_model, canvas.gather(1, index), index, valid,
                         soft.gather(1, index[..., None].expand(-1, -1, soft.shape[-1])), cache, store, store_valid)
    for b in range(B):
        n = int(valid[b].sum())
        torch.testing.assert_close(got[b, :n], want[b, index[b, :n]], rtol=1e-4, atol=1e-4)
    # ... and a stale store changes them (the check can fail): zero the stored keys/values
    for k, v in store:
        k.zero_()
        v.zero_()
    off = denoise_active(tiny_model, canvas.gather(1, index), index, valid, None, cache, store, store_valid)
    assert not torch.allclose(off[0], want[0, index[0]], atol=1e-3)


def _sudoku_llm():
    from blockdiff.engine.llm import LLM
    from blockdiff.sudoku.solver import BUNDLED_MODEL
    return LLM(BUNDLED_MODEL, dtype="float32")


@pytest.fixture(scope="module")
def sudoku():
    from blockdiff.sudoku.eval import held_out
    return _sudoku_llm(), held_out(6, 1000, bands=(">=40",))[">=40"]


def test_fast_mode_solves_easy_sudokus_computing_fewer_positions(sudoku):
    from blockdiff.sudoku.puzzles import is_valid_solution
    from blockdiff.sudoku.solver import solve_diffusion

    llm, pairs = sudoku
    stats = llm.engine.stats
    stats.pop("fast_positions", None)
    stats.pop("fast_canvas_positions", None)
    sols = solve_diffusion(llm, [p for p, _ in pairs], seed=0, fast=True)
    assert sum(is_valid_solution(p, s.grid) for (p, _), s in zip(pairs, sols)) >= 5
    assert 0 < stats["fast_positions"] < 0.9 * stats["fast_canvas_positions"]


def test_exact_mode_is_the_default_and_untouched_by_fast_requests(sudoku):
    from blockdiff.sudoku.solver import solve_diffusion

    llm, pairs = sudoku
    puzzles = [p for p, _ in pairs[:3]]
    before = llm.engine.stats.get("fast_positions", 0)
    a = [s.grid for s in solve_diffusion(llm, puzzles, seed=4)]
    assert llm.engine.stats.get("fast_positions", 0) == before  # nothing ran in fast mode
    assert [s.grid for s in solve_diffusion(llm, puzzles, seed=4, fast=False)] == a


def test_engine_default_applies_to_requests_that_do_not_say(tiny_model):
    eng = Engine(tiny_model, fast=True)
    assert eng.make_state([2, 3], SamplingParams(max_new_tokens=4)).params.fast is True
    assert eng.make_state([2, 3], SamplingParams(max_new_tokens=4, fast=False)).params.fast is False
    assert Engine(tiny_model).make_state([2, 3], SamplingParams(max_new_tokens=4)).params.fast is False


def test_rows_that_need_exact_distributions_run_exact_in_fast_mode(tiny_model):
    """rng="reference" and logprobs rows asking for fast are computed exactly: same tokens as exact."""
    def run(**kw):
        eng = Engine(tiny_model)
        s = eng.add_request([2, 3, 4], SamplingParams(max_new_tokens=20, seed=5, ignore_eos=True, **kw))
        while eng.has_unfinished():
            eng.step()
        return s.output_ids, eng.stats.get("fast_positions", 0)

    for kw in ({"rng": "reference"}, {"logprobs": 1}):
        exact, _ = run(**kw)
        fast, computed = run(fast=True, **kw)
        assert fast == exact and computed == 0
    _, computed = run(fast=True)  # a plain request does run fast
    assert computed > 0


def test_greedy_requests_run_fast_mode_without_drawing(tiny_model, monkeypatch):
    """temperature 0 in fast mode: a tick of only greedy rows draws nothing (no inverse-CDF search: the argmax is
    the token) and takes the argmax, as the drawing path would; a greedy row beside one that draws runs too."""
    import blockdiff.sampling.sampler as sampler

    def run(*temps):
        eng = Engine(tiny_model)
        ss = [eng.add_request([2, 3, 4], SamplingParams(max_new_tokens=20, seed=5 + i, ignore_eos=True, fast=True,
                                                        temperature=t)) for i, t in enumerate(temps)]
        while eng.has_unfinished():
            eng.step()
        assert eng.stats.get("fast_positions", 0) > 0 and all(s.finish_reason == "length" for s in ss)
        return [s.output_ids for s in ss]

    searched = []
    real = torch.searchsorted
    monkeypatch.setattr(torch, "searchsorted", lambda *a, **k: searched.append(1) or real(*a, **k))
    alone = run(0)[0]
    assert not searched and len(alone) == 20
    build = sampler.RowParams.build

    def drawing(*a, **k):  # the path that draws for every row, then keeps the argmax of the greedy ones
        p = build(*a, **k)
        p.all_greedy = False
        return p
    monkeypatch.setattr(sampler.RowParams, "build", drawing)  # (the class engine/fast.py builds from too)
    assert run(0)[0] == alone and searched  # same tokens with the draw done and discarded
    mixed = run(0, 1.0)  # one tick, a greedy row and a drawing one
    assert [len(x) for x in mixed] == [20, 20]


def test_fast_must_be_a_boolean():
    with pytest.raises(ValueError, match="'fast' must be a boolean"):
        SamplingParams(fast="yes")


def test_request_field_fast_reaches_the_sampling_params():
    from pydantic import ValidationError

    from blockdiff.server.protocol import CompletionRequest

    assert CompletionRequest(model="m", prompt="hi", fast=True).to_params().fast is True
    assert CompletionRequest(model="m", prompt="hi").to_params().fast is None  # the server's default decides
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="hi", fast="sometimes")


def test_serve_fast_flag_sets_the_engine_default():
    import argparse

    from blockdiff.server.cli import register

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers())
    assert ap.parse_args(["serve", "m", "--fast"]).fast is True
    assert ap.parse_args(["serve", "m"]).fast is False


def test_a_fully_fixed_canvas_runs_in_fast_mode(tiny_model):
    """Every position a template token: fast mode still runs it (a whole-canvas refresh every REFRESH-th step, one
    position on the steps between) and the request finishes with the template."""
    from blockdiff.engine.fast import REFRESH
    C = tiny_model.canvas_length
    eng = Engine(tiny_model)
    s = eng.add_request([2, 3], SamplingParams(max_new_tokens=C, seed=1, fast=True, canvas_template=[7] * C,
                                               max_denoising_steps=5, stability_threshold=10))
    while eng.has_unfinished():
        eng.step()
    assert s.output_ids == [7] * C and s.metrics.denoise_steps == 5
    refreshes = len(range(0, 5, REFRESH))
    assert eng.stats["fast_canvas_positions"] == 5 * C
    assert eng.stats["fast_positions"] == refreshes * C + (5 - refreshes)


def test_a_failure_in_one_fast_request_ends_it_alone(tiny_checkpoint, monkeypatch):
    """The engine rule holds in fast mode too: a request whose sampler row fails inside a fast tick, or whose
    logits turn non-finite there, ends alone with finish_reason "error" while its neighbours finish."""
    from blockdiff import LLM
    from blockdiff.engine.model_state import ModelState

    llm = LLM(tiny_checkpoint, dtype="float32")
    prompts = ["<bos>first prompt", "<bos>the bad one", "<bos>third prompt", "<bos>the nan one"]
    real_row = ModelState.sampler_row

    def sampler_row(self):
        if self.request_index == 1 and self.step == 2:
            raise RuntimeError("injected sampler failure")
        return real_row(self)
    monkeypatch.setattr(ModelState, "sampler_row", sampler_row)
    from blockdiff.engine import fast as fast_mod
    real_active, real_make_state, victim = fast_mod.denoise_active, llm.engine.make_state, {}

    def make_state(*a, **k):
        s = real_make_state(*a, **k)
        if s.request_index == 3:
            victim["cache"] = s.cache
        return s

    def denoise_active(model, ids, index, valid, soft, cache, *a):
        out = real_active(model, ids, index, valid, soft, cache, *a)
        for b, seq in enumerate(cache.seqs):
            if seq is victim.get("cache"):
                out[b, 0] = float("nan")  # one position of one row, as an overflow would
        return out
    monkeypatch.setattr(llm.engine, "make_state", make_state)
    monkeypatch.setattr(fast_mod, "denoise_active", denoise_active)
    ps = [SamplingParams(max_new_tokens=20, seed=i, max_denoising_steps=4, ignore_eos=True, fast=True)
          for i in range(4)]
    outs = llm.generate(prompts, ps)
    assert outs[1].finish_reason == "error" and "injected sampler failure" in outs[1].error
    assert outs[3].finish_reason == "error" and "not finite" in outs[3].error, outs[3]
    for i in (0, 2):
        assert outs[i].finish_reason == "length" and outs[i].error is None and len(outs[i].token_ids) == 20
