"""Every tool gives the trainer's and the evaluator's answer, for every test-time key.

One small model and config; a grid of test-time key combinations built from the key table
(``postprocess.TEST_TIME_KEYS``: a key added there fails :func:`test_grid_varies_every_key` until
the grid varies it). For each combination:

- ``COCOEvaluator``'s results, through ``train_net.py``'s ``Trainer`` as ``--eval-only`` runs it
  (``inference/``; with ``TEST.AUG.ENABLED`` also ``inference_TTA/``), equal ``tools.predict``'s
  results bit for bit: same image ids, category ids, boxes and scores;
- the exported TorchScript graph (ONNX through onnxruntime for a few combinations), run on the
  test loader's images and turned into COCO results by the same conversion, gives the same
  detections up to float rounding, or the export tool refuses the combination by key;
- with ``TEST.AUG.ENABLED``, predict equals the evaluator's ``inference_TTA/`` results, and
  predict without it equals ``inference/``.

A new tool or test-time key is held to the same answer here.
"""

import dataclasses
import importlib.util
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import MetadataCatalog
from detectron2.evaluation.evaluator import inference_context
from detectron2.modeling import build_model

import retinanet_plugin.postprocess as postprocess
from retinanet_plugin.data.registration import register_config_datasets
from retinanet_plugin.evaluation.results import coco_category_ids, instances_to_coco_results
from retinanet_plugin.export import (
    export_model,
    exported_instances,
    load_exported,
    match_detections,
)
from retinanet_plugin.postprocess import TEST_TIME_KEYS, PostProcessing, UnsupportedKeyError
from retinanet_plugin.test_time_augmentation import FocalRetinaNetWithTTA
from retinanet_plugin.tools import export as export_tool
from retinanet_plugin.tools import predict as predict_tool

from detector_fixture import save_detector, small_detector

REPO = Path(__file__).resolve().parents[1]
DATASET = "consistency_images"
# Category ids as a COCO file may have them, not 0..K-1: each tool must map classes back.
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}]
# (height, width): resized to a 128 px short side (so boxes are scaled back by 3/4, 1, 8/5 and
# 8/7), the last a 16-bit grayscale PNG that only the plugin's reader keeps in contrast.
SIZES = [(96, 128), (128, 96), (80, 120), (112, 112)]
# A float rounding apart: the graph fuses and orders float operations differently from eager
# PyTorch (and onnxruntime from both), about 1e-5 px and 1e-7 in score here.
BOX_ATOL, SCORE_ATOL = 1e-3, 1e-5

# Test-time key combinations, as KEY VALUE overrides of the module's config. Each key of
# TEST_TIME_KEYS is set to a value other than its default, where it has an effect, at least once
# (test_grid_varies_every_key); each combination changes the detections of these images
# (test_each_combination_changes_the_detections), so a tool that ignores a key cannot pass.
RETINANET = "MODEL.RETINANET."
GRID = {
    "defaults": [],
    "thresholds_and_limits": [
        RETINANET + "SCORE_THRESH_TEST", "0.06", RETINANET + "TOPK_CANDIDATES_TEST", "40",
        RETINANET + "NMS_THRESH_TEST", "0.6", "TEST.DETECTIONS_PER_IMAGE", "30",
    ],
    "per_class_agnostic": [
        RETINANET + "SCORE_THRESH_TEST_PER_CLASS", "[0.05, 0.07, 0.06]",
        RETINANET + "NMS_CLASS_AGNOSTIC", "True",
    ],
    "soft_linear": [
        RETINANET + "NMS_TYPE", "soft_linear", RETINANET + "NMS_THRESH_TEST", "0.3",
        RETINANET + "SOFT_NMS_SCORE_THRESH", "0.04",
    ],
    "soft_gaussian_sigma": [
        RETINANET + "NMS_TYPE", "soft_gaussian", RETINANET + "SOFT_NMS_SIGMA", "0.3",
        "TEST.DETECTIONS_PER_IMAGE", "50",
    ],
    "box_voting": [RETINANET + "BOX_VOTING", "True", RETINANET + "BOX_VOTING_IOU_THRESH", "0.6"],
    # The `make demo` recipe's suppression (configs/demo_deepforest_mobilenet_v2_fpn_long.yaml).
    "demo": [RETINANET + "NMS_TYPE", "soft_gaussian", RETINANET + "BOX_VOTING", "True"],
    "tta": ["TEST.AUG.ENABLED", "True"],
    "tta_demo": [
        "TEST.AUG.ENABLED", "True", RETINANET + "NMS_TYPE", "soft_gaussian",
        RETINANET + "BOX_VOTING", "True", RETINANET + "NMS_CLASS_AGNOSTIC", "True",
    ],
}  # fmt: skip
# ONNX export and onnxruntime take seconds a combination: a covering few (hard NMS, per-class
# thresholds with class-agnostic NMS, the demo's soft-NMS with box voting).
ONNX = ["defaults", "per_class_agnostic", "demo"]


def _write_images(folder):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        # Smooth noise, on which the random detector fires unevenly.
        image = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h))
        path = os.path.join(folder, f"img{i}.png")
        if i < len(SIZES) - 1:
            cv2.imwrite(path, image)
        else:  # values in the thousands: detectron2's read_image would clip them to 255
            Image.fromarray(image[:, :, 0].astype(np.uint16) * 257).save(path)
        paths.append(path)
    return paths


def _write_dataset(folder):
    """Four images with one annotation each; returns the COCO JSON's path."""
    images = folder / "images"
    images.mkdir()
    paths = _write_images(str(images))
    coco = {
        "images": [
            {"id": 20 + i, "file_name": os.path.basename(p), "height": h, "width": w}
            for i, (p, (h, w)) in enumerate(zip(paths, SIZES))
        ],
        "annotations": [
            {"id": i + 1, "image_id": 20 + i, "category_id": 7, "bbox": [10, 10, 40, 30],
             "area": 1200, "iscrowd": 0}
            for i in range(len(paths))
        ],  # fmt: skip
        "categories": CATEGORIES,
    }
    json_file = folder / "coco.json"
    json_file.write_text(json.dumps(coco))
    return str(json_file), str(images)


@lru_cache(maxsize=None)
def _train_net():
    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sorted(results):
    return sorted(results, key=lambda r: (r["image_id"], -r["score"], r["category_id"], r["bbox"]))


def _read_json(path):
    with open(path) as f:
        return json.load(f)


class Runs:
    """Each combination's config, model and tool outputs, computed once for the module."""

    def __init__(self, folder):
        self.folder = folder
        cfg, self.detector = small_detector(num_classes=len(CATEGORIES))
        json_file, self.image_root = _write_dataset(folder)
        cfg.DATASETS.COCO_INSTANCES = [[DATASET, json_file, self.image_root]]
        cfg.DATASETS.TRAIN = ()
        cfg.DATASETS.TEST = (DATASET,)
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.INPUT.MIN_SIZE_TEST = 128
        cfg.INPUT.MAX_SIZE_TEST = 192
        cfg.TEST.AUG.MIN_SIZES = (96, 160)
        cfg.TEST.AUG.MAX_SIZE = 256
        cfg.TEST.AUG.FLIP = True
        register_config_datasets(cfg)  # as train_net.py's setup() and the tools do
        self.base_cfg = cfg
        self._cache = {}

    def _once(self, key, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def cfg(self, name):
        cfg = self.base_cfg.clone()
        cfg.merge_from_list(GRID[name])
        return cfg

    def model(self, name):
        """The module's weights in a model built from the combination's config."""

        def build():
            model = build_model(self.cfg(name)).eval()
            model.load_state_dict(self.detector.state_dict())
            return model

        return self._once(("model", name), build)

    def evaluation(self, name):
        """COCOEvaluator's results as ``train_net.py --eval-only`` writes them (its ``main``:
        ``Trainer.test``, then with TEST.AUG.ENABLED ``Trainer.test_with_TTA``), by folder:
        "inference" and, written only with TEST.AUG.ENABLED, "inference_TTA"."""

        def evaluate():
            cfg = self.cfg(name)
            cfg.OUTPUT_DIR = str(self.folder / "eval" / name)
            trainer = _train_net().Trainer
            trainer.test(cfg, self.model(name))
            if cfg.TEST.AUG.ENABLED:
                trainer.test_with_TTA(cfg, self.model(name))
            written = {}
            for sub in ("inference", "inference_TTA"):
                path = os.path.join(cfg.OUTPUT_DIR, sub, DATASET, "coco_instances_results.json")
                if os.path.exists(path):
                    written[sub] = _read_json(path)
            return written

        return self._once(("evaluation", name), evaluate)

    def predict(self, name, *opts):
        """``tools.predict``'s results file and images.json on the dataset's image folder."""

        def run():
            cfg = self.cfg(name)
            cfg.merge_from_list(list(opts))
            out = self.folder / "predict" / "_".join((name,) + opts)
            failed, summary = predict_tool.predict(
                cfg, self.model(name), [self.image_root], str(out)
            )
            assert failed == []
            return _read_json(summary["results_file"]), _read_json(summary["images_file"])

        return self._once(("predict", name) + opts, run)

    def test_inputs(self, name):
        """The test loader's inputs (train_net.py's, with its mapper): image resized, the
        original height and width, image id."""
        loader = _train_net().Trainer.build_test_loader(self.cfg(name), DATASET)
        return [batch[0] for batch in loader]

    def exported(self, name, export_format):
        """The exported graph's COCO results on the test loader's inputs, converted as the
        evaluator converts the model's: boxes scaled back to the original image by the model's
        own ``detector_postprocess``, then ``instances_to_coco_results``."""

        def export():
            inputs = self.test_inputs(name)
            path = str(self.folder / "export" / f"{name}.{export_format}")
            export_model(self.model(name), inputs[0]["image"], path, export_format)
            run = load_exported(path, export_format)
            category_ids = coco_category_ids(MetadataCatalog.get(DATASET))
            return [
                result
                for x in inputs
                for result in instances_to_coco_results(
                    exported_instances(run, x), x["image_id"], category_ids
                )
            ]

        return self._once(("export", name, export_format), export)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("consistency"))


def _plain(name):
    """The combination without test-time augmentation."""
    opts = GRID[name]
    pairs = [(k, v) for k, v in zip(opts[::2], opts[1::2]) if k != "TEST.AUG.ENABLED"]
    return [x for pair in pairs for x in pair]


def test_grid_varies_every_key(runs):
    """Each key of the table takes a value other than its default, where it applies (SIGMA
    with Gaussian soft-NMS, ...), in some combination: a new key fails here until added."""
    default = PostProcessing.from_config(runs.base_cfg)
    assert default == PostProcessing()  # the module's config changes no test-time key
    varied = set()
    for name in GRID:
        pp = PostProcessing.from_config(runs.cfg(name))
        varied |= {
            spec.key
            for spec in TEST_TIME_KEYS
            if getattr(pp, spec.field) != getattr(default, spec.field)
            and (spec.applies is None or spec.applies(pp))
        }
    assert {spec.key for spec in TEST_TIME_KEYS} - varied == set()
    assert set(ONNX) <= set(GRID)


def _detections_by_image(results):
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    return by_image


def test_each_combination_changes_the_detections(runs):
    """Every image has detections in every combination, and each combination's differ from the
    defaults' (TTA's in inference_TTA/, its inference/ being the plain run's)."""
    image_ids = {20 + i for i in range(len(SIZES))}
    reference = _sorted(runs.evaluation("defaults")["inference"])
    for name in GRID:
        written = runs.evaluation(name)
        results = written["inference_TTA" if runs.cfg(name).TEST.AUG.ENABLED else "inference"]
        assert set(_detections_by_image(results)) == image_ids, name
        if name != "defaults":
            assert _sorted(results) != reference, f"{name} changes no detection"


@pytest.mark.parametrize("name", sorted(GRID))
def test_predict_equals_coco_evaluator(runs, name):
    """predict (batch size 1) writes COCOEvaluator's results file: same image ids, category
    ids, boxes and scores, bit for bit. With TEST.AUG.ENABLED the evaluator writes both plain
    (inference/) and TTA (inference_TTA/) results: predict gives the TTA ones, and the plain ones
    without the key; images.json says which."""
    cfg = runs.cfg(name)
    written = runs.evaluation(name)
    results, images = runs.predict(name)
    assert len(results) > 0
    if not cfg.TEST.AUG.ENABLED:
        assert set(written) == {"inference"}
        assert _sorted(results) == _sorted(written["inference"])
        assert images["test_augmentation"] is None
        return
    assert set(written) == {"inference", "inference_TTA"}
    assert _sorted(results) == _sorted(written["inference_TTA"])
    assert images["test_augmentation"] == {"min_sizes": [96, 160], "max_size": 256, "flip": True}
    plain, plain_images = runs.predict(name, "TEST.AUG.ENABLED", "False")
    assert _sorted(plain) == _sorted(written["inference"])
    assert plain_images["test_augmentation"] is None
    assert _sorted(plain) != _sorted(results)  # TTA changes the detections
    # TEST.AUG.ENABLED leaves the plain evaluation as it is without the key.
    if _plain(name) in GRID.values():
        other = next(n for n, opts in GRID.items() if opts == _plain(name))
        assert _sorted(written["inference"]) == _sorted(runs.evaluation(other)["inference"])


def test_tta_evaluation_leaves_the_model_in_eval_mode(runs):
    """inference_on_dataset puts the model it is given (the TTA wrapper) in eval mode and then
    back in its mode; a wrapper in nn.Module's default training mode turned the eval-mode model
    into a training one, so the next plain call (predict's, here) failed for want of annotations,
    or with BatchNorm would have updated its statistics."""
    model = runs.model("tta")
    assert not model.training
    with inference_context(FocalRetinaNetWithTTA(runs.cfg("tta"), model)):  # as the evaluator
        assert not model.training
    assert not model.training
    runs.evaluation("tta")  # the whole of train_net.py's TTA evaluation
    assert not model.training


def _assert_close_results(got, expected):
    """Same images, same number of detections of each, paired one to one with the same category,
    boxes within BOX_ATOL px (XYXY corners) and scores within SCORE_ATOL."""
    got, expected = _detections_by_image(got), _detections_by_image(expected)
    assert sorted(got) == sorted(expected)
    for image_id, mine in got.items():
        ref = expected[image_id]
        assert len(mine) == len(ref), image_id

        def tensors(results):
            xywh = torch.tensor([r["bbox"] for r in results], dtype=torch.float64)
            boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
            classes = torch.tensor([r["category_id"] for r in results])
            return boxes, torch.tensor([r["score"] for r in results]), classes

        boxes, scores, classes = tensors(mine)
        ref_boxes, ref_scores, ref_classes = tensors(ref)
        # Scores a rounding apart may swap ranks: pair by category, box and score.
        pair = match_detections(boxes, classes, ref_boxes, ref_classes, scores, ref_scores)
        assert sorted(pair.tolist()) == list(range(len(ref))), image_id
        torch.testing.assert_close(boxes, ref_boxes[pair], rtol=0, atol=BOX_ATOL)
        torch.testing.assert_close(scores, ref_scores[pair], rtol=0, atol=SCORE_ATOL)


def _assert_export_refused(runs, name, problems, tmp_path, caplog):
    """The export tool refuses the combination before tracing, naming each key it cannot
    express and the override that exports without it."""
    config_file, weights = save_detector(runs.cfg(name), runs.model(name), str(tmp_path))
    output = tmp_path / "model.ts"
    with caplog.at_level(logging.ERROR, logger="retinanet_plugin"):
        rc = export_tool.main(
            ["--config-file", config_file, "--weights", weights, "--format", "torchscript",
             "--output", str(output)]
        )  # fmt: skip
    assert rc == 1
    for problem in problems:
        assert problem in caplog.text
    assert not output.exists()


@pytest.mark.parametrize("name", sorted(GRID))
def test_torchscript_equals_coco_evaluator(runs, name, tmp_path, caplog):
    """The TorchScript graph on the test loader's images gives COCOEvaluator's results, up to
    float rounding; a combination it cannot express is refused by key (TEST.AUG.ENABLED)."""
    problems = PostProcessing.from_config(runs.cfg(name)).unsupported("export")
    if problems:
        assert runs.cfg(name).TEST.AUG.ENABLED  # today the only key export refuses
        _assert_export_refused(runs, name, problems, tmp_path, caplog)
        return
    _assert_close_results(runs.exported(name, "torchscript"), runs.evaluation(name)["inference"])


@pytest.mark.parametrize("name", ONNX)
def test_onnx_equals_coco_evaluator(runs, name):
    _assert_close_results(runs.exported(name, "onnx"), runs.evaluation(name)["inference"])


def test_a_key_a_path_lacks_is_refused_by_every_tool_on_it(runs, tmp_path, caplog, monkeypatch):
    """Each tool consults the key table for the path it runs: with box voting marked as honoured
    by eager inference only, predict with TEST.AUG.ENABLED, train_net's TTA wrapper and the
    export tool refuse it by name before running anything; predict without TTA runs."""
    keys = tuple(
        dataclasses.replace(spec, paths=("eager",))
        if spec.key == RETINANET + "BOX_VOTING" else spec
        for spec in TEST_TIME_KEYS
    )  # fmt: skip
    monkeypatch.setattr(postprocess, "TEST_TIME_KEYS", keys)
    name = "box_voting"
    model = runs.model(name)
    cfg = runs.cfg(name)
    cfg.TEST.AUG.ENABLED = True
    refusal = "MODEL.RETINANET.BOX_VOTING True cannot be expressed in test-time augmentation"
    with pytest.raises(UnsupportedKeyError, match=refusal):
        predict_tool.predict(cfg, model, [runs.image_root], str(tmp_path / "tta"))
    assert not (tmp_path / "tta").exists()  # refused before anything was read or written
    with pytest.raises(UnsupportedKeyError, match=refusal):
        FocalRetinaNetWithTTA(cfg, model)  # train_net.py's Trainer.test_with_TTA
    _assert_export_refused(
        runs, name,
        ["MODEL.RETINANET.BOX_VOTING True cannot be expressed in an exported graph",
         "export with MODEL.RETINANET.BOX_VOTING False"],
        tmp_path, caplog,
    )  # fmt: skip
    cfg.TEST.AUG.ENABLED = False
    _, summary = predict_tool.predict(cfg, model, [runs.image_root], str(tmp_path / "eager"))
    assert summary["detections"] > 0
