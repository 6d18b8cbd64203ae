"""What the plugin's Python (lazy) configs call, besides the model classes themselves.

detectron2's LazyConfig files build every object from keyword arguments (``LazyCall``); the
plugin's models take them directly (``FocalRetinaNet``, ``FocalRetinaNetHead``, ``FocalRPN``,
the losses). This package holds the few pieces whose YAML builder reads a ``CfgNode`` and so has
no keyword form yet, each sharing the YAML path's code:

- :func:`mobilenet_v2_features`: the bottom-up network of ``build_mobilenet_v2_fpn_backbone``;
- :func:`coco_instances`, :func:`register_datasets`, :func:`dataset_config`: datasets named by
  path (``DATASETS.COCO_INSTANCES``), registered and checked by
  :mod:`retinanet_plugin.data.registration`;
- :func:`clipped_optimizer`: ``SOLVER.CLIP_GRADIENTS`` through detectron2's own
  ``maybe_add_gradient_clipping``;
- :func:`tta_model`, :func:`tta_augmentation`: test-time augmentation from ``dataloader.tta``
  (``TEST.AUG.*``), for ``train_net.py`` and predict alike;
- :func:`yacs_keys`: the YAML keys that ``analyze_anchors`` and ``loss_cdf`` read, converted
  from the lazy nodes that mean the same;
- :func:`load_lazy_config`: the one reader of ``.py`` configs (``train_net.py``, the tools),
  which never sees a YAML file.

A ``.py`` config is a Python program: loading one runs its code (see docs/lazy_configs.md).
"""

from .backbone import mobilenet_v2_features
from .datasets import coco_instances, dataset_config, register_datasets
from .loading import is_lazy_config, load_lazy_config
from .optim import clipped_optimizer
from .tta import tta_augmentation, tta_model
from .yacs_keys import anchor_owner, backbone_without_weights, yacs_keys

__all__ = [
    "anchor_owner",
    "backbone_without_weights",
    "clipped_optimizer",
    "coco_instances",
    "dataset_config",
    "is_lazy_config",
    "load_lazy_config",
    "mobilenet_v2_features",
    "register_datasets",
    "tta_augmentation",
    "tta_model",
    "yacs_keys",
]
