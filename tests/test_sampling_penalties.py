"""OpenAI's sampling knobs on the canvas sampler: temperature (0 = greedy, else a factor on t_max -> t_min),
presence / frequency / repetition penalties and logit_bias, in ``SamplingParams`` and the batched sampler."""

from __future__ import annotations

import pytest
import torch

from blockdiff import LLM, SamplingParams
from blockdiff.config import GenerationDefaults
from blockdiff.sampling.fields import ParamError
from blockdiff.sampling.penalties import Penalties
from test_sampling_options import C, V, _rows, _step  # one batched-step helper for both files


def test_penalties_change_exactly_the_documented_logits_and_leave_other_rows_alone():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, C, V, generator=g) * 2
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0, logit_bias={7: 3.0})
    pen = Penalties(p, prompt_ids=[1, 2], V=V, device="cpu")
    pen.commit([5, 5, 9])  # output so far: 5 twice, 9 once
    plain = _step(logits, _rows(3))
    got = _step(logits, _rows(3, penalty=[None, pen, None]))
    assert torch.equal(got.probs[0], plain.probs[0]) and torch.equal(got.probs[2], plain.probs[2])
    assert torch.equal(got.canvas[0], plain.canvas[0]) and torch.equal(got.canvas[2], plain.canvas[2])
    want = logits[1].clone()
    for t in (1, 2, 5, 9):  # seen (prompt + output): repetition penalty
        want[:, t] = torch.where(want[:, t] > 0, want[:, t] / 2.0, want[:, t] * 2.0)
    want[:, 5] -= 0.5 + 0.25 * 2  # presence + frequency x count (output tokens only)
    want[:, 9] -= 0.5 + 0.25
    want[:, 7] += 3.0  # logit_bias
    t = 0.4 + 0.4 * (4 / 4)  # step 0 of 4: t_max
    assert torch.allclose(got.probs[1], torch.softmax(want / t, -1), atol=1e-6)


def test_greedy_rows_take_the_argmax_others_still_draw():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, C, V, generator=g)  # flat: a draw is rarely the argmax
    got = _step(logits, _rows(2, greedy=[True, False]))
    assert bool(got.accepted.all())  # entropy bound 1e9: every position draws
    assert torch.equal(got.canvas[0], got.argmax[0])
    assert not torch.equal(got.canvas[1], got.argmax[1])


def test_an_all_greedy_batch_draws_nothing_and_steps_as_if_it_had(monkeypatch):
    from blockdiff.sampling.sampler import RowParams, default_step
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, C, V, generator=g)
    rows = _rows(2, greedy=[True, True], entropy_bound=[0.5, 2.0])  # some positions accepted, some renoised
    canvas = torch.zeros(2, C, dtype=torch.long)
    params = RowParams.build(rows, "cpu", C, V)
    assert params.all_greedy and not RowParams.build(_rows(2, greedy=[True, False]), "cpu", C, V).all_greedy
    drawing = RowParams.build(rows, "cpu", C, V)
    drawing.all_greedy = False  # the path that draws for every row, then keeps the argmax of greedy rows
    want = default_step(logits.clone(), canvas, drawing)
    searched = []
    real = torch.searchsorted
    monkeypatch.setattr(torch, "searchsorted", lambda *a, **k: searched.append(1) or real(*a, **k))
    got = default_step(logits.clone(), canvas, params)
    assert not searched  # no inverse-CDF draw over the vocabulary
    assert 0 < int(got.accepted.sum()) < 2 * C
    for f in ("canvas", "argmax", "accepted", "entropy", "probs", "mean_entropy", "confident"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f


def test_temperature_scales_the_schedule_and_is_validated():
    d = GenerationDefaults()
    r = SamplingParams(temperature=0.5).resolved(d)
    assert (r.t_max, r.t_min) == pytest.approx((d.t_max * 0.5, d.t_min * 0.5))
    assert SamplingParams(temperature=1).resolved(d).t_max == d.t_max
    g = SamplingParams(temperature=0).resolved(d)
    assert g.greedy and g.seed == 0 and g.t_max == d.t_max  # greedy: deterministic, schedule kept for acceptance
    for kw, param in [({"temperature": 1e-45}, "temperature"), ({"temperature": 2.5}, "temperature"),
                      ({"t_min": 0, "t_max": 1e-300}, "t_max"), ({"t_min": 0, "t_max": 1e-45}, "t_max"),
                      ({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
                      ({"repetition_penalty": 5e-324}, "repetition_penalty"), ({"t_max": 4.7e307}, "t_max"),
                      ({"logit_bias": {"5": 101}}, "logit_bias.5"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                      ({"rng": "reference", "presence_penalty": 0.5}, "presence_penalty"),
                      ({"rng": "reference", "temperature": 0.5}, "temperature"),
                      ({"structured_outputs": {"regex": "a"}, "frequency_penalty": 1}, "frequency_penalty"),
                      ({"max_tokens": 4, "max_new_tokens": 5}, "max_tokens")]:
        with pytest.raises(ParamError) as e:
            SamplingParams(**kw)
        assert e.value.param == param, (kw, e.value.param, str(e.value))
    with pytest.raises(ParamError) as e:  # 0.01 x t_max 8e-5 = 8e-7: under the floor once resolved
        SamplingParams(temperature=0.01, t_max=8e-5, t_min=0).resolved(d)
    assert e.value.param == "temperature"
    assert SamplingParams(max_tokens=7).max_new_tokens == 7


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, dtype=torch.float32)


BASE = dict(seed=5, max_new_tokens=32, ignore_eos=True, max_denoising_steps=4)


def test_neutral_values_leave_seeded_output_unchanged(llm):
    a = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(**BASE))[0]
    b = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(
        temperature=1.0, presence_penalty=0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias={}, **BASE))[0]
    assert a.token_ids == b.token_ids
    ref = dict(BASE, rng="reference")  # the reference sampler takes the neutral values too
    c = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(**ref))[0]
    d = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(
        temperature=1, presence_penalty=0, frequency_penalty=0, repetition_penalty=1, **ref))[0]
    assert c.token_ids == d.token_ids


def test_logit_bias_and_penalties_steer_generation(llm):
    forced = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(
        logit_bias={"300": 100}, **BASE))[0]
    assert set(forced.token_ids) == {300}
    banned = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(
        logit_bias={t: -100 for t in forced.token_ids[:1]}, **BASE))[0]
    assert 300 not in banned.token_ids
    # frequency penalty: the second canvas avoids tokens of the first (bias 100 fights a penalty of 2 x count)
    rep = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(
        logit_bias={"300": 5}, frequency_penalty=2.0, **BASE))[0]
    first, second = rep.token_ids[:16], rep.token_ids[16:]
    assert first.count(300) > second.count(300)


def test_greedy_is_deterministic_without_a_seed(llm):
    p = dict(max_new_tokens=16, ignore_eos=True, max_denoising_steps=4, temperature=0)
    outs = [llm.generate(prompt_token_ids=[[9, 8, 7]], sampling_params=SamplingParams(**p))[0].token_ids
            for _ in range(2)]
    assert outs[0] == outs[1]
