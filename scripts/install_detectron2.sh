#!/usr/bin/env bash
# Install detectron2 into the Python environment of $PYTHON (default: .venv/bin/python).
#
# Two paths:
#   DETECTRON2_SOURCE=<git URL | local checkout>   upstream build, C++/CUDA ops included
#       e.g. DETECTRON2_SOURCE=git+https://github.com/facebookresearch/detectron2.git
#   (unset, default)                               offline: PyPI sdist pb1-detectron2==0.6
#       (detectron2 as of 2022) installed as pure Python, since the sdist lacks
#       detectron2/layers/csrc. detectron2._C becomes a placeholder whose use names the
#       missing build (scripts/detectron2_C_stub.py). RetinaNet needs no compiled op.
# torch must already be installed: detectron2's setup.py imports it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-.venv/bin/python}
SDIST_NAME=pb1-detectron2
SDIST_VERSION=0.6
SDIST_SHA256=5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "install_detectron2.sh: torch is not importable by $PYTHON; install requirements-torch.txt first" >&2
  exit 1
fi

if [ -n "${DETECTRON2_SOURCE:-}" ]; then
  src=$DETECTRON2_SOURCE
  if [ ! -d "$src" ] && [[ "$src" != git+* ]] && [[ "$src" == *://* ]]; then
    src="git+$src"
  fi
  echo "install_detectron2.sh: building detectron2 from $src (with its C++/CUDA ops)"
  "$PYTHON" -m pip install --no-build-isolation "$src"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "install_detectron2.sh: installing $SDIST_NAME==$SDIST_VERSION as pure Python (no C++ ops)"
# The sdist's setup.py imports torch, so even the download needs --no-build-isolation.
"$PYTHON" -m pip download --quiet --no-deps --no-build-isolation --no-binary :all: \
  "$SDIST_NAME==$SDIST_VERSION" -d "$work"
tarball="$work/$SDIST_NAME-$SDIST_VERSION.tar.gz"
echo "$SDIST_SHA256  $tarball" | sha256sum --check --quiet
tar xzf "$tarball" -C "$work"
srcdir="$work/$SDIST_NAME-$SDIST_VERSION"
# Its csrc directory is missing, so building the extension cannot work: build no extension.
grep -q 'ext_modules=get_extensions(),' "$srcdir/setup.py" || {
  echo "install_detectron2.sh: unexpected setup.py in $SDIST_NAME $SDIST_VERSION" >&2
  exit 1
}
sed -i 's/ext_modules=get_extensions(),/ext_modules=[],/' "$srcdir/setup.py"
# Restore upstream's layout (configs/ at the top), from which setup.py packages the model-zoo
# configs; in the sdist they sit where setup.py does not look, so model_zoo.get_config_file fails.
mv "$srcdir/detectron2/model_zoo/configs" "$srcdir/configs"
cp "$here/detectron2_C_stub.py" "$srcdir/detectron2/_C.py"
"$PYTHON" -m pip install --quiet --no-build-isolation "$srcdir"
