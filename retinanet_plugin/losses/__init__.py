"""Classification losses: the focal-loss family (functions) and the registry the model uses."""

from .classification import (  # registers the losses below
    CLS_LOSS_REGISTRY,
    AlphaBalancedCE,
    OHEMLoss,
    SigmoidFocalLoss,
    SigmoidFocalLossStar,
    SoftmaxFocalLoss,
    build_cls_loss,
)
from .focal import (
    alpha_balanced_ce,
    sigmoid_focal_loss,
    sigmoid_focal_loss_from_labels,
    sigmoid_focal_loss_per_level,
    sigmoid_focal_loss_reference,
    sigmoid_focal_loss_star,
    sigmoid_focal_loss_star_from_labels,
    sigmoid_focal_loss_star_per_level,
    sigmoid_focal_loss_star_reference,
    softmax_focal_loss,
)
from .resolve import resolve_cls_loss

__all__ = [
    "CLS_LOSS_REGISTRY",
    "build_cls_loss",
    "resolve_cls_loss",
    "AlphaBalancedCE",
    "OHEMLoss",
    "SigmoidFocalLoss",
    "SigmoidFocalLossStar",
    "SoftmaxFocalLoss",
    "alpha_balanced_ce",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_from_labels",
    "sigmoid_focal_loss_per_level",
    "sigmoid_focal_loss_reference",
    "sigmoid_focal_loss_star",
    "sigmoid_focal_loss_star_from_labels",
    "sigmoid_focal_loss_star_per_level",
    "sigmoid_focal_loss_star_reference",
    "softmax_focal_loss",
]
