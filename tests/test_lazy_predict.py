"""predict with a Python (lazy) config: the same files as with its YAML twin, and the lazy
path's own COCOEvaluator results (plain and with ``dataloader.tta``).

Both kinds are the CPU demo (MobileNetV2-FPN, random weights, every candidate kept) at 64 px on
three synthetic 64x80 images of one category whose COCO id is 5 (not 0), so the category ids
must come from the dataset.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.modeling import build_model

from retinanet_plugin import FocalRetinaNet, RetinaNetCheckpointer
from retinanet_plugin.config import load_config
from retinanet_plugin.engine.lazy_train import lazy_test, lazy_test_with_tta
from retinanet_plugin.tools import predict as predict_tool
from retinanet_plugin.tools.model_setup import load_cfg, load_model

REPO = Path(__file__).resolve().parents[1]
YAML = REPO / "configs" / "demo_deepforest_mobilenet_v2_fpn.yaml"
LAZY = REPO / "configs" / "demo_deepforest_mobilenet_v2_fpn.py"
DATASET = "lazy_predict_tiny"
TTA = {"min_sizes": [48, 64], "max_size": 96, "flip": True}


@pytest.fixture(autouse=True)
def eager_focal_loss(monkeypatch):
    monkeypatch.setenv("RETINANET_PLUGIN_COMPILE", "0")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three 64x80 images, image ids 21..23, category id 5; returns (json file, image folder)."""
    folder = tmp_path_factory.mktemp("lazy_predict") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        images.append({"id": 21 + i, "file_name": f"{i}.png", "height": 64, "width": 80})
        annotations.append({"id": i + 1, "image_id": 21 + i, "category_id": 5,
                            "bbox": [5.0, 8.0, 30.0, 24.0], "area": 720.0, "iscrowd": 0})
    json_file = folder.parent / "instances.json"
    json_file.write_text(json.dumps({
        "images": images, "annotations": annotations, "categories": [{"id": 5, "name": "tree"}],
    }))
    return str(json_file), str(folder)


def _opts(data, tta=False):
    """The same overrides for both kinds: the tiny set for train and test, 64 px, random weights,
    every candidate kept; with ``tta``, the TTA sizes."""
    json_file, folder = data
    entry = [DATASET, json_file, folder]
    yaml = [
        "MODEL.MOBILENET.PRETRAINED", "False", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
        "DATASETS.COCO_INSTANCES", repr([entry]), "DATASETS.TRAIN", f"('{DATASET}',)",
        "DATASETS.TEST", f"('{DATASET}',)", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "96", "DATALOADER.NUM_WORKERS", "0",
    ]  # fmt: skip
    lazy = [
        "model.backbone.bottom_up.features.pretrained=False", "model.test_score_thresh=0.0",
        f"dataloader.coco_instances={[entry]!r}", f"dataloader.train.dataset.names={DATASET}",
        f"dataloader.test.dataset.names={DATASET}",
        "dataloader.test.mapper.augmentations.0.short_edge_length=64",
        "dataloader.test.mapper.augmentations.0.max_size=96", "dataloader.test.num_workers=0",
    ]  # fmt: skip
    if tta:
        yaml += ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", str(tuple(TTA["min_sizes"])),
                 "TEST.AUG.MAX_SIZE", str(TTA["max_size"]), "TEST.AUG.FLIP", str(TTA["flip"])]
        lazy += [
            "+dataloader.tta._target_=detectron2.modeling.test_time_augmentation.DatasetMapperTTA",
            f"+dataloader.tta.min_sizes={TTA['min_sizes']}",
            f"+dataloader.tta.max_size={TTA['max_size']}", f"+dataloader.tta.flip={TTA['flip']}",
        ]
    return yaml, lazy


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights of the YAML demo model (the lazy twin has the same parameter names)."""
    cfg = load_config(str(YAML), ["MODEL.MOBILENET.PRETRAINED", "False"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lazy_predict_weights") / "weights"
    RetinaNetCheckpointer(build_model(cfg), str(path.parent)).save(path.name)
    return str(path) + ".pth"


def _predict(config, opts, weights, data, out):
    argv = ["--config-file", str(config), "--weights", weights, "--input", data[1],
            "--output", str(out), *opts]
    assert predict_tool.main(argv) == 0
    results = json.loads((out / "coco_instances_results.json").read_text())
    images = json.loads((out / "images.json").read_text())
    return results, images


def _lazy_cfg(opts, weights, out):
    cfg = load_cfg(str(LAZY), opts, weights=weights, lazy=True)
    cfg.train.output_dir = str(out)
    return cfg


def _evaluator_results(folder):
    return json.loads((folder / DATASET / "coco_instances_results.json").read_text())


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_predict_with_a_lazy_config_writes_its_yaml_twins_files(weights, data, tmp_path, tta):
    yaml_opts, lazy_opts = _opts(data, tta)
    results, images = _predict(YAML, yaml_opts, weights, data, tmp_path / "yaml")
    lazy_results, lazy_images = _predict(LAZY, lazy_opts, weights, data, tmp_path / "lazy")
    assert len(results) > 0 and {r["category_id"] for r in results} == {5}
    assert {im["id"] for im in images["images"]} == {21, 22, 23}  # the dataset's ids
    assert images["test_augmentation"] == (TTA if tta else None)
    # Identical, not close: same weights, mapper, resize, test-time keys and conversion.
    assert lazy_results == results
    assert lazy_images == images


def test_predict_equals_the_lazy_paths_coco_evaluator(weights, data, tmp_path):
    """predict with a .py config writes the results file of train_net.py's lazy path
    (``lazy_test``: dataloader.test, dataloader.evaluator) on the same weights."""
    _, lazy_opts = _opts(data)
    cfg = _lazy_cfg(lazy_opts, weights, tmp_path / "run")
    lazy_test(cfg, load_model(cfg))
    expected = _evaluator_results(tmp_path / "run" / "inference")
    results, images = _predict(LAZY, lazy_opts, weights, data, tmp_path / "predict")
    assert len(expected) > 0
    assert results == expected
    assert all(im["id_from"] == DATASET for im in images["images"])


def test_lazy_tta_equals_the_yaml_twins_tta_and_predict(weights, data, tmp_path):
    """``dataloader.tta`` on the lazy path (``lazy_test_with_tta``) gives the "_TTA" results of
    FocalRetinaNetWithTTA on the YAML twin with the same TEST.AUG.* (train_net.py's
    Trainer.test_with_TTA), which differ from the plain ones; predict with the .py config
    writes them too."""
    yaml_opts, lazy_opts = _opts(data, tta=True)
    cfg = _lazy_cfg(lazy_opts, weights, tmp_path / "lazy")
    model = load_model(cfg)
    lazy_metrics = lazy_test_with_tta(cfg, model)
    assert list(lazy_metrics) == ["bbox_TTA"]
    lazy = _evaluator_results(tmp_path / "lazy" / "inference_TTA")

    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    ycfg = load_cfg(str(YAML), yaml_opts, weights=weights).clone()
    ycfg.defrost()
    ycfg.OUTPUT_DIR = str(tmp_path / "yaml")
    yaml_metrics = train_net.Trainer.test_with_TTA(ycfg, load_model(ycfg))
    assert lazy == _evaluator_results(tmp_path / "yaml" / "inference_TTA")
    # As JSON: APl is NaN (no large boxes), and NaN != NaN.
    assert json.dumps(lazy_metrics) == json.dumps(yaml_metrics)

    plain = _lazy_cfg(_opts(data)[1], weights, tmp_path / "plain")
    lazy_test(plain, load_model(plain))
    assert len(lazy) > 0 and lazy != _evaluator_results(tmp_path / "plain" / "inference")
    results, _ = _predict(LAZY, lazy_opts, weights, data, tmp_path / "predict")
    assert results == lazy


class TreeDetector(FocalRetinaNet):
    """A user's FocalRetinaNet subclass, whose name does not say RetinaNet."""


def test_predict_with_a_user_subclass_of_focal_retinanet(weights, data, tmp_path):
    """``model._target_`` a subclass (here by its dotted name, as a saved config holds it): a
    one-stage model by its class, not by its name; the plain demo's files."""
    _, lazy_opts = _opts(data)
    expected = _predict(LAZY, lazy_opts, weights, data, tmp_path / "plain")
    subclass = [*lazy_opts, f"model._target_={__name__}.TreeDetector"]
    assert type(load_model(_lazy_cfg(subclass, weights, tmp_path / "run"))) is TreeDetector
    assert _predict(LAZY, subclass, weights, data, tmp_path / "sub") == expected
