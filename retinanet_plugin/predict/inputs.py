"""The inputs of predict: files, folders and globs expanded, image files read by the test
loader's mapper, videos read frame by frame, each image a :class:`Frame`."""

import glob
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

from detectron2.data.detection_utils import convert_PIL_to_numpy

from ..data.mapper import RobustDatasetMapper, read_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "OWN_IDS",
    "VIDEO_EXTENSIONS",
    "Frame",
    "count_frames",
    "expand_inputs",
    "image_frame",
    "is_video",
    "read_video",
    "video_fps",
]

IMAGE_EXTENSIONS = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
VIDEO_EXTENSIONS = {".avi", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".webm"}
OWN_IDS = "predict"  # images.json's "id_from" of an id that is predict's own, not a dataset's


def expand_inputs(patterns: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Files named by ``patterns``: files as given, folders' image and video files (not
    recursive, sorted), glob matches (sorted, ``**`` recursive).

    A file named twice, under any spelling (a symlink, a symlinked folder), is one input under
    its first spelling: repeats are found by real path, as predict's ``match_dataset`` matches
    files to a dataset's records, so that no dataset image is predicted (and its image id
    written) twice.

    Returns:
        list[str]: the files, in order, without repeats; list[str]: patterns that matched nothing.
    """
    files, unmatched, seen = [], [], set()
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = sorted(
                os.path.join(pattern, name)
                for name in os.listdir(pattern)
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
            )
        elif os.path.exists(pattern):
            matches = [pattern]
        else:
            matches = sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))
        if not matches:
            unmatched.append(pattern)
        for match in matches:
            key = os.path.realpath(match)
            if key not in seen:
                seen.add(key)
                files.append(match)
    return files, unmatched


def is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


@dataclass
class Frame:
    """One image to run the model on."""

    source: str  # input file
    image: np.ndarray  # (H, W, C) in INPUT.FORMAT, original size, for the drawing
    # The model's input, as the test loader gives it: "image" (C, H', W') resized, "height" and
    # "width" of the original, "image_id".
    inputs: Dict[str, Any]
    frame_index: Optional[int] = None  # position in a video
    id_from: str = OWN_IDS  # the dataset whose image id this is, or OWN_IDS

    @property
    def image_id(self) -> int:
        return self.inputs["image_id"]


def image_frame(
    path: str, mapper: RobustDatasetMapper, records: Dict[str, Dict[str, Any]],
    dataset: Optional[str], own_id: int,
) -> Frame:
    """The frame of an image file: read, resized and checked by the test loader's mapper, with
    the dataset's record (its image id, size) when the file is one of its images.

    Raises:
        OSError, SyntaxError, ValueError: the file cannot be decoded, or its size is not its
        record's.
    """
    record = records.get(os.path.realpath(path))
    if record is None:
        dataset_dict, id_from = {"file_name": path, "image_id": own_id}, OWN_IDS
    else:
        dataset_dict = {k: v for k, v in record.items() if k != "annotations"}
        id_from = dataset
    image = read_image(path, format=mapper.image_format)  # the mapper's reader, for the drawing
    return Frame(path, image, mapper(dataset_dict), None, id_from)


def read_video(path: str, image_format: str) -> Iterator[np.ndarray]:
    """Frames of a video in ``image_format`` (as ``read_image`` returns images).

    Raises:
        OSError: OpenCV cannot open the file or decode its first frame.
    """
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise OSError(f"OpenCV cannot open video {path}")
    try:
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                if index == 0:
                    raise OSError(f"OpenCV cannot decode a frame of video {path}")
                return
            index += 1
            if image_format == "BGR":
                yield frame
            else:
                rgb = Image.fromarray(np.ascontiguousarray(frame[:, :, ::-1]))
                yield convert_PIL_to_numpy(rgb, image_format)
    finally:
        capture.release()


def count_frames(path: str) -> int:
    capture = cv2.VideoCapture(path)
    try:
        return max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
    finally:
        capture.release()


def video_fps(path: str) -> float:
    capture = cv2.VideoCapture(path)
    try:
        return float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    finally:
        capture.release()
