"""detectron2's own lazy RetinaNet with ``_target_`` swapped to FocalRetinaNet is detectron2's
model: with the same weights, the same detections, losses and gradients.

tests/test_parity.py makes the same comparison on the YAML path; its checks are reused here.
Both models come from one shrunk copy of ``COCO-Detection/retinanet_R_50_FPN_1x.py``
(ResNet-18 trunk, two convs per head branch, 8 classes) to keep the test fast on CPU; the
comparison does not depend on those sizes.
"""

import pytest
import torch
from test_parity import (
    calibrated_pair,
    check_detections_equal,
    check_detections_equal_when_topk_binds,
    check_training_equal,
)

from detectron2 import model_zoo
from detectron2.config import instantiate
from detectron2.modeling.meta_arch.retinanet import RetinaNet, RetinaNetHead

from retinanet_plugin import FocalRetinaNet, FocalRetinaNetHead
from retinanet_plugin.losses import SigmoidFocalLoss


def lazy_retinanet_cfg():
    """detectron2's lazy RetinaNet R50-FPN config, shrunk; ``_target_`` still detectron2's."""
    cfg = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
    stages = cfg.model.backbone.bottom_up.stages
    stages.depth = 18
    del stages.stride_in_1x1  # ResNet-18's BasicBlock has no 1x1 conv
    cfg.model.backbone.top_block.in_channels = 512  # C5 of ResNet-18
    cfg.model.head.conv_dims = [256, 256]
    cfg.model.num_classes = 8
    return cfg


@pytest.fixture(scope="module")
def models():
    cfg = lazy_retinanet_cfg()
    torch.manual_seed(0)
    theirs = instantiate(cfg.model)
    cfg.model._target_ = FocalRetinaNet  # the only change: the drop-in the issue asks for
    ours = instantiate(cfg.model)
    assert type(theirs) is RetinaNet and type(ours) is FocalRetinaNet
    return calibrated_pair(theirs, ours)


def test_swapped_target_takes_detectron2s_arguments(models):
    theirs, ours = models
    assert type(ours.head) is RetinaNetHead  # detectron2's head, from detectron2's config
    assert isinstance(ours.cls_loss, SigmoidFocalLoss)
    assert (ours.cls_loss.alpha, ours.cls_loss.gamma) == (
        theirs.focal_loss_alpha, theirs.focal_loss_gamma
    ) == (0.25, 2.0)
    for name in ("num_classes", "smooth_l1_beta", "box_reg_loss_type", "test_score_thresh",
                 "test_topk_candidates", "test_nms_thresh", "max_detections_per_image",
                 "vis_period", "input_format", "head_in_features"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert torch.equal(ours.pixel_mean, theirs.pixel_mean)
    assert torch.equal(ours.pixel_std, theirs.pixel_std)


def test_detections_equal_detectron2(models):
    check_detections_equal(*models)


def test_detections_equal_detectron2_when_topk_binds(models):
    check_detections_equal_when_topk_binds(*models)


def test_losses_and_gradients_equal_detectron2(models):
    """Every gradient, backbone and FPN included (detectron2 freezes the stem and res2)."""
    differences = check_training_equal(*models, parameters=("backbone", "head"))
    # 2 losses + trainable parameters of res3-res5, the FPN and the head.
    assert len(differences) > 2 + 20


def test_head_target_swapped_too_gives_the_same_model():
    """The plugin's configs also name FocalRetinaNetHead: same parameters, same outputs."""
    cfg = lazy_retinanet_cfg()
    torch.manual_seed(0)
    theirs = instantiate(cfg.model.head)
    cfg.model.head._target_ = FocalRetinaNetHead
    ours = instantiate(cfg.model.head)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    features = [torch.randn(1, 256, s, s, generator=torch.Generator().manual_seed(s))
                for s in (16, 8, 4, 2, 1)]
    for a, b in zip(ours(features), theirs(features)):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
