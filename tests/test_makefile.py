"""`make demo` and `make ablation` prepare the data where train_net.py's registration reads
it."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from retinanet_plugin.data.deepforest import default_root

REPO = Path(__file__).resolve().parents[1]


def _demo_data_dir(env, target):
    """The --out of the demo's data step, as the shell expands it, from a dry run of make."""
    # -n prints the recipe without running it; PY=echo turns the printed python call into one
    # that only shows its arguments once the shell has expanded them.
    recipe = subprocess.run(
        ["make", "-n", "-s", target, "PY=echo"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    line = next(x for x in recipe.splitlines() if "retinanet_plugin.data.deepforest" in x)
    echoed = subprocess.run(
        ["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return echoed[echoed.index("--out") + 1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize("datasets", [None, "elsewhere/detectron2_data"])
@pytest.mark.parametrize("target", ["demo", "ablation"])
def test_make_demo_writes_where_train_net_reads(monkeypatch, datasets, target):
    env = {k: v for k, v in os.environ.items() if k != "DETECTRON2_DATASETS"}
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    if datasets is not None:
        env["DETECTRON2_DATASETS"] = datasets
        monkeypatch.setenv("DETECTRON2_DATASETS", datasets)
    written = _demo_data_dir(env, target)
    # train_net.py registers with register_deepforest(), whose root is default_root().
    expected = os.path.join(datasets or "datasets", "deepforest")
    assert default_root() == expected
    assert os.path.normpath(written) == expected
