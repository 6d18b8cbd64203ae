"""retinanet_plugin.tools.loss_cdf (Fig. 4): its per-sample losses are the detector's own loss
split by sample, its curves are cumulative distributions, and the command writes them."""

import csv
import json
import math

import cv2
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from retinanet_plugin.tools import loss_cdf

from small_config import small_retinanet_cfg


@pytest.fixture(autouse=True)
def eager_losses(monkeypatch):
    # The fused kernels give the same numbers eagerly (tests/test_focal_loss.py); compiling the
    # reduction="none" variant would cost a minute of this test's time on a busy CPU.
    monkeypatch.setenv("RETINANET_PLUGIN_COMPILE", "0")


def _cfg():
    cfg = small_retinanet_cfg(num_convs=1)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 160
    return cfg


def _inputs():
    g = torch.Generator().manual_seed(0)
    out = []
    for (h, w), boxes, classes in [
        ((128, 160), [[10, 12, 60, 70], [80, 20, 150, 110]], [0, 2]),
        ((128, 128), [[30, 30, 90, 100]], [1]),
    ]:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.tensor(classes)
        out.append({"image": torch.rand(3, h, w, generator=g) * 255, "instances": inst})
    return out


def test_normalized_cdf_hand_computed():
    # sorted [0, 1, 3, 4], sum 8: cumulative [0, 1/8, 4/8, 8/8] at fractions 1/4 .. 4/4
    fraction, cumulative = loss_cdf.normalized_cdf(np.array([3.0, 0.0, 1.0, 4.0]))
    np.testing.assert_allclose(fraction, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(cumulative, [0.0, 0.125, 0.5, 1.0])
    # The hardest 25% (the 4) carry 4/8 of the loss; the hardest 50%, 7/8.
    assert loss_cdf._hardest_share(cumulative, 0.25) == pytest.approx(0.5)
    assert loss_cdf._hardest_share(cumulative, 0.5) == pytest.approx(0.875)
    with pytest.raises(ValueError, match="non-negative"):
        loss_cdf.normalized_cdf(np.array([1.0, -0.5]))


def test_split_focal_losses_hand_computed():
    # Anchor 0: class 0 (positive, x = 0, p_t = 0.5) and class 1 a negative with x = ln(1/3):
    # p = 0.25, p_t = 0.75. Anchor 1: background (label K = 2), x = 0 (p_t = 0.5) and x = ln 3
    # (p = 0.75, p_t = 0.25). Anchor 2: ignored (-1), contributes nothing.
    logits = torch.tensor([[[0.0, math.log(1 / 3)], [0.0, math.log(3)], [5.0, 5.0]]])
    labels = torch.tensor([[0, 2, -1]])
    pos, neg = loss_cdf.split_focal_losses(logits, labels, gamma=2.0)
    # FL = -(1 - p_t)^2 ln p_t: 0.25 ln 2 = 0.1732868; 0.0625 ln(4/3) = 0.0179801;
    # 0.5625 ln 4 = 0.7797905
    np.testing.assert_allclose(pos.numpy(), [0.25 * math.log(2)], rtol=1e-5)
    np.testing.assert_allclose(
        sorted(neg.numpy()), [0.0625 * math.log(4 / 3), 0.25 * math.log(2), 0.5625 * math.log(4)],
        rtol=1e-5,
    )


def test_losses_sum_to_the_detectors_training_loss():
    """On a small FocalRetinaNet, the tool's samples are exactly the elements the detector's
    classification loss sums, labelled as in training."""
    cfg = _cfg()
    cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA = -1.0  # the tool leaves alpha out (see its docstring)
    cfg.MODEL.RETINANET.FOCAL_LOSS_GAMMA = 2.0
    cfg.MODEL.RETINANET.LOSS_NORMALIZER = "batch"  # divides by this batch's foreground count
    torch.manual_seed(0)
    model = build_model(cfg)
    inputs = _inputs()

    model.train()
    with EventStorage() as storage:
        loss_cls = model(inputs)["loss_cls"]
        num_fg = storage.history("num_pos_anchors").latest() * len(inputs)
    model.eval()
    logits, labels = loss_cdf.anchor_logits_and_labels(model, inputs)
    pos, neg = loss_cdf.split_focal_losses(logits, labels, gamma=2.0)

    assert pos.numel() == num_fg > 0
    valid = int((labels >= 0).sum())
    assert neg.numel() == valid * 3 - pos.numel()
    assert (pos.sum() + neg.sum()).item() == pytest.approx(loss_cls.item() * num_fg, rel=1e-5)

    # gamma = 0 is plain cross-entropy: compare with torch's BCE on the one-hot targets.
    pos0, neg0 = loss_cdf.split_focal_losses(logits, labels, gamma=0.0)
    keep = labels >= 0
    onehot = F.one_hot(labels[keep].clamp(max=3), 4)[:, :3].float()
    bce = F.binary_cross_entropy_with_logits(logits[keep], onehot, reduction="none")
    torch.testing.assert_close(torch.sort(pos0).values, torch.sort(bce[onehot == 1]).values)
    torch.testing.assert_close(torch.sort(neg0).values, torch.sort(bce[onehot == 0]).values)

    # Image by image, with a random subset of 100 negatives per image, the same for every gamma:
    # CE = -log p_t gives FL_2 = (1 - exp(-CE))^2 CE element by element only if the subsets
    # pair up.
    per_image = loss_cdf.collect_losses(model, inputs, [0.0, 2.0], negatives_per_image=100)
    ce, fl2 = per_image["negative"][0.0].astype(np.float64), per_image["negative"][2.0]
    assert ce.shape == fl2.shape == (200,)
    assert per_image["positive"][2.0].shape == (num_fg,)
    np.testing.assert_allclose(fl2, (1 - np.exp(-ce)) ** 2 * ce, rtol=1e-3, atol=1e-30)


def test_command_writes_the_figure_and_the_numbers(tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    # Two annotated images on disk, as a registered COCO dataset.
    rng = np.random.default_rng(0)
    coco = {"images": [], "annotations": [], "categories": [
        {"id": i + 1, "name": n} for i, n in enumerate("abc")]}
    for image_id, (boxes, cats) in enumerate([([[10, 12, 50, 58]], [1]),
                                               ([[30, 30, 60, 70], [5, 80, 40, 30]], [3, 2])], 1):
        cv2.imwrite(str(tmp_path / f"{image_id}.png"), rng.integers(0, 255, (128, 160, 3),
                                                                    dtype=np.uint8))
        coco["images"].append({"id": image_id, "file_name": f"{image_id}.png", "height": 128,
                               "width": 160})
        for box, cat in zip(boxes, cats):
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                        "bbox": box, "category_id": cat, "iscrowd": 0,
                                        "area": box[2] * box[3]})
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    name = "retinanet_plugin_loss_cdf_tiny"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(tmp_path / "ann.json"), str(tmp_path))
    (tmp_path / "cfg.yaml").write_text(cfg.dump())

    out = tmp_path / "cdf"
    summary = loss_cdf.main([
        "--config-file", str(tmp_path / "cfg.yaml"), "--weights", str(tmp_path / "model.pth"),
        "--dataset", name, "--gammas", "0", "2", "--output", str(out),
    ])  # fmt: skip

    assert (out / "loss_cdf.png").stat().st_size > 10_000
    with open(out / "loss_cdf.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * loss_cdf.CSV_GRID  # {positive, negative} x 2 gammas x grid
    for kind in ("positive", "negative"):
        for gamma in ("0", "2"):
            curve = [float(r["cumulative_loss"]) for r in rows
                     if r["samples"] == kind and r["gamma"] == gamma]
            assert np.all(np.diff(curve) >= 0) and curve[-1] == pytest.approx(1.0)
            assert curve[0] < curve[-1]
    saved = json.loads((out / "loss_cdf.json").read_text())
    assert saved == summary
    # 3 ground-truth boxes, each with at least its best anchor as foreground.
    assert saved["samples"]["positive"] >= 3
    # Focusing moves the negatives' loss onto the hardest samples (Fig. 4, right).
    neg = saved["hardest_share"]["negative"]
    assert neg["2"]["0.1"] > neg["0"]["0.1"]

    with pytest.raises(FileNotFoundError, match="--weights"):
        loss_cdf.main(["--config-file", str(tmp_path / "cfg.yaml"), "--weights", "missing.pth",
                       "--dataset", name])
