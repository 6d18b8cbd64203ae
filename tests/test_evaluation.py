"""FasterCOCOEvaluator (faster-coco-eval) gives pycocotools' AP through detectron2's COCOEvaluator.

Both evaluators see the same detections through detectron2's ``process`` / ``evaluate`` API, so
the category mapping, the JSON conversion and the AP table are exercised as in training.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances

from retinanet_plugin.data.deepforest import prepare_deepforest
from retinanet_plugin.evaluation import FasterCOCOEvaluator, build_coco_evaluator
from retinanet_plugin.evaluation import coco as coco_module

REPO = Path(__file__).resolve().parents[1]


def synthetic_coco(num_images: int, num_classes: int, seed: int):
    """A COCO set with crowd boxes, non-contiguous category ids and, per image, jittered copies of
    most ground-truth boxes (some with the wrong class) plus random false positives."""
    rng = np.random.default_rng(seed)
    cat_ids = [3 * c + 2 for c in range(num_classes)]  # 2, 5, 8: not 1..K
    images, annotations, detections = [], [], {}
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 320, "height": 240, "file_name": f"{image_id}.jpg"})
        dets = []
        for _ in range(rng.integers(0, 12)):
            x, y = rng.uniform(0, 280), rng.uniform(0, 200)
            w, h = rng.uniform(4, 120, size=2)
            cat = int(rng.choice(cat_ids))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.05),
            })  # fmt: skip
            if rng.random() < 0.8:
                jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
                cat_d = cat if rng.random() < 0.9 else int(rng.choice(cat_ids))
                dets.append(([x, y, x + w, y + h] + jitter, cat_d, rng.uniform(0.2, 1.0)))
        for _ in range(rng.integers(0, 40)):
            x, y = rng.uniform(0, 280), rng.uniform(0, 200)
            w, h = rng.uniform(4, 120, size=2)
            dets.append(([x, y, x + w, y + h], int(rng.choice(cat_ids)), rng.uniform(0, 0.6)))
        detections[image_id] = dets
    categories = [{"id": c, "name": f"class{c}"} for c in cat_ids]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def _register(name: str, coco: dict, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(coco))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(path), str(tmp_path))
    DatasetCatalog.get(name)  # loading sets the category id mapping in the metadata


def _evaluate(evaluator, name, detections):
    """Feeds detections {image_id: [(xyxy, coco category id, score)]} to evaluator."""
    contiguous = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    evaluator.reset()
    for image_id, dets in detections.items():
        inst = Instances((240, 320))
        inst.pred_boxes = Boxes(torch.tensor([d[0] for d in dets], dtype=torch.float32)
                                .reshape(-1, 4))
        inst.scores = torch.tensor([d[2] for d in dets], dtype=torch.float32)
        inst.pred_classes = torch.tensor([contiguous[d[1]] for d in dets], dtype=torch.int64)
        evaluator.process([{"image_id": image_id}], [{"instances": inst}])
    return evaluator.evaluate()["bbox"]


def _assert_same_ap(fast, official):
    assert set(fast) == set(official)
    for key, value in official.items():
        if np.isnan(value):
            assert np.isnan(fast[key]), key
        else:
            # AP in percent; 1e-4 of AP as a fraction is 1e-2 here, we ask 100x tighter.
            assert fast[key] == pytest.approx(value, abs=1e-4), key


def test_synthetic_set_same_ap_as_pycocotools(tmp_path, caplog):
    name = "retinanet_plugin_eval_synthetic"
    coco, detections = synthetic_coco(num_images=60, num_classes=3, seed=0)
    _register(name, coco, tmp_path)
    official = _evaluate(COCOEvaluator(name, use_fast_impl=False), name, detections)
    fast = _evaluate(FasterCOCOEvaluator(name, output_dir=str(tmp_path / "out")), name, detections)
    _assert_same_ap(fast, official)
    # Per-category AP and the headline numbers are real values, not a degenerate 0 / NaN set.
    assert {"AP-class2", "AP-class5", "AP-class8"} <= set(fast)
    assert 10 < fast["AP"] < 90 and 10 < fast["AP50"] < 100
    # detectron2's conversion still ran: the JSON holds dataset category ids, not contiguous ones.
    saved = json.loads((tmp_path / "out" / "coco_instances_results.json").read_text())
    assert {r["category_id"] for r in saved} == {2, 5, 8}
    # The binding of COCOeval_opt was scoped to the evaluation.
    assert coco_module.coco_evaluation.COCOeval_opt.__module__.startswith("detectron2")


def test_deepforest_val_same_ap_as_pycocotools(tmp_path):
    """The demo's val split (546 crowns), detections = jittered ground truth + false positives."""
    root = REPO / "datasets" / "deepforest"
    prepare_deepforest(root)
    coco = json.loads((root / "val.json").read_text())
    rng = np.random.default_rng(1)
    detections = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        box = np.array([x, y, x + w, y + h]) + rng.normal(0, 0.15, 4) * [w, h, w, h]
        detections[ann["image_id"]].append((box, ann["category_id"], rng.uniform(0.1, 1)))
    for dets in detections.values():
        for _ in range(20):
            x, y = rng.uniform(0, 360, 2)
            dets.append(([x, y, x + 40, y + 40], coco["categories"][0]["id"], rng.uniform(0, 0.7)))
    name = "retinanet_plugin_eval_deepforest_val"
    _register(name, coco, tmp_path)
    official = _evaluate(COCOEvaluator(name, use_fast_impl=False), name, detections)
    fast = _evaluate(FasterCOCOEvaluator(name), name, detections)
    _assert_same_ap(fast, official)
    assert 5 < fast["AP"] < 95


def test_build_coco_evaluator_picks_the_fastest(monkeypatch, tmp_path):
    name = "retinanet_plugin_eval_pick"
    coco, _ = synthetic_coco(num_images=2, num_classes=1, seed=0)
    _register(name, coco, tmp_path)

    monkeypatch.setattr(coco_module, "has_compiled_ops", lambda: True)
    compiled = build_coco_evaluator(name)
    assert type(compiled) is COCOEvaluator and compiled._use_fast_impl

    monkeypatch.setattr(coco_module, "has_compiled_ops", lambda: False)
    assert type(build_coco_evaluator(name)) is FasterCOCOEvaluator

    monkeypatch.setattr(coco_module, "faster_cocoeval_class", lambda: None)
    official = build_coco_evaluator(name)
    assert type(official) is COCOEvaluator and not official._use_fast_impl
    with pytest.raises(ImportError, match="faster-coco-eval"):
        FasterCOCOEvaluator(name)
