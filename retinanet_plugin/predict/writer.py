"""What predict writes: drawn images, annotated videos, ``coco_instances_results.json`` (by the
conversion ``COCOEvaluator`` uses) and ``images.json``."""

import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np

from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.structures import Instances

from ..evaluation.results import instances_to_coco_results
from ..tools.model_setup import Categories
from ..visualize import draw_detections
from .inputs import Frame

__all__ = ["FALLBACK_EXTENSION", "IMAGES_FILE", "RESULTS_FILE", "Writer"]

# The tool's logger, so the log lines read as those of ``python -m retinanet_plugin.tools.predict``.
logger = logging.getLogger("retinanet_plugin.tools.predict")

RESULTS_FILE = "coco_instances_results.json"
IMAGES_FILE = "images.json"
FALLBACK_EXTENSION = ".png"  # for drawings of inputs whose extension OpenCV cannot write


def _unique_path(out_dir: str, name: str, taken: set) -> str:
    stem, ext = os.path.splitext(name)
    candidate, i = name, 0
    while candidate in taken:
        i += 1
        candidate = f"{stem}_{i}{ext}"
    taken.add(candidate)
    return os.path.join(out_dir, candidate)


class Writer:
    """Drawn images, annotated videos and the two JSON files."""

    def __init__(
        self,
        out_dir: str,
        image_format: str,
        categories: Categories,
        draw_thresh: float,
        test_augmentation: Optional[Dict[str, Any]] = None,
        *,
        backend: Optional[Dict[str, str]] = None,
        tiles: Optional[Dict[str, Any]] = None,
    ):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.image_format = out_dir, image_format
        self.categories = categories
        self.test_augmentation = test_augmentation
        # How the results were made, for images.json: an exported file ran them, by windows.
        self.backend = backend or {"name": "eager"}
        self.tiles = tiles
        self._category_ids = dict(enumerate(categories.ids))
        self.draw_thresh = draw_thresh
        self.results: List[Dict[str, Any]] = []
        self.images: List[Dict[str, Any]] = []
        self._taken: set = set()
        self._video: Optional[cv2.VideoWriter] = None
        self._video_source: Optional[str] = None
        self.written: List[str] = []

    def output_path(self, source: str, video: bool) -> str:
        name = os.path.basename(source)
        stem = os.path.splitext(name)[0]
        if video:
            name = stem + ".mp4"
        elif not cv2.haveImageWriter(name):
            name = stem + FALLBACK_EXTENSION
            logger.info("OpenCV cannot write %s: its drawing is %s", source, name)
        path = _unique_path(self.out_dir, name, self._taken)
        if os.path.exists(path) and os.path.samefile(path, source):
            raise ValueError(f"--output would overwrite the input {source}; choose another folder")
        return path

    def add(self, frame: Frame, instances: Instances, fps: float = 0.0) -> None:
        """Records ``frame``'s entry and results, then draws its detections."""
        height, width = frame.image.shape[:2]
        entry = {
            "id": frame.image_id, "id_from": frame.id_from, "file_name": frame.source,
            "height": height, "width": width,
        }
        if frame.frame_index is not None:
            entry["frame"] = frame.frame_index
        self.images.append(entry)
        self.results += instances_to_coco_results(instances, frame.image_id, self._category_ids)
        self._draw(frame, instances, fps)

    def _draw(self, frame: Frame, instances: Instances, fps: float) -> None:
        bgr = np.ascontiguousarray(convert_image_to_rgb(frame.image, self.image_format)[:, :, ::-1])
        drawn = draw_detections(
            bgr, instances.pred_boxes.tensor.numpy(), instances.scores.numpy(),
            instances.pred_classes.numpy(), self.categories.names, score_thresh=self.draw_thresh,
        )
        if frame.frame_index is None:
            path = self.output_path(frame.source, video=False)
            try:
                ok = cv2.imwrite(path, drawn)
            except cv2.error as e:
                raise OSError(f"cannot write {path}: {e}") from e
            if not ok:
                raise OSError(f"cannot write {path}")
            self.written.append(path)
            return
        if self._video_source != frame.source:
            self.close_video()
            path = self.output_path(frame.source, video=True)
            height, width = drawn.shape[:2]
            self._video = cv2.VideoWriter(
                path, cv2.VideoWriter_fourcc(*"mp4v"), fps or 25.0, (width, height)
            )
            if not self._video.isOpened():
                raise OSError(f"OpenCV cannot write video {path}")
            self._video_source = frame.source
            self.written.append(path)
        self._video.write(drawn)

    def close_video(self) -> None:
        if self._video is not None:
            self._video.release()
        self._video, self._video_source = None, None

    def finish(self) -> Tuple[str, str]:
        """Closes the video and writes both JSON files (each replaced whole, never half
        written)."""
        self.close_video()
        categories = [{"id": i, "name": n} for i, n in zip(self.categories.ids,
                                                          self.categories.names)]
        images = {
            "images": self.images,
            "categories": categories,
            "categories_from": self.categories.dataset,
            "test_augmentation": self.test_augmentation,
            "backend": self.backend,
            "tiles": self.tiles,
        }
        results_path = os.path.join(self.out_dir, RESULTS_FILE)
        images_path = os.path.join(self.out_dir, IMAGES_FILE)
        _write_json(results_path, self.results)
        _write_json(images_path, images, indent=1)
        return results_path, images_path


def _write_json(path: str, data: Any, indent: Optional[int] = None) -> None:
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(data, f, indent=indent)
    os.replace(partial, path)
