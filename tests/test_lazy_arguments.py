"""The keyword arguments a lazy config gives the plugin's models: detectron2's, with their
meaning, and the plugin's own, each either used or refused by name (never silently unused)."""

import pytest
import torch

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.layers import ShapeSpec

from retinanet_plugin import FocalRetinaNet, FocalRetinaNetHead, FocalRPN, LossNormalizer
from retinanet_plugin.losses import (
    AlphaBalancedCE,
    OHEMLoss,
    SigmoidFocalLoss,
    SigmoidFocalLossStar,
    SoftmaxFocalLoss,
)
from retinanet_plugin.meta_arch import resolve_cls_loss
from retinanet_plugin.registry import UnknownNameError


def test_no_loss_is_detectron2s_focal_loss_with_its_alpha_and_gamma():
    loss = resolve_cls_loss(None, focal_loss_alpha=0.5, focal_loss_gamma=1.0)
    assert type(loss) is SigmoidFocalLoss and (loss.alpha, loss.gamma) == (0.5, 1.0)


def test_a_registry_name_gets_alpha_and_gamma_where_it_takes_them():
    star = resolve_cls_loss("SigmoidFocalLossStar", focal_loss_gamma=4.0)
    assert type(star) is SigmoidFocalLossStar and (star.alpha, star.gamma) == (0.25, 4.0)
    ohem = resolve_cls_loss("OHEMLoss", focal_loss_alpha=0.5)
    assert type(ohem) is OHEMLoss and ohem.alpha == 0.5
    ce = resolve_cls_loss("AlphaBalancedCE", focal_loss_alpha=0.75)
    assert type(ce) is AlphaBalancedCE and (ce.alpha, ce.gamma) == (0.75, 0.0)


def test_a_value_the_named_loss_does_not_take_is_refused():
    with pytest.raises(ValueError, match=r"focal_loss_gamma = 0.5 is not used by .*AlphaBalanced"):
        resolve_cls_loss("AlphaBalancedCE", focal_loss_gamma=0.5)
    with pytest.raises(UnknownNameError, match="registered: .*SigmoidFocalLoss"):
        resolve_cls_loss("FocalLoss")


def test_a_loss_object_is_used_as_is_and_focal_values_beside_it_are_refused():
    loss = SoftmaxFocalLoss(alpha=0.5, gamma=1.0)
    assert resolve_cls_loss(loss) is loss
    with pytest.raises(ValueError, match="focal_loss_alpha = 0.5 would be ignored"):
        resolve_cls_loss(loss, focal_loss_alpha=0.5)


def _small_retinanet():
    cfg = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
    cfg.model.backbone.bottom_up.stages.depth = 18
    del cfg.model.backbone.bottom_up.stages.stride_in_1x1  # BasicBlock has no 1x1 conv
    cfg.model.backbone.top_block.in_channels = 512
    cfg.model.update(_target_=FocalRetinaNet, num_classes=3)
    cfg.model.head.update(_target_=FocalRetinaNetHead, conv_dims=[64])
    return cfg


def test_the_plugins_own_arguments_in_a_lazy_model():
    cfg = _small_retinanet()
    cfg.model.update(
        cls_loss=L(SigmoidFocalLossStar)(gamma=2.0, beta=1.0),
        loss_normalizer=L(LossNormalizer)(mode="batch"),
        nms_type="soft_gaussian",
        box_voting_iou_thresh=0.7,
        test_score_thresh_per_class=[0.1, 0.2, 0.3],
        crowd_ioa_thresh=0.7,
    )
    model = instantiate(cfg.model)
    assert type(model.cls_loss) is SigmoidFocalLossStar and model.cls_loss.beta == 1.0
    assert model.loss_normalizer.mode == "batch"
    pp = model.postprocessing
    assert (pp.nms_type, pp.box_voting, pp.box_voting_iou_thresh) == ("soft_gaussian", True, 0.7)
    assert pp.score_thresh_per_class == (0.1, 0.2, 0.3)
    assert model.crowd_ioa_thresh == 0.7
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": torch.rand(3, 64, 96) * 255}])
    assert out["instances"].image_size == (64, 96)


def test_focal_rpn_in_detectrons_lazy_faster_rcnn_names_what_it_refuses():
    cfg = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
    rpn = cfg.model.proposal_generator
    rpn._target_ = FocalRPN
    with pytest.raises(ValueError, match="remove batch_size_per_image and positive_fraction"):
        instantiate(rpn)
    del rpn.batch_size_per_image, rpn.positive_fraction
    rpn.head = L(FocalRetinaNetHead)(
        input_shape=[ShapeSpec(channels=256)] * 5,
        num_classes=3, num_anchors=3, conv_dims=[32],
    )
    with pytest.raises(ValueError, match="num_classes=1, got 3"):
        instantiate(rpn)
    rpn.head.num_classes = 1
    rpn.focal_loss_gamma = 1.0
    built = instantiate(rpn)
    assert type(built.cls_loss) is SigmoidFocalLoss and built.cls_loss.gamma == 1.0
    assert built.rpn_head.num_classes_key is None  # K = 1 whatever a config says
