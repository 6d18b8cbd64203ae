"""Which launcher starts the processes: chosen by MODEL.DEVICE, not by whether CUDA exists.

No GPU is needed: ``torch.cuda.is_available`` is patched to True and both launch paths (detectron2's
NCCL launcher, the plugin's GLOO workers) are replaced by recorders, so only the choice runs.
"""

import importlib
import runpy
import sys
from pathlib import Path

import pytest
import torch

# The module; ``retinanet_plugin.engine.launch`` as an attribute is the function it exports.
launch_module = importlib.import_module("retinanet_plugin.engine.launch")

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo_deepforest_mobilenet_v2_fpn.yaml"


@pytest.fixture
def paths(monkeypatch):
    """Pretends a GPU exists and records which launcher ``launch`` calls."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        launch_module.d2_launch, "launch", lambda *a, **k: calls.append(("detectron2", a, k))
    )
    monkeypatch.setattr(
        launch_module.mp, "spawn", lambda fn, **k: calls.append(("gloo", fn, k))
    )
    return calls


def _main(*args):
    raise AssertionError("the recorders never call main_func")


def test_cpu_device_starts_gloo_workers_on_a_cuda_machine(paths):
    launch_module.launch(_main, 2, dist_url="auto", device="cpu")
    assert [c[0] for c in paths] == ["gloo"]
    _, worker, kwargs = paths[0]
    assert worker is launch_module._cpu_worker and kwargs["nprocs"] == 2
    # args = (main_func, world_size, procs per machine, machine rank, dist_url, args, timeout)
    assert kwargs["args"][:4] == (_main, 2, 2, 0)
    assert kwargs["args"][4].startswith("tcp://127.0.0.1:")


@pytest.mark.parametrize("device", ["cuda", "cuda:0", None])
def test_cuda_device_uses_detectron2_launcher(paths, device):
    # None: the configured device is unknown; with CUDA present that is detectron2's default.
    launch_module.launch(_main, 2, dist_url="auto", device=device)
    assert [c[0] for c in paths] == ["detectron2"]


def test_single_process_always_uses_detectron2_launcher(paths):
    launch_module.launch(_main, 1, device="cpu")
    assert [c[0] for c in paths] == ["detectron2"]


def test_unsupported_device_for_several_processes_names_the_key(paths):
    with pytest.raises(ValueError, match=r"MODEL.DEVICE = 'meta'"):
        launch_module.launch(_main, 2, device="meta")
    assert paths == []


@pytest.mark.parametrize("device, expected", [("cpu", "gloo"), ("cuda", "detectron2")])
def test_train_net_passes_model_device(paths, monkeypatch, device, expected):
    # train_net.py run as a script, as a user would: `--num-gpus 2 MODEL.DEVICE cpu`.
    argv = ["train_net.py", "--config-file", str(DEMO_CONFIG), "--num-gpus", "2"]
    monkeypatch.setattr(sys, "argv", argv + ["MODEL.DEVICE", device])
    runpy.run_path(str(REPO / "train_net.py"), run_name="__main__")
    assert [c[0] for c in paths] == [expected]
