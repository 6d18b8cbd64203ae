"""Labelling anchors: detectron2's :class:`Matcher` with errors that name the config key, and the
check of ground-truth class ids against ``MODEL.RETINANET.NUM_CLASSES``."""

from typing import Sequence

from torch import Tensor

from detectron2.modeling.matcher import Matcher

__all__ = ["build_anchor_matcher", "check_gt_classes"]


def build_anchor_matcher(
    thresholds: Sequence[float],
    labels: Sequence[int],
    allow_low_quality_matches: bool,
    key: str = "MODEL.RETINANET",
) -> Matcher:
    """A :class:`Matcher`, with ValueErrors naming ``{key}.IOU_THRESHOLDS`` / ``IOU_LABELS``.

    detectron2's Matcher checks the same things with bare asserts (and not at all under
    ``python -O``).

    Args:
        thresholds (Sequence[float]): increasing IoU thresholds in (0, 1] (the paper: 0.4, 0.5).
        labels (Sequence[int]): one more label than thresholds, each -1 (ignore), 0 (background)
            or 1 (foreground).
        allow_low_quality_matches (bool): see :class:`Matcher`.
        key (str): config node of the two keys, for messages.
    """
    thresholds, labels = list(thresholds), list(labels)
    if not thresholds or not all(0 < t <= 1 for t in thresholds):
        raise ValueError(f"{key}.IOU_THRESHOLDS must be IoUs in (0, 1], got {thresholds}")
    if any(lo > hi for lo, hi in zip(thresholds[:-1], thresholds[1:])):
        raise ValueError(
            f"{key}.IOU_THRESHOLDS must be in increasing order (background < ignore < "
            f"foreground), got {thresholds}"
        )
    if len(labels) != len(thresholds) + 1 or not all(v in (-1, 0, 1) for v in labels):
        raise ValueError(
            f"{key}.IOU_LABELS must hold len(IOU_THRESHOLDS) + 1 = {len(thresholds) + 1} values "
            f"from {{-1, 0, 1}}, got {labels}"
        )
    return Matcher(thresholds, labels, allow_low_quality_matches=allow_low_quality_matches)


def check_gt_classes(
    gt_classes: Sequence[Tensor], num_classes: int, names: Sequence[str]
) -> None:
    """Raise ValueError if a ground-truth class id is outside [0, K).

    detectron2's RetinaNet refuses such ids (through ``one_hot``); left alone, the classification
    loss would take id K as background while the box loss and the normaliser count it as
    foreground, and id -1 would mark the anchors "ignore". Reading the ids is a host sync when
    they live on an accelerator: call this on host tensors, or only once a sync showed an error.

    Args:
        gt_classes (Sequence[Tensor]): per image, its (G,) class ids.
        num_classes (int): K, ``MODEL.RETINANET.NUM_CLASSES``.
        names (Sequence[str]): per image, how the message names it (file, image id).
    """
    for classes, name in zip(gt_classes, names):
        bad = classes[(classes < 0) | (classes >= num_classes)]
        if bad.numel():
            raise ValueError(
                f"{name} has ground-truth class ids {sorted(set(bad.tolist()))} outside "
                f"[0, MODEL.RETINANET.NUM_CLASSES = {num_classes}): set NUM_CLASSES to the "
                "dataset's number of classes, or map the dataset's category ids to 0..K-1"
            )
