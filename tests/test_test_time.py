"""Test-time options of FocalRetinaNet: soft-NMS, box voting, class-agnostic NMS, per-class score
thresholds, test-time augmentation; and crowd regions in training (mapper and anchor labels)."""

import math

import cv2
import numpy as np
import pytest
import torch

from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, Instances

from retinanet_plugin.data import RobustDatasetMapper
from retinanet_plugin.nms import box_voting, soft_nms
from retinanet_plugin.test_time_augmentation import FocalRetinaNetWithTTA

from small_config import small_retinanet_cfg


def _cfg(*opts):
    cfg = small_retinanet_cfg(num_convs=1)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    cfg.merge_from_list(list(opts))
    return cfg


# --------------------------------------------------------------------------------------------
# soft-NMS and box voting on hand-computed boxes
# --------------------------------------------------------------------------------------------
# One class: B and C lie inside A. IoU(A, B) = 80 / 100 = 0.8, IoU(A, C) = 40 / 100 = 0.4,
# IoU(B, C) = 40 / 80 = 0.5; D overlaps nothing.
BOXES = torch.tensor(
    [[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 4], [20, 20, 30, 30]], dtype=torch.float32
)
SCORES = torch.tensor([0.9, 0.8, 0.7, 0.6])


def _soft(method, boxes=BOXES, scores=SCORES, idxs=None, floor=0.001, max_det=100):
    idxs = torch.zeros(len(boxes), dtype=torch.int64) if idxs is None else idxs
    return soft_nms(
        boxes,
        scores,
        idxs,
        method=method,
        iou_threshold=0.3,
        sigma=0.5,
        score_threshold=floor,
        max_detections=max_det,
    )


def test_soft_nms_linear_golden():
    keep, scores = _soft("linear")
    # Pick A (0.9): B 0.8 * (1 - 0.8) = 0.16, C 0.7 * (1 - 0.4) = 0.42 (IoUs > 0.3), D 0.6.
    # Pick D (0.6), no overlap. Pick C (0.42): B 0.16 * (1 - 0.5) = 0.08. Pick B (0.08).
    assert keep.tolist() == [0, 3, 2, 1]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.6, 0.42, 0.08]))
    # The score floor drops B (0.08 <= 0.1); max_detections keeps the first picks.
    assert _soft("linear", floor=0.1)[0].tolist() == [0, 3, 2]
    assert _soft("linear", max_det=2)[0].tolist() == [0, 3]


def test_soft_nms_gaussian_golden():
    keep, scores = _soft("gaussian")
    # sigma = 0.5. Pick A: B 0.8 * exp(-0.8^2 / 0.5) = 0.8 * exp(-1.28) = 0.222430,
    # C 0.7 * exp(-0.4^2 / 0.5) = 0.7 * exp(-0.32) = 0.508304, D 0.6 * exp(0) = 0.6.
    # Pick D. Pick C: B 0.222430 * exp(-0.5^2 / 0.5) = 0.222430 * exp(-0.5) = 0.134911.
    assert keep.tolist() == [0, 3, 2, 1]
    expected = [0.9, 0.6, 0.7 * math.exp(-0.32), 0.8 * math.exp(-1.28) * math.exp(-0.5)]
    torch.testing.assert_close(scores, torch.tensor(expected))
    torch.testing.assert_close(scores[2:], torch.tensor([0.508304, 0.134911]), atol=1e-6, rtol=0)


def test_soft_nms_is_per_class_unless_agnostic():
    # E equals A but is class 1 (score 0.5): per class it is untouched; class-agnostic, IoU 1
    # decays it linearly to 0.5 * (1 - 1) = 0, below the floor: dropped.
    boxes = torch.cat([BOXES, BOXES[:1]])
    scores = torch.cat([SCORES, torch.tensor([0.5])])
    per_class = _soft("linear", boxes, scores, torch.tensor([0, 0, 0, 0, 1]))
    assert per_class[0].tolist() == [0, 3, 4, 2, 1]
    torch.testing.assert_close(per_class[1], torch.tensor([0.9, 0.6, 0.5, 0.42, 0.08]))
    agnostic = _soft("linear", boxes, scores, torch.zeros(5, dtype=torch.int64))
    assert agnostic[0].tolist() == [0, 3, 2, 1]
    # Negative coordinates (unclipped boxes) must not make two classes overlap either.
    shifted = _soft("linear", boxes - 25, scores, torch.tensor([0, 0, 0, 0, 1]))
    assert shifted[0].tolist() == per_class[0].tolist()


def test_box_voting_golden():
    # A's voters at IoU >= 0.8: A (0.9) and B (0.8, IoU 0.8); C (IoU 0.4) does not vote.
    # y2 = (0.9 * 10 + 0.8 * 8) / (0.9 + 0.8) = 15.4 / 1.7 = 9.0588; x1, y1, x2 agree.
    # D votes alone for itself. A class-1 copy of A does not vote for class-0 boxes.
    boxes = torch.cat([BOXES, BOXES[:1] + 1])
    scores = torch.cat([SCORES, torch.tensor([1.0])])
    idxs = torch.tensor([0, 0, 0, 0, 1])
    voted = box_voting(boxes[[0, 3]], idxs[[0, 3]], boxes, scores, idxs, 0.8)
    torch.testing.assert_close(voted, torch.tensor([[0, 0, 10, 15.4 / 1.7], [20, 20, 30, 30]]))


# --------------------------------------------------------------------------------------------
# The detector's post-processing keys
# --------------------------------------------------------------------------------------------
def test_defaults_keep_detectron2_post_processing():
    model = build_model(_cfg())
    assert model.nms_type == "hard" and not model.nms_class_agnostic
    assert model.test_score_thresh_per_class is None
    assert model.box_voting_iou_thresh is None and model.crowd_ioa_thresh is None


def test_keys_reach_the_model():
    model = build_model(
        _cfg(
            "MODEL.RETINANET.NUM_CLASSES", "2",
            "MODEL.RETINANET.SCORE_THRESH_TEST_PER_CLASS", "[0.2, 0.05]",
            "MODEL.RETINANET.NMS_CLASS_AGNOSTIC", "True",
            "MODEL.RETINANET.NMS_TYPE", "soft_linear",
            "MODEL.RETINANET.SOFT_NMS_SCORE_THRESH", "0.01",
            "MODEL.RETINANET.CROWD_IGNORE", "True",
            "MODEL.RETINANET.CROWD_IOA_THRESH", "0.6",
        )  # fmt: skip
    )
    assert model.test_score_thresh_per_class == [0.2, 0.05]
    assert model.nms_class_agnostic and model.nms_type == "soft_linear"
    assert model.soft_nms_score_thresh == 0.01 and model.crowd_ioa_thresh == 0.6


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("MODEL.RETINANET.NMS_TYPE", "soft", "MODEL.RETINANET.NMS_TYPE"),
        ("MODEL.RETINANET.SCORE_THRESH_TEST_PER_CLASS", "[0.1, 0.2]", "NUM_CLASSES = 80"),
        ("MODEL.RETINANET.SOFT_NMS_SIGMA", "0.0", "MODEL.RETINANET.SOFT_NMS_SIGMA"),
        ("MODEL.RETINANET.CROWD_IOA_THRESH", "1.5", "MODEL.RETINANET.CROWD_IOA_THRESH"),
    ],
)
def test_bad_test_time_keys_are_named(key, value, message):
    with pytest.raises(ValueError, match=message):
        build_model(_cfg(key, value))


@pytest.fixture(scope="module")
def two_class_model():
    torch.manual_seed(0)
    return build_model(_cfg("MODEL.RETINANET.NUM_CLASSES", "2")).eval()


def _one_level(logits_per_class, num_anchors=1):
    """One level of H x W locations, A = 1, well-separated 8x8 anchors, zero deltas (boxes =
    anchors). logits_per_class: (K, H, W)."""
    num_classes, height, width = logits_per_class.shape
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    corners = torch.stack([xs, ys], dim=-1).reshape(-1, 2).float() * 20
    anchors = Boxes(torch.cat([corners, corners + 8], dim=1))
    logits = logits_per_class[None]  # (1, A*K, H, W) with A = 1
    deltas = torch.zeros(1, 4, height, width)
    return [anchors], [logits], [deltas]


@pytest.mark.parametrize("dense", [True, False])
def test_per_class_score_thresholds(two_class_model, dense):
    model = two_class_model
    size = 2 if dense else 8  # 2x2: every location holds a candidate; 8x8: 3 of 64 do
    scores = torch.full((2, size, size), 0.01)
    scores[0, 0, 0], scores[1, 0, 0] = 0.3, 0.06  # class 0 passes 0.2; class 1 passes 0.05
    scores[0, 0, 1], scores[1, 0, 1] = 0.15, 0.04  # neither passes
    scores[1, 1, 1] = 0.5  # class 1 passes
    if dense:
        scores[0, 1, 0] = 0.19  # class 0, just below its 0.2
    level = _one_level(torch.logit(scores))
    model.test_score_thresh_per_class = [0.2, 0.05]
    try:
        result = model.inference(*level, [(200, 200)])[0]
    finally:
        model.test_score_thresh_per_class = None
    got = sorted(zip(result.pred_classes.tolist(), result.scores.tolist()))
    expected = [(0, 0.3), (1, 0.06), (1, 0.5)]
    assert [c for c, _ in got] == [c for c, _ in expected]
    torch.testing.assert_close(torch.tensor([s for _, s in got]), torch.tensor([0.3, 0.06, 0.5]))
    # The single default threshold 0.05 keeps class 0's 0.15 and 0.19 as well.
    default = model.inference(*level, [(200, 200)])[0]
    assert len(default) == len(expected) + 1 + dense


def test_class_agnostic_nms(two_class_model):
    model = two_class_model
    # Two classes at the same box (IoU 1): per class both stay, class-agnostic only the best.
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    classes = torch.tensor([0, 1, 1])
    assert model.select_detections(boxes, scores, classes, (100, 100)).scores.tolist() == (
        pytest.approx([0.9, 0.8, 0.7])
    )
    model.nms_class_agnostic = True
    try:
        agnostic = model.select_detections(boxes, scores, classes, (100, 100))
    finally:
        model.nms_class_agnostic = False
    assert agnostic.scores.tolist() == pytest.approx([0.9, 0.7])
    assert agnostic.pred_classes.tolist() == [0, 1]


def test_soft_nms_and_voting_from_config():
    model = build_model(
        _cfg(
            "MODEL.RETINANET.NMS_TYPE", "soft_gaussian",
            "MODEL.RETINANET.SOFT_NMS_SIGMA", "0.5",
            "MODEL.RETINANET.BOX_VOTING", "True",
            "MODEL.RETINANET.BOX_VOTING_IOU_THRESH", "0.8",
        )  # fmt: skip
    )
    result = model.select_detections(BOXES, SCORES, torch.zeros(4, dtype=torch.int64), (50, 50))
    # The Gaussian golden scores above; A voted with B as in test_box_voting_golden, B and C
    # voted by their IoU >= 0.8 neighbours: C alone, B with A: (0.9 * 10 + 0.8 * 8) / 1.7 too.
    torch.testing.assert_close(
        result.scores, torch.tensor([0.9, 0.6, 0.508304, 0.134911]), atol=1e-6, rtol=0
    )
    y2 = 15.4 / 1.7
    expected = [[0, 0, 10, y2], [20, 20, 30, 30], [0, 0, 10, 4], [0, 0, 10, y2]]
    torch.testing.assert_close(result.pred_boxes.tensor, torch.tensor(expected))


# --------------------------------------------------------------------------------------------
# Test-time augmentation
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tta_model():
    cfg = _cfg("MODEL.RETINANET.SCORE_THRESH_TEST", "0.03", "TEST.DETECTIONS_PER_IMAGE", "50")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        # The random trunk's features give logits with a std of 3-30 (measured): scores would
        # saturate at 1.0, where ties decide. Scaled, the logits spread by about 1 around the
        # prior's -4.6, so that many anchors pass 0.03 with distinct scores; small deltas keep
        # the boxes near their anchors.
        model.head.cls_score.weight.mul_(0.03)
        model.head.bbox_pred.weight.mul_(0.01)
    return cfg, model


def _tta(cfg, model, min_sizes, flip):
    cfg = cfg.clone()
    cfg.TEST.AUG.MIN_SIZES = min_sizes
    cfg.TEST.AUG.MAX_SIZE = 1000
    cfg.TEST.AUG.FLIP = flip
    return FocalRetinaNetWithTTA(cfg, model)


def _image(height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, height, width, generator=g) * 255).to(torch.uint8)


def _by_score(instances):
    order = torch.argsort(instances.scores, descending=True)
    return (
        instances.scores[order],
        instances.pred_boxes.tensor[order],
        instances.pred_classes[order],
    )


def _assert_same(a, b, atol=1e-3):
    assert len(a) == len(b) and len(a) > 0  # two empty sets would prove nothing
    for x, y in zip(_by_score(a), _by_score(b)):
        torch.testing.assert_close(x.float(), y.float(), atol=atol, rtol=1e-5)


def _mirror(instances, width):
    out = Instances(instances.image_size)
    boxes = instances.pred_boxes.tensor
    out.pred_boxes = Boxes(torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0],
                                        boxes[:, 3]], dim=1))  # fmt: skip
    out.scores, out.pred_classes = instances.scores, instances.pred_classes
    return out


def test_tta_one_scale_equals_the_model_on_the_resized_image(tta_model):
    cfg, model = tta_model
    # The loader's input is 96x128 for an original of 144x192 (x1.5); TTA resizes it to a
    # short side of 128 and maps its boxes back to 144x192. The model given that 128x170 image
    # rescales its detections to 144x192 itself: the same detections.
    image = _image(96, 128)
    inputs = {"image": image, "height": 144, "width": 192}
    with torch.no_grad():
        tta = _tta(cfg, model, (128,), False)([inputs])[0]["instances"]
        hwc = image.permute(1, 2, 0).numpy()
        resized = T.ResizeShortestEdge(128, 1000).get_transform(hwc).apply_image(hwc)
        plain_input = {"image": torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))}
        plain = model([{**plain_input, "height": 144, "width": 192}])[0]["instances"]
    assert tta.image_size == (144, 192)
    _assert_same(tta, plain)


def test_tta_with_flip_gives_the_mirrored_detections_of_the_mirrored_image(tta_model):
    cfg, model = tta_model
    # TTA with flip sees an image and its mirror either way, so the detections of the mirrored
    # image are the mirrored detections (a flip-symmetric image, its own mirror, thus gets
    # mirror-symmetric detections, up to the NMS's choice between a box and its mirror, which
    # tie). The model alone is not flip-equivariant (padding, random weights): the check below
    # shows that the property comes from the TTA.
    image = _image(128, 160, seed=1)
    flipped = image.flip(-1)
    tta = _tta(cfg, model, (128, 96), True)
    with torch.no_grad():
        result = tta([{"image": image}])[0]["instances"]
        result_of_flipped = tta([{"image": flipped}])[0]["instances"]
        plain = model([{"image": image}])[0]["instances"]
        plain_of_flipped = model([{"image": flipped}])[0]["instances"]
    _assert_same(result_of_flipped, _mirror(result, 160))
    with pytest.raises(AssertionError):
        _assert_same(plain_of_flipped, _mirror(plain, 160))


def test_tta_needs_a_focal_retinanet():
    cfg = _cfg()
    with pytest.raises(TypeError, match="FocalRetinaNet"):
        FocalRetinaNetWithTTA(cfg, torch.nn.Linear(1, 1))


# --------------------------------------------------------------------------------------------
# Crowd regions
# --------------------------------------------------------------------------------------------
# A 100x100 image: crowd box [0, 0, 50, 50]; a tree [70, 70, 90, 90]; a tree [5, 5, 15, 15]
# inside the crowd box.
ANCHORS = Boxes(
    torch.tensor(
        [
            [0, 0, 10, 10],  # IoA with the crowd 100 / 100 = 1: background -> ignore
            [40, 40, 60, 60],  # IoA (10 * 10) / 400 = 0.25 < 0.7: stays background
            [70, 70, 90, 90],  # the tree: class 1
            [0, 0, 50, 50],  # the crowd box itself, IoA 1: ignored, never foreground
            [5, 5, 15, 15],  # the tree inside the crowd: stays class 0
            [10, 10, 48, 48],  # IoA 1, IoU with the inner tree 25 / 1444 < 0.4: ignore
        ],
        dtype=torch.float32,
    )
)


def _crowd_instances(with_crowd=True):
    inst = Instances((100, 100))
    boxes = [[70, 70, 90, 90], [5, 5, 15, 15]] + [[0, 0, 50, 50]] * with_crowd
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.gt_classes = torch.tensor([1, 0, 0][: len(boxes)])
    inst.gt_is_crowd = torch.tensor([False, False, True][: len(boxes)])
    return inst


def test_crowd_anchors_are_ignored():
    model = build_model(_cfg("MODEL.RETINANET.NUM_CLASSES", "2", "MODEL.RETINANET.CROWD_IGNORE",
                             "True"))  # fmt: skip
    labels, boxes = model.label_anchors(ANCHORS, [_crowd_instances()])
    background = 2
    assert labels[0].tolist() == [-1, background, 1, -1, 0, -1]
    torch.testing.assert_close(boxes[0, 2], torch.tensor([70.0, 70, 90, 90]))


def test_crowd_defaults_keep_detectron2_labels():
    model = build_model(_cfg("MODEL.RETINANET.NUM_CLASSES", "2"))
    without_crowd = _crowd_instances(with_crowd=False)
    expected, _ = model.label_anchors(ANCHORS, [without_crowd])
    assert expected[0].tolist() == [2, 2, 1, 2, 0, 2]
    # Off by default: crowd boxes are dropped (as detectron2's mapper does), never matched.
    labels, _ = model.label_anchors(ANCHORS, [_crowd_instances()])
    assert labels.tolist() == expected.tolist()
    # Instances without the crowd field (detectron2's mapper) label as before with the switch on.
    model.crowd_ioa_thresh = 0.7
    without_field = Instances((100, 100), gt_boxes=without_crowd.gt_boxes,
                              gt_classes=without_crowd.gt_classes)  # fmt: skip
    assert model.label_anchors(ANCHORS, [without_field])[0].tolist() == expected.tolist()


def test_crowd_mapper_keeps_crowd_boxes(tmp_path):
    path = tmp_path / "tile.png"
    cv2.imwrite(str(path), np.zeros((100, 100, 3), np.uint8))

    def anno(box, crowd, category=0):
        return {"bbox": box, "bbox_mode": BoxMode.XYWH_ABS, "category_id": category,
                "iscrowd": crowd}  # fmt: skip

    record = {
        "file_name": str(path),
        "height": 100,
        "width": 100,
        "image_id": 7,
        "annotations": [
            anno([70, 70, 20, 20], 0, 1),
            anno([0, 0, 50, 50], 1),
            anno([150, 150, 10, 10], 1),  # outside the image: empty after clipping, dropped
        ],
    }
    kwargs = {"is_train": True, "augmentations": [T.Resize((200, 200))], "image_format": "BGR"}
    instances = RobustDatasetMapper(keep_crowd=True, **kwargs)(record)["instances"]
    # Resized x2: the tree [70, 70, 90, 90] -> [140, 140, 180, 180], the crowd -> [0, 0, 100, 100].
    assert instances.gt_boxes.tensor.tolist() == [[140, 140, 180, 180], [0, 0, 100, 100]]
    assert instances.gt_classes.tolist() == [1, 0]
    assert instances.gt_is_crowd.tolist() == [False, True]
    # detectron2's mapper drops the crowd box.
    assert len(DatasetMapper(**kwargs)(record)["instances"]) == 1
