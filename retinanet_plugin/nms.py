"""Post-processing of dense detections beyond detectron2's per-class NMS: soft-NMS and box voting.

Both treat classes independently by masking the IoU of boxes of different classes to 0 (an
all-zero ``idxs`` makes them class-agnostic), and both are written with operators that
``torch.jit.trace`` and the ONNX exporter record, so that the exported graph runs them as they
are (see :func:`retinanet_plugin.postprocess.select_detections`).

Shape shorthand:
    D: candidate detections of one image
    M: detections kept
"""

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["SOFT_NMS_METHODS", "box_voting", "soft_nms"]

SOFT_NMS_METHODS = ("linear", "gaussian")


def _pairwise_iou(columns_a: Tensor, area_a: Tensor, columns_b: Tensor, area_b: Tensor) -> Tensor:
    """IoU of XYXY boxes given as contiguous coordinate columns, broadcast: columns (4, ...) and
    areas of the broadcast shapes; 0 where the union is empty."""
    x1a, y1a, x2a, y2a = columns_a.unbind(0)
    x1b, y1b, x2b, y2b = columns_b.unbind(0)
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
    """Soft-NMS (Bodla et al., ICCV 2017), per class, all classes in one loop.

    Repeatedly takes the highest-scoring remaining box and decays the scores of the boxes of its
    class by their IoU with it: linear, s * (1 - IoU) where IoU > ``iou_threshold`` (else s);
    Gaussian, s * exp(-IoU^2 / sigma). Boxes whose score falls to ``score_threshold`` or below
    are dropped. The scores of the picked boxes never increase, so stopping after
    ``max_detections`` picks gives the top ``max_detections`` of a full run, and since a box
    decays only boxes of its own class, one loop gives every class's soft-NMS at once. The loop
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
    # Traced, the loop is unrolled max_detections times whatever the number of boxes: a dummy box
    # of score -1, never kept, is there to be picked once every real box is gone (or when there
    # is none). Eager, it stops after min(max_detections, D) picks, which is the same result.
    if torch.jit.is_tracing():
        steps = int(max_detections)
    else:
        steps = min(int(max_detections), boxes.shape[0])
    if steps == 0:
        return idxs.new_zeros(0, dtype=torch.int64), scores.new_zeros(0)
    columns, areas = _columns(torch.cat([boxes.float(), boxes.new_zeros(1, 4, dtype=torch.float)]))
    idxs = torch.cat([idxs, idxs.new_full((1,), -1)])
    current = torch.cat([scores.float(), scores.new_full((1,), -1.0, dtype=torch.float)])
    current = current.masked_fill(current <= score_threshold, -1.0)
    # Positions from a cumulative sum rather than arange(len(...)), which tracing would freeze.
    positions = torch.ones_like(idxs).cumsum(0) - 1
    picked, picked_scores = [], []
    for _ in range(steps):
        best = current.argmax()
        picked.append(best)
        picked_scores.append(current[best])
        iou = _pairwise_iou(columns[:, best], areas[best], columns, areas)
        iou = torch.where(idxs == idxs[best], iou, torch.zeros_like(iou))  # other classes: 0
        if method == "linear":
            decay = torch.where(iou > iou_threshold, 1 - iou, torch.ones_like(iou))
        else:
            decay = torch.exp(-(iou * iou) / sigma)
        current = current * decay
        # Dropped and picked boxes get -1 so that they are never picked (again); a -1 that
        # the argmax returns once every box is gone is filtered below.
        current = current.masked_fill((current <= score_threshold) | (positions == best), -1.0)
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
    # No early return for empty inputs: the zero-size operations give the right (0, 4) or
    # unchanged boxes, and a traced graph has no Python branch to take.
    kept_columns, kept_areas = _columns(kept_boxes.float())
    columns, areas = _columns(boxes.float())
    iou = _pairwise_iou(  # (M, D)
        kept_columns[:, :, None], kept_areas[:, None], columns[:, None, :], areas[None, :]
    )
    votes = (iou >= iou_threshold) & (kept_idxs[:, None] == idxs[None, :])
    weights = votes.float() * scores.float()[None, :]  # (M, D)
    total = weights.sum(dim=1, keepdim=True)
    voted = weights @ boxes.float() / total.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(total > 0, voted, kept_boxes.float())
