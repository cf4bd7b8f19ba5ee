#!/usr/bin/env bash
# Every CUDA path once, and the GPU measurements, in one run of at most about 8 minutes; prints one table.
#
#   bash bench/gpu_check.sh            # on a GPU machine, after scripts/install.sh
#   DEVICE=cpu QUICK=1 bash bench/gpu_check.sh   # dry run of the same steps at tiny sizes on the CPU
#
# Steps, in order: the GPU test subset (TEST_DEVICE=cuda pytest of the speech, scoring, open-set, model,
# resume-determinism and AMP tests; the 2-process DDP test needs 2 GPUs and is skipped with a line on one),
# all-pairs scoring + EER of 10,000 embeddings (49,995,000 pairs) in fp32, tf32 and bf16, EER of 10 M
# scores, training throughput (TDNN 30x800 batch 120 and ResNet-18 CIFAR batch 128, fp32 and bf16, the
# real loaders against the same batches already on the GPU), the digits demo and one Fashion-MNIST epoch.
# Each step's log goes to $LOGS (default $OUT or runs/gpu_check); a failing step is reported, not fatal.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
LOGS=${LOGS:-${OUT:-runs/gpu_check}}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$LOGS"
SUMMARY="$LOGS/summary.txt"
: >"$SUMMARY"
START=$(date +%s)

if [ "$QUICK" = 1 ]; then
  N_PAIRS=400; N_SCORES=100000; STEPS=3; FM_ITEMS=20; TESTS_K="not slow"
else
  N_PAIRS=10000; N_SCORES=10000000; STEPS=200; FM_ITEMS=6000; TESTS_K="not slow"
fi

step() {  # step NAME TIMEOUT_S COMMAND... : run, keep the log, record status and seconds
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  printf '%-28s rc=%-3s %5ss\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$SUMMARY"
}

echo "gpu_check on $DEVICE (quick=$QUICK), logs in $LOGS" | tee -a "$SUMMARY"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee -a "$SUMMARY"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())" \
  | tee -a "$SUMMARY"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")

TEST_FILES=(tests/test_speech.py tests/test_scoring.py tests/test_open_set.py tests/test_models.py tests/test_resume.py
            tests/test_losses.py tests/test_augment.py)
step tests-on-device 240 env TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -x -p no:cacheprovider -m "$TESTS_K" \
  "${TEST_FILES[@]}"
if [ "${GPUS:-0}" -ge 2 ] || [ "$DEVICE" = cpu ]; then
  step ddp-2-processes 120 env TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider tests/test_ddp.py
else
  echo "ddp-2-processes              skipped: one GPU (needs 2)" | tee -a "$SUMMARY"
fi
step allpairs-fp32 120 "$PY" bench/allpairs.py --device "$DEVICE" --n "$N_PAIRS" --repeats 2 --out "$LOGS/performance.md"
step allpairs-tf32 120 "$PY" bench/allpairs.py --device "$DEVICE" --n "$N_PAIRS" --repeats 2 --tf32 --no-baseline --out "$LOGS/performance.md"
step allpairs-bf16 120 "$PY" bench/allpairs.py --device "$DEVICE" --n "$N_PAIRS" --repeats 2 --amp --no-baseline --out "$LOGS/performance.md"
step allpairs-sym-fp32 120 "$PY" bench/allpairs.py --device "$DEVICE" --n "$N_PAIRS" --repeats 2 --pair-features sym --out "$LOGS/performance.md"
step metrics 60 "$PY" bench/metric_speed.py --device "$DEVICE" --n "$N_SCORES" --no-sklearn --out "$LOGS/performance.md"
step throughput 240 "$PY" bench/train_throughput.py --device "$DEVICE" --out "$LOGS/performance.md" --models TDNN,resnet \
  --precisions "$([ "$DEVICE" = cpu ] && echo fp32 || echo fp32,bf16)" --steps "$STEPS" \
  --workers "$([ "$DEVICE" = cpu ] && echo 0 || echo 8)"
DIGITS_FLAGS=()
[ "$QUICK" = 1 ] && DIGITS_FLAGS=(--epochs 1)
step digits-demo 120 "$PY" train.py --device "$DEVICE" --checkpoint-path "$LOGS/digits" "${DIGITS_FLAGS[@]}"
step fashion-epoch 180 "$PY" train.py --device "$DEVICE" --data-path /usr/share/datasets/fashion-mnist \
  --valid-data-path /usr/share/datasets/fashion-mnist --items-per-class "$FM_ITEMS" --epochs 1 --batch-size 128 \
  --lr 0.05 --softmax am_softmax --valid-max-items 2000 --checkpoint-path "$LOGS/fashion" --no-cp

echo | tee -a "$SUMMARY"
echo "key lines:" | tee -a "$SUMMARY"
grep -h -E "passed|failed|skipped|error" "$LOGS/tests-on-device.log" "$LOGS"/ddp-2-processes.log 2>/dev/null \
  | tail -n 3 | tee -a "$SUMMARY"
for f in allpairs-fp32 allpairs-tf32 allpairs-bf16 allpairs-sym-fp32; do
  grep -h -E "split scoring \+ metrics|split form|-> [0-9.]+x|EER" "$LOGS/$f.log" 2>/dev/null | sed "s/^/$f: /" \
    | tee -a "$SUMMARY"
done
grep -h -E "compute_metrics|->" "$LOGS/metrics.log" 2>/dev/null | sed 's/^/metrics: /' | tee -a "$SUMMARY"
grep -h -E "samples/s|% of the in-memory|bf16 / fp32" "$LOGS/throughput.log" 2>/dev/null | tee -a "$SUMMARY"
grep -h -E "^(e2e|cos|fus) " "$LOGS/digits-demo.log" 2>/dev/null | sed 's/^/digits: /' | tee -a "$SUMMARY"
grep -h -E "^epoch" "$LOGS/fashion-epoch.log" 2>/dev/null | sed 's/^/fashion: /' | tee -a "$SUMMARY"
echo "total $(( $(date +%s) - START )) s" | tee -a "$SUMMARY"
