"""Where the config places anchors: the head that owns them, the anchor generator's cell
anchors, strides and offset, and the backbone's padding, which sets the feature-map sizes."""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone, build_anchor_generator, build_backbone

# Meta-architectures whose anchors belong to a proposal generator (RPN or FocalRPN), matched
# with MODEL.RPN's keys; any other (FocalRetinaNet, detectron2's RetinaNet) reads MODEL.RETINANET.
_PROPOSAL_ARCHS = ("GeneralizedRCNN", "ProposalNetwork")


def anchor_head_key(cfg: CfgNode) -> str:
    """``MODEL.RPN`` for a two-stage or proposal-only model, else ``MODEL.RETINANET``: the node
    whose IN_FEATURES, IOU_THRESHOLDS and IOU_LABELS place and match the anchors."""
    return "MODEL.RPN" if cfg.MODEL.META_ARCHITECTURE in _PROPOSAL_ARCHS else "MODEL.RETINANET"


def anchor_head_node(cfg: CfgNode) -> CfgNode:
    """The config node :func:`anchor_head_key` names."""
    return cfg.MODEL.RPN if anchor_head_key(cfg) == "MODEL.RPN" else cfg.MODEL.RETINANET


@dataclass
class AnchorLayout:
    """Where anchors lie on an image: the generator's cell anchors, strides and offset, and how
    the backbone pads the image (which sets the feature-map sizes)."""

    cell_anchors: List[torch.Tensor]  # per level, (A, 4) XYXY around the grid point
    strides: List[int]
    offset: float
    size_divisibility: int
    square_size: int

    def grid_sizes(self, height: int, width: int) -> List[Tuple[int, int]]:
        """Feature-map (height, width) per level for one image of this size, alone in its
        batch: the padded size divided by the stride, rounded up, as stride-2 convolutions with
        padding give."""
        if self.square_size > 0:
            height = width = max(self.square_size, height, width)
        if self.size_divisibility > 1:
            d = self.size_divisibility
            height, width = -(-height // d) * d, -(-width // d) * d
        return [(-(-height // s), -(-width // s)) for s in self.strides]


def _backbone_cfg(cfg: CfgNode) -> CfgNode:
    cfg = cfg.clone()
    cfg.defrost()
    # Only the output shapes are needed: skip downloading ImageNet weights.
    if "MOBILENET" in cfg.MODEL:
        cfg.MODEL.MOBILENET.PRETRAINED = False
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def build_backbone_for_shapes(cfg: CfgNode) -> Backbone:
    """The config's backbone on the CPU without pretrained weights (only its shapes, padding
    and structure are read)."""
    return build_backbone(_backbone_cfg(cfg))


def backbone_shapes(
    cfg: CfgNode, backbone: Optional[Backbone] = None
) -> Tuple[Dict[str, ShapeSpec], int, int]:
    """(output shapes, size divisibility, square size) of the config's backbone, built once
    without weights; or of ``backbone`` (a Python config's, built by the caller)."""
    if backbone is None:
        backbone = build_backbone_for_shapes(cfg)
    constraints = getattr(backbone, "padding_constraints", None) or {}
    divisibility = constraints.get("size_divisibility", backbone.size_divisibility)
    return backbone.output_shape(), int(divisibility or 0), int(constraints.get("square_size", 0))


def anchor_layout(cfg: CfgNode, shapes: Dict[str, ShapeSpec], divisibility: int,
                  square_size: int = 0) -> AnchorLayout:
    """Builds the config's anchor generator (detectron2's ``build_anchor_generator``) on the
    input features of the head that owns the anchors (:func:`anchor_head_key`)."""
    features = list(anchor_head_node(cfg).IN_FEATURES)
    missing = [f for f in features if f not in shapes]
    if missing:
        raise ValueError(
            f"{anchor_head_key(cfg)}.IN_FEATURES names {missing}, which the backbone does not "
            f"output (it outputs {sorted(shapes)})"
        )
    generator = build_anchor_generator(cfg, [shapes[f] for f in features])
    if not hasattr(generator, "cell_anchors") or generator.box_dim != 4:
        raise ValueError(
            f"MODEL.ANCHOR_GENERATOR.NAME {cfg.MODEL.ANCHOR_GENERATOR.NAME!r}: only axis-aligned "
            "generators with cell_anchors, strides and offset (DefaultAnchorGenerator) are "
            "supported"
        )
    return AnchorLayout(
        cell_anchors=[c.detach().float().cpu() for c in generator.cell_anchors],
        strides=[int(s) for s in generator.strides],
        offset=float(generator.offset),
        size_divisibility=divisibility,
        square_size=square_size,
    )
