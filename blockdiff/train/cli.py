"""``blockdiff train``: train or fine-tune a DiffusionGemma-architecture model.

Examples::

    blockdiff train --task sudoku --recipe sudoku-small --clamp-givens --out runs/sudoku \\
        --max-steps 20000 --curriculum 0:45-70,3000:35-65
    blockdiff train --task jsonl --data pairs.jsonl --init-from some/checkpoint --out runs/ft

Re-running the same command resumes from ``--out`` (``--no-resume`` starts over; a finished run trains nothing).
Ctrl-C or SIGTERM saves at the end of the current step, then stops. Details: docs/sudoku.md, "Training".
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch

from ..argtypes import above, at_least, fraction


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (checkpoint + trainer state + log)")
    p.add_argument("--task", choices=["sudoku", "jsonl", "copy"], default="sudoku")
    p.add_argument("--data", help="jsonl task: file of {prompt_ids, answer_ids} lines")
    p.add_argument("--vocab-size", type=at_least(2), help="jsonl/copy task: vocabulary size")
    p.add_argument("--canvas-length", type=at_least(1), help="jsonl/copy task: canvas length")
    p.add_argument("--recipe", help="model size for a from-scratch run (default sudoku-small; not with --init-from)")
    p.add_argument("--init-from", help="fine-tune: start from this checkpoint's weights (fresh optimizer; folder, hub "
                   "id or .gguf; not a quantized checkpoint)")
    p.add_argument("--max-steps", type=at_least(1), default=1000)
    p.add_argument("--batch-size", type=at_least(1), default=64)
    p.add_argument("--lr", type=above(0), default=1e-3)
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument("--decay-start", type=at_least(0), default=0,
                   help="constant schedule: decay linearly from this step to --min-lr-ratio at --max-steps")
    p.add_argument("--min-lr-ratio", type=fraction, default=0.1)
    p.add_argument("--warmup-steps", type=at_least(0), default=100)
    p.add_argument("--weight-decay", type=at_least(0.0, float), default=0.01)
    p.add_argument("--grad-clip", type=at_least(0.0, float), default=1.0)
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--sc-prob", type=fraction, default=0.5, help="self-conditioning probability per example")
    p.add_argument("--clamp-givens", action="store_true", help="never noise the task's fixed (given) positions")
    p.add_argument("--canvases-per-prompt", type=at_least(1), default=1,
                   help="independently noised canvases per encoded prompt (more decoder signal per step)")
    p.add_argument("--curriculum", default="0:45-70", help="sudoku: STEP:MINCLUES-MAXCLUES,...")
    p.add_argument("--sudoku-pool", type=at_least(0), default=0,
                   help="sudoku: draw this many solution grids up front and build batches with tensor ops (GPU)")
    p.add_argument("--data-workers", type=at_least(1), default=1, help="processes drawing the sudoku pool")
    p.add_argument("--eval-every", type=at_least(0), default=0)
    p.add_argument("--eval-puzzles", type=at_least(1), default=64)
    p.add_argument("--save-every", type=at_least(0), default=200)
    p.add_argument("--log-every", type=at_least(1), default=10)
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU) | cpu | cuda | cuda:N")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--time-limit", type=at_least(0.0, float), default=0.0,
                   help="stop and save after this many seconds (0: no limit)")
    p.add_argument("--time-budget", type=at_least(0.0, float), default=0.0,
                   help="total training seconds the LR schedule and curriculum are stretched over (ends the run)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over in --out (overwriting what it holds) instead of resuming the run there")


def build_task(args):
    if args.task == "sudoku":
        from ..sudoku.task import SudokuTask
        return SudokuTask(args.curriculum, eval_puzzles=args.eval_puzzles, pool_size=args.sudoku_pool,
                          pool_seed=args.seed, workers=args.data_workers, device=args.device)
    from .tasks import CopyTask, JsonlTask
    if args.task == "copy":
        return CopyTask(args.vocab_size or 32, args.canvas_length or 8)
    if not args.data or not args.vocab_size or not args.canvas_length:
        raise SystemExit("--task jsonl needs --data, --vocab-size and --canvas-length")
    try:
        return JsonlTask(args.data, args.vocab_size, args.canvas_length)
    except OSError as e:
        raise ValueError(f"--data {args.data}: cannot read it: {e.strerror or e}") from None


def run(args) -> int:
    from .loop import TrainOptions, Trainer
    from ..cli import check_device, check_threads
    from .recipes import RECIPES, model_config

    check_threads(args.threads)
    if getattr(args, "device", None):
        args.device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.init_from and args.recipe:  # the checkpoint's config.json is the model: the recipe went unused
        raise ValueError(f"--recipe {args.recipe} builds a new model, --init-from {args.init_from} starts from that "
                         "checkpoint's: pass one of them")
    task = build_task(args)
    config = None
    if not args.init_from:
        recipe = args.recipe or "sudoku-small"
        if recipe not in RECIPES:
            raise SystemExit(f"unknown recipe {recipe!r}; choose from {sorted(RECIPES)}")
        config = model_config(task.vocab_size, task.canvas_length, **RECIPES[recipe])
    o = TrainOptions(out_dir=args.out, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                     schedule=args.schedule, decay_start=args.decay_start,
                     min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                     grad_clip=args.grad_clip, seed=args.seed, sc_prob=args.sc_prob,
                     clamp_givens=args.clamp_givens,
                     canvases_per_prompt=args.canvases_per_prompt, log_every=args.log_every, eval_every=args.eval_every,
                     save_every=args.save_every, device=args.device, amp_bf16=args.bf16,
                     resume=not args.no_resume, time_limit_s=args.time_limit,
                     time_budget_s=args.time_budget)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; name a folder for the run")
    created = not os.path.exists(args.out)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {args.out}: cannot create the run folder: {e.strerror or e}") from None
    try:
        trainer = Trainer(task, o, config=config, init_from=args.init_from, log=lambda s: print(s, flush=True))
        trainer.run()
    except BaseException:  # a bad --init-from, Ctrl-C while loading, a first step that fails (a prompt + canvas
        _remove_if_empty(args.out, created)  # longer than the sliding window): leave no empty run folder behind
        raise
    return 0


def _remove_if_empty(path: str, created: bool) -> None:
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(path)  # only an empty folder: nothing a run wrote is ever removed


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train or fine-tune a DiffusionGemma-architecture model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m blockdiff.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
