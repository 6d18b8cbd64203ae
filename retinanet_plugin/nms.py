"""Post-processing of dense detections beyond detectron2's per-class NMS: soft-NMS and box voting.

Both treat classes independently by the coordinate-offset trick of torchvision's
``batched_nms``: each class's boxes are moved to a region of their own, so that boxes of two
classes never overlap; an all-zero ``idxs`` makes them class-agnostic.

Shape shorthand:
    D: candidate detections of one image
    M: detections kept
"""

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["SOFT_NMS_METHODS", "box_voting", "soft_nms"]

SOFT_NMS_METHODS = ("linear", "gaussian")


def _offset_boxes(boxes: Tensor, idxs: Tensor) -> Tensor:
    """Boxes moved by ``idxs * span`` on both axes, where span exceeds every box's extent.

    torchvision offsets by ``max + 1``, which lets classes overlap when coordinates are negative
    (unclipped boxes can be); ``max - min + 1`` does not.
    """
    if boxes.numel() == 0:
        return boxes
    span = boxes.max() - boxes.min() + 1
    return boxes + (idxs.to(boxes) * span)[:, None]


def _pairwise_iou(columns_a: Tensor, area_a: Tensor, columns_b: Tensor, area_b: Tensor) -> Tensor:
    """IoU of XYXY boxes given as contiguous coordinate columns, broadcast: columns (4, ...) and
    areas of the broadcast shapes; 0 where the union is empty."""
    x1a, y1a, x2a, y2a = columns_a
    x1b, y1b, x2b, y2b = columns_b
    width = (torch.minimum(x2a, x2b) - torch.maximum(x1a, x1b)).clamp_(min=0)
    height = (torch.minimum(y2a, y2b) - torch.maximum(y1a, y1b)).clamp_(min=0)
    inter = width.mul_(height)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(inter))


def _columns(boxes: Tensor) -> Tuple[Tensor, Tensor]:
    """(4, D) contiguous x1, y1, x2, y2 and the (D,) areas: elementwise ops on contiguous
    columns run several times faster than on the strided views ``boxes[:, i]``."""
    columns = boxes.t().contiguous()
    return columns, (columns[2] - columns[0]) * (columns[3] - columns[1])


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    *,
    method: str,
    iou_threshold: float,
    sigma: float,
    score_threshold: float,
    max_detections: int,
) -> Tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al., ICCV 2017), per class, with the classes batched by offsets.

    Repeatedly takes the highest-scoring remaining box and decays the scores of the boxes of its
    class by their IoU with it: linear, s * (1 - IoU) where IoU > ``iou_threshold`` (else s);
    Gaussian, s * exp(-IoU^2 / sigma). Boxes whose score falls to ``score_threshold`` or below
    are dropped. The scores of the picked boxes never increase, so stopping after
    ``max_detections`` picks gives the top ``max_detections`` of a full run, and since boxes of
    different classes never overlap, one loop gives every class's soft-NMS at once. The loop
    makes no host synchronisation; each step is O(D).

    Args:
        boxes (Tensor): (D, 4) XYXY.
        scores (Tensor): (D,) scores in [0, 1].
        idxs (Tensor): (D,) class of each box (all zeros: class-agnostic).
        method (str): "linear" or "gaussian".
        iou_threshold (float): IoU above which the linear decay applies (Gaussian: unused).
        sigma (float): the Gaussian's sigma (linear: unused).
        score_threshold (float): boxes whose decayed score is <= this are dropped.
        max_detections (int): at most this many boxes are returned.

    Returns:
        Tensor: (M,) int64 indices of the kept boxes, by decreasing decayed score.
        Tensor: (M,) their decayed scores.
    """
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"soft-NMS method must be one of {SOFT_NMS_METHODS}, got {method!r}")
    num = min(int(max_detections), boxes.shape[0])
    if num == 0:
        return idxs.new_zeros(0, dtype=torch.int64), scores.new_zeros(0)
    columns, areas = _columns(_offset_boxes(boxes.float(), idxs))
    current = scores.float().masked_fill(scores <= score_threshold, -1.0)
    picked, picked_scores = [], []
    for _ in range(num):
        best = current.argmax()
        picked.append(best)
        picked_scores.append(current[best])
        iou = _pairwise_iou(columns[:, best], areas[best], columns, areas)
        if method == "linear":
            decay = torch.where(iou > iou_threshold, 1 - iou, torch.ones_like(iou))
        else:
            decay = torch.exp(-(iou * iou) / sigma)
        current = current * decay
        # Dropped and picked boxes get -1 so that they are never picked (again); a -1 that
        # the argmax returns once every box is gone is filtered below.
        current = current.masked_fill(current <= score_threshold, -1.0)
        current[best] = -1.0
    keep, kept_scores = torch.stack(picked), torch.stack(picked_scores)
    valid = kept_scores > score_threshold
    return keep[valid], kept_scores[valid].to(scores.dtype)


def box_voting(
    kept_boxes: Tensor,
    kept_idxs: Tensor,
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
) -> Tensor:
    """Box voting (Gidaris & Komodakis, ICCV 2015; Detectron's TEST.BBOX_VOTE): each kept box
    becomes the score-weighted mean of the candidates of its class that overlap it with
    IoU >= ``iou_threshold`` (itself included, when it is one of the candidates).

    Args:
        kept_boxes (Tensor): (M, 4) XYXY, the boxes kept by NMS.
        kept_idxs (Tensor): (M,) their classes.
        boxes (Tensor): (D, 4) all candidates before NMS.
        scores (Tensor): (D,) their scores, the weights.
        idxs (Tensor): (D,) their classes (all zeros: class-agnostic).
        iou_threshold (float): IoU at or above which a candidate votes.

    Returns:
        Tensor: (M, 4) voted boxes, float32. A kept box that no candidate overlaps enough
        (not possible when it is a candidate) stays as it is.
    """
    if kept_boxes.numel() == 0 or boxes.numel() == 0:
        return kept_boxes
    all_boxes = torch.cat([kept_boxes, boxes]).float()
    shifted = _offset_boxes(all_boxes, torch.cat([kept_idxs, idxs]))
    columns, areas = _columns(shifted)
    num_kept = len(kept_boxes)
    iou = _pairwise_iou(  # (M, D)
        columns[:, :num_kept, None], areas[:num_kept, None], columns[:, None, num_kept:],
        areas[None, num_kept:],
    )  # fmt: skip
    weights = (iou >= iou_threshold).float() * scores.float()[None, :]  # (M, D)
    total = weights.sum(dim=1, keepdim=True)
    voted = weights @ boxes.float() / total.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(total > 0, voted, kept_boxes.float())
