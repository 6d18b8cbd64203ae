"""FocalRetinaNet and FocalRetinaNetHead: registration, config validation, checkpoints, and the
end-to-end cases of detectron2's own RetinaNet tests (empty ground truth, inf / NaN features,
autocast)."""

import math
import re

import pytest
import torch
from fvcore.nn import smooth_l1_loss

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import CycleBatchNormList
from detectron2.modeling import META_ARCH_REGISTRY, PROPOSAL_GENERATOR_REGISTRY, build_model
from detectron2.modeling.box_regression import Box2BoxTransform, _dense_box_regression_loss
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from retinanet_plugin import (
    RETINANET_HEAD_REGISTRY,
    FocalRetinaNet,
    FocalRetinaNetHead,
    FocalRPN,
    LossNormalizer,
    RetinaNetCheckpointer,
)
from retinanet_plugin.box_regression import dense_box_reg_loss
from retinanet_plugin.losses import SigmoidFocalLoss

from small_config import small_retinanet_cfg


def _cfg(**overrides):
    """detectron2's RetinaNet R50-FPN config, FocalRetinaNet, shrunk to a ResNet-18 trunk and a
    one-conv head so that CPU tests run in seconds."""
    cfg = small_retinanet_cfg(num_convs=1)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    for key, value in overrides.items():
        cfg.merge_from_list([key.replace("__", "."), value])
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(_cfg())


def _empty_instances(h, w):
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.zeros(0, 4))
    inst.gt_classes = torch.zeros(0, dtype=torch.int64)
    return inst


def _instances(h, w, boxes, classes):
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def _batch(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(3, h, w, generator=g) * 255} for h, w in sizes]


# --------------------------------------------------------------------------------------------
# Registration and building
# --------------------------------------------------------------------------------------------
def test_registered_under_their_class_names():
    assert META_ARCH_REGISTRY.get("FocalRetinaNet") is FocalRetinaNet
    assert RETINANET_HEAD_REGISTRY.get("FocalRetinaNetHead") is FocalRetinaNetHead
    assert PROPOSAL_GENERATOR_REGISTRY.get("FocalRPN") is FocalRPN
    # detectron2's own RetinaNet is left alone.
    assert META_ARCH_REGISTRY.get("RetinaNet") is RetinaNet


@pytest.mark.parametrize("low_quality", [True, False])
def test_build_model_wires_the_configured_components(low_quality):
    model = build_model(_cfg(MODEL__RETINANET__ALLOW_LOW_QUALITY_MATCHES=low_quality))
    assert type(model) is FocalRetinaNet
    assert type(model.head) is FocalRetinaNetHead
    assert type(model.cls_loss) is SigmoidFocalLoss
    assert model.anchor_matcher.allow_low_quality_matches is low_quality
    assert model.anchor_matcher.thresholds[1:-1] == [0.4, 0.5]  # Sec. 4: bg < 0.4 <= ign < 0.5
    assert model.loss_normalizer.mode == "ema"


# --------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------
def test_head_initialisation_follows_sec_3_3(model):
    head = model.head
    # b = -log((1 - pi) / pi) with pi = 0.01: -log(99) = -4.595, so sigmoid(b) = 0.01.
    torch.testing.assert_close(
        head.cls_score.bias, torch.full_like(head.cls_score.bias, -math.log(99))
    )
    for conv in (head.cls_subnet[0], head.bbox_subnet[0], head.cls_score, head.bbox_pred):
        assert abs(conv.weight.std().item() - 0.01) < 0.001  # Gaussian, sigma = 0.01
    assert head.cls_subnet[0].bias.abs().max() == 0
    assert head.bbox_pred.bias.abs().max() == 0
    # 9 anchors x 80 classes and 9 x 4 deltas (Sec. 4).
    assert head.cls_score.out_channels == 720 and head.bbox_pred.out_channels == 36


@pytest.mark.parametrize("norm,kind", [("GN", torch.nn.GroupNorm), ("BN", CycleBatchNormList)])
def test_head_norm(norm, kind):
    cfg = _cfg(MODEL__RETINANET__NORM=norm)
    model = build_model(cfg)
    assert isinstance(model.head.cls_subnet[1], kind)
    model.train()
    # Two images: P7 of a 64x96 input is 1x1, and training BN needs more than one value.
    inputs = [{"image": torch.rand(3, 64, 96) * 255, "instances": _empty_instances(64, 96)}] * 2
    with EventStorage():
        losses = model(inputs)
    assert all(torch.isfinite(v) for v in losses.values())


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def test_empty_ground_truth_trains_and_evaluates(model):
    sizes = [(200, 250), (200, 249)]
    inputs = _batch(sizes)
    for x, (h, w) in zip(inputs, sizes):
        x["instances"] = _empty_instances(h, w)
    model.train()
    model.zero_grad()
    with EventStorage() as storage:
        losses = model(inputs)
        assert storage.latest()["num_pos_anchors"][0] == 0
    assert losses["loss_box_reg"].item() == 0  # exactly
    assert losses["loss_box_reg"].requires_grad  # still in the graph
    assert math.isfinite(losses["loss_cls"].item()) and losses["loss_cls"].item() > 0
    sum(losses.values()).backward()
    assert model.head.bbox_pred.weight.grad is not None
    assert model.head.bbox_pred.weight.grad.abs().max() == 0
    assert model.head.cls_score.weight.grad.abs().max() > 0

    model.eval()
    with torch.no_grad():
        outputs = model([{"image": x["image"]} for x in inputs])
    assert [o["instances"].image_size for o in outputs] == sizes


def test_loss_normalizer_divides_both_losses(model):
    inputs = _batch([(128, 160)], seed=1)
    inputs[0]["instances"] = _instances(128, 160, [[10, 10, 90, 70], [60, 50, 150, 120]], [1, 2])
    model.train()
    results = {}
    for mode in ("ema", "batch", "global"):
        model.loss_normalizer = LossNormalizer(mode)
        with EventStorage() as storage:
            losses = model([dict(x) for x in inputs])
            results[mode] = ({k: v.item() for k, v in losses.items()}, storage)
    # The foreground count reaches the event storage (and with low-quality matches, the
    # default, every box has at least its best anchor).
    num_pos = results["batch"][1].latest()["num_pos_anchors"][0]
    assert num_pos >= 2
    ema = 0.9 * 100 + 0.1 * num_pos  # detectron2's EMA after one step
    for key in ("loss_cls", "loss_box_reg"):
        total = results["batch"][0][key] * num_pos
        assert results["ema"][0][key] == pytest.approx(total / ema, rel=1e-5)
        # One process: "global" is "batch".
        assert results["global"][0][key] == pytest.approx(results["batch"][0][key], rel=1e-6)
    model.loss_normalizer = LossNormalizer()


def test_loss_normalizer_arithmetic():
    ema = LossNormalizer("ema", momentum=0.9, initial_value=100.0)
    assert ema(10, torch.device("cpu")) == pytest.approx(91.0)  # 0.9 * 100 + 0.1 * 10
    assert ema(0, torch.device("cpu")) == pytest.approx(82.0)  # 0.9 * 91 + 0.1 * max(0, 1)
    assert LossNormalizer("batch")(0, torch.device("cpu")) == 1.0
    assert LossNormalizer("batch")(7, torch.device("cpu")) == 7.0
    with pytest.raises(ValueError, match="mode"):
        LossNormalizer("mean")


def _global_normalizer_worker(rank, init_file, counts, results):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(counts)
    )
    try:
        results[rank] = LossNormalizer("global")(counts[rank], torch.device("cpu"))
    finally:
        torch.distributed.destroy_process_group()


def test_global_normalizer_averages_the_count_over_processes(tmp_path):
    """Two processes with 3 and 0 foreground anchors both divide by (3 + 0) / 2 = 1.5, so that
    after DDP's gradient averaging the update is the global sum divided by the global count."""
    counts = [3, 0]
    with torch.multiprocessing.Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.spawn(
            _global_normalizer_worker,
            args=(str(tmp_path / "init"), counts, results),
            nprocs=len(counts),
        )
        assert dict(results) == {0: 1.5, 1: 1.5}


def _box_reg_inputs(seed=0, num_images=2, num_anchors=60):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num_anchors, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + 10 + torch.rand(num_anchors, 2, generator=g) * 50], dim=1)
    gt_xy = torch.rand(num_images, num_anchors, 2, generator=g) * 100
    gt = torch.cat([gt_xy, gt_xy + 5 + torch.rand(num_images, num_anchors, 2, generator=g) * 60], 2)
    deltas = (torch.randn(num_images, num_anchors, 4, generator=g) * 0.3).requires_grad_()
    fg_mask = torch.rand(num_images, num_anchors, generator=g) < 0.3
    return anchors, deltas, gt, fg_mask


@pytest.mark.parametrize("loss_type", ["smooth_l1", "giou", "diou", "ciou"])
def test_box_reg_loss_equals_detectron2(loss_type):
    anchors, deltas, gt, fg_mask = _box_reg_inputs()
    transform = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    ours = dense_box_reg_loss(anchors, transform, deltas, gt, fg_mask, loss_type, 0.1)
    (grad_ours,) = torch.autograd.grad(ours, deltas)
    theirs = _dense_box_regression_loss(
        [Boxes(anchors)], transform, [deltas], list(gt), fg_mask, loss_type, 0.1
    )
    (grad_theirs,) = torch.autograd.grad(theirs, deltas)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-6)


def test_l1_box_loss_is_smooth_l1_with_beta_0():
    anchors, deltas, gt, fg_mask = _box_reg_inputs(seed=1)
    transform = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    l1 = dense_box_reg_loss(anchors, transform, deltas, gt, fg_mask, "L1", smooth_l1_beta=0.5)
    target = transform.get_deltas(anchors.expand_as(gt)[fg_mask], gt[fg_mask])
    expected = (deltas[fg_mask] - target).abs().sum()
    torch.testing.assert_close(l1, expected)
    assert smooth_l1_loss(deltas[fg_mask], target, 0.0, "sum").item() == pytest.approx(l1.item())


@pytest.mark.parametrize("loss_type", ["smooth_l1", "giou"])
def test_box_reg_loss_without_foreground_is_exact_zero_in_graph(loss_type):
    anchors, deltas, gt, fg_mask = _box_reg_inputs()
    transform = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    loss = dense_box_reg_loss(anchors, transform, deltas, gt, torch.zeros_like(fg_mask), loss_type)
    assert loss.item() == 0 and loss.requires_grad
    (grad,) = torch.autograd.grad(loss, deltas)
    assert grad.abs().max() == 0


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_inf_nan_predictions_give_no_finite_boxes(model, value):
    """detectron2's RetinaNetE2ETest.test_inf_nan_data, on smaller feature maps."""
    model.eval()
    model.test_score_thresh = -1.0  # keep every candidate that is not NaN
    try:
        images = ImageList(torch.full((1, 3, 256, 256), value), [(254, 254)])
        features = [torch.full((1, 256, s, s), value) for s in (32, 16, 8, 4, 2)]
        logits, deltas = model.head(features)
        logits = [torch.full_like(x, value) for x in logits]
        deltas = [torch.full_like(x, value) for x in deltas]
        det = model.forward_inference(images, features, (logits, deltas))
    finally:
        model.test_score_thresh = 0.05
    if len(det[0]):
        assert torch.isfinite(det[0].pred_boxes.tensor).sum() == 0


def test_score_threshold_is_applied_in_logit_space(model):
    """A score exactly at the threshold is dropped (detectron2 keeps score > thresh)."""
    model.eval()
    features = [torch.zeros(1, 256, s, s) for s in (8, 4, 2, 1, 1)]
    logits, deltas = model.head(features)
    logits = [torch.full_like(x, -20.0) for x in logits]
    # Two scores on P3 above and one below the 0.05 threshold: logit(0.05) = -2.944.
    logits[0][0, 3, 2, 2] = 0.0  # 0.5
    logits[0][0, 85, 1, 4] = -2.9  # 0.0522
    logits[0][0, 7, 5, 5] = -3.0  # 0.0474
    deltas = [torch.zeros_like(x) for x in deltas]
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    det = model.forward_inference(images, features, (logits, deltas))[0]
    assert sorted(det.pred_classes.tolist()) == [3, 5]  # channel 85 = anchor 1 x 80 + class 5
    torch.testing.assert_close(
        det.scores.sort(descending=True).values, torch.tensor([0.0, -2.9]).sigmoid()
    )
    assert det.scores.dtype == torch.float32 and det.pred_boxes.tensor.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast needs CUDA")
def test_autocast_keeps_boxes_float32():
    model = build_model(_cfg(MODEL__DEVICE="cuda")).eval()
    with torch.no_grad():
        model.head.cls_score.bias.add_(3.0)  # some scores above the threshold
    inputs = [{"image": torch.rand(3, 128, 128) * 255}]
    with torch.no_grad(), torch.autocast("cuda"):
        out = model(inputs)[0]["instances"]
    assert len(out) > 0
    assert out.pred_boxes.tensor.dtype == torch.float32
    assert out.scores.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Config validation and checkpoints
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key,value,also",
    [
        ("MODEL.RETINANET.HEAD_NAME", "NoSuchHead", "FocalRetinaNetHead"),
        ("MODEL.RETINANET.CLS_LOSS", "NoSuchLoss", "SigmoidFocalLoss"),
        ("MODEL.RETINANET.FOCAL_LOSS_GAMMA", -1.0, ">= 0"),
        ("MODEL.RETINANET.FOCAL_LOSS_ALPHA", 1.5, "[0, 1]"),
        ("MODEL.RETINANET.IOU_THRESHOLDS", [0.5, 0.4], "increasing"),
        ("MODEL.RETINANET.IOU_LABELS", [0, 1], "IOU_LABELS"),
        ("MODEL.RETINANET.BBOX_REG_LOSS_TYPE", "l2", "giou"),
        ("MODEL.RETINANET.LOSS_NORMALIZER", "mean", "global"),
        ("MODEL.RETINANET.PRIOR_PROB", 0.0, "(0, 1)"),
        ("MODEL.RETINANET.NUM_CLASSES", 0, ">= 1"),
    ],
)
def test_bad_config_error_names_the_key(key, value, also):
    cfg = _cfg()
    cfg.merge_from_list([key, value])
    with pytest.raises((ValueError, KeyError)) as info:
        build_model(cfg)
    assert key in str(info.value)
    assert also in str(info.value)


def test_negative_alpha_disables_balancing_and_builds():
    model = build_model(_cfg(MODEL__RETINANET__FOCAL_LOSS_ALPHA=-1.0))
    assert model.cls_loss.alpha < 0


def test_checkpoint_num_classes_mismatch(tmp_path):
    torch.manual_seed(0)
    three_classes = build_model(_cfg(MODEL__RETINANET__NUM_CLASSES=3))
    DetectionCheckpointer(three_classes, save_dir=str(tmp_path)).save("three_classes")
    path = str(tmp_path / "three_classes.pth")
    model = build_model(_cfg())  # 80 classes

    with pytest.raises(ValueError, match=re.escape("MODEL.RETINANET.NUM_CLASSES")):
        RetinaNetCheckpointer(model).load(path)
    with pytest.raises(ValueError, match=re.escape("MODEL.RETINANET.NUM_CLASSES")) as info:
        model.load_state_dict(three_classes.state_dict())
    assert "27 output channels (3 classes x 9 anchors)" in str(info.value)  # 27 = 9 x 3

    # detectron2's checkpointer keeps dropping the mismatched layer, for fine-tuning.
    before = model.head.cls_score.weight.clone()
    DetectionCheckpointer(model).load(path)
    assert torch.equal(model.head.cls_score.weight, before)
    assert torch.equal(model.head.bbox_pred.weight, three_classes.head.bbox_pred.weight)

    # A checkpoint that fits loads through RetinaNetCheckpointer.
    same = build_model(_cfg(MODEL__RETINANET__NUM_CLASSES=3))
    RetinaNetCheckpointer(same).load(path)
    assert torch.equal(same.head.cls_score.weight, three_classes.head.cls_score.weight)


def test_trainer_checkpointer_fine_tunes_but_checks_resumes(tmp_path):
    """fine_tune=True (train_net.py's trainer): MODEL.WEIGHTS of another class count loads as in
    detectron2 (classifier left at its initialisation); resuming from such a checkpoint raises."""
    torch.manual_seed(0)
    three_classes = build_model(_cfg(MODEL__RETINANET__NUM_CLASSES=3))
    DetectionCheckpointer(three_classes, save_dir=str(tmp_path)).save("three_classes")
    model = build_model(_cfg(MODEL__RETINANET__NUM_CLASSES=2))
    before = model.head.cls_score.weight.clone()
    checkpointer = RetinaNetCheckpointer(model, str(tmp_path), fine_tune=True)

    checkpointer.resume_or_load(str(tmp_path / "three_classes.pth"), resume=False)
    assert torch.equal(model.head.cls_score.weight, before)
    assert torch.equal(model.head.bbox_pred.weight, three_classes.head.bbox_pred.weight)
    # save() wrote last_checkpoint naming three_classes.pth: a resume must fit.
    with pytest.raises(ValueError, match=re.escape("MODEL.RETINANET.NUM_CLASSES")):
        checkpointer.resume_or_load("", resume=True)
