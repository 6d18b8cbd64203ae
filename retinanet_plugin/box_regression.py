"""Box regression loss over the foreground anchors of a dense detector.

Shape shorthand:
    N: images in the minibatch
    R: anchors per image, over all levels
    P: foreground anchors in the minibatch
"""

from typing import Callable, Dict

from fvcore.nn import giou_loss, smooth_l1_loss
from torch import Tensor

from detectron2.layers import ciou_loss, diou_loss
from detectron2.modeling.box_regression import Box2BoxTransform

__all__ = ["BOX_REG_LOSS_TYPES", "check_box_reg_loss_type", "dense_box_reg_loss"]

# Losses on decoded boxes; the other two types compare deltas.
_BOX_LOSSES: Dict[str, Callable[..., Tensor]] = {
    "giou": giou_loss,
    "diou": diou_loss,
    "ciou": ciou_loss,
}
# "smooth_l1" is the paper's (Sec. 4, "Optimization"); "l1" is smooth L1 with beta = 0.
BOX_REG_LOSS_TYPES = ("smooth_l1", "l1", *_BOX_LOSSES)


def check_box_reg_loss_type(loss_type: str, name: str = "box_reg_loss_type") -> str:
    """Return ``loss_type`` in lower case, or raise ValueError naming ``name`` (a config key).

    Names are case-insensitive, so "L1" and "l1" are the same loss.
    """
    canonical = loss_type.lower()
    if canonical not in BOX_REG_LOSS_TYPES:
        raise ValueError(f"{name} = {loss_type!r} is not one of {list(BOX_REG_LOSS_TYPES)}")
    return canonical


def dense_box_reg_loss(
    anchors: Tensor,
    box2box_transform: Box2BoxTransform,
    pred_deltas: Tensor,
    gt_boxes: Tensor,
    fg_mask: Tensor,
    loss_type: str = "smooth_l1",
    smooth_l1_beta: float = 0.0,
) -> Tensor:
    """Summed box regression loss over the foreground anchors (not normalised).

    Equals detectron2's ``_dense_box_regression_loss`` but encodes or decodes only the P
    foreground anchors instead of all N*R, which for the IoU losses is most of the work.

    Args:
        anchors (Tensor): (R, 4) XYXY anchors, shared by all images.
        box2box_transform (Box2BoxTransform): the delta parameterisation.
        pred_deltas (Tensor): (N, R, 4) predicted deltas.
        gt_boxes (Tensor): (N, R, 4) XYXY box matched to each anchor; read only under fg_mask.
        fg_mask (Tensor): (N, R) bool, the foreground anchors.
        loss_type (str): one of :data:`BOX_REG_LOSS_TYPES` (case-insensitive).
        smooth_l1_beta (float): beta of smooth L1; used only by "smooth_l1".

    Returns:
        Tensor: scalar sum. With no foreground it is an exact 0 that still depends on
        ``pred_deltas``, so backward runs (and DDP sees every parameter used).
    """
    loss_type = check_box_reg_loss_type(loss_type)
    # One nonzero (one host sync on GPU) instead of one per boolean-mask indexing.
    fg_idx = fg_mask.flatten().nonzero().squeeze(1)  # (P,) into N*R
    fg_deltas = pred_deltas.flatten(0, 1)[fg_idx]  # (P, 4)
    fg_gt = gt_boxes.flatten(0, 1)[fg_idx]
    fg_anchors = anchors[fg_idx % anchors.shape[0]]
    if loss_type in ("smooth_l1", "l1"):
        beta = smooth_l1_beta if loss_type == "smooth_l1" else 0.0
        target = box2box_transform.get_deltas(fg_anchors, fg_gt)
        return smooth_l1_loss(fg_deltas, target, beta=beta, reduction="sum")
    fg_boxes = box2box_transform.apply_deltas(fg_deltas, fg_anchors)
    return _BOX_LOSSES[loss_type](fg_boxes, fg_gt, reduction="sum")
