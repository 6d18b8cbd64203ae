"""FocalRPN: the RetinaNet head with one class as a Faster R-CNN proposal generator."""

import os

import pytest
import torch
from fvcore.nn import sigmoid_focal_loss_jit

from detectron2.config import get_cfg
from detectron2.layers import cat
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from retinanet_plugin import FocalRetinaNetHead, FocalRPN, add_retinanet_plugin_config

CONFIG = os.path.join(
    os.path.dirname(__file__), "..", "configs", "faster_rcnn_focal_rpn_R_50_FPN_1x.yaml"
)
IMAGE_SIZE = (128, 160)


def _cfg():
    cfg = get_cfg()
    add_retinanet_plugin_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    # Small and fast on CPU; none of these change what FocalRPN does.
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 256
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 500
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 200
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 500
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 100
    # Without pre-trained weights, FrozenBN is the identity and the trunk's activations reach the
    # hundreds; GroupNorm keeps them near unit scale so that a few SGD steps train from scratch.
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.FPN.NORM = "GN"
    # The per-step foreground count: detectron2's EMA starts at 100 and falls towards the ~20
    # foreground anchors of these images, which would raise the reported losses step by step.
    cfg.MODEL.RETINANET.LOSS_NORMALIZER = "batch"
    return cfg


def _dataset():
    """Two images of bright boxes on a dark, noisy background, with their ground truth."""
    g = torch.Generator().manual_seed(0)
    h, w = IMAGE_SIZE
    objects = [
        [([12, 16, 70, 90], 0), ([90, 40, 150, 110], 1)],
        [([30, 10, 110, 60], 1), ([20, 70, 60, 120], 0)],
    ]
    data = []
    for boxes in objects:
        image = torch.rand(3, h, w, generator=g) * 40
        for (x0, y0, x1, y1), label in boxes:
            image[:, y0:y1, x0:x1] = 200.0 if label == 0 else 120.0
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([b for b, _ in boxes], dtype=torch.float32))
        inst.gt_classes = torch.tensor([c for _, c in boxes])
        data.append({"image": image, "instances": inst})
    return data


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(_cfg())


def test_config_builds_generalized_rcnn_with_focal_rpn(model):
    assert type(model) is GeneralizedRCNN
    rpn = model.proposal_generator
    assert type(rpn) is FocalRPN
    head = rpn.rpn_head
    assert type(head) is FocalRetinaNetHead
    # One objectness logit and 4 deltas per anchor; A = 3 aspect ratios x 1 size.
    assert head.num_classes == 1 and head.num_anchors == 3
    assert head.cls_score.out_channels == 3 and head.bbox_pred.out_channels == 12
    assert len(head.cls_subnet) == 2  # NUM_CONVS: 1 -> conv, ReLU


def test_losses_are_focal_loss_over_every_anchor(model):
    """The objectness loss is fvcore's focal loss over all non-ignored anchors, object = 1,
    divided by the normaliser; nothing is subsampled as in the standard RPN."""
    data = _dataset()
    rpn = model.proposal_generator
    assert rpn.loss_normalizer.mode == "batch"  # from the config, see _cfg
    model.train()
    with torch.no_grad(), EventStorage():
        images = model.preprocess_image(data)
        features = model.backbone(images.tensor)
        gt = [x["instances"] for x in data]
        _, losses = rpn(images, features, gt)

        feats = [features[f] for f in rpn.in_features]
        anchors = rpn.anchor_generator(feats)
        labels, matched = rpn.label_and_sample_anchors(anchors, gt)
        logits, deltas = rpn.rpn_head(feats)
    labels = torch.stack(labels)
    # Far more than the 256 anchors per image the standard RPN would sample.
    assert ((labels >= 0).sum(1) > 10 * 256).all()
    logits = cat([x.permute(0, 2, 3, 1).flatten(1) for x in logits], dim=1)  # (N, R)
    valid = labels >= 0
    num_fg = (labels == 1).sum().item()
    assert num_fg > 0
    expected_cls = sigmoid_focal_loss_jit(
        logits[valid], (labels[valid] == 1).float(), alpha=0.25, gamma=2.0, reduction="sum"
    )
    torch.testing.assert_close(losses["loss_rpn_cls"], expected_cls / num_fg, rtol=1e-5, atol=0)

    deltas = cat([x.view(x.shape[0], 3, 4, *x.shape[-2:]).permute(0, 3, 4, 1, 2).flatten(1, 3)
                  for x in deltas], dim=1)  # (N, R, 4)
    fg = labels == 1
    all_anchors = Boxes.cat(anchors).tensor
    target = rpn.box2box_transform.get_deltas(
        all_anchors.expand(len(data), -1, -1)[fg], torch.stack(matched)[fg]
    )
    expected_loc = (deltas[fg] - target).abs().sum()  # SMOOTH_L1_BETA = 0: L1
    torch.testing.assert_close(losses["loss_rpn_loc"], expected_loc / num_fg, rtol=1e-5, atol=0)


def test_trains_and_infers(model):
    data = _dataset()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    with EventStorage() as storage:
        for _ in range(12):
            losses = model([dict(x) for x in data])
            assert {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"} <= losses.keys()
            assert all(torch.isfinite(v) for v in losses.values())
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            history.append({k: v.item() for k, v in losses.items()})
            storage.step()
    first, last = history[0], history[-1]
    # FocalRPN's own losses fall (objectness by more than half in 12 steps, measured 1.14 ->
    # 0.18), and so does the box classifier fed with its proposals. The second stage's box loss
    # is not asserted: it grows while more proposals become foreground.
    assert last["loss_rpn_cls"] < 0.5 * first["loss_rpn_cls"]
    rpn_total = [h["loss_rpn_cls"] + h["loss_rpn_loc"] for h in (first, last)]
    assert rpn_total[1] < rpn_total[0]
    assert last["loss_cls"] < first["loss_cls"]

    model.eval()
    with torch.no_grad():
        images = model.preprocess_image(data)
        features = model.backbone(images.tensor)
        proposals, rpn_losses = model.proposal_generator(images, features)
        outputs = model([{"image": x["image"]} for x in data])
    assert rpn_losses == {}
    for p in proposals:
        assert p.has("proposal_boxes") and p.has("objectness_logits")
        assert 0 < len(p) <= 100  # POST_NMS_TOPK_TEST
        assert torch.isfinite(p.proposal_boxes.tensor).all()
    for out in outputs:
        inst = out["instances"]
        assert inst.image_size == IMAGE_SIZE
        assert inst.has("pred_boxes") and inst.has("scores") and inst.has("pred_classes")
