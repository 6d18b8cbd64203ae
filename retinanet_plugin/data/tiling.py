"""Cutting VOC-annotated images into tiles and writing them as one COCO instances JSON.

Large images are cut into ``tile_size`` windows with ``overlap`` pixels shared by neighbours;
the last window in a row or column is shifted back to end at the image edge, so tiles never need
padding. Boxes are clipped to the tile and dropped when less than ``min_visibility`` of their
area remains or a side shrinks below 1 px. Tiles without boxes are kept as negatives.
"""

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from .voc import PathLike, VocObject, parse_voc_xml, read_voc_image

__all__ = ["DEFAULT_MIN_VISIBILITY", "DEFAULT_OVERLAP", "DEFAULT_TILE_SIZE", "convert_voc_to_coco"]

logger = logging.getLogger(__name__)

DEFAULT_TILE_SIZE = 400
DEFAULT_OVERLAP = 100
DEFAULT_MIN_VISIBILITY = 0.5


def _tile_starts(length: int, tile_size: int, stride: int) -> List[int]:
    """Window origins along one axis: every ``stride``, the last one flush with the edge."""
    if length <= tile_size:
        return [0]
    starts = list(range(0, length - tile_size + 1, stride))
    if starts[-1] + tile_size < length:
        starts.append(length - tile_size)
    return starts


def _clip_to_window(
    boxes: np.ndarray, window: Tuple[int, int, int, int], min_visibility: float
) -> Tuple[np.ndarray, np.ndarray]:
    """Clips boxes to a window and keeps those still visible enough.

    Args:
        boxes: (N, 4) float64 XYXY in source-image pixels.
        window: (x0, y0, x1, y1) of the tile in source-image pixels.
        min_visibility: smallest kept fraction of a box's area.

    Returns:
        (keep, clipped): keep is (M,) int64 indices into ``boxes``; clipped is (M, 4) XYXY in
        tile pixels.
    """
    x0, y0, x1, y1 = window
    clipped = np.stack(
        [
            np.clip(boxes[:, 0], x0, x1),
            np.clip(boxes[:, 1], y0, y1),
            np.clip(boxes[:, 2], x0, x1),
            np.clip(boxes[:, 3], y0, y1),
        ],
        axis=1,
    )
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = np.nonzero((w >= 1) & (h >= 1) & (w * h >= min_visibility * area))[0]
    return keep, clipped[keep] - np.array([x0, y0, x0, y0], dtype=np.float64)


def _tile_image(
    image: np.ndarray,
    stem: str,
    objects: Sequence[VocObject],
    image_dir: Path,
    tile_size: int,
    overlap: int,
    min_visibility: float,
) -> Iterator[Tuple[Dict[str, Any], List[Tuple[VocObject, List[float]]]]]:
    """Writes the tiles of one image and yields, per tile, its COCO image entry (without id)
    and the objects it keeps with their XYXY boxes in tile pixels.

    Args:
        image: (H, W, 3) uint8 BGR source image.
        stem: file name stem for the tiles.
        objects: the image's VOC objects, boxes already checked to lie inside it.
    """
    # Tiles of an earlier conversion with other tiling parameters would linger otherwise.
    for stale in image_dir.glob(f"{stem}_x*_y*.png"):
        stale.unlink()
    boxes = np.array([o.box for o in objects], dtype=np.float64).reshape(-1, 4)
    height, width = image.shape[:2]
    stride = tile_size - overlap
    for y0 in _tile_starts(height, tile_size, stride):
        for x0 in _tile_starts(width, tile_size, stride):
            x1, y1 = min(x0 + tile_size, width), min(y0 + tile_size, height)
            file_name = f"{stem}_x{x0}_y{y0}.png"
            if not cv2.imwrite(str(image_dir / file_name), image[y0:y1, x0:x1]):
                raise OSError(f"{image_dir / file_name}: could not write tile")
            keep, clipped = _clip_to_window(boxes, (x0, y0, x1, y1), min_visibility)
            tile = {
                "file_name": file_name,
                "width": x1 - x0,
                "height": y1 - y0,
                "tile_origin": [x0, y0],
            }
            yield tile, [(objects[i], box) for i, box in zip(keep.tolist(), clipped.tolist())]


def _check_tiling(tile_size: int, overlap: int, min_visibility: float) -> None:
    if tile_size <= 0 or not 0 <= overlap < tile_size:
        raise ValueError(
            f"need tile_size > 0 and 0 <= overlap < tile_size, got {tile_size}, {overlap}"
        )
    if not 0 < min_visibility <= 1:
        raise ValueError(f"min_visibility must be in (0, 1], got {min_visibility}")


def convert_voc_to_coco(
    sources: Sequence[Tuple[PathLike, Optional[PathLike]]],
    out_dir: PathLike,
    split: str,
    *,
    class_map: Mapping[str, str],
    tile_size: int = DEFAULT_TILE_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    min_visibility: float = DEFAULT_MIN_VISIBILITY,
    info: Optional[Mapping[str, Any]] = None,
) -> Dict[str, int]:
    """Tiles VOC-annotated images and writes ``<out_dir>/<split>.json`` in COCO format.

    Tiles go to ``<out_dir>/images/<stem>_x<X>_y<Y>.png`` (PNG: lossless, like the sources).
    Category ids are 1..K in the order of first appearance of each output name in ``class_map``.

    Args:
        sources: (xml_path, image_path) pairs; image_path None means ``<filename>`` next to the
            XML. Every source image goes to this one split.
        out_dir: output directory (created).
        split: split name, used for the JSON file name.
        class_map: VOC class name -> output category name. A VOC name not in it is an error.
        tile_size: side of a square tile in pixels; smaller images make one tile of their own
            size.
        overlap: pixels shared by neighbouring tiles.
        min_visibility: a clipped box is kept when at least this fraction of its area remains.
        info: extra entries for the JSON's ``info`` block.

    Returns:
        dict[str, int]: ``source_images``, ``source_boxes``, ``images`` (tiles), ``empty_images``
        (tiles without boxes) and ``boxes`` (annotations written).

    Raises:
        FileNotFoundError, ValueError: bad input (see :func:`parse_voc_xml`; also a missing or
            unreadable image, a box outside its image, a class not in ``class_map``). The
            message names the file and the object; no JSON is written then.
    """
    _check_tiling(tile_size, overlap, min_visibility)
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    category_names = list(dict.fromkeys(class_map.values()))
    category_ids = {name: i + 1 for i, name in enumerate(category_names)}
    images: List[Dict[str, Any]] = []
    annotations: List[Dict[str, Any]] = []
    stats = {"source_images": 0, "source_boxes": 0, "images": 0, "empty_images": 0, "boxes": 0}

    for xml_path, image_path in sources:
        ann = parse_voc_xml(xml_path)
        for obj in ann.objects:
            if obj.name not in class_map:
                raise ValueError(
                    f"{ann.xml_path}: object[{obj.index}] has class {obj.name!r}, which is not "
                    f"one of the known classes {sorted(class_map)}"
                )
        image_path, image = read_voc_image(ann, image_path)
        stats["source_images"] += 1
        stats["source_boxes"] += len(ann.objects)
        for tile, kept in _tile_image(
            image, image_path.stem, ann.objects, image_dir, tile_size, overlap, min_visibility
        ):
            tile["id"] = len(images) + 1
            tile["source_image"] = image_path.name
            images.append(tile)
            stats["empty_images"] += int(not kept)
            for obj, (x0, y0, x1, y1) in kept:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": tile["id"],
                        "category_id": category_ids[class_map[obj.name]],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],  # COCO XYWH, tile pixels
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                        "source_class": obj.name,
                        "source_object": obj.index,
                    }
                )
    stats["images"], stats["boxes"] = len(images), len(annotations)

    coco = {
        "info": {
            "description": f"{split} split, tiled from Pascal VOC",
            "split": split,
            "tile_size": tile_size,
            "overlap": overlap,
            "min_visibility": min_visibility,
            **(info or {}),
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": n} for n, i in category_ids.items()],
    }
    json_path = out_dir / f"{split}.json"
    partial = json_path.with_name(json_path.name + ".partial")
    partial.write_text(json.dumps(coco))
    os.replace(partial, json_path)  # a reader never sees half a file
    logger.info("Wrote %s: %s", json_path, stats)
    return stats
