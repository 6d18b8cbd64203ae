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

This module fetches, converts (with :mod:`.voc` for the XML and :mod:`.tiling` for tiles and the
COCO JSON), registers and holds the command line; :mod:`.coco_check` checks the result.
"""

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .coco_check import validate_coco_json
from .tiling import (
    DEFAULT_MIN_VISIBILITY,
    DEFAULT_OVERLAP,
    DEFAULT_TILE_SIZE,
    convert_voc_to_coco,
)
from .voc import PathLike, parse_voc_xml
from .wheel_fetch import fetch_from_wheel

# convert_voc_to_coco, parse_voc_xml and validate_coco_json live in .tiling, .voc and .coco_check;
# they stay importable from here for code written before the split.
__all__ = [
    "CLASS_MAP",
    "DATASET_NAMES",
    "SPLITS",
    "THING_CLASSES",
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
