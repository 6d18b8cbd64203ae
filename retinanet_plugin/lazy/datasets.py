"""Datasets of a lazy config: named by path, registered and checked by the YAML path's code.

A YAML config lists its COCO files under ``DATASETS.COCO_INSTANCES`` and ``train_net.py``
registers them. A lazy config keeps the same ``[name, json_file, image_root]`` triples in
``dataloader.coco_instances`` and registers them itself, with :func:`register_datasets` as its
last statement, so that any script that loads it (``train_net.py``, detectron2's
``tools/lazyconfig_train_net.py``, the tools) finds the names its loaders use::

    dataloader.coco_instances = coco_instances(
        [["my_coco_train", "../datasets/my_coco/train.json", "../datasets/my_coco/images"]],
        relative_to=__file__,
    )
    dataloader.train.dataset.names = "my_coco_train"
    register_datasets(dataloader)

:func:`dataset_config` gives the ``DATASETS.*`` view of a lazy config that
:mod:`retinanet_plugin.data.registration` reads, so registration (``register_config_datasets``,
which also registers the DeepForest demo sets when named) and the check before training
(``check_datasets``) are that module's, not a second copy.
"""

import os
from typing import Any, List, Optional, Sequence

from torch import nn

from detectron2.config import CfgNode

from ..data.registration import register_config_datasets

__all__ = ["coco_instances", "dataset_config", "register_datasets"]


def coco_instances(entries: Sequence[Sequence[str]], *, relative_to: str) -> List[List[str]]:
    """``[name, json_file, image_root]`` triples with their paths made absolute.

    Relative paths resolve against the folder of ``relative_to`` (pass ``__file__`` from the
    config, as a YAML config's paths resolve against its own folder); ``~`` and ``$VARS`` are
    expanded. The triples are validated when registered (:func:`register_datasets`).

    Args:
        entries: the triples, as ``DATASETS.COCO_INSTANCES`` holds them.
        relative_to (str): a file in the folder relative paths start from.
    """
    folder = os.path.dirname(os.path.abspath(relative_to))

    def resolve(path: Any) -> Any:
        if not isinstance(path, str):
            return path  # refused, with the whole entry, by the registration
        # join keeps an absolute path
        return os.path.normpath(os.path.join(folder, os.path.expanduser(os.path.expandvars(path))))

    return [[entry[0], *map(resolve, entry[1:])] if len(entry) == 3 else list(entry)
            for entry in entries]


def _names(names: Any) -> List[str]:
    # get_detection_dataset_dicts takes one name or a list of names.
    return [names] if isinstance(names, str) else list(names or [])


def _target_name(node: Any) -> str:
    target = node.get("_target_") if node is not None else None
    if isinstance(target, str):  # a config loaded back from YAML holds dotted names
        return target.rsplit(".", 1)[-1]
    return getattr(target, "__name__", "")


def _target_class(node: Any) -> Optional[type]:
    """The class ``node._target_`` names (a dotted name located as ``instantiate`` does), or
    None (no node, no target, a callable that is not a class, a name that does not resolve)."""
    target = node.get("_target_") if node is not None else None
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            target = locate(target)
        except ImportError:  # what locate raises for a name it cannot resolve
            return None
    return target if isinstance(target, type) else None


def is_one_stage(model: Any) -> bool:
    """Whether the lazy ``model`` node builds a one-stage detector (its class count is
    ``model.num_classes``): by its ``_target_`` class, a subclass of detectron2's
    ``DenseDetector`` (``RetinaNet``, ``FCOS``) or of the plugin's ``FocalRetinaNet``, whatever
    its name; a target that is no class (a factory function, a name that does not resolve):
    the node has ``num_classes`` and no ``roi_heads``."""
    from detectron2.modeling.meta_arch.dense_detector import DenseDetector

    from ..meta_arch import FocalRetinaNet

    cls = _target_class(model)
    if cls is not None and issubclass(cls, (DenseDetector, FocalRetinaNet)):
        return True
    if cls is not None and issubclass(cls, nn.Module):
        return False
    return model is not None and "num_classes" in model and model.get("roi_heads") is None


def architecture_name(model: Any) -> str:
    """``MODEL.META_ARCHITECTURE`` of the lazy ``model`` node: its ``_target_``'s name, but a
    one-stage subclass (:func:`is_one_stage`) whose name lacks "RetinaNet" is named by its
    RetinaNet base (``FocalRetinaNet`` or ``RetinaNet``), the name the YAML path's code reads
    as "class count in MODEL.RETINANET" (``check_datasets``, predict, ``loss_cdf``)."""
    name = _target_name(model)
    if "RetinaNet" in name or not is_one_stage(model):
        return name
    from ..meta_arch import FocalRetinaNet

    cls = _target_class(model)
    return "FocalRetinaNet" if cls is not None and issubclass(cls, FocalRetinaNet) else "RetinaNet"


def dataset_config(dataloader: Any, model: Optional[Any] = None) -> CfgNode:
    """The ``DATASETS.*`` keys (and the model's class count) of a lazy config, as a CfgNode.

    Args:
        dataloader: the config's ``dataloader`` node: ``coco_instances`` (optional, absolute
            paths), ``train.dataset.names``, ``test.dataset.names``, ``check`` (optional,
            "header" by default, as ``DATASETS.CHECK``).
        model: the config's ``model`` node, for the class count the check compares with each
            dataset's categories (``num_classes`` of a RetinaNet, ``roi_heads.num_classes`` of
            a GeneralizedRCNN); None: not compared.

    Returns:
        CfgNode: DATASETS.{COCO_INSTANCES, TRAIN, TEST, CHECK}, MODEL.META_ARCHITECTURE and the
        class count key, for ``register_config_datasets`` and ``check_datasets``.
    """
    train = dataloader.get("train")
    test = dataloader.get("test")
    cfg = CfgNode({
        "DATASETS": {
            "COCO_INSTANCES": [list(e) for e in dataloader.get("coco_instances") or []],
            "TRAIN": tuple(_names(train.dataset.names) if train is not None else []),
            "TEST": tuple(_names(test.dataset.names) if test is not None else []),
            "CHECK": dataloader.get("check", "header"),
        },
        "MODEL": {"META_ARCHITECTURE": architecture_name(model)},
    })
    if model is None:
        return cfg
    if is_one_stage(model):
        cfg.MODEL.RETINANET = CfgNode({"NUM_CLASSES": model.num_classes})
    elif cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and model.get("roi_heads"):
        cfg.MODEL.ROI_HEADS = CfgNode(
            {"NAME": _target_name(model.roi_heads), "NUM_CLASSES": model.roi_heads.num_classes}
        )
    return cfg


def register_datasets(dataloader: Any) -> List[str]:
    """Registers what a lazy config's loaders name: every ``dataloader.coco_instances`` entry
    (as ``DATASETS.COCO_INSTANCES``), and the DeepForest demo sets when a loader names them.

    Safe to call again, with the same rules as ``register_datasets_from_cfg``: an entry
    registered by an earlier call is replaced when its files changed, a name registered
    otherwise (a detectron2 builtin) is refused.

    Returns:
        list[str]: the names of ``dataloader.coco_instances``, in order.
    """
    cfg = dataset_config(dataloader)
    register_config_datasets(cfg)
    return [entry[0] for entry in cfg.DATASETS.COCO_INSTANCES]
