"""Training targets of FocalRetinaNet: each anchor's label and matched box (Sec. 4), the
foreground count the losses are divided by, and the checks of ground-truth class ids that ride
on them.

Shape shorthand:
    N: images in the minibatch
    R: anchors of one image over all levels
    K: foreground classes
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from detectron2.layers import cat
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, Instances, pairwise_ioa, pairwise_iou

from .matching import check_gt_classes

__all__ = [
    "check_input_classes",
    "count_foreground",
    "crowd_ioa_thresh_from_config",
    "label_anchors",
]


def crowd_ioa_thresh_from_config(rcfg) -> Optional[float]:
    """``crowd_ioa_thresh`` from CROWD_IGNORE / CROWD_IOA_THRESH of ``rcfg``
    (``cfg.MODEL.RETINANET``), checked, naming the key."""
    if not 0 <= rcfg.CROWD_IOA_THRESH <= 1:
        raise ValueError(
            f"MODEL.RETINANET.CROWD_IOA_THRESH must be in [0, 1], got {rcfg.CROWD_IOA_THRESH}"
        )
    return rcfg.CROWD_IOA_THRESH if rcfg.CROWD_IGNORE else None


def _describe_input(index: int, inputs: Dict[str, Any]) -> str:
    fields = [f"{k} {inputs[k]!r}" for k in ("file_name", "image_id") if k in inputs]
    return f"image {index} of the batch" + (f" ({', '.join(fields)})" if fields else "")


def check_input_classes(batched_inputs: List[Dict[str, Any]], num_classes: int) -> None:
    """Raise ValueError if an input's ``instances`` on the host hold a class id outside [0, K).

    The mapper's ``instances`` are normally on the host, where the check costs no sync and the
    error can name the image's ``file_name`` / ``image_id``; ids already on an accelerator are
    left to :func:`count_foreground`, within its existing host sync.
    """
    on_host = [
        (i, x) for i, x in enumerate(batched_inputs)
        if "instances" in x and x["instances"].gt_classes.device.type == "cpu"
    ]  # fmt: skip
    check_gt_classes(
        [x["instances"].gt_classes for _, x in on_host],
        num_classes,
        [_describe_input(i, x) for i, x in on_host],
    )


@torch.no_grad()
def label_anchors(
    anchors: Boxes,
    gt_instances: List[Instances],
    anchor_matcher: Matcher,
    num_classes: int,
    crowd_ioa_thresh: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """Assign each anchor a class (or background / ignore) and a ground-truth box.

    Args:
        anchors (Boxes): (R, 4) anchors of all levels, shared by the images.
        gt_instances (list[Instances]): N ground truths with ``gt_boxes`` and ``gt_classes``;
            an optional bool ``gt_is_crowd`` marks crowd regions (kept by
            :class:`RobustDatasetMapper` with ``keep_crowd``), which are never matched, and
            whose background anchors become ignored when ``crowd_ioa_thresh`` is set.
        anchor_matcher (Matcher): labels anchors by IoU with the ground truth.
        num_classes (int): K, the background label.
        crowd_ioa_thresh (float, optional): see :class:`FocalRetinaNet`.

    Returns:
        Tensor: (N, R) int64 labels: -1 ignore, K background, else the matched class.
        Tensor: (N, R, 4) matched ground-truth box per anchor; meaningful only where the
        label is a class.
    """
    labels, boxes = [], []
    for gt in gt_instances:
        crowd_boxes = None
        if gt.has("gt_is_crowd"):
            crowd_boxes = gt.gt_boxes[gt.gt_is_crowd]
            gt = gt[~gt.gt_is_crowd]
        labels_i, boxes_i = _label_one_image(anchors, gt, anchor_matcher, num_classes)
        if crowd_ioa_thresh is not None and crowd_boxes is not None and len(crowd_boxes):
            # Intersection over the anchor's area (as Detectron's CROWD_FILTER_THRESH): an
            # anchor mostly inside a crowd region may cover an unlabelled object.
            in_crowd = pairwise_ioa(crowd_boxes, anchors).amax(dim=0) > crowd_ioa_thresh
            labels_i = labels_i.masked_fill(in_crowd & (labels_i == num_classes), -1)
        labels.append(labels_i)
        boxes.append(boxes_i)
    return torch.stack(labels), torch.stack(boxes)


def _label_one_image(
    anchors: Boxes, gt: Instances, anchor_matcher: Matcher, num_classes: int
) -> Tuple[Tensor, Tensor]:
    """(R,) labels and (R, 4) matched boxes of one image's non-crowd ground truth."""
    if len(gt) == 0:
        background = torch.full_like(anchors.tensor[:, 0], num_classes)
        return background.to(torch.int64), torch.zeros_like(anchors.tensor)
    matched_idxs, match_labels = anchor_matcher(pairwise_iou(gt.gt_boxes, anchors))
    labels = gt.gt_classes[matched_idxs]
    labels = labels.masked_fill(match_labels == 0, num_classes)
    return labels.masked_fill(match_labels == -1, -1), gt.gt_boxes.tensor[matched_idxs]


def count_foreground(
    gt_labels: Tensor, num_classes: int, gt_classes: Optional[Sequence[Tensor]] = None
) -> Tuple[Tensor, int]:
    """The foreground anchors and their number, read in the step's one host sync.

    Args:
        gt_labels (Tensor): (N, R), from :func:`label_anchors`.
        num_classes (int): K.
        gt_classes (Sequence[Tensor], optional): N (G,) ground-truth class ids the labels
            came from; when given, an id outside [0, K) raises ValueError. The check rides on
            the foreground count's host sync, so it costs no sync of its own.

    Returns:
        Tensor: (N, R) bool foreground mask.
        int: its number of True values.
    """
    fg_mask = (gt_labels >= 0) & (gt_labels != num_classes)
    # Host syncs of a step: this count (it feeds the Python-side normaliser and the event
    # storage; detectron2's RetinaNet reads it too), the foreground indices of the box loss
    # (detectron2 pays one for its boolean-mask indexing), and with LOSS_NORMALIZER "global"
    # the all-reduced count. The class-id check is read with the count.
    counts = [fg_mask.sum()]
    if gt_classes is not None and len(gt_classes):
        all_classes = cat(list(gt_classes))
        counts.append(((all_classes < 0) | (all_classes >= num_classes)).sum())
    counts = torch.stack(counts).tolist()
    if len(counts) > 1 and counts[1]:
        names = [f"image {i} of the batch" for i in range(len(gt_classes))]
        check_gt_classes(gt_classes, num_classes, names)
    return fg_mask, counts[0]
