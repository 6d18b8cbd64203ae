"""Gradient clipping for a lazy config's optimizer, as ``SOLVER.CLIP_GRADIENTS`` does in YAML."""

from typing import Any, Union

import torch

from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils.registry import locate

__all__ = ["clipped_optimizer"]

CLIP_TYPES = ("value", "norm")


def clipped_optimizer(
    optimizer_class: Union[str, type] = "torch.optim.SGD",
    *,
    clip_type: str,
    clip_value: float,
    norm_type: float = 2.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_class(**kwargs)`` whose ``step()`` first clips the gradients.

    The clipping is detectron2's ``maybe_add_gradient_clipping``, given the
    ``SOLVER.CLIP_GRADIENTS`` keys a YAML config would hold, so both config systems clip alike
    (per parameter: "norm" rescales each parameter's gradient to an L-``norm_type`` norm of at
    most ``clip_value``, "value" clamps each element to [-clip_value, clip_value]).

    In a lazy config, replace the ``_target_`` of detectron2's optimizer node, so that
    ``optimizer.params.model`` (set by the training script) and ``optimizer.lr`` keep their keys::

        optimizer = model_zoo.get_config("common/optim.py").SGD
        optimizer.update(_target_=clipped_optimizer, clip_type="norm", clip_value=5.0)

    Args:
        optimizer_class (str or type): the optimizer, or its dotted name (a name keeps the
            config savable as YAML).
        clip_type (str): "norm" or "value" (``SOLVER.CLIP_GRADIENTS.CLIP_TYPE``).
        clip_value (float): ``SOLVER.CLIP_GRADIENTS.CLIP_VALUE``, > 0.
        norm_type (float): ``SOLVER.CLIP_GRADIENTS.NORM_TYPE``.
        kwargs: the optimizer's arguments (``params``, ``lr``, ...).
    """
    if clip_type not in CLIP_TYPES:
        raise ValueError(f"clip_type must be one of {CLIP_TYPES}, got {clip_type!r}")
    if not clip_value > 0:
        raise ValueError(f"clip_value must be > 0, got {clip_value}")
    if isinstance(optimizer_class, str):
        name = optimizer_class
        optimizer_class = locate(name)
        if not (isinstance(optimizer_class, type)
                and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise ValueError(f"optimizer_class {name!r} is not a torch.optim.Optimizer class")
    solver = CfgNode({"CLIP_GRADIENTS": {
        "ENABLED": True, "CLIP_TYPE": clip_type, "CLIP_VALUE": float(clip_value),
        "NORM_TYPE": float(norm_type),
    }})
    return maybe_add_gradient_clipping(CfgNode({"SOLVER": solver}), optimizer_class)(**kwargs)
