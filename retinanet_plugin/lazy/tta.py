"""Test-time augmentation of a Python (lazy) config: ``dataloader.tta``, the ``TEST.AUG.*`` of
a YAML config.

A lazy config turns it on with detectron2's mapper and the YAML keys' meaning::

    dataloader.tta = L(DatasetMapperTTA)(min_sizes=[400, 500], max_size=1000, flip=True)

:func:`tta_model` wraps the model as ``train_net.py``'s lazy path evaluates it (its
``inference_TTA/`` results) and as predict runs it, so both are one path.
"""

from typing import Any, Dict, Optional

from detectron2.config import instantiate

from ..test_time_augmentation import FocalRetinaNetWithTTA

__all__ = ["tta_augmentation", "tta_model"]


def tta_augmentation(cfg: Any) -> Optional[Dict[str, Any]]:
    """``dataloader.tta``'s sizes and flip, as ``{"min_sizes", "max_size", "flip"}`` (predict's
    images.json ``test_augmentation``, as for ``TEST.AUG.*``); None without ``dataloader.tta``.
    """
    node = cfg.dataloader.get("tta")
    if node is None:
        return None
    mapper = instantiate(node)  # the values it runs with, defaults of its class included
    return {
        "min_sizes": list(mapper.min_sizes),
        "max_size": mapper.max_size,
        "flip": mapper.flip,
    }


def tta_model(cfg: Any, model: Any) -> FocalRetinaNetWithTTA:
    """``model`` with the test-time augmentation of ``dataloader.tta`` (instantiated), as
    ``FocalRetinaNetWithTTA(cfg, model)`` wraps a YAML config's model.

    Raises:
        ValueError: the config has no ``dataloader.tta``.
        UnsupportedKeyError: a test-time key of the model that TTA cannot honour.
    """
    node = cfg.dataloader.get("tta")
    if node is None:
        raise ValueError("the config has no dataloader.tta (test-time augmentation)")
    return FocalRetinaNetWithTTA(None, model, tta_mapper=instantiate(node))
