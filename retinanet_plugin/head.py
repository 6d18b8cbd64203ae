"""The RetinaNet head (Sec. 4, "Classification Subnet" and "Box Regression Subnet"), its registry.

Shape shorthand:
    N: images in the minibatch
    L: feature levels the head runs on (P3-P7 in the paper)
    Hi, Wi: height and width of level i
    A: anchors per location (9 in the paper)
    K: foreground classes (the head has one sigmoid output per class and anchor)
"""

import logging
from typing import Any, Dict, List, Optional, Sequence

from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.utils.registry import Registry

from .registry import get_registered

__all__ = [
    "RETINANET_HEAD_REGISTRY", "build_retinanet_head", "FocalRetinaNetHead", "head_input_shapes"
]

logger = logging.getLogger(__name__)

RETINANET_HEAD_REGISTRY = Registry("RETINANET_HEAD")
RETINANET_HEAD_REGISTRY.__doc__ = """
Registry for dense detection heads of RetinaNet-style detectors, selected by
``cfg.MODEL.RETINANET.HEAD_NAME``.

The registered object is called as ``obj(cfg, input_shape)``, with ``input_shape`` a list of
:class:`ShapeSpec`, one per input level, and must return an ``nn.Module`` whose
``forward(features: List[Tensor])`` takes L tensors (N, C, Hi, Wi) and returns
``(logits, deltas)``: two lists of L tensors, (N, A*K, Hi, Wi) and (N, A*4, Hi, Wi).
"""


def build_retinanet_head(cfg, input_shape: List[ShapeSpec]) -> nn.Module:
    """Build the head named by ``cfg.MODEL.RETINANET.HEAD_NAME``.

    Args:
        cfg (CfgNode): the config.
        input_shape (list[ShapeSpec]): shapes of the L feature levels the head runs on.

    Raises:
        UnknownNameError (a ValueError): the name is not registered; the message lists the
            registered names.
    """
    head_cls = get_registered(
        RETINANET_HEAD_REGISTRY, cfg.MODEL.RETINANET.HEAD_NAME, "MODEL.RETINANET.HEAD_NAME"
    )
    return head_cls(cfg, input_shape)


@RETINANET_HEAD_REGISTRY.register()
class FocalRetinaNetHead(RetinaNetHead):
    """RetinaNet's class and box subnets (Sec. 4), shared over all levels.

    Each subnet is ``len(conv_dims)`` 3x3 convs with ReLU (the paper: 4 x 256), then a 3x3 conv to
    A*K logits or A*4 box deltas; the two subnets share no parameters. Convs start from a Gaussian
    with sigma 0.01 and bias 0, except the classification bias b = -log((1 - pi) / pi) so every
    anchor starts with foreground probability pi (Sec. 3.3, "Initialization").

    Layers, initialisation and the forward pass are detectron2's :class:`RetinaNetHead`, so the
    parameter names (``cls_subnet``, ``bbox_subnet``, ``cls_score``, ``bbox_pred``) and outputs
    are the same and detectron2 model-zoo RetinaNet checkpoints load unchanged. On top of it this
    class validates its arguments and refuses a checkpoint whose ``cls_score`` was trained for a
    different number of classes (see :meth:`check_cls_score_shape`).
    """

    @configurable
    def __init__(
        self,
        input_shape: List[ShapeSpec],
        *,
        num_classes: int,
        num_anchors: int,
        conv_dims: Sequence[int],
        norm: Any = "",
        prior_prob: float = 0.01,
    ):
        """
        Args:
            input_shape (list[ShapeSpec]): shapes of the L input levels; the head is shared, so
                they must all have the same number of channels.
            num_classes (int): K, the number of foreground classes.
            num_anchors (int): A, the number of anchors per location.
            conv_dims (Sequence[int]): output channels of each subnet conv (the paper: 4 x 256).
            norm (str or callable): normalisation after each subnet conv; "" for none. "BN" and
                "SyncBN" get one set of statistics per level (detectron2's CycleBatchNormList);
                anything else is passed to :func:`detectron2.layers.get_norm`.
            prior_prob (float): pi, the foreground probability every anchor starts with
                (Sec. 3.3); in (0, 1).
        """
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_anchors < 1:
            raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
        if len(conv_dims) < 1:
            raise ValueError("conv_dims must name at least one subnet conv")
        if not 0 < prior_prob < 1:
            # -log((1 - pi) / pi) is infinite or undefined outside (0, 1).
            raise ValueError(f"prior_prob (pi, Sec. 3.3) must be in (0, 1), got {prior_prob}")
        if len({s.channels for s in input_shape}) != 1:
            raise ValueError(
                "the head is shared across levels, so every input level needs the same channels; "
                f"got {[s.channels for s in input_shape]}"
            )
        # detectron2 builds BN / SyncBN as one set of statistics per level. Other norms are
        # added below instead: detectron2 0.6 probes get_norm(norm, 1), which GroupNorm(32, 1)
        # rejects (later releases probe with 32 channels).
        per_level_bn = norm in ("BN", "SyncBN")
        super().__init__(
            input_shape=input_shape,
            num_classes=num_classes,
            num_anchors=num_anchors,
            conv_dims=list(conv_dims),
            norm=norm if per_level_bn else "",
            prior_prob=prior_prob,
        )
        if norm and not per_level_bn:
            self.cls_subnet = _insert_norms(self.cls_subnet, norm)
            self.bbox_subnet = _insert_norms(self.bbox_subnet, norm)
        self.num_classes = num_classes
        self.num_anchors = num_anchors

    # The config key that sets K, for error messages; None where the owner fixes K (FocalRPN's
    # one objectness class), so that no message advises changing a key that has no effect.
    num_classes_key: Optional[str] = "MODEL.RETINANET.NUM_CLASSES"

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]) -> Dict[str, Any]:
        num_classes = cfg.MODEL.RETINANET.NUM_CLASSES
        if num_classes < 1:
            raise ValueError(f"MODEL.RETINANET.NUM_CLASSES must be >= 1, got {num_classes}")
        num_convs = cfg.MODEL.RETINANET.NUM_CONVS
        if num_convs < 1:
            raise ValueError(f"MODEL.RETINANET.NUM_CONVS must be >= 1, got {num_convs}")
        prior_prob = cfg.MODEL.RETINANET.PRIOR_PROB
        if not 0 < prior_prob < 1:
            raise ValueError(
                f"MODEL.RETINANET.PRIOR_PROB (pi, Sec. 3.3) must be in (0, 1), got {prior_prob}"
            )
        for name in ("SIZES", "ASPECT_RATIOS"):
            per_level = cfg.MODEL.ANCHOR_GENERATOR[name]
            # detectron2 asserts this without naming the key: one list per level, or one list
            # (or a flat list) for all levels.
            nested = len(per_level) > 0 and isinstance(per_level[0], (list, tuple))
            if nested and len(per_level) not in (1, len(input_shape)):
                raise ValueError(
                    f"MODEL.ANCHOR_GENERATOR.{name} has {len(per_level)} lists, one per level, "
                    f"but the head runs on {len(input_shape)} levels; give one list per level "
                    "or a single list for all"
                )
        num_anchors = build_anchor_generator(cfg, input_shape).num_cell_anchors
        if len(set(num_anchors)) != 1:
            # One shared conv predicts A outputs per location on every level.
            raise ValueError(
                "MODEL.ANCHOR_GENERATOR.SIZES and ASPECT_RATIOS must give every level the same "
                f"number of anchors per location for a shared head; got {num_anchors}"
            )
        return {
            "input_shape": input_shape,
            "num_classes": num_classes,
            "num_anchors": num_anchors[0],
            "conv_dims": [input_shape[0].channels] * num_convs,
            "norm": cfg.MODEL.RETINANET.NORM,
            "prior_prob": prior_prob,
        }

    def check_cls_score_shape(self, key: str, shape: Sequence[int]) -> None:
        """Raise ValueError when a checkpoint's ``cls_score`` does not fit this head.

        Args:
            key (str): the checkpoint key, for the message.
            shape (Sequence[int]): its shape; dim 0 is A*K.
        """
        expected = self.num_anchors * self.num_classes
        if shape[0] == expected:
            return
        rows = shape[0]
        trained_for = (
            f"{rows // self.num_anchors} classes" if rows % self.num_anchors == 0 else "another A*K"
        )
        if self.num_classes_key is None:
            raise ValueError(
                f"checkpoint {key} has {rows} output channels but this head has {expected} "
                f"({self.num_classes} class x {self.num_anchors} anchors per location; the class "
                "count is fixed, the anchors come from MODEL.ANCHOR_GENERATOR.SIZES and "
                "ASPECT_RATIOS). Set MODEL.ANCHOR_GENERATOR to the anchors the checkpoint was "
                "trained with, or check that it holds this model's head."
            )
        raise ValueError(
            f"checkpoint {key} has {rows} output channels ({trained_for} x {self.num_anchors} "
            f"anchors) but this head has {expected} ({self.num_classes_key} = "
            f"{self.num_classes} x {self.num_anchors} anchors). Set {self.num_classes_key} "
            "to the checkpoint's number of classes, or load it with detectron2's "
            "DetectionCheckpointer to fine-tune (it drops the mismatched cls_score on purpose)."
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # torch would also refuse the shape, but with a message that does not say which config
        # key to change; fvcore's Checkpointer drops mismatched keys before this is reached, see
        # retinanet_plugin.checkpoint.RetinaNetCheckpointer for that path.
        for suffix in ("cls_score.weight", "cls_score.bias"):
            key = prefix + suffix
            if key in state_dict:
                self.check_cls_score_shape(key, tuple(state_dict[key].shape))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_anchors={self.num_anchors}"


def head_input_shapes(
    input_shape: Dict[str, ShapeSpec], in_features: Sequence[str], key: str
) -> List[ShapeSpec]:
    """The shapes of the levels a shared head runs on, with errors naming ``key``.

    Args:
        input_shape (dict[str, ShapeSpec]): the backbone's outputs.
        in_features (Sequence[str]): the levels the head runs on, from the config.
        key (str): the config key ``in_features`` came from (``MODEL.RETINANET.IN_FEATURES``,
            ``MODEL.RPN.IN_FEATURES``).
    """
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise ValueError(
            f"{key} names {missing}, which the backbone does not output (it has "
            f"{sorted(input_shape)})"
        )
    shapes = [input_shape[f] for f in in_features]
    if len({s.channels for s in shapes}) != 1:
        raise ValueError(
            f"{key} = {list(in_features)} have {[s.channels for s in shapes]} channels; the head "
            "is shared across levels, so choose levels with the same number of channels"
        )
    return shapes


def _insert_norms(subnet: nn.Sequential, norm: Any) -> nn.Sequential:
    """``subnet`` with a norm layer after each conv: conv, norm, ReLU, as detectron2 orders them,
    so parameter names (``cls_subnet.1.weight`` ...) match its checkpoints."""
    layers = []
    for layer in subnet:
        layers.append(layer)
        if isinstance(layer, nn.Conv2d):
            layers.append(get_norm(norm, layer.out_channels))
    if any("BatchNorm" in type(x).__name__ for x in layers):
        logger.warning(
            "a BatchNorm shared by all levels may not work well in the head; use norm='BN' or "
            "'SyncBN' for per-level statistics"
        )
    return nn.Sequential(*layers)

