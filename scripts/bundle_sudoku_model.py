"""Copy a Sudoku training run into the bundled model folder and write its TRAINING.md.

    python scripts/bundle_sudoku_model.py runs/sudoku-s1 blockdiff/models/sudoku --commands runs/sudoku-s1.commands

Copies the released layout (config.json, generation_config.json, model.safetensors, tokenizer.json), never
the optimizer state, and renders the learning curve from the run's train_log.jsonl. ``--generation KEY=VALUE``
overrides sampling defaults in the bundled generation_config.json (e.g. t_max=0.9); the result is checked as the
loader checks it before anything is copied.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from blockdiff.config import check_generation_config

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")


def learning_curve(log_path: str, every: int = 100) -> tuple[str, dict]:
    rows, evals = [], {}
    with open(log_path) as f:
        for line in f:
            r = json.loads(line)
            if "eval" in r:
                evals[r["step"]] = r["eval"]
            else:
                rows.append(r)
    by_step = {}
    for r in rows:
        by_step[r["step"]] = r  # a resumed run re-logs steps after its last save: keep the latest
    out = ["| step | puzzles seen | training time (min) | loss | decoder | encoder | noised-cell acc | clues | "
           "in-training eval: solved / cell acc (>=40) |", "|---|---|---|---|---|---|---|---|---|"]
    last = None
    for step in sorted(by_step):
        r = by_step[step]
        last = r
        if step % every and step != max(by_step):
            continue
        ev = evals.get(step)
        ev_s = f"{ev['solve>=40']:.0%} / {ev['cell_acc>=40']:.0%}" if ev else ""
        out.append(f"| {step} | {r['examples']} | {r['elapsed_s'] / 60:.1f} | {r['loss']:.3f} | {r['dec']:.3f} | "
                   f"{r['enc']:.3f} | {r['acc']:.3f} | {r['stage'].replace('clues ', '')} | {ev_s} |")
    return "\n".join(out), last or {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("dest")
    ap.add_argument("--commands", help="file with the exact training command(s), one a line")
    ap.add_argument("--eval-table", help="markdown evaluation table to include")
    ap.add_argument("--generation", action="append", default=[], help="KEY=VALUE sampling default override")
    ap.add_argument("--every", type=int, default=100)
    args = ap.parse_args(argv)
    # Every input is read before anything is written, so a wrong path leaves DEST as it was.
    texts = {}
    for flag, path in (("--commands", args.commands), ("--eval-table", args.eval_table)):
        try:
            texts[flag] = open(path).read().strip() if path else None
        except OSError as e:
            ap.error(f"{flag} {path}: cannot read it: {e.strerror}")
    for name in FILES + ("train_log.jsonl",):
        if not os.path.isfile(os.path.join(args.run, name)):
            ap.error(f"{args.run} has no {name}: pass the --out folder of a `blockdiff train` run")
    gen = json.load(open(os.path.join(args.run, "generation_config.json")))
    for kv in args.generation:
        k, sep, v = kv.partition("=")
        try:
            gen[k] = json.loads(v) if sep else None
        except json.JSONDecodeError:
            ap.error(f"--generation {kv}: the value must be JSON (a number, true/false, a list, or a quoted string)")
        if not sep:
            ap.error(f"--generation {kv}: expected KEY=VALUE")
    gen_path = os.path.join(args.dest, "generation_config.json")
    try:  # a key the loader refuses (entropy_bound belongs in sampler_config) fails here, before anything is copied
        check_generation_config(gen, gen_path)
    except ValueError as e:
        ap.error(f"--generation: {e}")
    os.makedirs(args.dest, exist_ok=True)
    for name in FILES:
        shutil.copy(os.path.join(args.run, name), os.path.join(args.dest, name))
    with open(gen_path, "w") as f:
        json.dump(gen, f, indent=2)
    curve, last = learning_curve(os.path.join(args.run, "train_log.jsonl"), args.every)
    cfg = json.load(open(os.path.join(args.dest, "config.json")))["text_config"]
    commands = texts["--commands"] or "(not recorded)"
    size = os.path.getsize(os.path.join(args.dest, "model.safetensors"))
    text = f"""# The bundled Sudoku model

A DiffusionGemma-architecture model trained from scratch by `blockdiff train` on 2 shared CPU cores.
Format: `docs/sudoku.md` (cell-tagged tokens, givens fixed by `canvas_template`).

- Architecture: {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {cfg['num_attention_heads']} heads of
  {cfg['head_dim']} ({cfg['num_key_value_heads']} KV heads), dense GeGLU {cfg['intermediate_size']} in parallel with
  {cfg['num_experts']} experts top-{cfg['top_k_experts']} (expert width {cfg['moe_intermediate_size']}), last layer
  full attention, tied embeddings, soft-cap {cfg['final_logit_softcapping']}, vocabulary {cfg['vocab_size']},
  canvas 81. `model.safetensors`: {size / 1e6:.1f} MB (fp32).
- Seed 0. Budget spent: {last.get('step', '?')} optimizer steps, {last.get('examples', '?')} puzzles
  (x4 noised canvases each), {last.get('elapsed_s', 0) / 60:.0f} minutes of training on 2 CPU cores shared with
  other jobs (1 torch thread).
- Sampling defaults in `generation_config.json`: {json.dumps({k: gen[k] for k in ('max_denoising_steps', 't_max', 't_min') if k in gen})},
  entropy bound {gen.get('sampler_config', {}).get('entropy_bound')}.

## Exact training commands (the run was resumed with the same `--out`; each line continues the last)

```
{commands}
```

## Learning curve

"noised-cell acc" = decoder argmax accuracy on the noised canvas cells of the training batches (all noise
levels); the in-training eval solves 32 held-out unique 40-50-clue puzzles with a simple threshold sampler.

{curve}
"""
    if args.eval_table:
        text += "\n## Evaluation (held-out unique puzzles, `python -m blockdiff.sudoku.eval`)\n\n" + \
            texts["--eval-table"] + "\n"
    with open(os.path.join(args.dest, "TRAINING.md"), "w") as f:
        f.write(text)
    print(f"bundled {args.run} -> {args.dest} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
