"""The training loop: resumable, with progress lines, periodic evaluation and released-layout checkpoints.

A run directory holds the released checkpoint (``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json``) - loadable by ``load_model``/``LLM`` and the transformers
reference - plus ``trainer_state.pt`` (optimizer, step, RNG states, elapsed time) and ``train_log.jsonl``
(the learning curve). ``resume=True`` continues a run exactly where its last save left it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from ..config import ModelConfig
from ..files import atomic_files, atomic_path
from ..loader import drop_sharded_weights, is_gguf, load_model, resolve_path, stage_model
from ..model import DiffusionGemma
from ..progress import progress
from .objective import diffusion_loss
from .recipes import count_parameters, init_weights
from .tasks import Task

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"
GENERATION_FILE = "generation_config.json"
# TrainOptions fields that define the learning-rate schedule (a resume with other values replays the new one);
# the time budget places each step on it
SCHEDULE_OPTIONS = ("lr", "schedule", "max_steps", "warmup_steps", "decay_start", "min_lr_ratio", "time_budget_s")
CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")
# What a tokenizer is read from (blockdiff/tokenizer.py): carried over from a fine-tuned checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")  # image settings of a vision tower


@dataclass
class TrainOptions:
    out_dir: str
    max_steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    schedule: str = "constant"  # constant | cosine (over max_steps)
    decay_start: int = 0  # constant schedule: > 0 = decay linearly from this step to min_lr at max_steps
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    sc_prob: float = 0.5
    clamp_givens: bool = False
    canvases_per_prompt: int = 1
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 200
    device: str = "cpu"
    amp_bf16: bool = False  # bf16 autocast (GPU)
    resume: bool = True
    time_limit_s: float = 0.0  # stop (and save) after this much wall time in this invocation; 0 = none
    # > 0: total training seconds (across resumes) the run is planned for: the LR schedule and the curriculum
    # follow max(step, elapsed / budget * max_steps), and training ends when either reaches its end. Lets a
    # fixed-time GPU session finish its schedule without knowing its step rate in advance.
    time_budget_s: float = 0.0
    extra: dict = field(default_factory=dict)


def make_scheduler(opt: torch.optim.Optimizer, o: TrainOptions) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning rate per schedule step, from torch.optim.lr_scheduler: a linear warm-up to ``lr`` over
    ``warmup_steps`` (step s: lr * (s + 1) / warmup), then constant, or a linear decay from ``decay_start`` to
    ``lr * min_lr_ratio`` at ``max_steps``, or (``schedule="cosine"``) a cosine to ``lr * min_lr_ratio`` at
    ``max_steps``. Build it while the optimizer's groups still hold ``lr`` (before loading a saved state)."""
    from torch.optim import lr_scheduler as ls

    w, t, m = o.warmup_steps, o.max_steps, o.min_lr_ratio
    phases, starts = [], []

    def phase(sched, start):
        phases.append(sched)
        starts.append(start)

    if w > 0:
        phase(ls.LinearLR(opt, start_factor=1 / w, end_factor=1.0, total_iters=max(w - 1, 1)), 0)
    if o.schedule == "cosine":
        phase(ls.CosineAnnealingLR(opt, T_max=max(1, t - w), eta_min=o.lr * m), w)
    elif o.decay_start:
        d = max(o.decay_start, w)  # a decay that starts inside the warm-up takes over where the warm-up ends
        if d > w:
            phase(ls.ConstantLR(opt, factor=1.0, total_iters=0), w)
        f0 = 1 - (1 - m) * (d - o.decay_start) / max(1, t - o.decay_start)
        phase(ls.LinearLR(opt, start_factor=f0, end_factor=m, total_iters=max(1, t - d)), d)
    if not phases:
        phase(ls.ConstantLR(opt, factor=1.0, total_iters=0), 0)
    if len(phases) == 1:
        return phases[0]
    return ls.SequentialLR(opt, phases, milestones=starts[1:])


def advance_scheduler(sched: torch.optim.lr_scheduler.LRScheduler, to_step: int) -> None:
    """Step the scheduler up to schedule step ``to_step`` (several steps at once when a time budget jumps).
    The schedule is indexed by step, so stepping it before the optimizer's step is intended: torch warns about that
    order on a scheduler's first step (a run resumed after one step, or a replayed schedule), silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*optimizer.step", category=UserWarning)
        while sched.last_epoch < to_step:
            sched.step()


def make_optimizer(model: torch.nn.Module, o: TrainOptions) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=(0.9, 0.95))


class Trainer:
    def __init__(self, task: Task, options: TrainOptions, config: dict | None = None,
                 init_from: str | None = None, log=print):
        self.task, self.o, self.log = task, options, log
        o = options
        os.makedirs(o.out_dir, exist_ok=True)
        self.step, self.elapsed_s, self.examples = 0, 0.0, 0
        self.rng = random.Random(o.seed)
        self.gen = torch.Generator().manual_seed(o.seed)
        state_path = os.path.join(o.out_dir, STATE_FILE)
        resuming = o.resume and os.path.exists(state_path)
        if o.resume and not resuming and any(os.path.exists(os.path.join(o.out_dir, n)) for n in CHECKPOINT_FILES):
            # Not a run of ours (no trainer state): training would overwrite someone's checkpoint - perhaps the
            # very one named by --init-from.
            raise ValueError(f"{o.out_dir} already holds a checkpoint but no {STATE_FILE}, so it is not a training "
                             "run to resume; choose another --out (--no-resume overwrites it)")
        st = _read_state(state_path) if resuming else None
        if st is not None and st.get("task", task.name) != task.name:  # its optimizer and schedule: the other task's
            raise ValueError(f"{o.out_dir} is a run of task {st['task']}, not {task.name}: to fine-tune it on "
                             f"{task.name}, pass --init-from {o.out_dir} with another --out (--no-resume "
                             "overwrites the run)")
        if not resuming:  # a fresh start: the learning curve of an earlier run in this folder no longer applies
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(o.out_dir, LOG_FILE))
        # Files a checkpoint needs besides its weights (tokenizer, sampler defaults) come from the run itself
        # when resuming, else from the checkpoint fine-tuned (see save()).
        self.carry_from = o.out_dir if resuming else _local_dir(init_from)
        # a .gguf file holds them in its metadata: written out as the files a checkpoint folder has
        self.gguf_files = _gguf_files(init_from) if init_from and not resuming and is_gguf(init_from, None) else {}
        if hasattr(task, "use_generation_config"):  # answers end with the stop id of the checkpoint carried on
            task.use_generation_config(self._carried_generation_config())
        if resuming:
            self.model = load_model(o.out_dir, dtype="float32", device=o.device)
            _refuse_quantized(self.model, o.out_dir)  # e.g. a quantized copy of a run, trainer state and all
        elif init_from:
            # "none": a quantized GGUF file is dequantized; a quantized checkpoint folder stays quantized and is
            # refused below
            self.model = load_model(init_from, dtype="float32", device=o.device, quantization="none")
            _refuse_quantized(self.model, init_from)
        else:
            if config is None:
                raise ValueError("a from-scratch run needs a model config (a recipe)")
            self.model = DiffusionGemma(ModelConfig.from_dict(config)).to(o.device)
            init_weights(self.model, generator=self.gen)
            task.init_model(self.model, self.gen)
        m = self.model
        if m.vocab_size < task.vocab_size or m.canvas_length != task.canvas_length:
            raise ValueError(f"model (vocab {m.vocab_size}, canvas {m.canvas_length}) does not fit task "
                             f"{task.name} (vocab {task.vocab_size}, canvas {task.canvas_length}; "
                             "--vocab-size, --canvas-length)")
        _check_batch_fits(m, task, o)
        self.opt = make_optimizer(m, o)
        self.scheduler = make_scheduler(self.opt, o)
        if resuming:
            self.step, self.elapsed_s, self.examples = st["step"], st["elapsed_s"], st["examples"]
            # The saved scheduler holds the schedule it was built with (base lr, length): restored as is, a new
            # --lr was ignored and a cosine run extended by --max-steps climbed back up (cosine is periodic).
            # When a schedule option changed, or for a state saved before the scheduler was, replay the schedule
            # of the options given now up to this step instead.
            saved = st.get("options") or {}
            changed = {k: (saved[k], getattr(o, k)) for k in SCHEDULE_OPTIONS
                       if k in saved and saved[k] != getattr(o, k)}
            replay = "scheduler" not in st or bool(changed)
            if changed:
                self.log("schedule options changed since the last save ("
                         + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
                         + f"): the learning rate follows the new schedule from step {self.step}")
            if replay:
                advance_scheduler(self.scheduler, self.schedule_step())
            self.opt.load_state_dict(st["optimizer"])
            if not replay:
                self.scheduler.load_state_dict(st["scheduler"])
            for g, lr in zip(self.opt.param_groups, self.scheduler.get_last_lr()):
                g["lr"] = lr
            self.rng.setstate(st["python_rng"])
            self.gen.set_state(st["torch_rng"])
            self.log(f"resumed {o.out_dir} at step {self.step} ({self.elapsed_s / 60:.1f} min trained so far)"
                     + (f"; --init-from {init_from} is not used (the run's own weights are)" if init_from else ""))
            self._trim_log()
        self.log(f"model: {count_parameters(m) / 1e6:.2f}M parameters, {m.text.num_hidden_layers} layers, "
                 f"hidden {m.text.hidden_size}, {m.text.num_experts} experts top-{m.text.top_k_experts}, "
                 f"canvas {m.canvas_length}, vocab {m.vocab_size}")

    # ------------------------------------------------------------------ one step
    def schedule_step(self) -> int:
        """The step the LR schedule and the curriculum see (see TrainOptions.time_budget_s)."""
        o = self.o
        if not o.time_budget_s:
            return self.step
        return max(self.step, min(o.max_steps, int(self.elapsed_s / o.time_budget_s * o.max_steps)))

    def finished(self) -> bool:
        return self.step >= self.o.max_steps or self.schedule_step() >= self.o.max_steps

    def train_step(self) -> dict:
        o, m = self.o, self.model
        m.train()
        sched = self.schedule_step()
        batch = self.task.batch(sched, o.batch_size, self.rng)
        dev = o.device
        prompt, answer = batch.prompt.to(dev), batch.answer.to(dev)
        fixed = batch.fixed.to(dev) if (o.clamp_givens and batch.fixed is not None) else None
        advance_scheduler(self.scheduler, sched)
        gen = self.gen if dev == "cpu" else None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=o.amp_bf16 and dev.startswith("cuda")):
            out = diffusion_loss(m, prompt, answer, self._device_gen(gen), fixed=fixed, sc_prob=o.sc_prob,
                                 canvases_per_prompt=o.canvases_per_prompt)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(m.parameters(), o.grad_clip) if o.grad_clip else torch.tensor(0.0)
        self.opt.step()
        self.step += 1
        self.examples += prompt.shape[0]
        return {"loss": float(out.loss.detach()), "dec": out.decoder, "enc": out.encoder, "acc": out.canvas_accuracy,
                "gnorm": float(gnorm), "lr": self.opt.param_groups[0]["lr"]}

    def _device_gen(self, gen):
        # Noise on an accelerator comes from a generator on that device, seeded from the CPU stream.
        if gen is not None:
            return gen
        if not hasattr(self, "_dgen"):
            self._dgen = torch.Generator(device=self.o.device)
            self._dgen.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=self.gen)))
        return self._dgen

    def _carried_generation_config(self) -> dict:
        """The generation_config.json the checkpoint will carry (the run's, the fine-tuned checkpoint's or the
        .gguf file's); {} when there is none."""
        if GENERATION_FILE in self.gguf_files:
            return json.loads(self.gguf_files[GENERATION_FILE])
        path = os.path.join(self.carry_from, GENERATION_FILE) if self.carry_from else None
        if path and os.path.isfile(path):
            with contextlib.suppress(OSError, ValueError), open(path, encoding="utf-8") as f:
                gen = json.load(f)
                return gen if isinstance(gen, dict) else {}
        return {}

    # ------------------------------------------------------------------ saving
    def save(self) -> None:
        """Write the checkpoint and the trainer state, replaced together (blockdiff/files.py): a save cut short
        (a second Ctrl-C, a full disk) leaves the folder as the last save left it."""
        o = self.o
        os.makedirs(o.out_dir, exist_ok=True)
        tok = self.task.tokenizer_json()
        with atomic_files() as stage:
            stage_model(self.model, o.out_dir, stage)
            # The task's tokenizer defines the ids of its data; without one (jsonl, copy) the fine-tuned
            # checkpoint's tokenizer files are what the new checkpoint is read with. Its generation_config.json
            # (stop ids, tuned sampler values) wins over the task's defaults.
            carried = {GENERATION_FILE, *PROCESSOR_FILES} | (set() if tok is not None else set(TOKENIZER_FILES))
            # The rest of the tokenizer / processor files in --out are another model's (a --no-resume run over
            # it): removed once the new checkpoint is in place, or the new weights would be read with them.
            stale = {*TOKENIZER_FILES, *PROCESSOR_FILES} - carried - ({"tokenizer.json"} if tok is not None else set())
            for name in sorted(carried):
                src = os.path.join(self.carry_from, name) if self.carry_from else None
                dst = os.path.join(o.out_dir, name)
                if src and os.path.isfile(src):
                    if os.path.abspath(src) != os.path.abspath(dst):
                        shutil.copyfile(src, stage(dst))
                elif name in self.gguf_files:
                    with open(stage(dst), "w", encoding="utf-8") as f:
                        f.write(self.gguf_files[name])
                elif name == GENERATION_FILE:
                    _dump_json(stage(dst), self.task.generation_config())
                else:
                    stale.add(name)
            if tok is not None:
                _dump_json(stage(os.path.join(o.out_dir, "tokenizer.json")), tok, indent=1)
            state = {"optimizer": self.opt.state_dict(), "scheduler": self.scheduler.state_dict(), "step": self.step,
                     "elapsed_s": self.elapsed_s, "examples": self.examples, "python_rng": self.rng.getstate(),
                     "torch_rng": self.gen.get_state(), "options": asdict(o), "task": self.task.name}
            torch.save(state, stage(os.path.join(o.out_dir, STATE_FILE)))
        drop_sharded_weights(o.out_dir)
        for name in stale:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(o.out_dir, name))

    def _log_json(self, rec: dict) -> None:
        with open(os.path.join(self.o.out_dir, LOG_FILE), "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _trim_log(self) -> None:
        """Drop the log records of steps after the saved state (a run killed between saves trained and logged
        them, and resuming trains them again): the learning curve then lists every step once."""
        path = os.path.join(self.o.out_dir, LOG_FILE)
        if not os.path.exists(path):
            return
        with open(path) as f:
            lines = f.readlines()
        kept = [ln for ln in lines if _log_step(ln) <= self.step]
        if len(kept) != len(lines):
            with atomic_path(path) as tmp, open(tmp, "w") as f:
                f.writelines(kept)

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        o = self.o
        if self.finished():  # a finished run, run again: nothing to train, and its saved files stay as they are
            self.log(f"{o.out_dir} is already trained to step {self.step} of --max-steps {o.max_steps}"
                     + (f" (its --time-budget of {o.time_budget_s / 60:g} min is spent)" if o.time_budget_s
                        and self.step < o.max_steps else "")
                     + ": nothing to do; raise --max-steps (or --time-budget) to train it further")
            return {}
        start_wall = time.time()
        window, t_window = [], time.time()
        last = {}
        with progress("training", total=o.max_steps, completed=self.step) as bar, StopSignals() as stop:
            while not self.finished():
                if stop.signum:
                    self.log(f"{signal.Signals(stop.signum).name} at step {self.step}: saving {o.out_dir} "
                             "(run the same command again to resume)")
                    break
                t0 = time.time()
                rec = self.train_step()
                if not math.isfinite(rec["loss"]):
                    # the optimizer step has already spread it into the weights: saving now would overwrite the
                    # last good checkpoint with a broken one
                    raise ValueError(
                        f"the loss is {rec['loss']} at step {self.step}: stopped without saving ({o.out_dir} keeps "
                        "its last save); a lower --lr or a longer --warmup-steps usually helps")
                bar.update(completed=self.step)
                self.elapsed_s += time.time() - t0
                window.append(rec)
                last = rec
                if self.step % o.log_every == 0 or self.step == o.max_steps:
                    dt = time.time() - t_window
                    n = len(window)
                    avg = {k: sum(r[k] for r in window) / n for k in ("loss", "dec", "enc", "acc")}
                    ex_s = n * o.batch_size / max(dt, 1e-9)
                    eta = (o.max_steps - self.step) * dt / n
                    if o.time_budget_s:
                        eta = min(eta, max(0.0, o.time_budget_s - self.elapsed_s))
                    self.log(f"step {self.step}/{o.max_steps} loss {avg['loss']:.4f} (dec {avg['dec']:.4f} "
                             f"enc {avg['enc']:.4f}) noised-acc {avg['acc']:.3f} lr {rec['lr']:.2e} "
                             f"{ex_s:.1f} ex/s {ex_s * self.task.canvas_length:.0f} canvas tok/s "
                             f"ETA {eta / 60:.1f} min {self.task.describe(self.schedule_step())}")
                    self._log_json({"step": self.step, "examples": self.examples, "elapsed_s": round(self.elapsed_s, 1),
                                    **{k: round(v, 5) for k, v in avg.items()}, "lr": rec["lr"],
                                    "stage": self.task.describe(self.schedule_step())})
                    window, t_window = [], time.time()
                if o.eval_every and self.step % o.eval_every == 0:
                    t1 = time.time()
                    ev = self.task.evaluate(self.model, self.step)
                    if ev:
                        self.log(f"eval step {self.step}: " + " ".join(f"{k} {v:.3f}" for k, v in ev.items())
                                 + f" ({time.time() - t1:.1f}s)")
                        self._log_json({"step": self.step, "elapsed_s": round(self.elapsed_s, 1), "eval": ev})
                    t_window += time.time() - t1
                if o.save_every and self.step % o.save_every == 0:
                    self.save()
                if o.time_limit_s and time.time() - start_wall > o.time_limit_s:
                    self.log(f"time limit reached at step {self.step}")
                    break
            self.save()  # still under StopSignals: a Ctrl-C now waits for the save instead of cutting it short
        self.log(f"saved {o.out_dir} at step {self.step} ({self.elapsed_s / 60:.1f} min of training)")
        sys.stdout.flush()
        if stop.signum:  # saved: now end as the signal asked (SIGINT: KeyboardInterrupt; SIGTERM: terminated)
            signal.raise_signal(stop.signum)
        return last


class StopSignals:
    """While active (main thread only), SIGINT and SIGTERM ask the training loop to stop at the end of the current
    step and save, instead of killing it between saves (losing up to ``save_every`` steps) or in the middle of
    writing. ``signum`` is the first signal received; a second SIGINT raises KeyboardInterrupt at once (the
    checkpoint and trainer state are replaced together, so that loses steps, never the run). The previous handlers are
    restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:  # an ignored signal (a `cmd &` in a script) stays so
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


def _read_state(path: str) -> dict:
    """trainer_state.pt, or one line naming it when it cannot be read (truncated by a crash before saves were
    atomic, a full disk, another program's file)."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError ... for a damaged file
        why = (str(e).splitlines() or ["empty"])[0][:120]
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {why}); --no-resume starts the run over") \
            from None
    missing = [k for k in ("step", "elapsed_s", "examples", "optimizer", "python_rng", "torch_rng")
               if not isinstance(st, dict) or k not in st]
    if missing:
        raise ValueError(f"{path} is not a blockdiff trainer state (no {', '.join(missing)}); "
                         "--no-resume starts the run over")
    return st


def free_memory(device: str) -> int | None:
    """Bytes the device can still allocate (CPU: the kernel's MemAvailable), or None when unknown."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_batch_fits(model, task: Task, o: TrainOptions) -> None:
    """Refuse a --batch-size whose logits alone cannot fit: the kernel's OOM killer otherwise ends the run with
    a bare "Killed" (exit 137) minutes into loading, and a CUDA run with an out-of-memory traceback. A lower bound:
    the fp32 logits over the vocabulary that one step keeps for its backward pass (the prompt, the answer read
    causally, each noised canvas), and their gradients."""
    free = free_memory(o.device)
    if free is None:
        return
    prompt = task.batch(0, 1, random.Random(0)).prompt.shape[1]
    positions = prompt + task.canvas_length * (1 + o.canvases_per_prompt)
    need = o.batch_size * positions * model.vocab_size * 4 * 2
    if need > free:
        raise ValueError(f"--batch-size {o.batch_size} cannot fit: its logits alone need {need / 2 ** 30:.1f} GiB "
                         f"({o.batch_size} x {positions} positions x vocabulary {model.vocab_size} x fp32, and their "
                         f"gradients), and {o.device} has {free / 2 ** 30:.1f} GiB free; lower --batch-size")


def _dump_json(path: str, data, indent: int = 2) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent)


def _log_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return 0


def _local_dir(ref: str | None) -> str | None:
    """The local folder of a checkpoint reference (a folder, or a hub id already downloaded); None for a GGUF
    file or nothing."""
    if not ref or is_gguf(ref, None):
        return None
    return resolve_path(ref)


def _gguf_files(ref: str) -> dict[str, str]:
    """The tokenizer files and generation_config.json of a .gguf file's metadata, as file name -> text."""
    from ..hub import resolve_gguf
    from ..quant.gguf import generation_from_gguf, open_gguf, tokenizer_from_gguf

    reader = open_gguf(resolve_gguf(ref, None))
    gen = {k: v for k, v in generation_from_gguf(reader).items() if v is not None}
    out = {GENERATION_FILE: json.dumps(gen, indent=2)}
    tok = tokenizer_from_gguf(reader)
    if tok is not None:
        out["tokenizer.json"] = tok.to_json()
        out["tokenizer_config.json"] = json.dumps({k: v for k, v in tok.config.items() if v is not None}, indent=2)
        if tok.chat_template:
            out["chat_template.jinja"] = tok.chat_template
    return out


def _refuse_quantized(model: torch.nn.Module, ref: str) -> None:
    from ..quant.modules import has_quantized_modules

    if has_quantized_modules(model):
        method = (model.config.raw.get("quantization_config") or {}).get("method", "quantized")
        raise ValueError(f"{ref} holds quantized weights ({method}): training needs full-precision weights; "
                         "fine-tune the checkpoint it was quantized from")
