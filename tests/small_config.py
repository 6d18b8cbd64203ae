"""detectron2's RetinaNet R50-FPN model-zoo config, shrunk for CPU tests."""

import os

from detectron2 import model_zoo
from detectron2.config import get_cfg

from retinanet_plugin import add_retinanet_plugin_config


def small_retinanet_cfg(num_convs: int):
    """The model-zoo COCO-Detection/retinanet_R_50_FPN_1x config with the plugin's keys, no
    weights, on CPU, with a ResNet-18 trunk and ``num_convs`` convs per head branch."""
    cfg = get_cfg()
    add_retinanet_plugin_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64  # required by ResNet-18/34
    cfg.MODEL.RETINANET.NUM_CONVS = num_convs
    return cfg


FOCAL_RPN_CONFIG = os.path.join(
    os.path.dirname(__file__), "..", "configs", "faster_rcnn_focal_rpn_R_50_FPN_1x.yaml"
)


def small_focal_rpn_cfg(*opts):
    """configs/faster_rcnn_focal_rpn_R_50_FPN_1x.yaml (Faster R-CNN with FocalRPN) with no
    weights, on CPU, with a ResNet-18 trunk and 32-channel FPN, then the KEY VALUE ``opts``."""
    cfg = get_cfg()
    add_retinanet_plugin_config(cfg)
    cfg.merge_from_file(FOCAL_RPN_CONFIG)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.merge_from_list(list(opts))
    return cfg
