"""Placeholder for ``detectron2._C`` in a pure-Python detectron2 install.

scripts/install_detectron2.sh puts this file at ``detectron2/_C.py`` when detectron2 is installed
from the PyPI sdist ``pb1-detectron2``, whose C++/CUDA sources are absent. detectron2 imports
``_C`` at import time in a few modules (deformable conv, rotated boxes, fast COCO eval), so the
import must succeed; any use of a compiled op then fails with an error that names the missing
build instead of an obscure ImportError. RetinaNet needs none of these ops.
"""

# Checked by retinanet_plugin.utils.env.has_compiled_ops().
IS_PLACEHOLDER = True


# detectron2.utils.collect_env (called by default_setup, i.e. by every train_net.py run) asks the
# compiled module how it was built; these answers say that it was not.
def get_compiler_version() -> str:
    return "none (placeholder detectron2._C, no compiled ops)"


def get_cuda_version() -> str:
    return "none (placeholder detectron2._C, no compiled ops)"


def has_cuda() -> bool:
    return False


class MissingCompiledOpsError(AttributeError):
    """A compiled detectron2 op was used in an install without detectron2's C++/CUDA build."""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise MissingCompiledOpsError(
        f"detectron2._C.{name} is not available: this detectron2 was installed from the PyPI "
        "sdist pb1-detectron2 without its compiled C++/CUDA ops (detectron2/layers/csrc is not "
        "in that sdist). Rebuild detectron2 from source to use it, e.g. "
        "`DETECTRON2_SOURCE=git+https://github.com/facebookresearch/detectron2.git "
        "make install`. RetinaNet does not need it; for COCO evaluation use "
        "COCOEvaluator(..., use_fast_impl=False)."
    )
