"""A small FocalRetinaNet whose random weights give well-separated detections, for the predict
and export tests."""

import os
from typing import Tuple

import torch

from detectron2.config import CfgNode
from detectron2.modeling import build_model

from retinanet_plugin import FocalRetinaNet

from small_config import small_retinanet_cfg

# Candidates per image above the 0.05 threshold on the calibration image: enough to reach the
# 100-detection limit after NMS on most images, few enough to keep the tests fast.
CANDIDATES = 300


def small_detector(num_classes: int = 3) -> Tuple[CfgNode, FocalRetinaNet]:
    """ResNet-18-FPN RetinaNet, one conv per head branch, GroupNorm in backbone and FPN (random
    weights without it give activations of 1e2 and more, whose float rounding differs between
    runtimes by more than the parity tolerance), test images resized to a 160 px short side.

    The classification bias is set so that about CANDIDATES scores of a random 128x160 image
    pass the score threshold; scores are continuous, so no two detections tie.
    """
    cfg = small_retinanet_cfg(num_convs=1)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.FPN.NORM = "GN"
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.INPUT.MIN_SIZE_TEST = 160
    cfg.INPUT.MAX_SIZE_TEST = 256
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, 128, 160), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = model.preprocess_image([{"image": image.float()}])
        features = model.backbone(images.tensor)
        logits, _ = model.head([features[f] for f in model.head_in_features])
        bias = model.head.cls_score.bias
        raw = torch.cat([(x - bias.view(1, -1, 1, 1)).flatten() for x in logits])
        # sigmoid(x) > 0.05 <=> x > logit(0.05) = log(0.05 / 0.95) = -2.944
        cut = raw.quantile(1 - CANDIDATES / raw.numel())
        bias.fill_(-2.944 - cut.item())
    return cfg, model


def save_detector(cfg: CfgNode, model: FocalRetinaNet, folder: str) -> Tuple[str, str]:
    """Writes the config and the weights (detectron2 checkpoint layout); returns their paths."""
    config_file = os.path.join(folder, "config.yaml")
    with open(config_file, "w") as f:
        f.write(cfg.dump())
    weights = os.path.join(folder, "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    return config_file, weights
