"""Classification losses: the focal-loss family (functions) and the registry the model uses."""

from .focal import (
    alpha_balanced_ce,
    sigmoid_focal_loss,
    sigmoid_focal_loss_from_labels,
    sigmoid_focal_loss_reference,
    sigmoid_focal_loss_star,
    sigmoid_focal_loss_star_from_labels,
    sigmoid_focal_loss_star_reference,
    softmax_focal_loss,
)
from .classification import CLS_LOSS_REGISTRY, build_cls_loss  # registers the losses below
from .classification import (
    AlphaBalancedCE,
    OHEMLoss,
    SigmoidFocalLoss,
    SigmoidFocalLossStar,
    SoftmaxFocalLoss,
)

__all__ = [
    "CLS_LOSS_REGISTRY",
    "build_cls_loss",
    "AlphaBalancedCE",
    "OHEMLoss",
    "SigmoidFocalLoss",
    "SigmoidFocalLossStar",
    "SoftmaxFocalLoss",
    "alpha_balanced_ce",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_from_labels",
    "sigmoid_focal_loss_reference",
    "sigmoid_focal_loss_star",
    "sigmoid_focal_loss_star_from_labels",
    "sigmoid_focal_loss_star_reference",
    "softmax_focal_loss",
]
