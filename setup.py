"""retinanet_plugin: RetinaNet with focal loss as a Detectron2 plugin.

detectron2 is not on PyPI, so it is not listed in install_requires; install it first
(scripts/install_detectron2.sh, or `make install`). This file stops early with a clear message when
torch or detectron2 is missing from the environment being installed into.
"""

import os
import subprocess
import sys

from setuptools import find_packages, setup

_REQUIRED = ("torch", "detectron2")


def _missing_in_target_env():
    """Names of required packages that the target interpreter cannot import.

    Under pip's build isolation the build runs with a temporary sys.path, so the check asks the
    same interpreter again with the isolation variables removed.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    missing = []
    for name in _REQUIRED:
        probe = f"import importlib.util as u; exit(u.find_spec('{name}') is None)"
        cmd = [sys.executable, "-c", probe]
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            missing.append(name)
    return missing


_missing = _missing_in_target_env()
if _missing:
    sys.exit(
        "retinanet_plugin needs {} installed first. Run `make install` from the repository root, "
        "or install torch (requirements-torch.txt) and then detectron2 "
        "(scripts/install_detectron2.sh).".format(" and ".join(_missing))
    )

setup(
    name="retinanet_plugin",
    version="0.1.0",
    description="RetinaNet with focal loss (Lin et al., ICCV 2017) as a Detectron2 plugin",
    packages=find_packages(include=("retinanet_plugin", "retinanet_plugin.*")),
    python_requires=">=3.9",
    install_requires=["torch", "torchvision", "fvcore", "pycocotools", "opencv-python"],
    include_package_data=True,
)
