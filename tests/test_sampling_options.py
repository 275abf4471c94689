"""top_p / top_k / min_p truncation and output-token logprobs: what is cut, that unset rows stay bit-identical,
and that a reported logprob is the committed token's log-probability under its canvas's last tempered
distribution (the definition in docs/serving.md)."""

from __future__ import annotations

import re

import pytest
import torch

from blockdiff import LLM, SamplingParams
from blockdiff.sampling.fields import ParamError
from blockdiff.sampling.sampler import RowParams, default_step, temperature
from blockdiff.sampling.truncation import truncate

V, C = 64, 8


def _brute_keep(p: list[float], top_k, top_p, min_p) -> set[int]:
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep = set(order if top_k is None else order[:top_k])
    if min_p is not None:
        keep &= {i for i in range(len(p)) if p[i] >= min_p * max(p)}
    if top_p is not None and top_p < 1:
        total = sum(p[i] for i in keep)
        out, mass = set(), 0.0
        for i in order:
            if i in keep and mass < top_p * total:
                out.add(i)
                mass += p[i]
        keep = out
    return keep | {order[0]}


def test_truncate_keeps_exactly_the_documented_set():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(6, V, generator=g, dtype=torch.float64) * 3, -1)
    top_k = torch.tensor([V, 3, V, V, 5, 1])
    top_p = torch.tensor([1.0, 1.0, 0.5, 1.0, 0.8, 1.0], dtype=torch.float64)
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.2, 0.05, 0.0], dtype=torch.float64)
    out = truncate(probs, top_k, top_p, min_p)
    for r in range(6):
        k, tp, mp = int(top_k[r]), float(top_p[r]), float(min_p[r])
        want = _brute_keep(probs[r].tolist(), k, tp, mp)
        assert set((out[r] > 0).nonzero().view(-1).tolist()) == want, r
        assert torch.equal(out[r][out[r] > 0], probs[r][out[r] > 0])  # kept values untouched
    assert torch.equal(out[0], probs[0])  # a row that cuts nothing is bit-identical


def _rows(B, **over):
    base = dict(step=0, max_steps=4, t_min=0.4, t_max=0.8, entropy_bound=1e9, confidence=0.005, seed=0,
                canvas_index=0)
    return [dict(base, seed=b, **{k: v[b] for k, v in over.items()}) for b in range(B)]


def _step(logits, rows):
    canvas = torch.zeros(logits.shape[:2], dtype=torch.long)
    return default_step(logits.clone(), canvas, RowParams.build(rows, "cpu", C, V))


def test_draws_stay_inside_each_rows_cut_and_other_rows_are_untouched():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, C, V, generator=g) * 2
    plain = _step(logits, _rows(5))
    cut = _step(logits, _rows(5, top_k=[None, 1, 3, None, None], top_p=[None, None, None, 0.3, None],
                             min_p=[None, None, None, None, 0.5]))
    assert bool(plain.accepted.all()) and bool(cut.accepted.all())  # entropy bound 1e9: every position draws
    assert torch.equal(cut.canvas[0], plain.canvas[0])  # no cut: the same draw as without any truncation
    assert torch.equal(cut.probs, plain.probs) and torch.equal(cut.entropy, plain.entropy)  # whole distribution
    probs = plain.probs
    tok = cut.canvas
    assert torch.equal(tok[1], plain.argmax[1])  # top_k = 1 draws the argmax
    top3 = probs[2].topk(3, -1).indices
    assert bool((top3 == tok[2][:, None]).any(-1).all())
    p4 = probs[4].gather(-1, tok[4][:, None]).squeeze(-1)
    assert bool((p4 >= 0.5 * probs[4].max(-1).values).all())
    for c in range(C):  # top_p: the token lies in the smallest most-likely-first set reaching 0.3
        assert tok[3, c].item() in _brute_keep(probs[3, c].tolist(), None, 0.3, None)


def test_sampling_params_validate_truncation_and_logprobs():
    for kw, words in [({"top_p": 0}, "'top_p' must be > 0"), ({"top_p": 1.5}, "'top_p' must be <= 1"),
                      ({"top_k": -2}, "'top_k' must be >= -1"), ({"min_p": -0.1}, "'min_p' must be >= 0"),
                      ({"logprobs": 21}, "'logprobs' must be <= 20"),
                      ({"rng": "reference", "top_k": 4}, "no top_p, top_k or min_p"),
                      ({"rng": "reference", "min_p": 0.1}, "no top_p, top_k or min_p")]:
        with pytest.raises(ParamError, match=re.escape(words)) as e:
            SamplingParams(**kw)
        assert e.value.param == next(iter(kw if "rng" not in kw else set(kw) - {"rng"}))
    SamplingParams(rng="reference", top_p=1.0, min_p=0.0)  # neutral values cut nothing: reference stays exact


def test_structured_outputs_take_truncation_and_still_refuse_what_they_cannot_honour():
    so = {"structured_outputs": {"regex": "[a-z]+"}}
    p = SamplingParams(top_p=0.9, top_k=5, min_p=0.05, temperature=0.7, **so)  # was a ParamError naming top_p
    assert (p.top_p, p.top_k, p.min_p) == (0.9, 5, 0.05)
    SamplingParams(temperature=0, **so)
    for kw, words in [({"logprobs": 2}, "logprobs cannot be combined with structured_outputs"),
                      ({"presence_penalty": 0.5}, "presence_penalty cannot be combined with structured_outputs"),
                      ({"repetition_penalty": 1.2}, "repetition_penalty cannot be combined with structured_outputs"),
                      ({"logit_bias": {5: 1.0}}, "logit_bias cannot be combined with structured_outputs"),
                      ({"rng": "reference"}, "structured_outputs needs rng='default'")]:
        with pytest.raises(ParamError, match=re.escape(words)) as e:
            SamplingParams(**kw, **so)
        assert e.value.param == next(iter(set(kw) - {"rng"} or {"rng"})), (kw, e.value.param)
    # text infilling takes a cut too (was a ParamError naming the field); logprobs stay refused there
    for infill in ({"suffix": "end"}, {"text_template": "a <|hole|> b"}):
        p = SamplingParams(top_k=3, top_p=0.5, min_p=0.1, **infill)
        assert (p.top_k, p.top_p, p.min_p) == (3, 0.5, 0.1)
        with pytest.raises(ParamError, match=re.escape("logprobs cannot be combined with")) as e:
            SamplingParams(logprobs=1, **infill)
        assert e.value.param == "logprobs"


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, dtype=torch.float32)


def test_neutral_truncation_leaves_seeded_output_unchanged(llm):
    base = dict(seed=5, max_new_tokens=32, ignore_eos=True, max_denoising_steps=4)
    a = llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=SamplingParams(**base))[0]
    b = llm.generate(prompt_token_ids=[[5, 6, 7, 8]],
                     sampling_params=SamplingParams(top_p=1.0, min_p=0.0, **base))[0]
    assert a.token_ids == b.token_ids


def test_logprobs_are_the_last_steps_tempered_distribution_at_the_committed_tokens(llm, monkeypatch):
    model = llm.model
    seen = []
    orig = model.denoise

    def record(*a, **kw):
        out = orig(*a, **kw)
        seen.append(out.clone())  # the sampler overwrites the buffer in place
        return out

    monkeypatch.setattr(model, "denoise", record)
    N, k = 4, 3
    p = SamplingParams(seed=1, max_new_tokens=32, ignore_eos=True, max_denoising_steps=N, stability_threshold=10_000,
                       t_min=0.4, t_max=0.8, logprobs=k)
    out = llm.generate(prompt_token_ids=[[9, 10, 11]], sampling_params=p)[0]
    C = model.canvas_length
    assert len(out.logprobs) == len(out.token_ids) == 32 and len(seen) == 2 * N
    t = temperature(N - 1, N, 0.4, 0.8)
    for j, (tok, (lp, top)) in enumerate(zip(out.token_ids, out.logprobs)):
        logits = seen[(j // C) * N + N - 1][0, j % C]  # the canvas's last step
        want = torch.log_softmax(logits / t, -1)
        assert lp == pytest.approx(want[tok].item(), abs=1e-4)
        assert tok == int(want.argmax())  # committed = that distribution's argmax, so its logprob leads top
        assert [i for i, _ in top] == want.topk(k).indices.tolist()
        assert [x for _, x in top] == pytest.approx(want.topk(k).values.tolist(), abs=1e-4)
        assert top[0][1] == lp


@pytest.mark.parametrize("call, error, words", [
    (lambda llm: llm.generate("hi", {"max_new_tokens": 4}), TypeError, "must be a SamplingParams or a list"),
    (lambda llm: llm.generate("hi", 5), TypeError, "got int"),
    (lambda llm: llm.generate("hi", [SamplingParams(), 3]), TypeError, "the list holds a int"),
    (lambda llm: llm.generate(5, SamplingParams()), ValueError, "prompts must be a string or a list"),
    (lambda llm: llm.generate(prompt_token_ids=[2, 3, 4]), ValueError, "list of token-id lists"),
    (lambda llm: llm.generate("hi", on_event=5), TypeError, "on_event must be a callable"),
])
def test_generate_refuses_arguments_of_the_wrong_kind_before_running_anything(llm, call, error, words):
    before = llm.engine.stats["denoise_steps"]
    with pytest.raises(error, match=re.escape(words)):
        call(llm)
    assert llm.engine.stats["denoise_steps"] == before


@pytest.mark.parametrize("kw, words", [
    (dict(dtype=torch.int8), "dtype torch.int8 is not a compute dtype"),
    (dict(device="bogus"), "unknown device 'bogus'"),
])
def test_llm_refuses_a_dtype_or_device_it_cannot_compute_in_with_a_value_error(tiny_checkpoint, kw, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        LLM(tiny_checkpoint, **kw)


@pytest.mark.parametrize("load", ["LLM", "load_model"])
def test_a_device_this_machine_lacks_is_a_value_error_before_the_load(tiny_checkpoint, monkeypatch, load):
    """device='cuda' without CUDA (or an index past the devices) is one ValueError naming the device, as the CLI's
    --device is, not torch's AssertionError from inside the load."""
    from blockdiff import load_model

    fn = LLM if load == "LLM" else load_model
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=re.escape("device 'cuda': CUDA is not available on this machine")):
        fn(tiny_checkpoint, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=re.escape("device 'cuda:3': this machine has 1 cuda device(s)")):
        fn(tiny_checkpoint, device="cuda:3")
