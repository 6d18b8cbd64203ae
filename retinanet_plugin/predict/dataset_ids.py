"""Inputs matched to a registered dataset of the config, so that an image of the dataset gets
its image id and category ids, as ``COCOEvaluator`` writes them."""

import logging
import os
from typing import Any, Dict, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..tools.model_setup import config_datasets, dataset_classes, dataset_view
from .inputs import OWN_IDS

__all__ = ["log_image_ids", "match_dataset"]

# The tool's logger, so the log lines read as those of ``python -m retinanet_plugin.tools.predict``.
logger = logging.getLogger("retinanet_plugin.tools.predict")


def match_dataset(cfg, files: Sequence[str]) -> Tuple[Optional[str], Dict[str, Dict[str, Any]]]:
    """The dataset that ``files`` are images of.

    The first dataset of ``DATASETS.TEST``, then ``DATASETS.TRAIN`` (registered), with
    ``MODEL.RETINANET.NUM_CLASSES`` classes (of a ``.py`` config: the datasets of its
    ``dataloader.test`` / ``train``, the model's ``num_classes``), that has a record whose
    ``file_name`` is one of ``files`` (same real path). Only datasets whose ``image_root`` holds
    one of the files are loaded.

    Returns:
        The dataset's name (None without one) and its records by real path of the image.
    """
    cfg = dataset_view(cfg)
    paths = {os.path.realpath(f) for f in files}
    for name in config_datasets(cfg):
        root = MetadataCatalog.get(name).get("image_root")
        prefix = os.path.join(os.path.realpath(root), "") if root else None
        if prefix is None or not any(p.startswith(prefix) for p in paths):
            continue
        logger.info("Inputs under the image root of dataset %s: loading it for image ids", name)
        try:
            records = DatasetCatalog.get(name)
        # What detectron2's COCO loader raises on a missing or malformed file.
        except (OSError, ValueError, KeyError, AssertionError) as e:
            logger.warning("cannot load dataset %s to match image ids: %s", name, e)
            continue
        by_path = {os.path.realpath(r["file_name"]): r for r in records}
        if paths & by_path.keys() and dataset_classes(name, cfg.MODEL.RETINANET.NUM_CLASSES):
            return name, by_path
    return None, {}


def log_image_ids(images: Sequence[Dict[str, Any]], dataset: Optional[str]) -> None:
    """Says whose ids ``images`` (images.json's entries) carry: ``dataset``'s or predict's own."""
    own = [im["id"] for im in images if im["id_from"] == OWN_IDS]
    if dataset is not None:
        logger.info(
            "%d of %d images are images of dataset %s: their image ids and category ids are the "
            "dataset's", len(images) - len(own), len(images), dataset,
        )
    if not own:
        return
    if dataset is None:
        logger.info(
            "Image ids are predict's own (%d..%d; images.json names each file): no input is an "
            "image of a registered dataset of DATASETS.TEST / TRAIN (matched by its path under "
            "the dataset's image root)", min(own), max(own),
        )
        return
    logger.warning(
        "%d of %d images are not in dataset %s: their ids (%d..%d, after the dataset's) are "
        "predict's own (\"id_from\": \"%s\" in images.json)",
        len(own), len(images), dataset, min(own), max(own), OWN_IDS,
    )
