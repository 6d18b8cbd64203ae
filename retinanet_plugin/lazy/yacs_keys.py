"""The YAML keys of a Python (lazy) config, for the tools whose analysis reads them
(``analyze_anchors``, ``loss_cdf``).

:func:`yacs_keys` converts exactly the keys those tools read, each from the lazy node that
means the same thing (the node a ``train_net.py`` run instantiates), onto the plugin's defaults;
every other key keeps its default and is not read. What no key can describe (the backbone
itself, the trainer's mapper) the tools instantiate from the lazy config.

====================================  ==========================================================
YAML key                              lazy node
====================================  ==========================================================
MODEL.META_ARCHITECTURE               ``model._target_``'s name (a one-stage subclass:
                                      its RetinaNet base's, ``architecture_name``)
MODEL.RETINANET.IN_FEATURES           ``model.head_in_features``
MODEL.RETINANET.NUM_CLASSES           ``model.num_classes``
MODEL.RETINANET.IOU_THRESHOLDS,       ``model.anchor_matcher.thresholds``, ``labels``,
IOU_LABELS, ALLOW_LOW_QUALITY_MATCHES ``allow_low_quality_matches``
MODEL.RPN.* (GeneralizedRCNN)         the same of ``model.proposal_generator``
MODEL.ANCHOR_GENERATOR.NAME, SIZES,   the anchor generator's ``_target_`` name, ``sizes``,
ASPECT_RATIOS, OFFSET                 ``aspect_ratios``, ``offset``
INPUT.MIN_SIZE_TRAIN, MAX_SIZE_TRAIN, ``ResizeShortestEdge`` of ``dataloader.train.mapper``
MIN_SIZE_TRAIN_SAMPLING               (``short_edge_length``, ``max_size``, ``sample_style``);
                                      none: ``(0,)``, 0, choice (no resize)
INPUT.MIN_SIZE_TEST, MAX_SIZE_TEST    ``ResizeShortestEdge`` of ``dataloader.test.mapper``;
                                      none: 0, 0 (no resize)
INPUT.FORMAT                          ``dataloader.test.mapper.image_format``
DATASETS.TRAIN, TEST, COCO_INSTANCES  :func:`~retinanet_plugin.lazy.dataset_config`
MODEL.DEVICE, OUTPUT_DIR              ``train.device``, ``train.output_dir``
====================================  ==========================================================
"""

from collections.abc import Sequence
from typing import Any, List, Optional, Tuple

from omegaconf import DictConfig, ListConfig

from detectron2.config import CfgNode, get_cfg, instantiate
from detectron2.data import transforms as T

from ..config import add_retinanet_plugin_config
from .datasets import _target_name, architecture_name, dataset_config

__all__ = ["anchor_owner", "backbone_without_weights", "yacs_keys"]

# Meta-architectures whose anchors belong to the proposal generator (MODEL.RPN's keys).
_PROPOSAL_ARCHS = ("GeneralizedRCNN", "ProposalNetwork")


def anchor_owner(model: Any) -> Tuple[str, Any]:
    """The YAML node name and the lazy node of the head that owns the anchors:
    ``("RPN", model.proposal_generator)`` for a two-stage or proposal-only model, else
    ``("RETINANET", model)``."""
    if _target_name(model) in _PROPOSAL_ARCHS:
        return "RPN", model.proposal_generator
    return "RETINANET", model


# What ``INPUT.MIN_SIZE_*`` 0 means to detectron2 (``ResizeShortestEdge`` of 0: no resize):
# a mapper with no resize, converted.
_NO_RESIZE = T.ResizeShortestEdge(0, 0, sample_style="choice")


def _resize(mapper_node: Any, where: str) -> Optional[T.ResizeShortestEdge]:
    """The mapper's ``ResizeShortestEdge``, as it runs (class defaults included); a mapper with
    none runs images at their own size: ``ResizeShortestEdge(0, 0)``, detectron2's no resize.
    None: no mapper.

    Raises:
        ValueError: the mapper resizes otherwise (``where`` names it): no key describes that.
    """
    if mapper_node is None:
        return None
    mapper = instantiate(mapper_node)
    augs = getattr(mapper, "augmentations", T.AugmentationList([])).augs
    for aug in augs:
        if isinstance(aug, T.ResizeShortestEdge):
            return aug
    others = [type(a).__name__ for a in augs if "Resize" in type(a).__name__]
    if others:
        raise ValueError(
            f"{where} resizes with {', '.join(others)}, not ResizeShortestEdge: the "
            "INPUT.MIN_SIZE_* keys these tools read cannot describe it"
        )
    return _NO_RESIZE


def _per_level(values: Any) -> List[List[float]]:
    """Anchor sizes or ratios as the YAML keys hold them: one list per level, or one list for
    all levels; a flat list is that one list (as detectron2's ``_broadcast_params`` reads it)."""
    values = list(values)
    if values and not isinstance(values[0], Sequence):
        values = [values]
    return [[float(v) for v in level] for level in values]


def yacs_keys(cfg: Any) -> CfgNode:
    """The YAML keys of ``cfg`` (a loaded ``.py`` config) that ``analyze_anchors`` and
    ``loss_cdf`` read (see the module's table), on the plugin's defaults; not frozen.

    Raises:
        ValueError: a node the table names is missing (named).
    """
    keys = get_cfg()
    add_retinanet_plugin_config(keys)
    model = cfg.model
    keys.MODEL.META_ARCHITECTURE = architecture_name(model)
    datasets = dataset_config(cfg.dataloader, model)
    for key in ("TRAIN", "TEST", "COCO_INSTANCES"):
        keys.DATASETS[key] = datasets.DATASETS[key]
    keys.OUTPUT_DIR = cfg.train.output_dir
    keys.MODEL.DEVICE = cfg.train.get("device", "cpu")

    name, owner = anchor_owner(model)
    node = keys.MODEL[name]
    matcher, generator = owner.get("anchor_matcher"), owner.get("anchor_generator")
    if matcher is None or generator is None:
        raise ValueError(
            f"the config's {'model.proposal_generator' if name == 'RPN' else 'model'} has no "
            "anchor_matcher / anchor_generator: these tools analyse anchor-based models"
        )
    node.IN_FEATURES = list(owner.in_features if name == "RPN" else model.head_in_features)
    node.IOU_THRESHOLDS = [float(t) for t in matcher.thresholds]
    node.IOU_LABELS = [int(label) for label in matcher.labels]
    if name == "RETINANET":
        node.NUM_CLASSES = int(model.num_classes)
        node.ALLOW_LOW_QUALITY_MATCHES = bool(matcher.get("allow_low_quality_matches", False))
    keys.MODEL.ANCHOR_GENERATOR.NAME = _target_name(generator)
    keys.MODEL.ANCHOR_GENERATOR.SIZES = _per_level(generator.sizes)
    keys.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = _per_level(generator.aspect_ratios)
    keys.MODEL.ANCHOR_GENERATOR.OFFSET = float(generator.get("offset", 0.0))

    train = _resize(cfg.dataloader.get("train", {}).get("mapper"), "dataloader.train.mapper")
    if train is not None:
        edges = [int(s) for s in train.short_edge_length]  # ResizeShortestEdge(800): (800, 800)
        keys.INPUT.MIN_SIZE_TRAIN = tuple(
            dict.fromkeys(edges) if train.sample_style == "choice" else edges
        )
        keys.INPUT.MAX_SIZE_TRAIN = int(train.max_size)
        keys.INPUT.MIN_SIZE_TRAIN_SAMPLING = train.sample_style
    test_mapper = cfg.dataloader.get("test", {}).get("mapper")
    test = _resize(test_mapper, "dataloader.test.mapper")
    if test is not None:
        keys.INPUT.MIN_SIZE_TEST = int(test.short_edge_length[0])
        keys.INPUT.MAX_SIZE_TEST = int(test.max_size)
    if test_mapper is not None and test_mapper.get("image_format") is not None:
        keys.INPUT.FORMAT = test_mapper.image_format
    return keys


def _pretrained_flags(node: Any) -> List[Tuple[Any, str]]:
    """(node, "pretrained") of every boolean ``pretrained`` key under ``node``."""
    if isinstance(node, DictConfig):
        flags = [(node, "pretrained")] if isinstance(node.get("pretrained"), bool) else []
        return flags + [f for key in node.keys() if key != "pretrained"
                        for f in _pretrained_flags(node[key])]
    if isinstance(node, ListConfig):
        return [f for item in node for f in _pretrained_flags(item)]
    return []


def backbone_without_weights(cfg: Any) -> Any:
    """The config's backbone (``model.backbone``) on the CPU, every ``pretrained`` flag of its
    node off (only its output shapes and padding are read: nothing downloaded), as the YAML path
    builds it with ``MODEL.MOBILENET.PRETRAINED False``."""
    flags = _pretrained_flags(cfg.model.backbone)
    saved = [node[key] for node, key in flags]
    try:  # set in place: the node's ${..} interpolations need its parent
        for node, key in flags:
            node[key] = False
        return instantiate(cfg.model.backbone).to("cpu")
    finally:
        for (node, key), value in zip(flags, saved):
            node[key] = value
