#!/usr/bin/env bash
# The GPU benchmark of issue 8, in one go on one H100/H200 (about 5 minutes; under 8): the released 26B-A4B
# shape with random weights built on the device, per batch size (1, 4, 16), exact and fast mode: denoise tick time against the
# memory-bandwidth floor, tok/s at 16 and 48 steps per canvas, peak memory; then one denoising tick's memory at
# the real vocabulary (batch 16, canvas 256). JSON reports under $OUT.
#
#   OUT=/path/to/results scripts/gpu_bench.sh
#   GPU_BENCH_SMOKE=1 OUT=/tmp/x scripts/gpu_bench.sh   # CPU smoke run of the same steps on a toy shape (tests)
#
# Environment: PYTHON (default python), DEVICE (default cuda), BATCHES (default 1,4,16), DTYPE (default auto:
# bf16 on GPU), PEAK_BANDWIDTH (GB/s; default: the table in blockdiff/bench/full_shape_ticks.py), BUDGET_S (default 450:
# the compiled run only starts with enough of it left, and is cut at the budget), TP_CONFIG / TP_BATCH (the
# tensor-parallel runs on machines with 2+ GPUs, step 5).
#
# The main run is eager (BLOCKDIFF_COMPILE=0): the first torch.compile of the 30-layer shape is unmeasured and may
# take minutes. With time left, the same run repeats compiled (full_compiled.json); its warm-up ticks absorb the
# compile, the timed ticks come after it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:?set OUT to a folder for the JSON reports}
mkdir -p "$OUT"
BENCH=("$PY" -m blockdiff.cli bench)
EXTRA=()
[ -n "${PEAK_BANDWIDTH:-}" ] && EXTRA+=(--peak-bandwidth "$PEAK_BANDWIDTH")

if [ -n "${GPU_BENCH_SMOKE:-}" ]; then
  DEVICE=${DEVICE:-cpu}; SHAPE=full-smoke; BATCHES=${BATCHES:-1,2}; REPEATS=1; WARMUP=0; PROMPT=8
  VOCAB_CONFIG=tiny; VOCAB_BATCH=2; EXTRA+=(--threads 1)
else
  DEVICE=${DEVICE:-cuda}; SHAPE=full; BATCHES=${BATCHES:-1,4,16}; REPEATS=5; WARMUP=2; PROMPT=256
  VOCAB_CONFIG=vocab-full; VOCAB_BATCH=16
  "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
fi
start=$(date +%s)

# 1. The full shape, per batch size (bf16 on GPU), eager; exact and fast mode (approximate) at each batch size.
BLOCKDIFF_COMPILE=0 "${BENCH[@]}" --random-config "$SHAPE" --device "$DEVICE" --dtype "${DTYPE:-auto}" --batches "$BATCHES" \
  --repeats "$REPEATS" --warmup "$WARMUP" --prompt-len "$PROMPT" --fast "${EXTRA[@]}" --out "$OUT/full.json"

# 2. Quantized variants of the full shape: `bench --random-config full --quantization Q` builds the shape in CPU
#    memory tensor by tensor and times one denoise step (blockdiff/bench/full_shape_quantized.py), so the per-batch
#    flags do not apply (bench refuses --batches, --fast, --peak-bandwidth with it). full-smoke (the
#    smoke run) takes no --quantization: it used to run unquantized under a full_$q.json name.
if [ "$SHAPE" = full ] && grep -q -- '"--quantization"' blockdiff/bench/cli.py 2>/dev/null; then
  for q in ${QUANT_SCHEMES:-int8 int4 fp8}; do
    "${BENCH[@]}" --random-config full --prompt-len "$PROMPT" --quantization "$q" --out "$OUT/full_$q.json" \
      || echo "quantization $q failed (see above)" >&2
  done
fi

# 3. One denoising tick's memory at the real vocabulary: logits buffer vs everything beyond it.
if [ -z "${GPU_BENCH_SMOKE:-}" ] || [ -n "${GPU_BENCH_SMOKE_MEMORY:-}" ]; then
  BLOCKDIFF_COMPILE=0 "${BENCH[@]}" --random-config "$VOCAB_CONFIG" --device "$DEVICE" --batch "$VOCAB_BATCH" --tick-memory \
    --no-oracle --systems blockdiff-default --steps 2 --repeats 1 --warmup 0 --prompt-len "$PROMPT" \
    "${EXTRA[@]}" --out "$OUT/vocab_full_tick.json"
fi
# 4. The same run compiled (torch.compile of the denoise step, the CUDA default), if the budget allows.
left=$(( ${BUDGET_S:-450} - ($(date +%s) - start) ))
if [ -z "${GPU_BENCH_SMOKE:-}" ] && [ "$left" -gt 150 ]; then
  BLOCKDIFF_COMPILE=1 timeout "$left" "${BENCH[@]}" --random-config "$SHAPE" --device "$DEVICE" --dtype "${DTYPE:-auto}" \
    --batches "$BATCHES" --repeats "$REPEATS" --warmup "$WARMUP" --prompt-len "$PROMPT" "${EXTRA[@]}" \
    --out "$OUT/full_compiled.json" || echo "compiled run: not finished within the budget (${left} s)" >&2
fi
# 5. Tensor parallel (issue 19) on machines with several GPUs: one checkpoint split over 1/2/4/8 GPUs (NCCL), the
#    same batch, default sampler. TP_CONFIG (default mid-v262k: the real vocabulary, mid-size layers) - the full
#    shape needs a 50 GB random checkpoint on disk and each rank loads the whole file before keeping its shard
#    (shard-while-loading is not built yet), so it is not the default here.
NGPU=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
if [ -z "${GPU_BENCH_SMOKE:-}" ] && [ "${NGPU:-0}" -ge 2 ]; then
  for tp in 1 2 4 8; do
    [ "$NGPU" -ge "$tp" ] || continue
    "${BENCH[@]}" --random-config "${TP_CONFIG:-mid-v262k}" --device "$DEVICE" --tensor-parallel-size "$tp" \
      --batch "${TP_BATCH:-16}" --no-oracle --systems blockdiff-default --no-memory-run --repeats 3 --warmup 1 \
      --prompt-len "$PROMPT" --out "$OUT/tp$tp.json" || echo "tensor parallel $tp failed (see above)" >&2
  done
fi
echo "gpu_bench: done in $(( $(date +%s) - start )) s; reports in $OUT"
