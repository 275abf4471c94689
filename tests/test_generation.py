"""Generation: reference-exact mode equals the transformers oracle token for token; default mode keeps the
reference's distribution; the ModelState lifecycle; SamplingParams validation; stop conditions."""

import collections

import pytest
import torch
import json
import os
import shutil

from fixtures import load_oracle, make_checkpoint, oracle_generate

from blockdiff import LLM, SamplingParams
from blockdiff.engine.model_state import InvalidTransition, ModelState, Phase
from blockdiff.sampling.sampler import RowParams, default_step, reference_entropy, reference_step

EOS = {1, 106, 50}


def _prompt(seed, n, vocab=512):
    g = torch.Generator().manual_seed(10_000 + seed)
    # Avoid EOS ids in prompts so the test is about generated tokens.
    ids = torch.randint(5, vocab, (n,), generator=g).tolist()
    return [t if t not in EOS else 7 for t in ids]


@pytest.fixture(scope="module")
def early_stop_checkpoint(tmp_path_factory):
    """A window shorter than the prompt, 3 experts of 6, a cold schedule, an entropy bound that accepts every
    position and a confidence threshold every step satisfies: the canvas iterates to a fixed point, so canvases
    end by the stability rule long before the step cap."""
    return make_checkpoint(tmp_path_factory.mktemp("early"), seed=3,
                           text_overrides=dict(num_experts=6, top_k_experts=3, sliding_window=6),
                           generation_config=dict(confidence_threshold=1e9, max_denoising_steps=24, t_max=0.05,
                                                  t_min=0.01, stability_threshold=2,
                                                  sampler_config={"_cls_name": "EntropyBoundSamplerConfig",
                                                                  "entropy_bound": 50.0}))


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, dtype="float32")


# ------------------------------------------------------------------------------ reference-exact mode
@pytest.mark.parametrize("seed,prompt_len,n", [(0, 5, 40), (1, 21, 16), (2, 9, 37), (3, 1, 3), (4, 12, 33)])
def test_reference_mode_equals_oracle_at_step_cap(tiny_checkpoint, llm, seed, prompt_len, n):
    prompt = _prompt(seed, prompt_len)
    expected = oracle_generate(tiny_checkpoint, prompt, seed, n)
    out = llm.generate(prompt_token_ids=[prompt],
                       sampling_params=SamplingParams(max_new_tokens=n, seed=seed, rng="reference"))[0]
    assert out.token_ids == expected
    assert out.metrics.denoise_steps == 48 * out.metrics.canvases  # random weights never converge


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_reference_mode_equals_oracle_with_early_stops(early_stop_checkpoint, seed):
    llm = LLM(early_stop_checkpoint, dtype="float32")
    prompt = _prompt(seed, 14)
    n = 45  # three canvases of 16, the last cut
    expected = oracle_generate(early_stop_checkpoint, prompt, seed, n)
    out = llm.generate(prompt_token_ids=[prompt],
                       sampling_params=SamplingParams(max_new_tokens=n, seed=seed, rng="reference"))[0]
    assert out.token_ids == expected
    assert out.metrics.denoise_steps < 24 * out.metrics.canvases  # canvases ended early


def test_reference_mode_stops_at_eos_like_the_oracle(tiny_checkpoint, llm):
    # Find seeds where the oracle stops on an EOS id inside the budget, and check those too.
    hits = 0
    for seed in range(12):
        prompt = _prompt(seed, 6)
        expected = oracle_generate(tiny_checkpoint, prompt, seed, 64)
        if not (expected and expected[-1] in EOS):
            continue
        out = llm.generate(prompt_token_ids=[prompt],
                           sampling_params=SamplingParams(max_new_tokens=64, seed=seed, rng="reference"))[0]
        assert out.token_ids == expected
        assert out.finish_reason == "stop"
        hits += 1
    assert hits >= 1, "no seed produced an EOS; pick a different checkpoint seed"


# Settings the fixed checkpoints above never use, each generation compared with the oracle's token for token.
VARIANTS = {
    # exact GeLU + attention biases (encoder's own) + YaRN on an odd canvas of 7; stability 0 (confidence alone
    # stops a canvas), t_min 0, one EOS id as an int, no pad id
    "gelu_bias_yarn_canvas7": (dict(hidden_activation="gelu", attention_bias=True, rope_parameters={
        "sliding_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10_000.0,
                              "original_max_position_embeddings": 64},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 10_000.0}}),
        7, dict(stability_threshold=0, confidence_threshold=0.5, t_min=0.0, t_max=0.3, max_denoising_steps=7,
                eos_token_id=7, pad_token_id=None,
                sampler_config={"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 2.5})),
    # window 3 < canvas 16 < prompt; all layers sliding but the forced last one; stability over 3 steps
    "window3_canvas16": (dict(sliding_window=3, layer_types=["sliding_attention"] * 4, hidden_activation="silu"),
                         16, dict(eos_token_id=[3, 9], stability_threshold=3, confidence_threshold=100.0,
                                  max_denoising_steps=9)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_reference_mode_equals_oracle_on_other_model_and_sampler_settings(tmp_path, name):
    text, canvas, gen = VARIANTS[name]
    path = make_checkpoint(tmp_path / name, text_overrides=text, canvas_length=canvas, generation_config=gen,
                           with_tokenizer=False, seed=1)
    llm = LLM(path, dtype="float32")
    for seed in (0, 1):
        prompt = _prompt(seed, 21)
        expected = oracle_generate(path, prompt, seed, 40)
        out = llm.generate(prompt_token_ids=[prompt],
                           sampling_params=SamplingParams(max_new_tokens=40, seed=seed, rng="reference"))[0]
        assert out.token_ids == expected


# Sampler settings at the edges of their ranges, each run as the oracle's generate(**settings) token for token.
EDGE_SETTINGS = {
    "one_step": dict(max_denoising_steps=1),
    "confidence_alone_stops_at_the_first_step": dict(max_denoising_steps=6, stability_threshold=0,
                                                     confidence_threshold=1e9),
    "stability_past_the_step_cap": dict(max_denoising_steps=6, stability_threshold=100, confidence_threshold=1e9),
    "cold_to_zero_stops_on_stability": dict(max_denoising_steps=12, stability_threshold=1, confidence_threshold=1e9,
                                            t_min=0.0, t_max=0.05),
    "tiny_entropy_bound": dict(max_denoising_steps=6, entropy_bound=1e-9),
    "huge_entropy_bound": dict(max_denoising_steps=6, entropy_bound=1e9),
    "t_max_1_t_min_0": dict(max_denoising_steps=6, t_min=0.0, t_max=1.0),
    "hot": dict(max_denoising_steps=6, t_min=5.0, t_max=100.0),
}


@pytest.mark.parametrize("name", list(EDGE_SETTINGS))
def test_reference_mode_equals_oracle_at_the_edges_of_the_sampler_settings(tiny_checkpoint, llm, name):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    settings = EDGE_SETTINGS[name]
    oracle_kw = {k: v for k, v in settings.items() if k != "entropy_bound"}
    if "entropy_bound" in settings:
        oracle_kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=settings["entropy_bound"])
    steps = []
    for seed, prompt_len, n in [(0, 7, 40), (1, 1, 19)]:
        prompt = _prompt(seed, prompt_len)
        expected = oracle_generate(tiny_checkpoint, prompt, seed, n, **oracle_kw)
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
            max_new_tokens=n, seed=seed, rng="reference", **settings))[0]
        assert out.token_ids == expected
        steps.append(out.metrics.denoise_steps / out.metrics.canvases)
    cap = settings["max_denoising_steps"]
    if name == "confidence_alone_stops_at_the_first_step":
        assert steps == [1, 1]
    elif name == "cold_to_zero_stops_on_stability":
        assert min(steps) < cap  # the stability rule ended canvases
    else:
        assert steps == [cap, cap]


def test_reference_requests_batched_with_other_prompt_lengths_each_equal_the_oracle_alone(tiny_checkpoint, llm):
    """One generate() call over prompts of 1 to 30 tokens (the window is 8) with other budgets: each request equals
    the oracle's batch-1 run of its own prompt and seed (blockdiff pads nothing into a request; the oracle's own
    batched run, one RNG for the whole batch, is not what a seed reproduces)."""
    prompts = [_prompt(i, n) for i, n in enumerate([1, 5, 13, 30])]
    params = [SamplingParams(max_new_tokens=n, seed=50 + i, rng="reference", max_denoising_steps=8)
              for i, n in enumerate([20, 33, 16, 40])]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    for prompt, sp, out in zip(prompts, params, outs):
        assert out.token_ids == oracle_generate(tiny_checkpoint, prompt, sp.seed, sp.max_new_tokens,
                                                max_denoising_steps=8)


def test_ignore_eos_and_stop_token_ids_equal_the_oracle_with_those_eos_ids(tiny_checkpoint, llm):
    """ignore_eos is the oracle without EOS ids; stop_token_ids join the checkpoint's (or replace them, with
    ignore_eos): the oracle with that EOS list, stopping in the first canvas, a later one or at the budget's end."""
    ref = load_oracle(tiny_checkpoint)

    def oracle(prompt, seed, n, eos):
        torch.manual_seed(seed)
        row = ref.generate(torch.tensor([prompt]), max_new_tokens=n, max_denoising_steps=5,
                           eos_token_id=eos).sequences[0, len(prompt):].tolist()[:n]
        cut = next((i for i, t in enumerate(row) if t in (eos or [])), None)
        return row if cut is None else row[:cut + 1]

    prompt, n = _prompt(0, 5), 45
    p = dict(max_new_tokens=n, seed=0, rng="reference", max_denoising_steps=5)
    free = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(ignore_eos=True, **p))[0]
    assert free.token_ids == oracle(prompt, 0, n, None) and free.finish_reason == "length"
    toks = free.token_ids
    for stops in ([toks[0]], [toks[3]], [toks[20], toks[40]], [toks[n - 1]]):
        cut = min(toks.index(t) for t in stops) + 1
        alone = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
            ignore_eos=True, stop_token_ids=stops, **p))[0]
        assert alone.token_ids == oracle(prompt, 0, n, stops) == toks[:cut] and alone.finish_reason == "stop"
        joined = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(stop_token_ids=stops, **p))[0]
        assert joined.token_ids == oracle(prompt, 0, n, sorted(EOS | set(stops)))


@pytest.mark.parametrize("layout", ["no_file", "no_eos_key"])
def test_generation_defaults_of_a_checkpoint_are_the_oracles(tiny_checkpoint, tmp_path, layout):
    """Without generation_config.json, or without eos_token_id in it, the reference stops on no EOS id at all (it
    never falls back to config.json's eos_token_id) and takes its built-in sampler defaults: so does blockdiff."""
    from blockdiff.config import REFERENCE_GENERATION_DEFAULTS

    path = str(tmp_path / "ckpt")
    shutil.copytree(tiny_checkpoint, path)
    gen = os.path.join(path, "generation_config.json")
    if layout == "no_file":
        os.remove(gen)
    else:
        with open(gen) as f:
            d = json.load(f)
        del d["eos_token_id"], d["pad_token_id"]
        with open(gen, "w") as f:
            json.dump(d, f)
    ref = load_oracle(path)
    assert ref.generation_config.eos_token_id is None and ref.config.text_config.eos_token_id == 1
    ours = LLM(path, dtype="float32").defaults
    assert ours.eos_token_ids == [] and ours.pad_token_id is None
    filled = ref.generation_config._get_default_generation_params()  # what the oracle's generate() fills in
    expected = {k: getattr(ref.generation_config, k) if getattr(ref.generation_config, k) is not None else filled[k]
                for k in REFERENCE_GENERATION_DEFAULTS if k != "entropy_bound"}
    sampler = ref.generation_config.sampler_config or filled["sampler_config"]
    assert {k: getattr(ours, k) for k in expected} == expected and ours.entropy_bound == sampler.entropy_bound


def test_a_static_cache_changes_the_oracles_tokens_so_blockdiff_refuses_it(tiny_checkpoint, llm, tmp_path):
    """generation_config.json's cache_implementation is not a speed knob only: the reference's static cache lets the
    canvas see sliding_window cached positions of a sliding layer (its dynamic cache keeps window - 1), so with a
    prompt longer than the window its tokens change. blockdiff runs the dynamic cache's tokens; it refuses the
    static setting at load rather than generate other tokens than the oracle would, and keeps the dynamic ones."""
    from blockdiff.checks import CheckpointError

    prompt = _prompt(4, 12)  # the tiny checkpoint's window is 8
    params = SamplingParams(max_new_tokens=16, seed=4, rng="reference", max_denoising_steps=2)
    ours = llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0].token_ids
    by_cache = {}
    for cache in ("dynamic", "offloaded", "static"):
        path = str(tmp_path / cache)
        shutil.copytree(tiny_checkpoint, path)
        gen = os.path.join(path, "generation_config.json")
        with open(gen) as f:
            d = json.load(f)
        with open(gen, "w") as f:  # (compiling would take minutes on CPU)
            json.dump({**d, "cache_implementation": cache, "disable_compile": True}, f)
        if cache != "offloaded":  # (the reference's offloading needs CUDA)
            by_cache[cache] = oracle_generate(path, prompt, 4, 16, max_denoising_steps=2)
        if cache == "static":
            with pytest.raises(CheckpointError, match="cache_implementation='static' is not supported"):
                LLM(path, dtype="float32")
        else:
            out = LLM(path, dtype="float32").generate(prompt_token_ids=[prompt], sampling_params=params)[0]
            assert out.token_ids == ours
    assert by_cache["dynamic"] == ours
    assert by_cache["static"] != ours


@pytest.mark.parametrize("edit,refused", [
    (dict(temperature=0.7, top_p=0.9), True),  # another model's sampling knobs: the reference refuses the file
    (dict(sampler_config={"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1, "top_k": 4}), True),
    (dict(top_k=None), True),  # even null
    (dict(transformers_version="5.23.0", _from_model_config=False, return_dict_in_generate=True, bos_token_id=2,
          cache_implementation="dynamic", cache_config=None, disable_compile=True), False),  # no-op keys load in both
])
def test_generation_config_keys_load_in_blockdiff_exactly_where_they_load_in_the_oracle(tiny_checkpoint, tmp_path,
                                                                                         edit, refused):
    """A generation_config.json key the reference does not take makes it refuse the file; blockdiff refuses it too
    (it ignored it: a checkpoint's temperature or top_p changed nothing without a word)."""
    from blockdiff.checks import CheckpointError

    path = str(tmp_path / "ckpt")
    shutil.copytree(tiny_checkpoint, path)
    gen = os.path.join(path, "generation_config.json")
    with open(gen) as f:
        d = json.load(f)
    with open(gen, "w") as f:
        json.dump({**d, **edit}, f)
    if refused:
        with pytest.raises((ValueError, TypeError)):
            load_oracle(path)
        with pytest.raises(CheckpointError, match="is not"):
            LLM(path, dtype="float32")
    else:
        assert load_oracle(path).generation_config.max_denoising_steps == 48
        assert LLM(path, dtype="float32").defaults.max_denoising_steps == 48


# ------------------------------------------------------------------------------ default mode
def _rows(B, step=3, max_steps=10, t_min=0.4, t_max=0.8, bound=0.5, seed=0, C=None, V=None, **extra):
    rows = [dict(step=step, max_steps=max_steps, t_min=t_min, t_max=t_max, entropy_bound=bound, confidence=0.1,
                 seed=seed + i, canvas_index=0, **extra) for i in range(B)]
    return RowParams.build(rows, "cpu", C, V)


def test_default_step_matches_reference_step_on_everything_but_the_draws():
    torch.manual_seed(0)
    B, C, V = 3, 24, 50
    logits = torch.randn(B, C, V) * 4
    canvas = torch.randint(0, V, (B, C))
    fast = default_step(logits.clone(), canvas, _rows(B))
    for b in range(B):
        ref = reference_step(logits[b].clone(), canvas[b], 3, 10, 0.4, 0.8, 0.5, torch.Generator().manual_seed(1),
                             0.1)
        assert torch.equal(ref.argmax, fast.argmax[b])
        assert torch.equal(ref.accepted, fast.accepted[b])
        assert 0 < int(ref.accepted.sum()) < C
        assert torch.allclose(ref.entropy, fast.entropy[b], atol=1e-5)
        assert torch.allclose(ref.probs, fast.probs[b], atol=1e-6)
        assert abs(float(ref.mean_entropy) - float(fast.mean_entropy[b])) < 1e-5
        assert bool(ref.confident) == bool(fast.confident[b])
        # accepted positions keep a sampled token, the others are renoised: both in the vocabulary
        assert fast.canvas[b].shape == canvas[b].shape and int(fast.canvas[b].max()) < V


@pytest.mark.parametrize("max_steps", [1, 7, 10, 48, 333])
def test_row_temperature_is_bit_equal_to_the_reference_schedule(max_steps):
    from blockdiff.sampling.sampler import row_temperature, temperature
    cases = [(s, tmin, tmax) for s in range(max_steps) for tmin, tmax in [(0.4, 0.8), (0.01, 0.05), (0.0, 1.3)]]
    rows = [dict(step=s, max_steps=max_steps, t_min=a, t_max=b, entropy_bound=1, confidence=1, seed=0,
                 canvas_index=0) for s, a, b in cases]
    got = row_temperature(RowParams.build(rows, "cpu", 4, 4))
    want = torch.stack([temperature(s, max_steps, a, b) for s, a, b in cases])
    assert torch.equal(got, want)


def test_default_step_samples_the_tempered_distribution():
    V, C, trials = 6, 64, 300
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    logits = row.repeat(trials, C, 1)
    t = 0.8  # step 0 of 10 uses t_max
    want = torch.softmax(row / t, -1)
    res = default_step(logits, torch.zeros(trials, C, dtype=torch.long), _rows(trials, step=0, t_max=t, bound=1e9))
    assert bool(res.accepted.all())  # a huge entropy bound accepts every position
    counts = collections.Counter(res.canvas.flatten().tolist())
    n = C * trials
    got = torch.tensor([counts[i] / n for i in range(V)])
    assert (got - want).abs().max() < 0.01, (got, want)


def test_default_step_never_draws_a_disallowed_token_and_keeps_template_positions():
    B, C, V = 4, 32, 40
    logits = torch.randn(B, C, V) * 3
    allowed = torch.tensor([3, 5, 7, 39])
    disallowed = torch.ones(V, dtype=torch.bool)
    disallowed[allowed] = False
    fixed = torch.zeros(C, dtype=torch.bool)
    fixed[::3] = True
    template = torch.where(fixed, torch.arange(C) % V, torch.zeros(C, dtype=torch.long))
    rows = [dict(step=0, max_steps=4, t_min=0.4, t_max=0.8, entropy_bound=1e9, confidence=1.0, seed=i,
                 canvas_index=0, disallowed=disallowed if i % 2 == 0 else None,
                 fixed=fixed if i < 2 else None, template=template if i < 2 else None) for i in range(B)]
    res = default_step(logits, torch.zeros(B, C, dtype=torch.long), RowParams.build(rows, "cpu", C, V))
    for b in (0, 2):  # constrained rows: sampled and argmax tokens stay in the allowed set
        free = ~fixed if b < 2 else torch.ones(C, dtype=torch.bool)
        assert set(res.canvas[b][free].tolist()) <= set(allowed.tolist())
        assert set(res.argmax[b][free].tolist()) <= set(allowed.tolist())
    for b in (0, 1):
        assert torch.equal(res.canvas[b][fixed], template[fixed]) and torch.equal(res.argmax[b][fixed], template[fixed])
    assert len(set(res.canvas[3].tolist())) > 4  # the unconstrained row is not restricted


def test_counter_draws_do_not_depend_on_the_batch_or_the_row():
    """A row's random numbers are a function of (seed, canvas, step, position) only: the same alone, in a
    batch, at another row index or in another batch order."""
    from blockdiff.sampling import counter_rng as rng
    seeds = torch.tensor([11, 2 ** 62 + 5, 7, 11])
    canvas = torch.tensor([0, 3, 1, 2])
    step = torch.tensor([4, 0, -1, 4])
    batch = rng.randint(seeds, canvas, step, rng.RENOISE, 64, 262_144)
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = rng.randint(seeds[perm], canvas[perm], step[perm], rng.RENOISE, 64, 262_144)
    for b in range(4):
        alone = rng.randint(seeds[b:b + 1], canvas[b:b + 1], step[b:b + 1], rng.RENOISE, 64, 262_144)[0]
        assert torch.equal(alone, batch[b])
        assert torch.equal(shuffled[(perm == b).nonzero()[0, 0]], alone)
    assert not torch.equal(batch[0], batch[3])  # another canvas index: other draws
    u = rng.uniform(seeds, canvas, step, rng.SAMPLE, 4096)
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.02
    big = rng.randint(torch.arange(64), torch.zeros(64, dtype=torch.long), torch.zeros(64, dtype=torch.long),
                      rng.INIT, 256, 10)
    freq = torch.bincount(big.flatten(), minlength=10).float() / big.numel()
    assert (freq - 0.1).abs().max() < 0.01


def test_default_step_results_per_row_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    B, C, V = 5, 16, 300
    logits = torch.randn(B, C, V) * 3
    canvas = torch.randint(0, V, (B, C))
    params = _rows(B, bound=2.0)
    full = default_step(logits.clone(), canvas, params)
    order = [4, 1, 3, 0, 2]
    rows = [dict(step=3, max_steps=10, t_min=0.4, t_max=0.8, entropy_bound=2.0, confidence=0.1, seed=b,
                 canvas_index=0) for b in order]
    shuffled = default_step(logits[order].clone(), canvas[order], RowParams.build(rows, "cpu", C, V))
    for i, b in enumerate(order):
        alone = default_step(logits[b:b + 1].clone(), canvas[b:b + 1], _rows(1, seed=b, bound=2.0))
        for got in (full.canvas[b], shuffled.canvas[i]):
            assert torch.equal(got, alone.canvas[0])


def test_entropy_matches_categorical():
    x = torch.randn(3, 7, 40) * 5
    ent = torch.distributions.Categorical(logits=x).entropy()
    assert torch.equal(reference_entropy(x), ent)


def test_default_mode_equals_reference_mode_when_sampling_is_deterministic(tiny_checkpoint, llm, monkeypatch):
    # Near-zero temperature makes every sample the argmax; a huge entropy bound accepts every position: both
    # modes then follow the same path whatever their random draws after the initial canvas, which here the
    # default mode takes from the reference's first draw (one canvas).
    from blockdiff.engine import model_state

    def reference_first_draw(seed, canvas_index, C, V, fixed=None, template=None):
        return torch.randint(0, V, (1, C), generator=torch.Generator().manual_seed(int(seed[0])))
    monkeypatch.setattr(model_state, "initial_canvas", reference_first_draw)
    assert llm.model.canvas_length == 16
    p = dict(max_new_tokens=16, seed=3, t_min=1e-6, t_max=2e-6, entropy_bound=1e9, max_denoising_steps=8)
    prompt = _prompt(7, 10)
    ref = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(rng="reference", **p))[0]
    fast = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(rng="default", **p))[0]
    assert ref.token_ids == fast.token_ids
    assert ref.metrics.denoise_steps == fast.metrics.denoise_steps


def test_default_mode_is_reproducible_per_seed_and_varies_across_seeds(llm):
    prompt = _prompt(1, 8)
    a = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_new_tokens=20, seed=5))[0]
    b = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_new_tokens=20, seed=5))[0]
    c = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_new_tokens=20, seed=6))[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize("rng", ["default", "reference"])
def test_seeded_output_is_the_same_alone_and_batched_in_deterministic_mode(tiny_checkpoint, rng):
    llm = LLM(tiny_checkpoint, dtype="float32", deterministic=True)
    assert llm.deterministic and llm.model.batch_invariant
    prompts = [_prompt(i, 3 + 4 * i) for i in range(4)]
    params = [SamplingParams(max_new_tokens=10 + 9 * i, seed=100 + i, rng=rng, max_denoising_steps=6)
              for i in range(4)]
    together = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    for p, sp, out in zip(prompts, params, together):
        alone = llm.generate(prompt_token_ids=[p], sampling_params=sp)[0]
        assert alone.token_ids == out.token_ids


# ------------------------------------------------------------------------------ outputs and stops
def test_max_new_tokens_not_a_multiple_of_the_canvas(llm):
    out = llm.generate(prompt_token_ids=[_prompt(2, 4)],
                       sampling_params=SamplingParams(max_new_tokens=21, seed=0, ignore_eos=True,
                                                      max_denoising_steps=3))[0]
    assert len(out.token_ids) == 21
    assert out.finish_reason == "length"
    assert out.metrics.canvases == 2


def test_stop_token_ids_end_the_output(llm):
    base = llm.generate(prompt_token_ids=[_prompt(3, 5)],
                        sampling_params=SamplingParams(max_new_tokens=16, seed=1, ignore_eos=True,
                                                       max_denoising_steps=3))[0]
    stop_tok = base.token_ids[5]
    out = llm.generate(prompt_token_ids=[_prompt(3, 5)],
                       sampling_params=SamplingParams(max_new_tokens=16, seed=1, ignore_eos=True,
                                                      max_denoising_steps=3, stop_token_ids=[stop_tok]))[0]
    first = base.token_ids.index(stop_tok)
    assert out.token_ids == base.token_ids[:first + 1]
    assert out.finish_reason == "stop"


def test_stop_strings_cut_the_text(llm):
    base = llm.generate(prompt_token_ids=[_prompt(4, 5)],
                        sampling_params=SamplingParams(max_new_tokens=16, seed=2, ignore_eos=True,
                                                       max_denoising_steps=3))[0]
    text = base.text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip())
    out = llm.generate(prompt_token_ids=[_prompt(4, 5)],
                       sampling_params=SamplingParams(max_new_tokens=16, seed=2, ignore_eos=True,
                                                      max_denoising_steps=3, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:text.index(stop)]
    assert stop not in out.text


def test_text_prompt_and_chat(llm):
    out = llm.generate("Hello there", SamplingParams(max_new_tokens=8, seed=0, max_denoising_steps=2))[0]
    assert out.prompt_token_ids[0] == 2  # <bos> added
    assert isinstance(out.text, str)
    chat = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=8, seed=0,
                                                                           max_denoising_steps=2))[0]
    assert chat.prompt_token_ids[:2] == [2, 105] and chat.prompt_token_ids[-3:-2] == [105]
    assert chat.metrics.tokens_per_forward > 0


def test_canvas_template_positions_are_kept_and_allowed_ids_respected(llm):
    template = [-1] * 16
    template[0], template[5], template[15] = 300, 301, 302
    allowed = list(range(200, 260))
    out = llm.generate(prompt_token_ids=[_prompt(5, 6)],
                       sampling_params=SamplingParams(max_new_tokens=16, seed=0, canvas_template=template,
                                                      allowed_token_ids=allowed, ignore_eos=True,
                                                      max_denoising_steps=5))[0]
    assert (out.token_ids[0], out.token_ids[5], out.token_ids[15]) == (300, 301, 302)
    free = [t for i, t in enumerate(out.token_ids) if i not in (0, 5, 15)]
    assert all(200 <= t < 260 for t in free)


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("kwargs,needle", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-5), "max_new_tokens"),
    (dict(max_denoising_steps=1.5), "max_denoising_steps"),
    (dict(entropy_bound=0), "entropy_bound"),
    (dict(t_min=0.9, t_max=0.5), "t_max must be greater than t_min"),
    (dict(t_min=-1.0), "t_min"),
    (dict(seed=-1), "seed"),
    (dict(rng="fast"), "rng"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"),
    (dict(canvas_template=[1, -2]), "canvas_template"),
    (dict(rng="reference", allowed_token_ids=[5]), "rng='reference'"),
    (dict(confidence_threshold=float("nan")), "confidence_threshold"),
])
def test_sampling_params_reject_bad_values_with_a_clear_message(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        SamplingParams(**kwargs)


def test_request_level_errors(llm):
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate(prompt_token_ids=[[1, 2]], sampling_params=SamplingParams(allowed_token_ids=[10_000]))
    with pytest.raises(ValueError, match="canvas holds 16"):
        llm.generate(prompt_token_ids=[[1, 2]], sampling_params=SamplingParams(canvas_template=[-1] * 17))
    with pytest.raises(ValueError, match="context"):
        llm.generate(prompt_token_ids=[[3] * 2000], sampling_params=SamplingParams(max_new_tokens=100))
    with pytest.raises(ValueError, match="at least one token"):
        llm.generate(prompt_token_ids=[[]])
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        llm.generate(prompt_token_ids=[[5, 512]])
    with pytest.raises(ValueError, match="exactly one"):
        llm.generate()
    assert not llm.engine.has_unfinished()  # nothing half-admitted


# ------------------------------------------------------------------------------ the state machine
def test_model_state_lifecycle_and_events(llm):
    events = []
    state = llm.engine.make_state(_prompt(0, 5), SamplingParams(max_new_tokens=20, seed=0, max_denoising_steps=3,
                                                                ignore_eos=True), on_event=events.append)
    assert state.phase is Phase.WAITING
    with pytest.raises(InvalidTransition):
        state.apply_step(None, None)
    llm.engine.scheduler.add(state)
    phases = []
    while not state.finished:
        llm.engine.step()
        phases.append(state.phase)
    assert phases[0] is Phase.DENOISING and Phase.COMMITTING in phases and phases[-1] is Phase.FINISHED
    kinds = collections.Counter(e.kind for e in events)
    assert kinds["draft"] == state.metrics.denoise_steps == 6
    assert kinds["block"] == state.metrics.canvases == 2
    assert kinds["done"] == 1 and events[-1].kind == "done"
    blocks = [t for e in events if e.kind == "block" for t in e.token_ids]
    assert blocks == state.output_ids and len(blocks) == 20
    assert state.cache is None  # KV memory released at finish
    with pytest.raises(InvalidTransition):
        state.tokens_to_encode()


def test_abort_frees_the_request(llm):
    state = llm.engine.add_request(_prompt(0, 5), SamplingParams(max_new_tokens=64, seed=0))
    llm.engine.step()
    assert state.phase is Phase.DENOISING and state.cache.length == 5
    assert llm.engine.abort(state.request_id)
    assert state.finish_reason == "abort" and state.cache is None
    assert not llm.engine.has_unfinished()


def test_model_state_is_a_plain_state_machine_without_a_model():
    from blockdiff.config import TextConfig
    specs = TextConfig.from_dict(dict(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                      num_key_value_heads=1, head_dim=4, num_experts=2, top_k_experts=1,
                                      moe_intermediate_size=4)).layers
    sp = SamplingParams(max_new_tokens=4).resolved(__import__("blockdiff").GenerationDefaults())
    s = ModelState("r", 0, [1, 2], sp, specs, 4, 50, [1])
    assert s.tokens_to_encode() == [1, 2]
    s.encoded()
    assert s.phase is Phase.DENOISING and s.canvas.shape == (4,)
