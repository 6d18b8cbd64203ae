"""The classification loss that detectron2-style keyword arguments ask for (a lazy config).

detectron2's ``RetinaNet`` takes ``focal_loss_alpha`` / ``focal_loss_gamma``; this plugin's
models also take the loss itself (an object or a ``CLS_LOSS_REGISTRY`` name). Used by
:class:`FocalRetinaNet` and :class:`FocalRPN`; the YAML path builds the loss with
:func:`build_cls_loss` instead.
"""

import inspect
from typing import Union

from torch import nn

from ..registry import get_registered
from .classification import CLS_LOSS_REGISTRY, SigmoidFocalLoss

__all__ = ["FOCAL_LOSS_ALPHA", "FOCAL_LOSS_GAMMA", "resolve_cls_loss"]

# detectron2's RetinaNet defaults of focal_loss_alpha / focal_loss_gamma (the paper's, Eq. 5).
FOCAL_LOSS_ALPHA = 0.25
FOCAL_LOSS_GAMMA = 2.0


def resolve_cls_loss(
    cls_loss: Union[nn.Module, str, None],
    *,
    focal_loss_alpha: float = FOCAL_LOSS_ALPHA,
    focal_loss_gamma: float = FOCAL_LOSS_GAMMA,
) -> nn.Module:
    """The classification loss a model built from keyword arguments (a lazy config) asks for.

    detectron2's ``RetinaNet`` takes ``focal_loss_alpha`` / ``focal_loss_gamma`` and hard-codes
    the sigmoid focal loss; this plugin also takes the loss itself. Every combination either
    means one loss or is refused, so no value is silently unused:

    - None: :class:`SigmoidFocalLoss` with the two values (detectron2's loss);
    - a ``CLS_LOSS_REGISTRY`` name: that class, given ``alpha`` / ``gamma`` from the two values
      where its constructor takes them (as ``MODEL.RETINANET.FOCAL_LOSS_*`` feed
      ``MODEL.RETINANET.CLS_LOSS`` on the YAML path); a value other than the default that it
      does not take raises;
    - an ``nn.Module``: used as is, its hyperparameters set on it; both values must then be
      their defaults.

    Raises:
        ValueError (UnknownNameError for an unregistered name): see above.
    """
    given = {"alpha": focal_loss_alpha, "gamma": focal_loss_gamma}
    defaults = {"alpha": FOCAL_LOSS_ALPHA, "gamma": FOCAL_LOSS_GAMMA}
    changed = {k: v for k, v in given.items() if v != defaults[k]}
    if cls_loss is None:
        return SigmoidFocalLoss(**given)
    if isinstance(cls_loss, str):
        loss_class = get_registered(CLS_LOSS_REGISTRY, cls_loss, "cls_loss")
        takes = inspect.signature(loss_class.__init__).parameters
        unused = sorted(f"focal_loss_{k} = {v}" for k, v in changed.items() if k not in takes)
        if unused:
            raise ValueError(
                f"{', '.join(unused)} is not used by cls_loss = {cls_loss!r}; leave it at its "
                f"default or choose a loss that takes it"
            )
        return loss_class(**{k: v for k, v in given.items() if k in takes})
    if changed:
        raise ValueError(
            f"{', '.join(f'focal_loss_{k} = {v}' for k, v in changed.items())} would be ignored: "
            f"cls_loss is given as an object ({type(cls_loss).__name__}); set the value on it "
            "(e.g. L(SigmoidFocalLoss)(alpha=..., gamma=...)) and leave focal_loss_* at their "
            "defaults"
        )
    return cls_loss
