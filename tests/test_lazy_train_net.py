"""train_net.py with a Python (lazy) config: trains, evaluates, resumes exactly, stops plainly on
bad data, and never hands a YAML file to LazyConfig.load. detectron2's own
tools/lazyconfig_train_net.py trains the plugin's lazy configs too (with a detectron2 checkout).

Every run is a subprocess of train_net.py on a tiny synthetic COCO set (three 64x80 images, one
category) with the CPU demo's lazy config (MobileNetV2-FPN, random weights) at 64 px.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import LazyConfig

from retinanet_plugin.lazy import load_lazy_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_deepforest_mobilenet_v2_fpn.py"
D2_SOURCE = os.environ.get("RETINANET_PLUGIN_D2_SOURCE")

pytestmark = pytest.mark.slow

CONFIG = '''
from detectron2.config import LazyConfig

from retinanet_plugin.lazy import coco_instances, register_datasets

_base = LazyConfig.load({demo!r})
model, dataloader, optimizer, lr_multiplier, train = (
    _base[k] for k in ("model", "dataloader", "optimizer", "lr_multiplier", "train")
)
model.backbone.bottom_up.features.pretrained = False  # nothing downloaded
# Near-prior scores after a few steps: keep them, so that COCOEvaluator has detections to score.
model.test_score_thresh = 0.0
model.max_detections_per_image = 100
dataloader.coco_instances = coco_instances(
    [["lazy_train_net_tiny", "data/instances.json", "data"]], relative_to=__file__
)
dataloader.train.dataset.names = "lazy_train_net_tiny"
dataloader.test.dataset.names = "lazy_train_net_tiny"
dataloader.train.mapper.augmentations[0].short_edge_length = (64,)
dataloader.train.mapper.augmentations[0].max_size = 96
dataloader.test.mapper.augmentations[0].short_edge_length = 64
dataloader.test.mapper.augmentations[0].max_size = 96
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.num_workers = 0
# Random flips (detectron2's common train mapper) that depend only on the image's position in
# the stream, so that a resumed run repeats them.
dataloader.per_image_seed = True
train.max_iter = 5
train.checkpointer.period = 2
train.eval_period = 0
train.log_period = 1
train.seed = 1
register_datasets(dataloader)
'''


def _write_coco(folder: Path) -> Path:
    """Three 64x80 images with one or two boxes of category 1."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 64, "width": 80})
        for j in range(1 + i % 2):
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                "bbox": [5.0 + 20 * j, 8.0, 30.0, 24.0], "area": 720.0, "iscrowd": 0,
            })
    path = folder / "instances.json"
    path.write_text(json.dumps({
        "images": images, "annotations": annotations, "categories": [{"id": 1, "name": "c0"}],
    }))
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lazy_train_net")
    _write_coco(folder / "data")
    path = folder / "tiny_lazy.py"
    path.write_text(CONFIG.format(demo=str(DEMO)))
    return path


def _env(**extra):
    pythonpath = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(pythonpath),
        OMP_NUM_THREADS="1",
        RETINANET_PLUGIN_COMPILE="0",  # the eager focal loss: no one-off compile per process
        **extra,
    )


def _run(argv, env=None, check=True):
    proc = subprocess.run(
        [sys.executable] + [str(a) for a in argv], cwd=REPO, env=env or _env(),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _train_net(config, out, *opts, **kwargs):
    return _run(
        ["train_net.py", "--config-file", config, f"train.output_dir={out}", *opts], **kwargs
    )


def _copypaste(text):
    """The AP line of detectron2's print_csv_format ("copypaste: 1.2345,...")."""
    lines = re.findall(r"copypaste: ([-0-9.,nan]+)$", text, flags=re.M)
    assert lines, text[-3000:]
    return lines[-1]


def test_trains_evaluates_and_eval_only_reproduces_the_ap(config, tmp_path):
    out = tmp_path / "run"
    proc = _train_net(config, out)

    records = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    assert any(r.get("iteration") == 4 and "total_loss" in r for r in records)
    for key in ("AP", "AP50", "AP75"):  # COCOEvaluator's final evaluation reached metrics.json
        assert 0.0 <= records[-1][f"bbox/{key}"] <= 100.0, records[-1]
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["trainer"]["iteration"] == 4
    assert "data_sampler" in final and "loss_normalizers" in final  # what an exact resume needs
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    # COCOEvaluator wrote where the YAML path's does, and the picture was drawn from it.
    results = out / "inference" / "lazy_train_net_tiny" / "coco_instances_results.json"
    assert json.loads(results.read_text())
    picture = np.asarray(Image.open(out / "val_predictions.png"))
    assert picture.shape[0] > 0 and picture.shape[2] == 3
    assert (out / "config.yaml").is_file()  # detectron2's default_setup saved the config

    # --eval-only of the trained weights: the same detections and AP.
    again = tmp_path / "eval"
    evaluated = _train_net(
        config, again, f"train.init_checkpoint={out / 'model_final.pth'}", "--eval-only"
    )
    assert _copypaste(evaluated.stdout + evaluated.stderr) == _copypaste(proc.stdout + proc.stderr)
    assert (again / "inference" / "lazy_train_net_tiny" / "coco_instances_results.json"
            ).read_text() == results.read_text()
    assert not (again / "model_final.pth").exists()


def test_killed_and_resumed_ends_as_uninterrupted(config, tmp_path):
    reference = tmp_path / "uninterrupted"
    _train_net(config, reference, "dataloader.test.dataset.names=[]")

    out = tmp_path / "run"
    marker = tmp_path / "reached"
    coco = config.parent / "data"
    env = _env(
        KILL_AT="step:2",  # inside iteration 2's forward: model_0000001 is the last checkpoint
        KILL_MARKER=str(marker),
        TINY_DATASET=f"lazy_train_net_unused:{coco / 'instances.json'}:{coco}",
    )
    argv = [sys.executable, str(REPO / "tests" / "killable_train.py"), "--config-file",
            str(config), f"train.output_dir={out}", "dataloader.test.dataset.names=[]"]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, f"exited {proc.returncode} before the kill point"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"

    _train_net(config, out, "dataloader.test.dataset.names=[]", "--resume")
    log = (out / "log.txt").read_text()
    assert "Starting training from iteration 2" in log
    assert "as an uninterrupted run's" in log  # continue_data_stream found the same stream

    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    expected = torch.load(reference / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["trainer"]["iteration"] == expected["trainer"]["iteration"] == 4
    for key, value in expected["model"].items():  # bit for bit
        assert torch.equal(final["model"][key], value), key
    momenta = final["trainer"]["optimizer"]["state"]
    for index, state in expected["trainer"]["optimizer"]["state"].items():
        assert torch.equal(momenta[index]["momentum_buffer"], state["momentum_buffer"]), index
    assert final["loss_normalizers"] == expected["loss_normalizers"]


@pytest.mark.parametrize("broken", ["missing_image", "bad_entry"])
def test_a_data_error_ends_the_run_plainly(config, tmp_path, broken):
    data = tmp_path / "broken"
    json_file = _write_coco(data)
    (data / "1.png").unlink()
    entry = f"['lazy_broken','{json_file}','{data}']" if broken == "missing_image" else "[only]"
    proc = _train_net(
        config, tmp_path / "out", f"dataloader.coco_instances=[{entry}]",
        "dataloader.train.dataset.names=lazy_broken", "dataloader.test.dataset.names=lazy_broken",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    problems = proc.stderr.split("the data has these problems:")[-1]
    assert ("1.png" if broken == "missing_image" else "[name, json_file, image_root]") in problems
    assert not (tmp_path / "out" / "model_final.pth").exists()


def test_a_yaml_config_never_reaches_lazyconfig_load(monkeypatch, tmp_path):
    """LazyConfig.load reads YAML with yaml.unsafe_load; the plugin reads YAML safely."""
    import importlib.util

    from retinanet_plugin.tools.model_setup import load_cfg

    loaded = []

    def spy(path, *args, **kwargs):
        loaded.append(str(path))
        assert str(path).endswith(".py"), f"LazyConfig.load got {path}"
        return load(path, *args, **kwargs)

    load = LazyConfig.load
    monkeypatch.setattr(LazyConfig, "load", staticmethod(spy))
    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    yaml = REPO / "configs" / "demo_deepforest_mobilenet_v2_fpn.yaml"
    args = train_net.argument_parser().parse_args(["--config-file", str(yaml)])
    assert train_net.configured_device(args) == "cpu"
    assert load_cfg(str(yaml)).MODEL.META_ARCHITECTURE == "FocalRetinaNet"
    with pytest.raises(ValueError, match="not a Python config"):
        load_lazy_config(str(yaml))
    assert loaded == []
    # A .py goes there (with its key=value overrides).
    args = train_net.argument_parser().parse_args(
        ["--config-file", str(DEMO), "train.device=cuda"]
    )
    assert train_net.configured_device(args) == "cuda"
    assert loaded[0] == str(DEMO)


@pytest.mark.skipif(
    not D2_SOURCE,
    reason="set RETINANET_PLUGIN_D2_SOURCE to a detectron2 checkout (built in place) to run its "
    "unchanged tools/lazyconfig_train_net.py on the plugin's lazy config",
)
def test_detectron2s_lazyconfig_train_net_trains_and_evaluates_the_plugins_config(
    config, tmp_path
):
    tool = Path(D2_SOURCE) / "tools" / "lazyconfig_train_net.py"
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([D2_SOURCE, env["PYTHONPATH"]])
    out = tmp_path / "upstream"
    proc = _run([tool, "--config-file", config, f"train.output_dir={out}"], env=env)
    # detectron2 from the checkout, the plugin's model and head.
    check = _run(["-c", "import detectron2; print(detectron2.__file__)"], env=env)
    assert check.stdout.strip().startswith(str(Path(D2_SOURCE).resolve()))
    assert "FocalRetinaNet(" in proc.stdout + proc.stderr
    records = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    assert any(r.get("iteration") == 4 and "total_loss" in r for r in records)
    assert 0.0 <= records[-1]["bbox/AP50"] <= 100.0, records[-1]
    assert (out / "model_final.pth").is_file()

    # detectron2's parser takes its flags before the overrides only.
    evaluated = _run([tool, "--config-file", config, "--eval-only", f"train.output_dir={out}/eval",
                      f"train.init_checkpoint={out / 'model_final.pth'}"], env=env)
    assert _copypaste(evaluated.stdout + evaluated.stderr) == _copypaste(proc.stdout + proc.stderr)
