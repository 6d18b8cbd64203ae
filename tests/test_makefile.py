"""`make demo` and `make ablation` prepare the data where train_net.py's registration reads
it."""

import os
import shutil
import subprocess
import sys
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
    # The recipe's shell lines (continuations joined), then the command of a `&&` chain that
    # prepares the data.
    commands = [c for x in recipe.replace("\\\n", " ").splitlines() for c in x.split("&&")]
    line = next(x for x in commands if "retinanet_plugin.data.deepforest" in x)
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


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_demo_refuses_an_unknown_precision_before_the_download(tmp_path):
    # STAMP=Makefile: the install counts as done; the real Python runs scripts/demo_config.py.
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "data"))
    run = subprocess.run(
        ["make", "-s", "demo", "DEMO_PRECISION=fp16", "STAMP=Makefile", f"PY={sys.executable}"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode != 0
    assert "DEMO_PRECISION must be auto, bf16 or fp32, got 'fp16'" in run.stderr
    assert not (tmp_path / "data").exists()  # neither the data step nor training ran
