"""How the config's matcher labels anchors: its foreground and background IoU thresholds and
whether it allows low-quality matches (those of :func:`~.layout.anchor_head_key`'s node)."""

import math
from typing import Tuple

from detectron2.config import CfgNode

from .layout import anchor_head_key, anchor_head_node


def allow_low_quality_matches(cfg: CfgNode) -> bool:
    """RPN (and FocalRPN) always allow them, as detectron2 hard-codes; RetinaNet reads the
    plugin's ``MODEL.RETINANET.ALLOW_LOW_QUALITY_MATCHES`` (True, detectron2's, when absent)."""
    if anchor_head_key(cfg) == "MODEL.RPN":
        return True
    return bool(cfg.MODEL.RETINANET.get("ALLOW_LOW_QUALITY_MATCHES", True))


def matcher_thresholds(cfg: CfgNode) -> Tuple[float, float]:
    """(foreground threshold, background threshold) of the anchor matcher
    (:func:`anchor_head_key`'s ``IOU_THRESHOLDS`` / ``IOU_LABELS``).

    The foreground threshold is where the top run of intervals labelled 1 starts; the
    background threshold is the upper end of the intervals labelled 0 (both as detectron2's
    ``Matcher`` reads them).
    """
    key, node = anchor_head_key(cfg), anchor_head_node(cfg)
    thresholds = [-math.inf] + list(node.IOU_THRESHOLDS) + [math.inf]
    labels = list(node.IOU_LABELS)
    if len(labels) != len(thresholds) - 1:
        raise ValueError(
            f"{key}.IOU_LABELS has {len(labels)} labels for "
            f"{len(thresholds) - 2} IOU_THRESHOLDS; it needs one more label than thresholds"
        )
    if labels[-1] != 1:
        raise ValueError(f"{key}.IOU_LABELS {labels} must end with 1 (foreground)")
    first_fg = len(labels) - 1
    while first_fg > 0 and labels[first_fg - 1] == 1:
        first_fg -= 1
    if 1 in labels[:first_fg]:
        raise ValueError(
            f"{key}.IOU_LABELS {labels}: foreground (1) must be one run of the "
            "highest IoU intervals"
        )
    bg = [thresholds[i + 1] for i, label in enumerate(labels) if label == 0]
    return float(thresholds[first_fg]), float(max(bg)) if bg else float(thresholds[first_fg])
