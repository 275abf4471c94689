"""One request's failure stays its own (the engine rule): a failure injected into ONE request of a batch, at each
place that is that request's own work inside a tick — its prompt's encode, its image, its sampler row, its
structured-output constraint, its stop check, its non-finite logits, its detokenizer — ends that request alone
with ``finish_reason="error"`` and a one-line message, while its neighbours in the same batch finish normally and,
in deterministic mode, bit-identically to a run without the bad request."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from blockdiff import LLM, SamplingParams
from blockdiff.engine import engine as engine_mod
from blockdiff.engine.model_state import ModelState
from blockdiff.structured import CanvasConstraint
from fixtures import TINY_VISION_CONFIGS, make_checkpoint

BAD = 1  # the request_index of the request that fails
PROMPTS = ["<bos>first prompt", "<bos>the bad one", "<bos>third, longer prompt here", "<bos>4"]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, dtype="float32", deterministic=True)


def params(i: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=40, seed=100 + i, max_denoising_steps=4, ignore_eos=True, **kw)


def baseline(llm) -> dict:
    """The neighbours run without the bad request."""
    good = [i for i in range(len(PROMPTS)) if i != BAD]
    outs = llm.generate([PROMPTS[i] for i in good], [params(i) for i in good])
    return {i: o for i, o in zip(good, outs)}


def check(outs, base: dict, words: str) -> None:
    bad = outs[BAD]
    assert bad.finish_reason == "error", bad
    assert words in bad.error and "\n" not in bad.error and len(bad.error) <= 300, bad.error
    for i, o in enumerate(outs):
        if i != BAD:
            assert o.finish_reason == "length" and o.error is None
            assert o.token_ids == base[i].token_ids and o.text == base[i].text


def bad_state(s: ModelState) -> bool:
    return s.request_index == BAD


def test_a_failing_sampler_row_ends_only_its_request(llm, monkeypatch):
    base = baseline(llm)
    real = ModelState.sampler_row

    def sampler_row(self):
        if bad_state(self) and self.step == 2:
            raise RuntimeError("injected sampler failure")
        return real(self)
    monkeypatch.setattr(ModelState, "sampler_row", sampler_row)
    outs = llm.generate(PROMPTS, [params(i) for i in range(len(PROMPTS))])
    check(outs, base, "its sampler settings failed: RuntimeError: injected sampler failure")


def test_a_failing_constraint_ends_only_its_request_and_hides_the_parser_state(llm, monkeypatch):
    base = baseline(llm)
    real = CanvasConstraint.step

    def step(self, logits, step, *a, **k):
        if step == 1:
            raise RuntimeError("grammar matcher failed: NoExtensionBias\n<state>\nTokens: secret schema part\n")
        return real(self, logits, step, *a, **k)
    monkeypatch.setattr(CanvasConstraint, "step", step)
    ps = [SamplingParams(max_new_tokens=40, seed=100 + i, max_denoising_steps=4,
                         structured_outputs={"regex": "[a-z ]+"}) if i == BAD else params(i)
          for i in range(len(PROMPTS))]
    outs = llm.generate(PROMPTS, ps)
    check(outs, base, "its structured output constraint failed: RuntimeError: grammar matcher failed")
    assert "secret" not in outs[BAD].error and "<state>" not in outs[BAD].error


def fail_stop_checks_on_boom(monkeypatch) -> None:
    """Requests whose stop strings hold "BOOM" get a stop check that raises (the others keep the real one)."""
    real = engine_mod.Engine._stop_checker

    def stop_checker(self, stops):
        if "BOOM" not in stops:
            return real(self, stops)

        def check(ids):
            raise ValueError("injected stop-check failure")
        return check
    monkeypatch.setattr(engine_mod.Engine, "_stop_checker", stop_checker)


def test_a_failing_stop_check_ends_only_its_request(llm, monkeypatch):
    base = baseline(llm)
    fail_stop_checks_on_boom(monkeypatch)
    ps = [params(i, stop=["BOOM"]) if i == BAD else params(i) for i in range(len(PROMPTS))]
    outs = llm.generate(PROMPTS, ps)
    check(outs, base, "ValueError: injected stop-check failure")


def test_non_finite_logits_end_only_their_request_never_a_success(llm, monkeypatch):
    base = baseline(llm)
    model = llm.model
    real = type(model).denoise
    victim = {}

    def make_state(*a, **k):
        s = real_make_state(*a, **k)
        if s.request_index == BAD:
            victim["cache"] = s.cache
        return s

    def denoise(self, canvas, cache, *a, **k):
        out = real(self, canvas, cache, *a, **k)
        for b, seq in enumerate(cache.seqs):
            if seq is victim.get("cache"):
                out[b, 3] = float("nan")  # one position of one row, as an overflow would
        return out
    real_make_state = llm.engine.make_state
    monkeypatch.setattr(llm.engine, "make_state", make_state)
    monkeypatch.setattr(type(model), "denoise", denoise)
    outs = llm.generate(PROMPTS, [params(i) for i in range(len(PROMPTS))])
    check(outs, base, "not finite (NaN or infinity) at denoising step 1")
    assert outs[BAD].token_ids == []


def test_non_finite_logits_in_the_batched_default_mode_end_only_their_request(tiny_checkpoint, monkeypatch):
    """The batched path (one forward, one sampler call for all rows): the per-row finite flag rides the tick's one
    readback."""
    fast = LLM(tiny_checkpoint, dtype="float32")
    model = fast.model
    real = type(model).denoise
    calls = []

    def denoise(self, canvas, cache, *a, **k):
        out = real(self, canvas, cache, *a, **k)
        calls.append(canvas.shape[0])
        if canvas.shape[0] == len(PROMPTS):
            out[BAD] = float("inf")
        return out
    monkeypatch.setattr(type(model), "denoise", denoise)
    outs = fast.generate(PROMPTS, [params(i) for i in range(len(PROMPTS))])
    assert calls[0] == len(PROMPTS)  # one batched forward
    # its row sits wherever the engine put it: exactly one request failed, with the message, and the others ran
    failed = [o for o in outs if o.finish_reason == "error"]
    assert len(failed) == 1 and "not finite" in failed[0].error
    assert all(o.finish_reason == "length" and len(o.token_ids) == 40 for o in outs if o is not failed[0])


def test_a_failing_batched_encode_is_retried_row_by_row(tiny_checkpoint, monkeypatch):
    fast = LLM(tiny_checkpoint, dtype="float32")
    model = fast.model
    real = type(model).encode
    bad_len = len(fast.tokenizer.encode(PROMPTS[BAD][5:])) + 1

    def encode(self, ids, cache, lengths=None, **k):
        n = lengths if lengths is not None else [ids.shape[1]] * ids.shape[0]
        if bad_len in n and all(c.length == 0 for c in cache.seqs):  # the prompt encode holding the bad prompt
            raise RuntimeError("injected encode failure")
        return real(self, ids, cache, lengths, **k)
    monkeypatch.setattr(type(model), "encode", encode)
    outs = fast.generate(PROMPTS, [params(i) for i in range(len(PROMPTS))])
    assert [o.finish_reason for o in outs] == ["length", "error", "length", "length"]
    assert "encoding failed: RuntimeError: injected encode failure" in outs[BAD].error


def test_a_failing_detokenizer_ends_only_its_output(llm, monkeypatch):
    base = baseline(llm)
    real = llm._decode
    states = {}
    real_make_state = llm.engine.make_state

    def make_state(*a, **k):
        s = real_make_state(*a, **k)
        states[s.request_index] = s
        return s

    def decode(ids):
        if ids is states[BAD].output_ids:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real(ids)
    monkeypatch.setattr(llm.engine, "make_state", make_state)
    monkeypatch.setattr(llm, "_decode", decode)
    outs = llm.generate(PROMPTS, [params(i) for i in range(len(PROMPTS))])
    check(outs, base, "detokenizing its output failed: UnicodeDecodeError")


def test_a_failing_image_ends_only_its_request(tmp_path, monkeypatch):
    path = make_checkpoint(tmp_path / "mm", vision=TINY_VISION_CONFIGS["patch8_pool2_clipped"], seed=3)
    mm = LLM(path, dtype="float32", deterministic=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8), "RGB")
    prompts = list(PROMPTS)
    prompts[BAD] = {"prompt": "<bos>see <|image|>", "multi_modal_data": {"image": img}}
    good = [i for i in range(len(prompts)) if i != BAD]
    base = dict(zip(good, mm.generate([prompts[i] for i in good], [params(i) for i in good])))

    def broken(*a, **k):
        raise RuntimeError("injected vision failure")
    monkeypatch.setattr(mm.model.vision, "image_features", broken)
    outs = mm.generate(prompts, [params(i) for i in range(len(prompts))])
    check(outs, base, "encoding its prompt: RuntimeError: injected vision failure")


def test_row_params_failure_is_found_row_by_row_in_the_batched_sampler(tiny_checkpoint, monkeypatch):
    fast = LLM(tiny_checkpoint, dtype="float32")
    real = engine_mod.RowParams.build

    def build(rows, *a, **k):
        if any(r["seed"] == 101 and r["step"] == 1 for r in rows):
            raise OverflowError("injected: a value the device cannot hold")
        return real(rows, *a, **k)
    monkeypatch.setattr(engine_mod.RowParams, "build", build)
    outs = fast.generate(PROMPTS, [params(i) for i in range(len(PROMPTS))])
    assert [o.finish_reason for o in outs] == ["length", "error", "length", "length"]
    assert "its sampler settings failed: OverflowError" in outs[BAD].error


@pytest.mark.parametrize("t_max", [1e-300, 1e-45])
def test_a_temperature_that_underflows_is_refused_up_front(t_max):
    """The issue's reproducer (a temperature whose logits / t overflow to garbage) is refused where the parameters
    are checked, naming the field; a non-finite row that still reaches the sampler ends alone (tested above with
    non-finite logits), never as all-pad tokens."""
    from blockdiff.sampling.fields import ParamError
    with pytest.raises(ParamError, match="'t_max' must be >= 1e-06") as e:
        SamplingParams(max_new_tokens=16, seed=1, t_min=0, t_max=t_max, max_denoising_steps=3)
    assert e.value.param == "t_max"


@pytest.mark.parametrize("fail_at_layer", [0, 1])
def test_a_batched_encode_failing_after_it_overwrote_sliding_keys_never_runs_on_with_them(tiny_checkpoint,
                                                                                        monkeypatch, fail_at_layer):
    """A batched commit encode that raises: before any write (layer 0) each row is run again alone and goes on;
    after layer 0 wrote its sliding-window ring, which wraps onto positions each row still reads, running a row
    again would read the failed call's keys there: those rows fail, and never finish as a success with the
    tokens of a wrong cache."""
    from blockdiff.kv_cache import CacheBatch
    fast = LLM(tiny_checkpoint, dtype="float32")
    ps = [params(i) for i in range(len(PROMPTS))]
    base = fast.generate(PROMPTS, ps)
    real = CacheBatch.write
    raised = []

    def write(self, layer, k, v):
        if layer == fail_at_layer and not raised and len(self.lengths) > 1 and min(self.lengths) > 0:
            raised.append(list(self.lengths))  # the first batched commit encode
            raise RuntimeError("injected mid-encode failure")
        return real(self, layer, k, v)
    monkeypatch.setattr(CacheBatch, "write", write)
    outs = fast.generate(PROMPTS, ps)
    assert raised and len(raised[0]) == len(PROMPTS)
    if fail_at_layer == 0:
        assert [o.finish_reason for o in outs] == ["length"] * len(PROMPTS)
        return
    for o, b in zip(outs, base):
        assert o.finish_reason == "error", (o.token_ids, b.token_ids)
        assert "overwriting its sliding-window keys/values): RuntimeError: injected mid-encode failure" in o.error


def test_overwrites_visible_matches_the_ring_slots_an_encode_writes():
    """The rule the engine uses above, against the slots themselves: positions a query after ``length`` sees, and
    the slots of the last ring's worth of new positions (the ones an encode writes)."""
    from blockdiff.config import FULL, SLIDING, LayerSpec
    from blockdiff.kv_cache import KVPool
    for window, page in [(8, 16), (8, 4), (17, 4), (1, 4), (5, 1)]:
        pool = KVPool([LayerSpec(SLIDING, 4, 1, True, window)], page_size=page)
        g = pool.group_of[0]
        R = pool.ring_pages(g) * page
        for length in range(0, 40):
            for n in range(1, 40):
                seen = {p % R for p in range(length - pool.visible(g, length), length)} if R else set()
                written = {q % R for q in range(max(length, length + n - R), length + n)} if R else set()
                assert pool.overwrites_visible(g, length, n) == bool(seen & written), (window, page, length, n)
    full = KVPool([LayerSpec(FULL, 4, 1, True, None)], page_size=4)
    assert not full.overwrites_visible(None, 100, 1000)


def test_a_late_stop_string_is_found_in_a_few_decodes_not_one_per_output_token(tiny_checkpoint):
    """The stop check runs on the engine thread, so its cost is every request's wait: where a stop string first
    shows up in a long output, the cut is found by bisecting the last canvas (a few decodes), and it is the cut
    of the shortest prefix holding the stop string, as decoding every prefix finds it."""
    import random
    from types import SimpleNamespace

    from blockdiff.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tiny_checkpoint)
    decodes = []

    class Counting:
        def decode(self, ids):
            decodes.append(len(ids))
            return tok.decode(ids)
    rng = random.Random(0)
    C = 16
    for stops in (["ZQ"], ["the", "ZQXJ"], ["a b"]):
        for trial in range(10):
            ids = [rng.randrange(3, 400) for _ in range(rng.randrange(C, 40 * C))] + tok.encode(stops[-1])
            ids += [rng.randrange(3, 400) for _ in range(C)]
            want = next(k for k in range(1, len(ids) + 1) if any(s in tok.decode(ids[:k]) for s in stops))
            check = engine_mod.Engine._stop_checker(SimpleNamespace(tokenizer=Counting()), stops)
            for end in range(C, len(ids) + C, C):  # one call per committed canvas, as ModelState makes them
                decodes.clear()
                cut = check(ids[:end])
                if cut is not None:
                    break
                assert len(decodes) == 1
            assert cut == want, (stops, trial)
            assert len(decodes) <= 2 + (C - 1).bit_length()  # not one decode per token of the output
