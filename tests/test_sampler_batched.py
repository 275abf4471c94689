"""The batched default-mode sampler step: no host synchronisation inside, temporaries bounded by a row chunk
(never a second [B, C, V] buffer), and the engine's tick reading back once."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blockdiff.sampling import sampler
from blockdiff.sampling.sampler import ROW_CHUNK, RowParams, default_step

# Ops that make the host wait for the device (or have a data-dependent output shape).
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "item", "is_nonzero", "equal", "bincount",
            "unique", "_unique2", "masked_scatter"}


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []  # (name, largest output numel, args hold a bool index)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        biggest = max((o.numel() for o in outs if isinstance(o, torch.Tensor)), default=0)
        bool_index = func.__name__.startswith("index") and any(
            isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in a)
            for a in args)
        aliases = any(isinstance(o, torch.Tensor) and isinstance(args[0], torch.Tensor) and
                      o.untyped_storage().data_ptr() == args[0].untyped_storage().data_ptr() for o in outs)
        self.ops.append((func.overloadpacket.__name__, 0 if aliases else biggest, bool_index))
        return out


def _params(B, C, V, with_constraints=True):
    rows = []
    for b in range(B):
        r = dict(step=b % 5, max_steps=8, t_min=0.4, t_max=0.8, entropy_bound=0.5 + b, confidence=0.01, seed=b,
                 canvas_index=b)
        if with_constraints and b % 2:
            fixed = torch.arange(C) % 4 == 0
            r.update(fixed=fixed, template=torch.where(fixed, 7, 0), disallowed=torch.arange(V) % 3 == 0)
        rows.append(r)
    return RowParams.build(rows, "cpu", C, V)


def test_default_step_has_no_host_sync_and_no_data_dependent_shape():
    B, C, V = 4, 40, 97
    logits = torch.randn(B, C, V)
    canvas = torch.randint(0, V, (B, C))
    params = _params(B, C, V)
    with OpRecorder() as rec:
        default_step(logits, canvas, params)
    names = {n for n, _, _ in rec.ops}
    assert not names & SYNC_OPS, names & SYNC_OPS
    assert not any(b for _, _, b in rec.ops), "boolean-mask indexing"


def test_default_step_temporaries_stay_within_a_row_chunk():
    B, C, V = 3, 2 * ROW_CHUNK, 211
    logits = torch.randn(B, C, V)
    params = _params(B, C, V)
    with OpRecorder() as rec:
        res = default_step(logits, torch.zeros(B, C, dtype=torch.long), params)
    assert res.probs.data_ptr() == logits.data_ptr()  # the tempered distribution is the logits buffer
    # Every freshly allocated output (not a view or in-place result on the logits) is at most a row chunk of
    # the vocabulary, or a per-row [B, V] / per-position [B, C] tensor: never [B, C, V].
    limit = max(ROW_CHUNK * V, B * V, B * C)
    big = [(n, k) for n, k, _ in rec.ops if k > limit]
    assert not big, big


def test_engine_tick_reads_back_once(tiny_checkpoint, monkeypatch):
    """Outside the model forward, one device-to-host transfer per tick for the sampler's results."""
    from blockdiff import LLM, SamplingParams
    from blockdiff.engine.model_state import Phase
    llm = LLM(tiny_checkpoint, dtype="float32")
    for s in range(5):
        llm.engine.add_request([5 + s, 9, 11], SamplingParams(max_new_tokens=16, seed=s, max_denoising_steps=3,
                                                              ignore_eos=True, rng="reference" if s == 3 else "default"))
    llm.engine.step()  # prefill + first denoise
    calls, counting = [], [True]
    real_tolist, real_denoise = torch.Tensor.tolist, llm.model.denoise

    def counting_tolist(self):
        if counting[0]:
            calls.append(tuple(self.shape))
        return real_tolist(self)

    def quiet_denoise(*a, **k):  # the model's own reads are the model side's business
        counting[0] = False
        try:
            return real_denoise(*a, **k)
        finally:
            counting[0] = True
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    monkeypatch.setattr(llm.model, "denoise", quiet_denoise)
    states = [s for s in llm.engine.scheduler.running if s.phase is Phase.DENOISING]
    assert len(states) == 5
    with torch.no_grad():
        llm.engine._denoise(states)
    C = llm.model.canvas_length
    assert calls == [(5, C + 3)], calls  # stop flags, finite flags + argmax canvases (no listener: no masks)
    states[0].on_event = lambda ev: None
    calls.clear()
    with torch.no_grad():
        llm.engine._denoise([s for s in states if s.phase is Phase.DENOISING])
    assert calls == [(5, 3 * C + 3)], calls  # a draft listener: the acceptance masks and entropies come along


def test_counter_rng_stays_in_int64_without_overflow_for_every_seed_bit():
    from blockdiff.sampling import counter_rng as rng
    seeds = torch.tensor([0, 1, 2 ** 31, 2 ** 32 - 1, 2 ** 62, 2 ** 63 - 1])
    h = rng.hash_keys(seeds, torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long), rng.SAMPLE, 128)
    assert int(h.min()) >= 0 and int(h.max()) < 2 ** 32
    assert len({tuple(r) for r in h.tolist()}) == 6  # every seed its own stream
    assert sampler is not None


def test_serve_deterministic_flag_reaches_the_model_and_the_async_engine(tiny_checkpoint):
    from blockdiff.cli import build_parser, load_llm
    from blockdiff.engine.async_engine import AsyncEngine

    for flags, want in (([], False), (["--deterministic"], True)):
        args = build_parser().parse_args(["serve", tiny_checkpoint, "--threads", "1", *flags])
        llm = load_llm(args)
        assert llm.model.batch_invariant is want and llm.deterministic is want
        assert AsyncEngine(llm.engine).deterministic is want


def test_default_step_on_bf16_logits_keeps_fp32_entropy_and_sampling():
    B, C, V = 2, 8, 300
    logits = (torch.randn(B, C, V) * 3).bfloat16()
    params = _params(B, C, V, with_constraints=False)
    want = default_step(logits.float(), torch.zeros(B, C, dtype=torch.long), params)
    got = default_step(logits.clone(), torch.zeros(B, C, dtype=torch.long), params)
    assert got.entropy.dtype == torch.float32 and got.probs.dtype == torch.bfloat16
    # the tempered logits are rounded to bf16 in place; entropy and sampling then run in fp32
    assert torch.allclose(got.entropy, want.entropy, atol=0.1)
    assert torch.allclose(got.probs.float().sum(-1), torch.ones(B, C), atol=2e-2)
    assert int(got.canvas.max()) < V and int(got.canvas.min()) >= 0
