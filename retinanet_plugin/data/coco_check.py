"""Checks a COCO instances JSON, and the image files it names, before detectron2 trains on it.

detectron2 reads a COCO file lazily and trusts it: a missing or truncated image crashes the run
when the loader first reaches it (possibly hours in), a size that disagrees with the file raises
a bare ``SizeMismatchError``, and boxes of zero size, NaN or outside the image silently train a
wrong model. :func:`check_coco_json` finds all of these at once, before the first step, and names
the JSON file, the image (id and file name) and the annotation id of each problem.

Image files are checked at one of two depths:

* ``"header"`` (default): the file exists, Pillow recognises it from its header, the size it
  declares (after the EXIF orientation that detectron2 applies when loading) equals the JSON's
  ``width`` x ``height``, and JPEG / PNG files end with their end marker (``FFD9`` /
  ``IEND``), which a truncated file lacks. Nothing is decoded: a header and the file's last bytes
  are read, so 100k images take seconds to a minute, mostly file-system latency.
* ``"decode"``: the above, and every image is fully decoded, as the data loader would.

Command line: ``python -m retinanet_plugin.data.coco_check train.json --image-root images``.
"""

import argparse
import json
import logging
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from PIL import Image

__all__ = ["CHECK_MODES", "CocoCheckError", "check_coco_json", "image_size", "validate_coco_json"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

CHECK_MODES = ("off", "header", "decode")
# EXIF orientations 5-8 transpose the image: detectron2 (and any viewer) shows it as H x W.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112
# Files end with these markers; a few writers append padding or metadata after them, so the
# marker is looked for in the last bytes rather than required at the very end.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
_TAIL_BYTES = 4096
# Boxes may exceed the image by rounding (COCO's own JSONs do, by fractions of a pixel).
BOX_TOLERANCE = 0.5


class CocoCheckError(ValueError):
    """A COCO JSON or one of its images is not fit for training; the message lists every
    problem found (up to a limit), one per line."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def _ends_with_marker(f: BinaryIO, image_format: Optional[str]) -> bool:
    marker = _END_MARKERS.get(image_format or "")
    if marker is None:
        return True  # no cheap test for this format; "decode" mode catches it
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - _TAIL_BYTES))
    return marker in f.read()


def _exif_orientation(image: Image.Image) -> int:
    # Pillow's PNG getexif() decodes the whole image to look for an eXIf chunk after the pixels;
    # one before them (the usual place) is already in image.info from the header read.
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return image.getexif().get(_EXIF_ORIENTATION, 1)


def image_size(path: PathLike, *, decode: bool = False) -> Tuple[int, int, int]:
    """The size of an image as detectron2's loader will see it, from its header by default.

    Args:
        path: the image file.
        decode: decode the whole image too (finds corrupt data in the middle of a file).

    Returns:
        (width, height, orientation): width and height after the EXIF orientation is applied
        (detectron2's ``read_image`` applies it), and the EXIF orientation (1 when absent).

    Raises:
        FileNotFoundError: no such file.
        OSError: not an image Pillow can read, or truncated; the message says which.
    """
    with open(path, "rb") as f:  # FileNotFoundError propagates
        try:
            image = Image.open(f)
            width, height = image.size
            image_format = image.format
            orientation = _exif_orientation(image)
            if decode:
                image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            # Pillow raises SyntaxError for some broken PNGs, ValueError for bad headers.
            raise OSError(f"cannot be read as an image ({type(e).__name__}: {e})") from None
        truncated = not decode and not _ends_with_marker(f, image_format)
    if truncated:
        raise OSError(
            f"is truncated: a {image_format} file must end with "
            f"{_END_MARKERS[image_format]!r} and this one does not"
        )
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return width, height, orientation


def _check_image_file(
    json_path: Path, img: Mapping[str, Any], image_root: Path, decode: bool
) -> Optional[str]:
    file_path = image_root / img["file_name"]
    where = f"{json_path}: image id {img['id']} ({img['file_name']})"
    try:
        width, height, orientation = image_size(file_path, decode=decode)
    except FileNotFoundError:
        return f"{where}: image file {file_path} not found"
    except OSError as e:
        return f"{where}: image file {file_path} {e}"
    expected = (img.get("width"), img.get("height"))
    if expected == (width, height) or not all(_is_int(v) for v in expected):
        return None
    message = (
        f"{where}: the JSON says {expected[0]}x{expected[1]} (width x height) but the file is "
        f"{width}x{height}"
    )
    if orientation != 1:
        message += f" after its EXIF orientation {orientation}, which detectron2 applies on load"
        if expected == (height, width):
            message += (
                "; the JSON has the size before rotation: width, height and boxes must be given "
                "in the rotated image, as it is displayed"
            )
    return message


def _check_image_files(
    json_path: Path, images: List[Mapping[str, Any]], image_root: Path, mode: str, threads: int
) -> List[str]:
    """Checks the files in ``threads`` contiguous slices (one task each: a task per image costs
    more in thread-pool locking than a header read), errors in image order."""
    decode = mode == "decode"
    step = max(1, -(-len(images) // max(1, threads)))

    def check(start: int) -> List[str]:
        found = (
            _check_image_file(json_path, img, image_root, decode)
            for img in images[start : start + step]
        )
        return [e for e in found if e is not None]

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return [e for part in pool.map(check, range(0, len(images), step)) for e in part]


def _check_categories(path: Path, coco: Mapping[str, Any]) -> Tuple[set, List[str]]:
    cat_ids: set = set()
    errors = []
    for cat in coco["categories"]:
        if not (
            isinstance(cat, dict) and _is_int(cat.get("id")) and isinstance(cat.get("name"), str)
        ):
            errors.append(f"{path}: category {cat!r}: needs an integer 'id' and a string 'name'")
        elif cat["id"] in cat_ids:
            errors.append(f"{path}: category id {cat['id']}: duplicate id")
        else:
            cat_ids.add(cat["id"])
    return cat_ids, errors


def _check_images(path: Path, coco: Mapping[str, Any]) -> Tuple[Dict[int, Any], List[str]]:
    """Checks the image entries; returns the well-formed ones by id, and the errors."""
    images: Dict[int, Any] = {}
    errors = []
    for img in coco["images"]:
        iid = img.get("id") if isinstance(img, dict) else None
        where = f"{path}: image id {iid!r}"
        if not isinstance(img, dict) or not _is_int(iid):
            errors.append(f"{where}: needs a unique integer 'id'")
            continue
        if iid in images:
            errors.append(f"{where}: duplicate id (also {images[iid].get('file_name')!r})")
            continue
        if not isinstance(img.get("file_name"), str):
            errors.append(f"{where}: needs a string 'file_name'")
            continue
        where = f"{path}: image id {iid} ({img['file_name']})"
        if not all(_is_int(img.get(k)) and img[k] > 0 for k in ("width", "height")):
            errors.append(f"{where}: needs positive integer 'width' and 'height'")
        images[iid] = img
    return images, errors


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
    if not all(math.isfinite(v) for v in bbox):
        return errors + [f"{where}: bbox {bbox} has a non-finite value (NaN or infinity)"]
    x, y, w, h = bbox
    width, height = img.get("width", math.inf), img.get("height", math.inf)
    if w <= 0 or h <= 0:
        errors.append(f"{where}: bbox {bbox} has zero or negative size")
    elif (
        x < -BOX_TOLERANCE
        or y < -BOX_TOLERANCE
        or x + w > width + BOX_TOLERANCE
        or y + h > height + BOX_TOLERANCE
    ):
        errors.append(f"{where}: bbox {bbox} lies outside the {width}x{height} image")
    return errors


def _load(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: COCO JSON file not found")
    try:
        coco = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoCheckError(f"{path}: not a COCO JSON file (cannot parse JSON: {e})") from None
    keys = ("images", "annotations", "categories")
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in keys):
        raise CocoCheckError(f"{path}: not a COCO instances file (needs lists {', '.join(keys)})")
    return coco


def check_coco_json(
    path: PathLike,
    image_root: Optional[PathLike] = None,
    *,
    mode: str = "header",
    num_classes: Optional[int] = None,
    num_classes_key: str = "num_classes",
    require_annotations: bool = False,
    max_errors: int = 20,
    num_threads: int = 8,
) -> Dict[str, Any]:
    """Checks a COCO instances JSON and its image files; see the module docstring.

    Checked: the three top-level lists; at least one image; unique integer image, annotation
    and category ids; each image's ``file_name`` and positive ``width`` / ``height``; each
    annotation's ``image_id`` and ``category_id`` exist; each box ``[x, y, w, h]`` is finite,
    has ``w, h > 0`` and lies inside its image (within :data:`BOX_TOLERANCE` px); and, unless
    ``mode`` is ``"off"``, each image file (see :func:`image_size`). Images without annotations
    are valid negatives.

    Args:
        path: the JSON file.
        image_root: directory that ``file_name`` is relative to; default the JSON's directory.
        mode: ``"header"``, ``"decode"`` or ``"off"`` (JSON only, image files not opened).
        num_classes: when given, the number of categories must equal it.
        num_classes_key: what to call ``num_classes`` in the error (a config key).
        require_annotations: at least one annotation must exist (a training set).
        max_errors: how many problems the message lists at most.
        num_threads: image files are opened by this many threads (file-system latency bound).

    Returns:
        dict: the parsed JSON.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CocoCheckError: (a ``ValueError``) every problem found, up to ``max_errors``, one line
            each, naming the JSON file, the image id and file name, and the annotation id.
    """
    if mode not in CHECK_MODES:
        raise ValueError(f"mode must be one of {CHECK_MODES}, got {mode!r}")
    path = Path(path)
    image_root = Path(image_root) if image_root is not None else path.parent
    coco = _load(path)

    cat_ids, errors = _check_categories(path, coco)
    if num_classes is not None and num_classes != len(coco["categories"]):
        errors.append(
            f"{path}: {len(coco['categories'])} categories but {num_classes_key} is "
            f"{num_classes}; set {num_classes_key} to {len(coco['categories'])} (or fix the "
            "categories), otherwise the classifier has the wrong number of outputs"
        )
    images, image_errors = _check_images(path, coco)
    errors += image_errors
    if not coco["images"]:
        errors.append(f"{path}: no images: the dataset is empty")
    seen: set = set()
    for ann in coco["annotations"]:
        errors += _check_annotation(path, ann, images, cat_ids)
        aid = ann.get("id") if isinstance(ann, dict) else None
        if aid in seen:
            errors.append(f"{path}: annotation id {aid}: duplicate id")
        seen.add(aid)
    if require_annotations and coco["images"] and not coco["annotations"]:
        errors.append(f"{path}: no annotations: nothing to train on")

    if mode != "off":
        errors += _check_image_files(path, list(images.values()), image_root, mode, num_threads)

    if errors:
        more = f"\n... and {len(errors) - max_errors} more" if len(errors) > max_errors else ""
        raise CocoCheckError("\n".join(errors[:max_errors]) + more)
    logger.info(
        "%s: %d images, %d annotations, %d categories: OK (image files: %s)",
        path,
        len(coco["images"]),
        len(coco["annotations"]),
        len(coco["categories"]),
        mode,
    )
    return coco


def validate_coco_json(
    path: PathLike, image_root: Optional[PathLike] = None, *, max_errors: int = 20
) -> Dict[str, Any]:
    """:func:`check_coco_json` with header reads of the image files (its name before the
    checker grew into a module of its own)."""
    return check_coco_json(path, image_root, mode="header", max_errors=max_errors)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Checks COCO JSON files from the command line; exit status 1 when any fails."""
    parser = argparse.ArgumentParser(
        prog="python -m retinanet_plugin.data.coco_check",
        description="Check COCO instances JSON files and their images before training.",
    )
    parser.add_argument("json_files", nargs="+", help="COCO instances JSON files")
    parser.add_argument(
        "--image-root", default=None, help="folder file_name is relative to (default: the JSON's)"
    )
    parser.add_argument("--mode", choices=CHECK_MODES, default="header")
    parser.add_argument("--num-classes", type=int, default=None, help="expected category count")
    args = parser.parse_args(argv)
    status = 0
    for json_file in args.json_files:
        try:
            coco = check_coco_json(
                json_file, args.image_root, mode=args.mode, num_classes=args.num_classes
            )
        except (CocoCheckError, FileNotFoundError) as e:
            print(e, file=sys.stderr)
            status = 1
            continue
        print(
            f"{json_file}: {len(coco['images'])} images, {len(coco['annotations'])} annotations, "
            f"{len(coco['categories'])} categories: OK (image files: {args.mode})"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
