"""RetinaNet with focal loss (Lin et al., ICCV 2017) as a Detectron2 plugin.

``import retinanet_plugin`` registers every component with detectron2's registries.
"""

from . import backbone  # registers build_mobilenet_v2_fpn_backbone
from . import losses  # registers the classification losses in CLS_LOSS_REGISTRY
from . import head  # registers FocalRetinaNetHead in RETINANET_HEAD_REGISTRY
from . import meta_arch  # registers FocalRetinaNet in META_ARCH_REGISTRY
from . import proposal_generator  # registers FocalRPN in PROPOSAL_GENERATOR_REGISTRY
from .checkpoint import RetinaNetCheckpointer
from .config import add_retinanet_plugin_config
from .losses import (
    CLS_LOSS_REGISTRY,
    alpha_balanced_ce,
    build_cls_loss,
    sigmoid_focal_loss,
    sigmoid_focal_loss_from_labels,
    sigmoid_focal_loss_per_level,
    sigmoid_focal_loss_star,
    sigmoid_focal_loss_star_from_labels,
    softmax_focal_loss,
)
from .head import RETINANET_HEAD_REGISTRY, FocalRetinaNetHead, build_retinanet_head
from .loss_normalizer import LossNormalizer
from .meta_arch import FocalRetinaNet
from .proposal_generator import FocalRPN
from .test_time_augmentation import FocalRetinaNetWithTTA

__all__ = [
    "CLS_LOSS_REGISTRY",
    "add_retinanet_plugin_config",
    "alpha_balanced_ce",
    "build_cls_loss",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_from_labels",
    "sigmoid_focal_loss_per_level",
    "sigmoid_focal_loss_star",
    "sigmoid_focal_loss_star_from_labels",
    "softmax_focal_loss",
    "FocalRPN",
    "FocalRetinaNet",
    "FocalRetinaNetHead",
    "FocalRetinaNetWithTTA",
    "LossNormalizer",
    "RETINANET_HEAD_REGISTRY",
    "RetinaNetCheckpointer",
    "build_retinanet_head",
]
