#!/usr/bin/env bash
# Train the Sudoku DiffusionGemma model from scratch on one GPU (~10 minutes of an H100), evaluate it, and
# write the checkpoint, log and evaluation under $OUT. Self-contained: it draws its own data on the machine.
#
#   bash scripts/train_sudoku_gpu.sh                          # the GPU run (cuda, bf16 autocast)
#   bash scripts/train_sudoku_gpu.sh --device cpu --max-steps 2  # smoke test of the same script on CPU
#
# Options: --device D  --max-steps N  --time-limit SECONDS (training budget: the cosine schedule and the
#          curriculum run on max(step / N, elapsed / SECONDS), so the run ends on time whatever the step rate)
#          --recipe NAME
#          --batch-size B  --per-band N (evaluation puzzles per clue band)  --out DIR
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
MAX_STEPS=20000
TIME_LIMIT=420          # training seconds; leaves ~3 minutes of a 10-minute session for start-up and the evaluation
RECIPE=sudoku-large
BATCH=""
PER_BAND=""
OUTDIR="${OUT:-runs/gpu}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --max-steps) MAX_STEPS="$2"; shift 2 ;;
    --time-limit) TIME_LIMIT="$2"; shift 2 ;;
    --recipe) RECIPE="$2"; shift 2 ;;
    --batch-size) BATCH="$2"; shift 2 ;;
    --per-band) PER_BAND="$2"; shift 2 ;;
    --out) OUTDIR="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

if [[ "$DEVICE" == cpu ]]; then
  # Smoke-test sizes: the same code path, seconds on a laptop.
  BATCH="${BATCH:-4}"; PER_BAND="${PER_BAND:-2}"; POOL=64; WORKERS=1; EXTRA=(--threads 2); EVAL_EVERY=0
else
  BATCH="${BATCH:-256}"; PER_BAND="${PER_BAND:-200}"; POOL=200000; WORKERS=14; EXTRA=(--bf16); EVAL_EVERY=1000
fi
RUN="$OUTDIR/sudoku"
mkdir -p "$OUTDIR"
python - <<PY
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY

# Curriculum: many clues first, then down to the hardest band (steps scale with MAX_STEPS).
C1=$((MAX_STEPS / 10)); C2=$((MAX_STEPS / 4)); C3=$((MAX_STEPS / 2))
python -m blockdiff.train --task sudoku --recipe "$RECIPE" --clamp-givens --out "$RUN" --no-resume \
  --device "$DEVICE" "${EXTRA[@]}" --batch-size "$BATCH" --canvases-per-prompt 2 \
  --lr 1e-3 --schedule cosine --warmup-steps $((MAX_STEPS / 50 + 1)) --max-steps "$MAX_STEPS" \
  --time-budget "$TIME_LIMIT" --curriculum "0:45-75,$C1:35-65,$C2:28-55,$C3:22-50" \
  --sudoku-pool "$POOL" --data-workers "$WORKERS" --eval-every "$EVAL_EVERY" --eval-puzzles 128 \
  --save-every 2000 --log-every 100 --seed 0 2>&1 | tee "$OUTDIR/train.log"

# exact, fast (approximate, issue 20: its quality and wall time on a trained model) and autoregressive decoding
python -m blockdiff.sudoku.eval --model "$RUN" --device "$DEVICE" --per-band "$PER_BAND" --modes diffusion,fast,ar \
  --batch-size 256 --out "$OUTDIR/eval.json" 2>&1 | tee "$OUTDIR/eval.md"
rm -f "$RUN/trainer_state.pt.tmp"
echo "checkpoint: $RUN  log: $OUTDIR/train.log  evaluation: $OUTDIR/eval.md"
