# Faster R-CNN R50-FPN 1x whose RPN is FocalRPN: faster_rcnn_focal_rpn_R_50_FPN_1x.yaml as a lazy
# config. The RetinaNet head with one class, trained with focal loss on every anchor instead of
# 256 sampled ones; detectron2's Mask R-CNN R50-FPN 1x without its mask branch for the rest.
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from retinanet_plugin import FocalRetinaNetHead, FocalRPN
from retinanet_plugin.data import RobustDatasetMapper
from retinanet_plugin.evaluation import build_coco_evaluator

_base = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
model = _base.model
dataloader = _base.dataloader
optimizer = _base.optimizer  # SGD, lr 0.02
lr_multiplier = _base.lr_multiplier
train = _base.train

model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
dataloader.train.mapper.use_instance_mask = False

rpn = model.proposal_generator
model.proposal_generator = L(FocalRPN)(
    in_features=rpn.in_features,  # p2-p6
    # One 3x3 conv per subnet, like the standard RPN head's single conv: the head also runs on
    # P2, where the paper's 4 convs per subnet would cost more than the whole backbone.
    head=L(FocalRetinaNetHead)(
        input_shape=[ShapeSpec(channels=256)] * 5,
        num_classes=1,
        num_anchors=3,  # one size per level x 3 aspect ratios
        conv_dims=[256],
        prior_prob=0.01,  # pi, Sec. 3.3
    ),
    anchor_generator=rpn.anchor_generator,
    anchor_matcher=rpn.anchor_matcher,
    box2box_transform=rpn.box2box_transform,
    focal_loss_alpha=0.25,  # alpha, Eq. 5
    focal_loss_gamma=2.0,  # gamma, Eq. 5
    pre_nms_topk=rpn.pre_nms_topk,  # per level
    post_nms_topk=rpn.post_nms_topk,  # per image
    nms_thresh=rpn.nms_thresh,
)
del rpn

dataloader.train.mapper._target_ = RobustDatasetMapper
dataloader.test.mapper._target_ = RobustDatasetMapper
dataloader.evaluator = L(build_coco_evaluator)(dataset_name="${..test.dataset.names}")
