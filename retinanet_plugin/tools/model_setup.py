"""Config and model loading shared by the inference tools (predict, export).

:func:`load_cfg` reads either kind of config: YAML through the plugin's safe reader, ``.py``
(for a tool that takes one, ``lazy=True``) through :func:`~retinanet_plugin.lazy.
load_lazy_config`. :func:`load_model`, :func:`test_mapper`, :func:`test_augmentations` and the
dataset helpers (:func:`dataset_view`) give a tool what it needs from either, built by the same
code as ``train_net.py``'s (``build_model`` / ``instantiate``, the test loader's mapper, the
datasets ``register_config_datasets`` registers).
"""

import logging
import os
import sys
from typing import Any, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from detectron2.config import CfgNode, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import build_augmentation
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from ..checkpoint import RetinaNetCheckpointer
from ..config import load_config
from ..data import build_dataset_mapper
from ..data.registration import register_config_datasets
from ..evaluation.results import coco_category_ids
from ..lazy import dataset_config, is_lazy_config, load_lazy_config
from ..meta_arch import FocalRetinaNet

__all__ = [
    "Categories",
    "config_datasets",
    "dataset_categories",
    "dataset_classes",
    "dataset_view",
    "load_cfg",
    "lazy_config_refusal",
    "load_model",
    "refuse_lazy_config",
    "setup_logging",
    "test_augmentations",
    "test_mapper",
    "test_min_size",
    "to_model_input",
]

logger = logging.getLogger(__name__)


def lazy_config_refusal(config_file: str, tool: Optional[str] = None) -> ValueError:
    """The error of a tool that reads YAML keys only, given a Python (.py) config; names
    ``tool`` (default: the running program)."""
    tool = tool or os.path.basename(sys.argv[0]) or "this tool"
    return ValueError(
        f"{tool} takes a YAML config; {config_file} is a Python (lazy) config, which it does not "
        "read yet: use the YAML twin beside it (configs/<name>.yaml)"
    )


def refuse_lazy_config(config_file: str, tool: Optional[str] = None) -> None:
    """Raises :func:`lazy_config_refusal` when ``config_file`` is a Python (.py) config."""
    if is_lazy_config(config_file):
        raise lazy_config_refusal(config_file, tool)


def load_cfg(
    config_file: str,
    opts: Sequence[str] = (),
    *,
    weights: Optional[str] = None,
    device: Optional[str] = None,
    score_thresh: Optional[float] = None,
    lazy: bool = False,
    tool: Optional[str] = None,
) -> Any:
    """The config of ``config_file`` with ``opts`` applied.

    A YAML file (frozen CfgNode): ``opts`` are KEY VALUE pairs; ``weights``, ``device`` and
    ``score_thresh`` set ``MODEL.WEIGHTS``, ``MODEL.DEVICE`` and
    ``MODEL.RETINANET.SCORE_THRESH_TEST``. A ``.py`` file (only with ``lazy=True``; otherwise a
    ValueError naming ``tool``): ``opts`` are ``key=value`` words, and the three set
    ``train.init_checkpoint``, ``train.device`` and ``model.test_score_thresh``. The datasets the
    config can name are registered as ``train_net.py`` registers them, so their class names are
    known.
    """
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if score_thresh is not None and not 0 <= score_thresh < 1:
        raise ValueError(f"score threshold must be in [0, 1), got {score_thresh}")
    if is_lazy_config(config_file):
        if not lazy:
            refuse_lazy_config(config_file, tool)
        cfg = load_lazy_config(config_file, opts)
        for node, key, value in (
            (cfg.train, "init_checkpoint", weights),
            (cfg.train, "device", device),
            (cfg.model, "test_score_thresh", score_thresh),
        ):
            if value is not None:
                node[key] = value
        return cfg
    cfg = load_config(config_file, opts)
    if weights is not None:
        cfg.MODEL.WEIGHTS = weights
    if device is not None:
        cfg.MODEL.DEVICE = device
    if score_thresh is not None:
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = score_thresh
    cfg.freeze()
    register_config_datasets(cfg)
    return cfg


def setup_logging() -> None:
    """INFO logs of detectron2, fvcore (checkpoint loading) and this package to the terminal."""
    for name in ("detectron2", "fvcore", "retinanet_plugin"):
        setup_logger(name=name, abbrev_name={"detectron2": "d2"}.get(name, name))


def to_model_input(
    cfg: Any, image: np.ndarray, augmentations: Optional[T.AugmentationList] = None
) -> torch.Tensor:
    """(H, W, C) image, already in the test loader's format, to the model's (C, H', W') input
    tensor: the test loader's augmentations (:func:`test_augmentations`; ``ResizeShortestEdge``
    to ``MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``), applied as its mapper applies them.

    Args:
        cfg: a YAML (CfgNode) or ``.py`` config.
        augmentations: ``test_augmentations(cfg)``, when the caller has them already.
    """
    aug_input = T.AugInput(image)
    if augmentations is None:
        augmentations = test_augmentations(cfg)
    augmentations(aug_input)
    return torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))


def load_model(cfg: Any) -> FocalRetinaNet:
    """Builds the config's model in eval mode and loads its weights (``MODEL.WEIGHTS``, or a
    ``.py`` config's ``train.init_checkpoint``) through :class:`RetinaNetCheckpointer` (which
    refuses a checkpoint with another class count)."""
    if isinstance(cfg, CfgNode):
        model, weights, key = build_model(cfg), cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS"
        arch = cfg.MODEL.META_ARCHITECTURE
    else:  # as train_net.py builds a .py config's model
        model = instantiate(cfg.model).to(cfg.train.device)
        weights, key, arch = cfg.train.init_checkpoint, "train.init_checkpoint", None
    if not isinstance(model, FocalRetinaNet):
        raise ValueError(
            f"the model is {arch or type(model).__name__!r}; these tools need FocalRetinaNet"
        )
    if not weights:
        logger.warning("%s is empty: the model has its initial weights", key)
    RetinaNetCheckpointer(model).load(weights)
    return model.eval()


def test_mapper(cfg: Any) -> Any:
    """The mapper of ``train_net.py``'s test loader: ``build_dataset_mapper(cfg, False)``, or a
    ``.py`` config's ``dataloader.test.mapper``."""
    if isinstance(cfg, CfgNode):
        return build_dataset_mapper(cfg, is_train=False)
    return instantiate(cfg.dataloader.test.mapper)


def test_augmentations(cfg: Any) -> T.AugmentationList:
    """The augmentations of the test loader's mapper (:func:`test_mapper`): for a YAML config
    detectron2's ``build_augmentation(cfg, is_train=False)``, as the mapper builds them."""
    if isinstance(cfg, CfgNode):
        return T.AugmentationList(build_augmentation(cfg, is_train=False))
    return test_mapper(cfg).augmentations


def test_min_size(cfg: Any) -> int:
    """The test loader's shorter side (``INPUT.MIN_SIZE_TEST``, or the first size of the
    ``.py`` config's test resize); 0 when it does not resize."""
    if isinstance(cfg, CfgNode):
        return cfg.INPUT.MIN_SIZE_TEST
    for aug in test_augmentations(cfg).augs:
        if isinstance(aug, T.ResizeShortestEdge):
            return int(aug.short_edge_length[0])
    return 0


class Categories(NamedTuple):
    """The model's K classes as a dataset names them.

    Attributes:
        names: K class names.
        ids: K category ids, ``ids[i]`` for class i: the dataset's own ids through the reverse of
            its ``thing_dataset_id_to_contiguous_id`` (as ``COCOEvaluator`` maps them), else
            0..K-1 (what ``COCOEvaluator`` writes for a dataset without that mapping).
        dataset: the dataset they come from; None for the generic "class i".
    """

    names: List[str]
    ids: List[int]
    dataset: Optional[str]


def dataset_view(cfg: Any) -> CfgNode:
    """The ``DATASETS.*`` and ``MODEL.RETINANET.NUM_CLASSES`` keys of either kind of config: a
    YAML config itself, a ``.py`` config's through :func:`~retinanet_plugin.lazy.dataset_config`
    (the names its ``dataloader.train`` / ``test`` load, the model's ``num_classes``)."""
    if isinstance(cfg, CfgNode):
        return cfg
    return dataset_config(cfg.dataloader, cfg.model)


def config_datasets(cfg: Any) -> List[str]:
    """The registered datasets of ``DATASETS.TEST``, then ``DATASETS.TRAIN``, each once (either
    kind of config, :func:`dataset_view`)."""
    cfg = dataset_view(cfg)
    registered = set(DatasetCatalog.list())
    names = dict.fromkeys(list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN))
    return [name for name in names if name in registered]


def dataset_classes(name: str, num_classes: int) -> Optional[Categories]:
    """The categories of dataset ``name`` from its metadata, as ``COCOEvaluator`` reads them.

    detectron2 fills a COCO JSON dataset's ``thing_classes`` and
    ``thing_dataset_id_to_contiguous_id`` when it loads the file (the test loader does so before
    the evaluator maps its results), so a dataset whose metadata lacks them is loaded; its
    builtin COCO sets carry them without any file.

    Returns:
        Categories, or None when the dataset has no class names or not ``num_classes`` of them
        (logged).
    """
    meta = MetadataCatalog.get(name)
    complete = meta.get("thing_classes") is not None and (
        meta.get("thing_dataset_id_to_contiguous_id") is not None or not meta.get("json_file")
    )
    if not complete:
        try:
            DatasetCatalog.get(name)
        # What detectron2's COCO loader raises on a missing or malformed file.
        except (OSError, ValueError, KeyError, AssertionError) as e:
            logger.warning("cannot load dataset %s for its categories: %s", name, e)
    names = meta.get("thing_classes")
    if names is None:
        return None
    if len(names) != num_classes:
        logger.warning(
            "dataset %s has %d categories, MODEL.RETINANET.NUM_CLASSES is %d: not using them",
            name, len(names), num_classes,
        )
        return None
    to_category = coco_category_ids(meta)
    ids = [to_category[i] for i in range(num_classes)] if to_category else list(range(num_classes))
    return Categories(list(names), ids, name)


def dataset_categories(cfg: Any) -> Categories:
    """Class names and category ids of the model's K classes (either kind of config).

    From the first dataset of :func:`config_datasets` with K classes (:func:`dataset_classes`);
    without one, "class 0", "class 1", ... with ids 0..K-1.
    """
    num_classes = dataset_view(cfg).MODEL.RETINANET.NUM_CLASSES
    for name in config_datasets(cfg):
        categories = dataset_classes(name, num_classes)
        if categories is not None:
            return categories
    return Categories([f"class {i}" for i in range(num_classes)], list(range(num_classes)), None)
