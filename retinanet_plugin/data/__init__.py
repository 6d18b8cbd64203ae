"""Datasets: the DeepForest tree-crown demo data and a COCO JSON checker.

Nothing is registered at import: :func:`register_deepforest` takes the dataset root, so a caller
(``train_net.py``, a test) decides where the data lives.
"""

from .crowd_mapper import CrowdDatasetMapper
from .deepforest import (
    convert_deepforest,
    convert_voc_to_coco,
    fetch_deepforest,
    parse_voc_xml,
    prepare_deepforest,
    register_deepforest,
    validate_coco_json,
)

__all__ = [
    "CrowdDatasetMapper",
    "convert_deepforest",
    "convert_voc_to_coco",
    "fetch_deepforest",
    "parse_voc_xml",
    "prepare_deepforest",
    "register_deepforest",
    "validate_coco_json",
]
