"""A picture of detections next to ground truth, to see at a glance what a model learnt."""

import json
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

__all__ = ["draw_detections", "draw_prediction_grid", "save_prediction_grid", "tile_grid"]

# BGR, as cv2 writes them.
GROUND_TRUTH_COLOR = (0, 255, 0)


def _draw_tile(
    record: Dict[str, Any],
    predictions: Sequence[Dict[str, Any]],
    score_thresh: float,
    class_names: Sequence[str],
    id_to_index: Dict[int, int],
    min_side: int,
) -> np.ndarray:
    image = cv2.imread(record["file_name"], cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {record['file_name']}")
    # Small tiles are enlarged (whole factors) so that labels on dense boxes stay legible.
    scale = max(1, int(np.ceil(min_side / max(1, min(image.shape[:2])))))
    if scale > 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    for ann in record.get("annotations", []):
        x0, y0, x1, y1 = (v * scale for v in
                          BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS))
        cv2.rectangle(image, (int(x0), int(y0)), (int(x1), int(y1)), GROUND_TRUTH_COLOR, 1)
    kept = [p for p in predictions if p["score"] >= score_thresh]
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (p["bbox"] for p in kept)],
                     dtype=np.float64).reshape(-1, 4) * scale  # COCO results are XYWH
    classes = np.array([id_to_index.get(p.get("category_id", 0), p.get("category_id", 0))
                        for p in kept], dtype=np.int64)
    names = [str(n) for n in class_names]
    names += [f"class {i}" for i in range(len(names), int(classes.max(initial=-1)) + 1)]
    image = draw_detections(image, boxes, np.array([p["score"] for p in kept]), classes, names)
    name = os.path.basename(record["file_name"])
    name = name if len(name) <= 28 else "..." + name[-25:]
    caption = (f"{name}: {len(record.get('annotations', []))} gt (green), {len(kept)} det "
               f">= {score_thresh:.2f}")
    _caption(image, caption)
    return image


def _caption(image: np.ndarray, text: str) -> None:
    """White text on a black band along the top edge, in place."""
    (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
    cv2.rectangle(image, (0, 0), (min(image.shape[1], tw + 8), th + baseline + 6), (0, 0, 0),
                  cv2.FILLED)
    cv2.putText(image, text, (4, th + 3), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1,
                cv2.LINE_AA)


def draw_prediction_grid(
    dataset_dicts: Sequence[Dict[str, Any]],
    coco_results: Sequence[Dict[str, Any]],
    *,
    score_thresh: float = 0.3,
    max_images: int = 8,
    columns: int = 4,
    class_names: Sequence[str] = (),
    dataset_id_to_contiguous_id: Optional[Dict[int, int]] = None,
    min_side: int = 700,
) -> np.ndarray:
    """Tiles of a dataset with ground truth (green, thin) and detections labelled with their
    class name and score (one colour per class, see :func:`draw_detections`).

    Args:
        dataset_dicts: detectron2 dataset records (``file_name``, ``image_id``, ``annotations``).
        coco_results: detections in COCO results format (``image_id``, XYWH ``bbox``,
            ``score``), e.g. ``coco_instances_results.json`` written by ``COCOEvaluator``.
        score_thresh: detections below this score are not drawn.
        max_images: the first ``max_images`` records are drawn.
        columns: tiles per row.
        class_names: the dataset's ``thing_classes`` (detections of a class without a name are
            labelled "class i").
        dataset_id_to_contiguous_id: the dataset's ``thing_dataset_id_to_contiguous_id``: the
            results' ``category_id`` are dataset ids, mapped back to class indices with it.
        min_side: tiles whose shorter side is smaller are enlarged by a whole factor to reach
            it, so that the labels of dense small boxes stay legible.

    Returns:
        ndarray: (H, W, 3) uint8 BGR image; tiles of different sizes are padded with black.
    """
    if not dataset_dicts:
        raise ValueError("no images to draw")
    by_image: Dict[Any, List[Dict[str, Any]]] = defaultdict(list)
    for pred in coco_results:
        by_image[pred["image_id"]].append(pred)
    tiles = [
        _draw_tile(record, by_image[record["image_id"]], score_thresh, class_names,
                   dataset_id_to_contiguous_id or {}, min_side)
        for record in dataset_dicts[:max_images]
    ]
    return tile_grid(tiles, columns)


def tile_grid(tiles: Sequence[np.ndarray], columns: int) -> np.ndarray:
    """(H, W, 3) tiles in rows of ``columns``, each in a cell of the largest tile's size, padded
    with black."""
    cell_h = max(t.shape[0] for t in tiles)
    cell_w = max(t.shape[1] for t in tiles)
    columns = min(columns, len(tiles))
    rows = (len(tiles) + columns - 1) // columns
    grid = np.zeros((rows * cell_h, columns * cell_w, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        y, x = (i // columns) * cell_h, (i % columns) * cell_w
        grid[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    return grid


def save_prediction_grid(
    dataset_name: str, results_json: str, out_path: str, **kwargs: Any
) -> str:
    """Draws :func:`draw_prediction_grid` for a registered dataset and writes it to ``out_path``.

    Args:
        dataset_name: a name in detectron2's ``DatasetCatalog``.
        results_json: COCO results file of detections on that dataset.
        out_path: image file to write (format from its extension, e.g. ``.png``).
        kwargs: passed to :func:`draw_prediction_grid`.

    Returns:
        str: ``out_path``.
    """
    with open(results_json) as f:
        coco_results = json.load(f)
    records = DatasetCatalog.get(dataset_name)  # loading a COCO json fills the id mapping
    metadata = MetadataCatalog.get(dataset_name)
    kwargs.setdefault("class_names", metadata.get("thing_classes", []))
    kwargs.setdefault("dataset_id_to_contiguous_id",
                      metadata.get("thing_dataset_id_to_contiguous_id", {}))
    grid = draw_prediction_grid(records, coco_results, **kwargs)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    if not cv2.imwrite(out_path, grid):
        raise OSError(f"cannot write {out_path}")
    return out_path


# Distinct BGR colours for classes, cycled when there are more classes.
_CLASS_COLORS = (
    (0, 0, 255), (255, 128, 0), (0, 200, 0), (255, 0, 255), (0, 200, 255),
    (255, 255, 0), (128, 0, 255), (0, 128, 255), (128, 255, 0), (255, 0, 128),
)


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    class_names: Sequence[str],
    *,
    score_thresh: float = 0.0,
    labels: Optional[Sequence[str]] = None,
    color: Optional[Tuple[int, int, int]] = None,
) -> np.ndarray:
    """Boxes with "class score" labels on a copy of ``image``.

    Line width and font scale grow with the image's size (1 px and 0.4 at 400x400, 3 px and
    0.72 at 1280x1280, 7 px and 1.18 at 4000x3000), so labels stay readable on small tiles and
    large photos alike; each class has its own colour; labels sit on a filled background above
    the box (inside it at the top edge of the image), moved left where they would run past the
    right edge.

    Args:
        image: (H, W, 3) uint8 BGR.
        boxes: (D, 4) XYXY pixels; scores: (D,); classes: (D,) indices into ``class_names``.
        class_names: K names.
        score_thresh: detections scoring below this are not drawn.
        labels: (D,) texts to write instead of "class score" (e.g. ground truth's names); an
            empty text: the box alone.
        color: one BGR colour for every box instead of the class colours.

    Returns:
        ndarray: (H, W, 3) uint8 BGR.
    """
    out = np.ascontiguousarray(image).copy()
    side = (out.shape[0] * out.shape[1]) ** 0.5  # 400 for a 400x400 image
    thickness = max(1, round(side / 500))
    # Text grows slower than the image: dense small objects in a large photo keep legible,
    # non-overlapping labels more often.
    font_scale = 0.4 * (side / 400) ** 0.5
    font_thickness = 1 if font_scale < 0.8 else 2
    for i, (box, score, cls) in enumerate(zip(boxes, scores, classes)):
        if score < score_thresh:
            continue
        box_color = color or _CLASS_COLORS[int(cls) % len(_CLASS_COLORS)]
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        cv2.rectangle(out, (x0, y0), (x1, y1), box_color, thickness)
        label = labels[i] if labels is not None else f"{class_names[int(cls)]} {float(score):.2f}"
        if not label:
            continue
        (tw, th), baseline = cv2.getTextSize(
            label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, font_thickness
        )
        top = y0 - th - baseline if y0 - th - baseline >= 0 else y0
        left = max(0, min(x0, out.shape[1] - tw))  # the whole label inside the image
        cv2.rectangle(out, (left, top), (left + tw, top + th + baseline), box_color, cv2.FILLED)
        cv2.putText(
            out, label, (left, top + th), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255),
            font_thickness, cv2.LINE_AA,
        )
    return out
