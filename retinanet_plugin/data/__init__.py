"""Datasets: COCO JSON checking and registration from the config, the DeepForest demo data
(fetching, Pascal VOC parsing, tiling), and the one dataset mapper every loader builds
(:func:`build_dataset_mapper`).

Nothing is registered at import: :func:`register_deepforest` takes the dataset root and
:func:`register_datasets_from_cfg` the config, so a caller (``train_net.py``, a test) decides
where the data lives.
"""

from .coco_check import CHECK_MODES, CocoCheckError, check_coco_json, image_size, validate_coco_json
from .deepforest import (
    convert_deepforest,
    fetch_deepforest,
    prepare_deepforest,
    register_deepforest,
)
from .mapper import RobustDatasetMapper, build_dataset_mapper, read_image
from .registration import check_datasets, register_datasets_from_cfg
from .tiling import convert_voc_to_coco
from .voc import parse_voc_xml

__all__ = [
    "CHECK_MODES",
    "CocoCheckError",
    "RobustDatasetMapper",
    "build_dataset_mapper",
    "check_coco_json",
    "check_datasets",
    "convert_deepforest",
    "convert_voc_to_coco",
    "fetch_deepforest",
    "image_size",
    "parse_voc_xml",
    "prepare_deepforest",
    "read_image",
    "register_datasets_from_cfg",
    "register_deepforest",
    "validate_coco_json",
]
