"""Ground-truth boxes as training sees them: read from a dataset, crowd and empty boxes
dropped, resized to every training size."""

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.structures import BoxMode


def training_short_edges(cfg: CfgNode) -> List[int]:
    """The shorter-edge lengths training resizes to (``INPUT.MIN_SIZE_TRAIN``).

    With ``MIN_SIZE_TRAIN_SAMPLING: choice`` every value; with ``range`` five evenly spaced
    values from the interval's ends (training samples every integer in between).
    """
    sizes = cfg.INPUT.MIN_SIZE_TRAIN
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    style = cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    if style == "range":
        if len(sizes) != 2:
            raise ValueError(
                f"INPUT.MIN_SIZE_TRAIN {sizes} must be [min, max] with "
                "MIN_SIZE_TRAIN_SAMPLING range"
            )
        return sorted({int(round(x)) for x in np.linspace(sizes[0], sizes[1], 5)})
    if style != "choice":
        raise ValueError(f"INPUT.MIN_SIZE_TRAIN_SAMPLING must be choice or range, got {style!r}")
    return [int(s) for s in sizes]


@dataclass
class BoxSet:
    """Ground-truth boxes as training sees them (crowd and empty boxes dropped)."""

    boxes: np.ndarray  # (N, 4) float64 XYXY_ABS in the original image
    image_hw: np.ndarray  # (N, 2) int64 (height, width) of the box's image
    num_images: int
    skipped_crowd: int = 0
    skipped_empty: int = 0
    # (N,) int64, non-decreasing: the image of each box; None = every box alone in its image.
    image_index: Optional[np.ndarray] = None
    # (N,) int64: the category_id of each box, as the dataset dicts hold it; None = unknown.
    category: Optional[np.ndarray] = None


def boxes_from_dicts(dataset_dicts: Sequence[Dict[str, Any]]) -> BoxSet:
    """Collects the boxes of detectron2 dataset dicts (``height``, ``width``, ``annotations``).

    Crowd boxes are dropped, as ``DatasetMapper`` drops them before matching; so are boxes of
    zero width or height, which ``filter_empty_instances`` drops.
    """
    boxes, sizes, index, category, crowd, empty = [], [], [], [], 0, 0
    for i, d in enumerate(dataset_dicts):
        for key in ("height", "width"):
            if key not in d:
                raise ValueError(f"image {d.get('file_name', d.get('image_id'))!r} has no {key!r}")
        for ann in d.get("annotations", []):
            if ann.get("iscrowd", 0):
                crowd += 1
                continue
            box = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
                empty += 1
                continue
            boxes.append(box)
            sizes.append((d["height"], d["width"]))
            index.append(i)
            category.append(int(ann.get("category_id", -1)))
    return BoxSet(
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        image_hw=np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
        num_images=len(dataset_dicts),
        skipped_crowd=crowd,
        skipped_empty=empty,
        image_index=np.asarray(index, dtype=np.int64),
        category=np.asarray(category, dtype=np.int64),
    )


def resize_boxes(box_set: BoxSet, short_edge: int, max_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Boxes and image sizes after ``ResizeShortestEdge(short_edge, max_size)``, as training
    resizes them (``ResizeTransform`` scales x by new_w / w and y by new_h / h)."""
    if short_edge == 0:  # detectron2's NoOpTransform
        return box_set.boxes.copy(), box_set.image_hw.copy()
    new_hw = np.array(
        [ResizeShortestEdge.get_output_shape(int(h), int(w), short_edge, max_size)
         for h, w in box_set.image_hw],
        dtype=np.int64,
    ).reshape(-1, 2)
    scale = new_hw / np.maximum(box_set.image_hw, 1)
    boxes = box_set.boxes * np.concatenate([scale[:, 1:], scale[:, :1]] * 2, axis=1)
    return boxes, new_hw


def dataset_class_names(name: str) -> Dict[int, str]:
    """``category_id`` -> class name of the dicts :func:`load_dataset_dicts` returns: a COCO
    JSON file's ``categories`` (its ids are kept as they are), or a registered dataset's
    ``thing_classes`` (its dicts hold contiguous ids); empty when the dataset names none."""
    if name.endswith(".json"):
        with open(name) as f:
            categories = json.load(f).get("categories", [])
        return {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    classes = MetadataCatalog.get(name).get("thing_classes", None) or []
    return dict(enumerate(map(str, classes)))


def load_dataset_dicts(name: str) -> List[Dict[str, Any]]:
    """A registered dataset's dicts, or a COCO JSON file's (``name`` ending in ``.json``; its
    images are not read). The DeepForest demo datasets are registered on demand, as
    ``train_net.py`` does."""
    if name.endswith(".json"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"--dataset {name}: no such COCO JSON file")
        return load_coco_json(name, image_root="")
    from ..data.deepforest import DATASET_NAMES, register_deepforest

    if name in DATASET_NAMES.values() and name not in DatasetCatalog.list():
        register_deepforest()
    if name not in DatasetCatalog.list():
        raise KeyError(
            f"dataset {name!r} is not registered; pass a registered name (DATASETS.TRAIN) or a "
            "COCO JSON file"
        )
    return DatasetCatalog.get(name)
