"""Config and model loading shared by the inference tools (predict, export)."""

import json
import logging
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import build_augmentation
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from ..checkpoint import RetinaNetCheckpointer
from ..config import load_config
from ..data.registration import register_config_datasets
from ..meta_arch import FocalRetinaNet

__all__ = ["dataset_categories", "load_cfg", "load_model", "setup_logging", "to_model_input"]

logger = logging.getLogger(__name__)


def load_cfg(
    config_file: str,
    opts: Sequence[str] = (),
    *,
    weights: Optional[str] = None,
    device: Optional[str] = None,
    score_thresh: Optional[float] = None,
) -> CfgNode:
    """The frozen config of ``config_file`` with ``opts`` (KEY VALUE pairs) merged on top.

    ``weights``, ``device`` and ``score_thresh`` set ``MODEL.WEIGHTS``, ``MODEL.DEVICE`` and
    ``MODEL.RETINANET.SCORE_THRESH_TEST`` when given. The datasets the config can name are
    registered as ``train_net.py`` registers them, so their class names are known.
    """
    cfg = load_config(config_file, opts)
    if weights is not None:
        cfg.MODEL.WEIGHTS = weights
    if device is not None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        cfg.MODEL.DEVICE = device
    if score_thresh is not None:
        if not 0 <= score_thresh < 1:
            raise ValueError(f"score threshold must be in [0, 1), got {score_thresh}")
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = score_thresh
    cfg.freeze()
    register_config_datasets(cfg)
    return cfg


def setup_logging() -> None:
    """INFO logs of detectron2, fvcore (checkpoint loading) and this package to the terminal."""
    for name in ("detectron2", "fvcore", "retinanet_plugin"):
        setup_logger(name=name, abbrev_name={"detectron2": "d2"}.get(name, name))


def to_model_input(cfg: CfgNode, image: np.ndarray) -> torch.Tensor:
    """(H, W, C) image, already in ``INPUT.FORMAT``, to the model's (C, H', W') input tensor:
    the test-time augmentations of detectron2's ``DatasetMapper(cfg, is_train=False)``
    (``ResizeShortestEdge`` to ``MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``), applied as it applies
    them."""
    aug_input = T.AugInput(image)
    T.AugmentationList(build_augmentation(cfg, is_train=False))(aug_input)
    return torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))


def load_model(cfg: CfgNode) -> FocalRetinaNet:
    """Builds the config's model in eval mode and loads ``MODEL.WEIGHTS`` through
    :class:`RetinaNetCheckpointer` (which refuses a checkpoint with another class count)."""
    model = build_model(cfg)
    if not isinstance(model, FocalRetinaNet):
        raise ValueError(
            f"MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}; these tools need "
            "FocalRetinaNet"
        )
    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: the model has its initial weights")
    RetinaNetCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def dataset_categories(cfg: CfgNode) -> Tuple[List[str], List[int]]:
    """Class names and COCO category ids of the model's K classes.

    From the first registered dataset of ``DATASETS.TEST`` / ``TRAIN`` with K categories: its
    COCO JSON's categories sorted by id (detectron2's contiguous class i is the i-th of them),
    else its ``thing_classes`` with ids 0..K-1. Without such a dataset: "class 0", "class 1", ...

    Returns:
        list[str]: K names; list[int]: K category ids, for COCO-results files.
    """
    num_classes = cfg.MODEL.RETINANET.NUM_CLASSES
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        if name not in DatasetCatalog.list():
            continue
        meta = MetadataCatalog.get(name)
        categories = _json_categories(meta.json_file) if meta.get("json_file") else None
        if categories is None and meta.get("thing_classes") is not None:
            categories = list(enumerate(meta.thing_classes))
        if categories is None:
            continue
        if len(categories) == num_classes:
            return [n for _, n in categories], [i for i, _ in categories]
        logger.warning(
            "dataset %s has %d categories, MODEL.RETINANET.NUM_CLASSES is %d: not using them",
            name, len(categories), num_classes,
        )
    return [f"class {i}" for i in range(num_classes)], list(range(num_classes))


def _json_categories(json_file: str) -> Optional[List[Tuple[int, str]]]:
    try:
        with open(json_file) as f:
            categories = json.load(f)["categories"]
    except (OSError, ValueError, KeyError) as e:
        logger.warning("cannot read the categories of %s: %s", json_file, e)
        return None
    return sorted((c["id"], c["name"]) for c in categories)
