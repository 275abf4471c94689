"""Training: the objective, resumable runs, and checkpoints the transformers reference loads."""

import json
import math
import os

import pytest
import torch

from blockdiff import load_model
from blockdiff.train.cli import main as train_main
from blockdiff.train.loop import TrainOptions, Trainer
from blockdiff.train.objective import corrupt, diffusion_loss
from blockdiff.train.recipes import RECIPES, model_config
from blockdiff.train.tasks import CopyTask


def _trainer(out, steps, seed=0, lr=3e-3, resume=True, batch=8, **kw):
    task = CopyTask(vocab_size=32, canvas_length=8)
    o = TrainOptions(**{**dict(out_dir=str(out), max_steps=steps, batch_size=batch, lr=lr, warmup_steps=1, seed=seed,
                               log_every=1000, save_every=0, resume=resume), **kw})
    return Trainer(task, o, config=model_config(32, 8, **RECIPES["tiny"]), log=lambda s: None)


def test_corrupt_noises_at_rate_t_and_never_touches_fixed_positions():
    g = torch.Generator().manual_seed(0)
    answer = torch.arange(10, 10 + 64).repeat(256, 1)  # [256, 64]
    fixed = torch.zeros_like(answer, dtype=torch.bool)
    fixed[:, :16] = True
    noisy, noised = corrupt(answer, 1000, g, fixed=fixed)
    assert not noised[:, :16].any() and torch.equal(noisy[:, :16], answer[:, :16])
    frac = noised[:, 16:].float().mean(1)  # per example ~ t ~ U(0, 1)
    assert 0.4 < float(frac.mean()) < 0.6 and float(frac.min()) < 0.1 and float(frac.max()) > 0.9
    changed = (noisy != answer)
    assert bool((changed <= noised).all())  # only noised positions change (a few keep their token by chance)


def test_loss_decreases_on_copy_task(tmp_path):
    tr = _trainer(tmp_path / "run", 30, lr=1e-2)
    losses = [tr.train_step()["loss"] for _ in range(30)]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5  # ln(32) * 2 = 6.9 at the start


def test_self_conditioning_mask_is_per_example():
    torch.manual_seed(0)
    from blockdiff import DiffusionGemma, ModelConfig
    from blockdiff.train.recipes import init_weights
    m = DiffusionGemma(ModelConfig.from_dict(model_config(32, 8, **RECIPES["tiny"])))
    init_weights(m, generator=torch.Generator().manual_seed(1))
    calls = []
    orig = m.denoise

    def spy(canvas, cache, **kw):
        out = orig(canvas, cache, **kw)
        calls.append((canvas, cache, kw, out))
        return out

    m.denoise = spy
    B = 16
    prompt = torch.randint(8, 32, (B, 5))
    answer = torch.randint(8, 32, (B, 8))
    diffusion_loss(m, prompt, answer, torch.Generator().manual_seed(3), sc_prob=0.5)
    first, second = calls[0], calls[-1]
    mask = second[2]["self_conditioning_mask"]
    assert mask.shape == (B,) and mask.dtype == torch.bool and 0 < int(mask.sum()) < B
    assert first[0].shape[0] == int(mask.sum())  # the no-grad first pass runs only for the rows that use it
    canvas, cache, kw, logits = second
    plain = orig(canvas, cache)  # no signal at all
    assert torch.allclose(logits[~mask], plain[~mask], atol=1e-5)
    assert not torch.allclose(logits[mask], plain[mask], atol=1e-3)


def test_resume_restores_step_optimizer_and_rng(tmp_path):
    straight = _trainer(tmp_path / "a", 6)
    ref_losses = [straight.train_step()["loss"] for _ in range(6)]

    first = _trainer(tmp_path / "b", 3)
    first.run()
    resumed = _trainer(tmp_path / "b", 6)
    assert resumed.step == 3
    s1, s2 = first.opt.state_dict(), resumed.opt.state_dict()
    for k, v in s1["state"].items():
        assert torch.equal(v["exp_avg"], s2["state"][k]["exp_avg"])
        assert torch.equal(v["exp_avg_sq"], s2["state"][k]["exp_avg_sq"])
    losses = [resumed.train_step()["loss"] for _ in range(3)]
    assert losses == pytest.approx(ref_losses[3:], rel=1e-5)


def test_checkpoint_loads_in_reference_with_same_denoise_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "ck"
    tr = _trainer(out, 3, lr=5e-2)  # large steps move norms and scalars off their neutral values
    tr.run()
    for name in ("config.json", "model.safetensors", "generation_config.json", "trainer_state.pt"):
        assert os.path.exists(out / name), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"]["model_type"] == "gemma4_vision"
    ours = load_model(str(out), dtype="float32")
    ref = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(str(out), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(8, 32, (2, 6), generator=g)
    canvas = torch.randint(0, 32, (2, 8), generator=g)
    sc = torch.randn(2, 8, 32, generator=g)
    mask = torch.tensor([True, False])
    with torch.no_grad():
        cache = ours.new_cache(2)
        ours.encode(prompt, cache)
        a = ours.denoise(canvas, cache, self_conditioning_logits=sc, self_conditioning_mask=mask)
        b = ref(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc,
                self_conditioning_mask=mask).logits
    assert torch.allclose(a, b.float(), atol=1e-4), (a - b).abs().max()


def test_train_cli_writes_checkpoint(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = train_main(["--task", "copy", "--recipe", "tiny", "--out", str(out), "--max-steps", "2",
                     "--batch-size", "4", "--log-every", "1"])
    assert rc == 0
    assert "step 2/2 loss" in capsys.readouterr().out
    assert load_model(str(out)).canvas_length == 8


def test_canvases_per_prompt_shares_one_encoder_pass():
    from blockdiff import DiffusionGemma, ModelConfig
    from blockdiff.train.recipes import init_weights
    m = DiffusionGemma(ModelConfig.from_dict(model_config(32, 8, **RECIPES["tiny"])))
    init_weights(m, generator=torch.Generator().manual_seed(1))
    encodes, denoise_rows = [], []
    enc, den = m.encode, m.denoise
    m.encode = lambda ids, cache, **kw: (encodes.append(ids.shape[0]), enc(ids, cache, **kw))[1]
    m.denoise = lambda c, cache, **kw: (denoise_rows.append(c.shape[0]), den(c, cache, **kw))[1]
    out = diffusion_loss(m, torch.randint(8, 32, (3, 5)), torch.randint(8, 32, (3, 8)),
                         torch.Generator().manual_seed(0), canvases_per_prompt=4)
    out.loss.backward()
    assert encodes == [3, 3] and denoise_rows[-1] == 12
    assert torch.isfinite(out.loss)


def _reference_lr(step: int, o: TrainOptions) -> float:
    """The schedule as blockdiff computed it by hand before torch.optim.lr_scheduler took over (the values to keep)."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        frac = min(1.0, (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps))
        return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
    if o.decay_start and step >= o.decay_start:
        frac = min(1.0, (step - o.decay_start) / max(1, o.max_steps - o.decay_start))
        return o.lr * (1 - (1 - o.min_lr_ratio) * frac)
    return o.lr


SCHEDULES = [dict(max_steps=300, warmup_steps=10, decay_start=200, min_lr_ratio=0.1),
             dict(max_steps=110, warmup_steps=10, schedule="cosine"),
             dict(max_steps=50, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0),
             dict(max_steps=40, warmup_steps=1),
             dict(max_steps=40, warmup_steps=0),
             dict(max_steps=60, warmup_steps=20, decay_start=5, min_lr_ratio=0.2),
             dict(max_steps=60, warmup_steps=0, decay_start=30)]


@pytest.mark.parametrize("kw", SCHEDULES)
@pytest.mark.parametrize("stride", [1, 7])
def test_lr_scheduler_gives_the_hand_written_schedule_values(kw, stride):
    """torch.optim.lr_scheduler phases reproduce the former formula at every schedule step, also when a time
    budget makes the schedule jump several steps at once."""
    from blockdiff.train.loop import advance_scheduler, make_scheduler
    o = TrainOptions(out_dir="x", lr=1e-3, **kw)
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [w]}, {"params": [], "weight_decay": 0.0}], lr=o.lr)
    sched = make_scheduler(opt, o)
    for step in range(0, o.max_steps + 1, stride):
        advance_scheduler(sched, step)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([_reference_lr(step, o)] * 2, rel=1e-9, abs=1e-15)
        opt.step()


def test_lr_schedule_warms_up_then_holds_or_decays():
    o = TrainOptions(out_dir="x", lr=1e-3, max_steps=300, warmup_steps=10, decay_start=200, min_lr_ratio=0.1)
    assert _reference_lr(0, o) == pytest.approx(1e-4) and _reference_lr(9, o) == pytest.approx(1e-3)
    assert _reference_lr(150, o) == pytest.approx(1e-3) and _reference_lr(250, o) == pytest.approx(5.5e-4)
    assert _reference_lr(300, o) == pytest.approx(1e-4)


def test_resumed_run_continues_the_lr_schedule(tmp_path):
    """Stopped and resumed, the run sees the same learning rates as one uninterrupted run (scheduler state saved)."""
    whole = _trainer(tmp_path / "whole", 30, warmup_steps=5, decay_start=10)
    lrs = [whole.train_step()["lr"] for _ in range(30)]
    part = _trainer(tmp_path / "part", 30, warmup_steps=5, decay_start=10)
    first = [part.train_step()["lr"] for _ in range(12)]
    part.save()
    resumed = _trainer(tmp_path / "part", 30, warmup_steps=5, decay_start=10)
    assert resumed.step == 12
    rest = [resumed.train_step()["lr"] for _ in range(18)]
    assert first + rest == pytest.approx(lrs, rel=1e-12)


def test_time_budget_drives_schedule_and_ends_the_run(tmp_path):
    tr = _trainer(tmp_path / "tb", 1000, time_budget_s=10.0)
    assert tr.schedule_step() == 0
    tr.elapsed_s = 5.0
    assert tr.schedule_step() == 500 and not tr.finished()
    tr.elapsed_s = 10.0
    assert tr.finished()


def test_init_from_continues_from_a_checkpoints_weights(tmp_path):
    src = _trainer(tmp_path / "src", 2)
    src.run()
    task = CopyTask(vocab_size=32, canvas_length=8)
    ft = Trainer(task, TrainOptions(out_dir=str(tmp_path / "ft"), max_steps=1, batch_size=4, log_every=1000),
                 init_from=str(tmp_path / "src"), log=lambda s: None)
    assert ft.step == 0
    a, b = src.model.state_dict(), ft.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ interruption, fine-tuning, and what --out holds
class _SignalAt(CopyTask):
    """A copy task whose batch for step ``at`` sends ``signum`` to this process (a Ctrl-C in the middle of a run)."""

    def __init__(self, at, signum):
        super().__init__(vocab_size=32, canvas_length=8)
        self.at, self.signum = at, signum

    def batch(self, step, batch_size, rng):
        if step == self.at:
            import signal
            signal.raise_signal(self.signum)
        return super().batch(step, batch_size, rng)


def test_ctrl_c_saves_at_the_step_it_stopped_and_resumes_from_there(tmp_path):
    """Ctrl-C between saves used to drop every step since the last save (and one during a save left a truncated
    model.safetensors); now the step finishes, the run is saved, then KeyboardInterrupt propagates."""
    import signal
    o = TrainOptions(out_dir=str(tmp_path / "run"), max_steps=50, batch_size=4, warmup_steps=1, log_every=1,
                     save_every=0)
    lines = []
    tr = Trainer(_SignalAt(3, signal.SIGINT), o, config=model_config(32, 8, **RECIPES["tiny"]), log=lines.append)
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    assert any(s.startswith("SIGINT at step 4: saving") for s in lines), lines
    st = torch.load(tmp_path / "run" / "trainer_state.pt", weights_only=False)
    assert st["step"] == 4
    saved = load_model(str(tmp_path / "run"), dtype="float32", device="cpu").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in tr.model.state_dict().items() if k in saved)
    assert not [f for f in os.listdir(tmp_path / "run") if ".tmp" in f]  # no temporary files left behind
    resumed = _trainer(tmp_path / "run", 50)
    assert resumed.step == 4


def test_sigterm_saves_then_terminates(tmp_path):
    """SIGTERM (a job scheduler, `kill`) stops a CLI run at the end of the step: saved, then terminated by it."""
    import signal
    import subprocess
    import sys
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "blockdiff", "train", "--task", "copy", "--recipe", "tiny", "--out",
                          str(out), "--max-steps", "100000", "--batch-size", "2", "--save-every", "0",
                          "--log-every", "2", "--threads", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in p.stdout:
            seen.append(line)
            if line.startswith("step 2/"):
                p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == -signal.SIGTERM, "".join(seen)
    assert any(s.startswith("SIGTERM at step") for s in seen), "".join(seen)
    step = torch.load(out / "trainer_state.pt", weights_only=False)["step"]
    assert step >= 2 and any(s.startswith(f"saved {out} at step {step}") for s in seen)
    logged = [json.loads(s)["step"] for s in (out / "train_log.jsonl").read_text().splitlines()]
    assert max(logged) <= step


def test_resume_drops_log_records_past_the_saved_step(tmp_path):
    """A run killed between saves had logged steps it then trains again: the learning curve lists each once."""
    tr = _trainer(tmp_path / "run", 6, log_every=1)
    for _ in range(2):
        tr.train_step()
    tr.save()
    with open(tmp_path / "run" / "train_log.jsonl", "w") as f:
        f.writelines(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4))
    _trainer(tmp_path / "run", 6)
    steps = [json.loads(s)["step"] for s in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_out_holding_a_checkpoint_that_is_not_a_run_is_refused(tmp_path):
    """`--out` naming an existing checkpoint (no trainer_state.pt), e.g. the --init-from one: training would
    overwrite it. --no-resume overwrites it on purpose, and starts a fresh learning curve."""
    src = _trainer(tmp_path / "src", 1)
    src.run()
    os.remove(tmp_path / "src" / "trainer_state.pt")
    before = (tmp_path / "src" / "model.safetensors").read_bytes()
    task = CopyTask(vocab_size=32, canvas_length=8)
    with pytest.raises(ValueError, match=r"already holds a checkpoint but no trainer_state.pt.*--no-resume"):
        Trainer(task, TrainOptions(out_dir=str(tmp_path / "src"), max_steps=1), init_from=str(tmp_path / "src"),
                log=lambda s: None)
    assert (tmp_path / "src" / "model.safetensors").read_bytes() == before
    fresh = _trainer(tmp_path / "src", 1, resume=False)
    assert not (tmp_path / "src" / "train_log.jsonl").exists() and fresh.step == 0


def test_fine_tune_keeps_the_checkpoints_tokenizer_and_generation_config(tmp_path):
    """Fine-tuning a chat checkpoint on pre-tokenized data wrote no tokenizer (the result could not read text) and
    replaced generation_config.json by the task's (eos [1] instead of the checkpoint's stop ids)."""
    from fixtures import make_checkpoint
    src = make_checkpoint(tmp_path / "src", text_overrides={"sliding_window": 64}, canvas_length=8)
    task = CopyTask(vocab_size=512, canvas_length=8)
    out = tmp_path / "ft"
    Trainer(task, TrainOptions(out_dir=str(out), max_steps=1, batch_size=2, log_every=1000), init_from=src,
            log=lambda s: None).run()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == open(os.path.join(src, name), "rb").read(), name
    lines = []
    resumed = Trainer(task, TrainOptions(out_dir=str(out), max_steps=2, batch_size=2, log_every=1000),
                      init_from=src, log=lines.append)
    assert any(s.endswith(f"; --init-from {src} is not used (the run's own weights are)") for s in lines), lines
    resumed.run()  # a resumed run keeps them too
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 106, 50]
    from blockdiff import LLM
    assert LLM(str(out), device="cpu").tokenizer.encode("hi")


def test_fine_tuning_a_quantized_checkpoint_is_refused(tmp_path):
    """It used to train only the layers left in full precision (and crash on int4 in backward)."""
    from fixtures import make_checkpoint
    from blockdiff.quant.cli import quantize_checkpoint
    src = make_checkpoint(tmp_path / "src", text_overrides={"sliding_window": 64}, canvas_length=8)
    quantize_checkpoint(src, str(tmp_path / "q8"), "int8", log=lambda s: None)
    with pytest.raises(ValueError, match=r"q8 holds quantized weights \(int8\): training needs full-precision"):
        Trainer(CopyTask(vocab_size=512, canvas_length=8), TrainOptions(out_dir=str(tmp_path / "ft")),
                init_from=str(tmp_path / "q8"), log=lambda s: None)


def test_fine_tune_from_a_quantized_gguf_trains_its_dequantized_weights(tmp_path):
    from fixtures import make_checkpoint
    from gguf_fixtures import write_gguf
    src = make_checkpoint(tmp_path / "src", text_overrides={"sliding_window": 64}, canvas_length=8)
    gguf_path = write_gguf(src, str(tmp_path / "m.gguf"), default_type="Q4_0")
    tr = Trainer(CopyTask(vocab_size=512, canvas_length=8),
                 TrainOptions(out_dir=str(tmp_path / "ft"), max_steps=1, batch_size=2, log_every=1000),
                 init_from=gguf_path, log=lambda s: None)
    tr.run()
    assert load_model(str(tmp_path / "ft"), dtype="float32", device="cpu").config.raw.get("quantization_config") is None
    # the file's tokenizer and sampler defaults become the new checkpoint's files (it could not read text before)
    from blockdiff import LLM
    from blockdiff.quant.gguf import load_gguf
    _, tok, defaults = load_gguf(gguf_path, dtype="float32", device="cpu")
    llm = LLM(str(tmp_path / "ft"), device="cpu")
    assert llm.tokenizer.encode("<bos>hello there") == tok.encode("<bos>hello there")
    assert llm.tokenizer.chat_template == tok.chat_template
    assert llm.defaults == defaults


@pytest.mark.parametrize("line, message", [
    ("not json", r"line 2: not valid JSON"),
    ('[1, 2]', r'line 2: expected an object \{"prompt_ids"'),
    ('{"prompt": [2, 5], "answer_ids": [9]}', r"line 2: prompt_ids must be a non-empty list"),
    ('{"prompt_ids": [], "answer_ids": [9]}', r"line 2: prompt_ids must be a non-empty list"),
    ('{"prompt_ids": [2, 5], "answer_ids": [9, 99]}',
     r"line 2: answer_ids holds 99: token ids are integers in \[0, 32\)"),
    ('{"prompt_ids": [2, -1], "answer_ids": [9]}', r"line 2: prompt_ids holds -1"),
    ('{"prompt_ids": [2, 5], "answer_ids": ["a"]}', r"line 2: answer_ids holds 'a'"),
    ('{"prompt_ids": [2, 5], "answer_ids": [true]}', r"line 2: answer_ids holds True"),
    # these two named neither the line nor the field ("every prompt must have the same length")
    ('{"prompt_ids": [2, 5, 6], "answer_ids": [9]}', r"line 2: prompt_ids has 3 ids, line 1's has 2: every prompt"),
    ('{"prompt_ids": [2, 5], "answer_ids": [9, 9, 9, 9, 9]}', r"line 2: answer_ids has 5 ids, longer than the canvas "
                                                             r"\(4, --canvas-length\)"),
])
def test_jsonl_data_errors_name_the_file_line_and_field(tmp_path, line, message):
    """A bad line was a KeyError traceback, or an error about `input_ids` at the first training step."""
    from blockdiff.train.tasks import JsonlTask
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt_ids": [2, 5], "answer_ids": [9, 10]}\n' + line + "\n")
    with pytest.raises(ValueError, match="d.jsonl: " + message):
        JsonlTask(str(data), vocab_size=32, canvas_length=4)


@pytest.mark.parametrize("first, then", [
    (dict(steps=10, schedule="cosine"), dict(steps=20, schedule="cosine")),  # extending a cosine run
    (dict(steps=10, lr=1e-3), dict(steps=10, lr=5e-3)),                      # a new --lr
])
def test_resume_with_new_schedule_options_follows_the_new_schedule(tmp_path, first, then):
    """The saved scheduler used to win: a new --lr was ignored, and a cosine run extended with --max-steps went
    back up toward the peak lr (CosineAnnealingLR is periodic). Now the new options' schedule is replayed."""
    def make(out, steps, **kw):
        return _trainer(out, steps, batch=2, warmup_steps=2, **kw)
    whole = make(tmp_path / "whole", **then)
    expected = [whole.train_step()["lr"] for _ in range(then["steps"])]
    part = make(tmp_path / "part", **first)
    for _ in range(5):
        part.train_step()
    part.save()
    resumed = make(tmp_path / "part", **then)
    got = [resumed.train_step()["lr"] for _ in range(then["steps"] - 5)]
    assert got == pytest.approx(expected[5:], rel=1e-9)


@pytest.mark.parametrize("flag", ["--time-limit", "--time-budget"])
def test_negative_time_limits_are_refused(flag, capsys):
    """A negative --time-limit stopped every run after its first step (any elapsed time exceeds it)."""
    from blockdiff.cli import main as cli_main
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--out", "OUT", flag, "-5"])
    assert e.value.code == 2
    assert f"argument {flag}: must be >= 0.0, got -5" in capsys.readouterr().err


def test_python_m_blockdiff_train_reports_errors_in_one_line(tmp_path):
    """The documented `python -m blockdiff.train` printed a traceback for bad input (and for Ctrl-C)."""
    import subprocess
    import sys
    data = tmp_path / "d.jsonl"
    data.write_text("not json\n")
    p = subprocess.run([sys.executable, "-m", "blockdiff.train", "--task", "jsonl", "--data", str(data),
                        "--vocab-size", "32", "--canvas-length", "4", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"blockdiff: error: {data}: line 1: not valid JSON: Expecting value (column 1)"], p.stderr


@pytest.mark.parametrize("damage", [b"", b"\x00" * 300, "truncate"])
def test_a_damaged_trainer_state_is_one_line_naming_it(tmp_path, damage):
    """torch.load's RuntimeError / EOFError / UnpicklingError tracebacks, instead of a line saying what to do."""
    tr = _trainer(tmp_path / "run", 2)
    tr.run()
    state = tmp_path / "run" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:500] if damage == "truncate" else damage)
    with pytest.raises(ValueError, match=r"trainer_state.pt cannot be read \(.*\); --no-resume starts the run over"):
        _trainer(tmp_path / "run", 4)
    assert _trainer(tmp_path / "run", 4, resume=False).step == 0


def test_a_model_that_does_not_fit_the_task_names_the_flags(tmp_path):
    _trainer(tmp_path / "src", 1).run()
    with pytest.raises(ValueError, match=r"canvas 8\) does not fit task copy \(vocab 32, canvas 4; --vocab-size, "):
        Trainer(CopyTask(vocab_size=32, canvas_length=4), TrainOptions(out_dir=str(tmp_path / "ft")),
                init_from=str(tmp_path / "src"), log=lambda s: None)


def test_a_non_finite_loss_stops_the_run_without_overwriting_the_last_save(tmp_path, monkeypatch):
    """The run went on training NaN weights and its next save replaced the last good checkpoint with them."""
    import blockdiff.train.loop as loop
    real = loop.diffusion_loss
    calls = []

    def nan_at_step_4(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == 4:
            out.loss = out.loss * float("nan")
        return out

    tr = _trainer(tmp_path / "run", 10, save_every=2)
    monkeypatch.setattr(loop, "diffusion_loss", nan_at_step_4)
    with pytest.raises(ValueError, match=r"the loss is nan at step 4: stopped without saving"):
        tr.run()
    assert torch.load(tmp_path / "run" / "trainer_state.pt", weights_only=False)["step"] == 2
    saved = load_model(str(tmp_path / "run"), dtype="float32", device="cpu")
    assert all(torch.isfinite(p).all() for p in saved.parameters())


def test_fine_tuning_an_fp8_checkpoint_loaded_dequantized_writes_a_full_precision_config(tmp_path):
    """On a CPU an FP8 checkpoint loads dequantized and trains; the new checkpoint's config.json kept the source's
    compressed-tensors quantization_config for its fp32 weights."""
    from fixtures import make_checkpoint
    from blockdiff.quant.cli import quantize_checkpoint
    src = make_checkpoint(tmp_path / "src", text_overrides={"sliding_window": 64}, canvas_length=8)
    quantize_checkpoint(src, str(tmp_path / "fp8"), "fp8", log=lambda s: None)
    Trainer(CopyTask(vocab_size=512, canvas_length=8),
            TrainOptions(out_dir=str(tmp_path / "ft"), max_steps=1, batch_size=2, log_every=1000, device="cpu"),
            init_from=str(tmp_path / "fp8"), log=lambda s: None).run()
    assert "quantization_config" not in json.loads((tmp_path / "ft" / "config.json").read_text())


def test_resuming_in_a_folder_of_quantized_weights_is_refused_in_one_line(tmp_path, capsys):
    """A run folder whose checkpoint was replaced by a quantized copy (as `blockdiff quantize` of a run once
    made, trainer state included) resumed into a torch error about the optimizer's parameter groups."""
    import shutil
    from blockdiff.quant.cli import quantize_checkpoint
    _trainer(tmp_path / "run", 1).run()
    quantize_checkpoint(str(tmp_path / "run"), str(tmp_path / "q"), "int8", log=lambda s: None)
    shutil.copyfile(tmp_path / "run" / "trainer_state.pt", tmp_path / "q" / "trainer_state.pt")
    with pytest.raises(ValueError, match=r"q holds quantized weights \(int8\): training needs full-precision"):
        _trainer(tmp_path / "q", 2)


def test_jsonl_data_that_is_not_utf8_names_the_file_and_line_and_a_bom_is_read(tmp_path):
    """A Latin-1 byte was the bare "'utf-8' codec can't decode byte 0xe9 in position 40", naming neither the
    file nor the line."""
    from blockdiff.train.tasks import JsonlTask
    good = '{"prompt_ids": [2, 5], "answer_ids": [9, 10]}\n'
    data = tmp_path / "d.jsonl"
    data.write_bytes(good.encode() + b'{"prompt_ids": [2, 5], "answer_ids": [9], "note": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl: line 2: not UTF-8 text \(byte 0xe9"):
        JsonlTask(str(data), vocab_size=32, canvas_length=4)
    data.write_bytes(b"\xef\xbb\xbf" + (good * 2).encode())  # saved with a byte-order mark
    assert len(JsonlTask(str(data), vocab_size=32, canvas_length=4).rows) == 2


def test_a_run_whose_first_step_fails_leaves_no_empty_run_folder(tmp_path, capsys):
    """The folder was removed when loading failed, but not when the first step did (a prompt + canvas longer than
    the sliding window): an empty --out stayed behind."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt_ids": [2] * 510, "answer_ids": [9, 10]}) + "\n")  # window 512
    out = tmp_path / "run"
    from blockdiff.cli import main as cli_main
    rc = cli_main(["train", "--task", "jsonl", "--data", str(data), "--vocab-size", "32", "--canvas-length", "4",
                   "--recipe", "tiny", "--out", str(out), "--max-steps", "1", "--batch-size", "1", "--device", "cpu"])
    assert rc == 2 and "must fit the sliding window" in capsys.readouterr().err
    assert not out.exists()


def test_no_resume_over_a_sharded_checkpoint_saves_weights_that_load(tmp_path):
    """Fine-tuning in place (`--init-from D --out D --no-resume`, D sharded as the released checkpoint is) wrote
    model.safetensors beside the old model.safetensors.index.json, which the loader reads first: the saved run
    loaded the weights it started from, and a resume trained those again."""
    from safetensors.torch import load_file, save_file
    d = tmp_path / "ckpt"
    _trainer(d, 1).run()
    for f in ("trainer_state.pt", "train_log.jsonl"):
        os.remove(d / f)
    tensors = load_file(d / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, d / shard, metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}))
    os.remove(d / "model.safetensors")
    tr = Trainer(CopyTask(vocab_size=32, canvas_length=8),
                 TrainOptions(out_dir=str(d), max_steps=2, batch_size=4, lr=3e-2, warmup_steps=1, log_every=1000,
                              save_every=0, resume=False, device="cpu"), init_from=str(d), log=lambda s: None)
    tr.run()
    trained = tr.model.state_dict()
    loaded = load_model(str(d), dtype="float32", device="cpu").state_dict()
    assert all(torch.equal(trained[k], loaded[k]) for k in trained if not k.startswith("inv_freq"))
    assert not set(shards) & set(os.listdir(d)) and "model.safetensors.index.json" not in os.listdir(d)


def test_a_finished_run_run_again_trains_nothing_and_leaves_its_files(tmp_path):
    """Re-running a finished command rewrote an identical checkpoint (and trainer state) for nothing."""
    _trainer(tmp_path / "run", 2).run()
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    seen = []
    tr = _trainer(tmp_path / "run", 2)
    tr.log = seen.append
    assert tr.run() == {} and tr.step == 2
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == files
    assert any("already trained to step 2 of --max-steps 2: nothing to do; raise --max-steps" in s for s in seen)
    more = _trainer(tmp_path / "run", 3)  # a higher --max-steps trains on from there
    more.run()
    assert more.step == 3


def test_resuming_a_run_with_another_task_is_refused_naming_both(tmp_path):
    """A run resumed with another --task took the other task's data into its optimizer and schedule silently."""
    from blockdiff.train.tasks import JsonlTask
    _trainer(tmp_path / "run", 1).run()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt_ids": [2, 5], "answer_ids": list(range(9, 17))}) + "\n")
    o = TrainOptions(out_dir=str(tmp_path / "run"), max_steps=3, batch_size=2, log_every=1000, save_every=0)
    with pytest.raises(ValueError, match=r"run is a run of task copy, not jsonl: to fine-tune it on jsonl, pass "
                                         r"--init-from .*run with another --out"):
        Trainer(JsonlTask(str(data), vocab_size=32, canvas_length=8), o, log=lambda s: None)
    with pytest.raises(ValueError, match=r"run is a run of task copy, not jsonl"):  # named before its shapes are
        Trainer(JsonlTask(str(data), vocab_size=64, canvas_length=16), o, log=lambda s: None)


def test_a_save_interrupted_while_writing_leaves_the_last_save_whole(tmp_path, monkeypatch):
    """A second Ctrl-C during a save replaced the files one by one: the first save of a new run cut short after
    model.safetensors left weights without config.json, and the same command then refused the folder (a checkpoint
    that is no run); later saves mixed new weights with the old step's trainer state."""
    import blockdiff.train.loop as loop
    out = tmp_path / "run"
    real_save = torch.save

    def cut(*a, **k):  # the trainer state is the last file a save writes
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.torch, "save", cut)
    with pytest.raises(KeyboardInterrupt):
        _trainer(out, 2).run()
    assert sorted(os.listdir(out)) == ["train_log.jsonl"]  # nothing of the save, and no temporary files
    monkeypatch.setattr(loop.torch, "save", real_save)
    tr = _trainer(out, 2)  # the same command again: a fresh run, not "holds a checkpoint but no trainer_state.pt"
    tr.run()
    saved = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "train_log.jsonl"}
    more = _trainer(out, 4)
    for _ in range(2):
        more.train_step()
    monkeypatch.setattr(loop.torch, "save", cut)
    with pytest.raises(KeyboardInterrupt):
        more.save()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "train_log.jsonl"} == saved


def test_a_signal_during_the_saves_renames_waits_until_every_file_is_in_place(tmp_path, monkeypatch):
    """The files of a save are replaced together: a Ctrl-C arriving between two renames is delivered after the
    last, so the weights, config.json and trainer state on disk are all of the same step."""
    import signal
    import blockdiff.files as files
    tr = _trainer(tmp_path / "run", 2)
    tr.train_step()
    real_replace, renamed = os.replace, []

    def replace(src, dst):
        if not renamed:
            signal.raise_signal(signal.SIGINT)
        real_replace(src, dst)
        renamed.append(os.path.basename(dst))

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        tr.save()
    assert {"model.safetensors", "config.json", "trainer_state.pt"} <= set(renamed)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert _trainer(tmp_path / "run", 2).step == 1
    saved = load_model(str(tmp_path / "run"), dtype="float32", device="cpu").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in tr.model.state_dict().items() if k in saved)


def test_a_raised_time_budget_replays_the_schedule_at_the_new_position(tmp_path):
    """A run whose --time-budget is spent says to raise it to train on; resumed with a larger budget, its schedule
    position (elapsed / budget) moves back, but the saved scheduler stayed at the old, later step: a cosine run went
    on at its final learning rate instead of the new budget's."""
    def make(budget):
        return _trainer(tmp_path / "run", 100, batch=2, warmup_steps=2, schedule="cosine", time_budget_s=budget)
    part = make(10.0)
    part.elapsed_s = 9.5  # 95% of the budget trained
    part.train_step()
    part.save()
    resumed = make(20.0)
    assert resumed.schedule_step() == 47
    fresh = _trainer(tmp_path / "fresh", 100, batch=2, warmup_steps=2, schedule="cosine")
    fresh.step = 47
    assert resumed.train_step()["lr"] == pytest.approx(fresh.train_step()["lr"], rel=1e-9)


def test_a_jsonl_fine_tune_ends_answers_with_the_checkpoints_stop_id(tmp_path):
    """Answers shorter than the canvas were ended with id 1 whatever the fine-tuned checkpoint stops on (its
    generation_config says [1, 106, 50] here, and 1 need not be an EOS at all): they now end with its first stop
    id and its pad id, and a from-scratch run keeps 1 / 0."""
    import random
    from fixtures import make_checkpoint
    from blockdiff.train.tasks import JsonlTask
    src = make_checkpoint(tmp_path / "src", text_overrides={"sliding_window": 64}, canvas_length=8)
    gen = json.loads(open(os.path.join(src, "generation_config.json")).read())
    gen["eos_token_id"], gen["pad_token_id"] = [106, 1, 50], 3
    with open(os.path.join(src, "generation_config.json"), "w") as f:
        json.dump(gen, f)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt_ids": [2, 9, 10], "answer_ids": [11, 12, 13]}) + "\n")
    task = JsonlTask(str(data), vocab_size=512, canvas_length=8)
    assert task.batch(0, 1, random.Random(0)).answer.tolist() == [[11, 12, 13, 1, 0, 0, 0, 0]]  # no checkpoint
    Trainer(task, TrainOptions(out_dir=str(tmp_path / "ft"), max_steps=1, batch_size=2, log_every=1000),
            init_from=src, log=lambda s: None).run()
    assert task.batch(0, 1, random.Random(0)).answer.tolist() == [[11, 12, 13, 106, 3, 3, 3, 3]]
    assert json.loads((tmp_path / "ft" / "generation_config.json").read_text())["eos_token_id"] == [106, 1, 50]


def test_no_resume_over_another_models_folder_leaves_none_of_its_tokenizer_files(tmp_path):
    """A tokenizer-less run (copy / jsonl) started with --no-resume over a chat checkpoint's folder left that
    model's tokenizer files beside the new weights, which were then read with a tokenizer of another vocabulary."""
    from fixtures import make_checkpoint
    out = make_checkpoint(tmp_path / "other", text_overrides={"sliding_window": 64}, canvas_length=8)
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    Trainer(CopyTask(vocab_size=32, canvas_length=8), TrainOptions(out_dir=out, max_steps=1, batch_size=2,
                                                                    log_every=1000, resume=False),
            config=model_config(32, 8, **RECIPES["tiny"]), log=lambda s: None).run()
    left = set(os.listdir(out))
    assert not left & {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}, left
    from blockdiff import LLM
    assert LLM(out, device="cpu").tokenizer is None  # the run's own checkpoint: ids in, ids out


def test_a_batch_size_whose_logits_cannot_fit_is_refused_before_training(tmp_path, capsys):
    """An absurd --batch-size was killed by the OOM killer (a bare "Killed", exit 137) once the first step ran."""
    from blockdiff.cli import main as cli_main
    assert cli_main(["train", "--task", "copy", "--out", str(tmp_path / "run"), "--batch-size", "100000000",
                     "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blockdiff: error: --batch-size 100000000 cannot fit: its logits alone need ") and \
        "x 25 positions x vocabulary 32" in err and "lower --batch-size" in err, err
    assert not (tmp_path / "run").exists()  # no empty run folder left behind
    _trainer(tmp_path / "ok", 1, batch=64).run()  # an ordinary batch is not refused


def test_bundling_a_run_checks_the_generation_overrides_before_copying(tmp_path):
    """`scripts/bundle_sudoku_model.py --generation entropy_bound=0.3` wrote a generation_config.json the loader
    refuses (entropy_bound belongs in sampler_config), found only at the bundled model's first load."""
    import subprocess
    import sys
    run, dest = tmp_path / "run", tmp_path / "dest"
    assert train_main(["--task", "sudoku", "--max-steps", "1", "--batch-size", "2", "--out", str(run)]) == 0
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "bundle_sudoku_model.py")

    def bundle(*kv):
        flags = [a for x in kv for a in ("--generation", x)]
        return subprocess.run([sys.executable, script, str(run), str(dest), *flags], capture_output=True, text=True,
                              timeout=120)
    for kv, words in (("entropy_bound=0.3", "entropy_bound=0.3 is not a key of the reference's generation config"),
                      ("t_max=0.3", "t_max must be greater than t_min"), ("t_max=abc", "the value must be JSON"),
                      ("t_max", "expected KEY=VALUE")):
        p = bundle(kv)
        assert p.returncode == 2 and words in p.stderr, p.stderr
        assert not dest.exists()  # nothing copied
    assert bundle("t_max=0.9").returncode == 0
    assert json.loads((dest / "generation_config.json").read_text())["t_max"] == 0.9
    from blockdiff import LLM
    assert LLM(str(dest), device="cpu").defaults.t_max == 0.9
