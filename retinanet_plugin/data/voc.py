"""Pascal VOC annotation files: parsing, and checking the boxes against their image.

VOC boxes are read as DeepForest reads them: continuous pixel coordinates with
``0 <= xmin < xmax <= width``. A box outside the image or of zero/negative size is an **error**,
not clipped: it means the annotation belongs to another image or another coordinate convention,
and clipping would hide that.
"""

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import cv2
import numpy as np

__all__ = ["VocAnnotation", "VocObject", "parse_voc_xml", "read_voc_image"]

PathLike = Union[str, os.PathLike]


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


def read_voc_image(ann: VocAnnotation, image_path: Optional[PathLike]) -> Tuple[Path, np.ndarray]:
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
