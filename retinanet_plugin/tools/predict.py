"""Run a FocalRetinaNet checkpoint on images, folders, globs and videos.

Example::

    python -m retinanet_plugin.tools.predict \\
        --config-file configs/demo_deepforest_mobilenet_v2_fpn.yaml \\
        --weights output/demo/model_final.pth --input datasets/deepforest/images clip.mp4 \\
        --output output/predict

Images go through detectron2's test-time preprocessing (``DatasetMapper(cfg, is_train=False)``:
``read_image`` in ``INPUT.FORMAT``, ``ResizeShortestEdge`` to ``MIN_SIZE_TEST`` /
``MAX_SIZE_TEST``) and the boxes are mapped back to the original image, so the detections are
those ``COCOEvaluator`` scores for the same images. Up to ``--batch-size`` consecutive inputs run
as one batch when they pad to the same size (padding a smaller image to a larger one's size would
change its detections).

Writes to ``--output``: the drawn images (same file names), one annotated ``.mp4`` per video,
``coco_instances_results.json`` (COCO results: image_id, category_id, XYWH bbox, score) and
``images.json`` (COCO ``images`` with the id, file name, size and, for video frames, the frame
index of each input, and ``categories``). Inputs that cannot be read are logged by name and
skipped; the exit code is then 1.
"""

import argparse
import glob
import itertools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from PIL import Image

from detectron2.data.detection_utils import convert_image_to_rgb, convert_PIL_to_numpy, read_image
from detectron2.structures import BoxMode

from ..visualize import draw_detections
from .model_setup import dataset_categories, load_cfg, load_model, setup_logging, to_model_input

try:  # an optional nicety: without tqdm, progress is logged
    from tqdm import tqdm
except ImportError:
    tqdm = None

logger = logging.getLogger("retinanet_plugin.tools.predict")  # not __name__: "__main__" under -m

IMAGE_EXTENSIONS = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
VIDEO_EXTENSIONS = {".avi", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".webm"}
RESULTS_FILE = "coco_instances_results.json"
IMAGES_FILE = "images.json"


def expand_inputs(patterns: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Files named by ``patterns``: files as given, folders' image and video files (not
    recursive, sorted), glob matches (sorted, ``**`` recursive).

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
            key = os.path.abspath(match)
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
    image: np.ndarray  # (H, W, C) in INPUT.FORMAT, original size
    frame_index: Optional[int] = None  # position in a video
    image_id: int = 0


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


class Predictor:
    """Batches :class:`Frame` s of equal padded size and runs the model on them."""

    def __init__(self, cfg, model, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.cfg = cfg
        self.model = model
        self.batch_size = batch_size
        self.size_divisibility = max(1, model.backbone.size_divisibility)
        self._pending: List[Tuple[Frame, torch.Tensor]] = []

    def _padded_size(self, tensor: torch.Tensor) -> Tuple[int, int]:
        d = self.size_divisibility
        return (-(-tensor.shape[-2] // d) * d, -(-tensor.shape[-1] // d) * d)

    def add(self, frame: Frame) -> List[Tuple[Frame, Dict[str, np.ndarray]]]:
        """Queue ``frame``; returns the detections of the batch this completes, if any."""
        tensor = to_model_input(self.cfg, frame.image)
        done = []
        if self._pending and self._padded_size(self._pending[0][1]) != self._padded_size(tensor):
            done = self.flush()
        self._pending.append((frame, tensor))
        if len(self._pending) >= self.batch_size:
            done += self.flush()
        return done

    @torch.no_grad()
    def flush(self) -> List[Tuple[Frame, Dict[str, np.ndarray]]]:
        """Run the queued frames; returns each with its boxes (XYXY, original pixels), scores
        and classes."""
        if not self._pending:
            return []
        batch, self._pending = self._pending, []
        inputs = [
            {"image": t, "height": f.image.shape[0], "width": f.image.shape[1]} for f, t in batch
        ]
        outputs = self.model(inputs)
        done = []
        for (frame, _), output in zip(batch, outputs):
            instances = output["instances"].to("cpu")
            done.append(
                (
                    frame,
                    {
                        "boxes": instances.pred_boxes.tensor.numpy(),
                        "scores": instances.scores.numpy(),
                        "classes": instances.pred_classes.numpy(),
                    },
                )
            )
        return done


class Progress:
    """tqdm when installed, else an INFO line every few seconds; both show images/s."""

    def __init__(self, total: int, interval_s: float = 5.0):
        self.total, self.count, self.interval_s = total, 0, interval_s
        self.start = self.last_log = time.perf_counter()
        self.bar = tqdm(total=total, unit="img", desc="predict") if tqdm is not None else None

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last_log >= self.interval_s:
            self.last_log = now
            logger.info("%d/%d images, %.2f images/s", self.count, self.total, self.rate())

    def rate(self) -> float:
        return self.count / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
        self, out_dir: str, image_format: str, class_names: Sequence[str],
        category_ids: Sequence[int], draw_thresh: float,
    ):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.image_format = out_dir, image_format
        self.class_names, self.category_ids = list(class_names), list(category_ids)
        self.draw_thresh = draw_thresh
        self.results: List[Dict[str, Any]] = []
        self.images: List[Dict[str, Any]] = []
        self._taken: set = set()
        self._video: Optional[cv2.VideoWriter] = None
        self._video_source: Optional[str] = None
        self.written: List[str] = []

    def output_path(self, source: str, video: bool) -> str:
        name = os.path.basename(source)
        if video:
            name = os.path.splitext(name)[0] + ".mp4"
        path = _unique_path(self.out_dir, name, self._taken)
        if os.path.exists(path) and os.path.samefile(path, source):
            raise ValueError(f"--output would overwrite the input {source}; choose another folder")
        return path

    def add(self, frame: Frame, det: Dict[str, np.ndarray], fps: float = 0.0) -> None:
        height, width = frame.image.shape[:2]
        entry = {"id": frame.image_id, "file_name": frame.source, "height": height, "width": width}
        if frame.frame_index is not None:
            entry["frame"] = frame.frame_index
        self.images.append(entry)
        xywh = BoxMode.convert(det["boxes"].copy(), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
        for box, score, cls in zip(xywh.tolist(), det["scores"].tolist(), det["classes"].tolist()):
            self.results.append(
                {
                    "image_id": frame.image_id,
                    "category_id": self.category_ids[cls],
                    "bbox": box,
                    "score": score,
                }
            )
        bgr = np.ascontiguousarray(convert_image_to_rgb(frame.image, self.image_format)[:, :, ::-1])
        drawn = draw_detections(
            bgr, det["boxes"], det["scores"], det["classes"], self.class_names,
            score_thresh=self.draw_thresh,
        )
        if frame.frame_index is None:
            path = self.output_path(frame.source, video=False)
            if not cv2.imwrite(path, drawn):
                raise OSError(f"cannot write {path}")
            self.written.append(path)
            return
        if self._video_source != frame.source:
            self.close_video()
            path = self.output_path(frame.source, video=True)
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
        self.close_video()
        results_path = os.path.join(self.out_dir, RESULTS_FILE)
        with open(results_path, "w") as f:
            json.dump(self.results, f)
        images_path = os.path.join(self.out_dir, IMAGES_FILE)
        categories = [{"id": i, "name": n} for i, n in zip(self.category_ids, self.class_names)]
        with open(images_path, "w") as f:
            json.dump({"images": self.images, "categories": categories}, f, indent=1)
        return results_path, images_path


def _count_frames(path: str) -> int:
    capture = cv2.VideoCapture(path)
    try:
        return max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
    finally:
        capture.release()


def _video_fps(path: str) -> float:
    capture = cv2.VideoCapture(path)
    try:
        return float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    finally:
        capture.release()


def predict(
    cfg,
    model,
    inputs: Sequence[str],
    out_dir: str,
    *,
    batch_size: int = 1,
    draw_thresh: float = 0.5,
) -> Tuple[List[str], Dict[str, Any]]:
    """Run ``model`` on every file of ``inputs`` and write the outputs to ``out_dir``.

    Returns:
        list[str]: inputs that could not be read (patterns matching nothing, unreadable images
        or videos), each already logged as an error; dict: a summary (``images``, ``detections``,
        ``images_per_s``, ``results_file``, ``images_file``).
    """
    files, failed = expand_inputs(inputs)
    for pattern in failed:
        logger.error("no such file, folder or glob match: %s", pattern)
    names, category_ids = dataset_categories(cfg)
    writer = Writer(out_dir, cfg.INPUT.FORMAT, names, category_ids, draw_thresh)
    predictor = Predictor(cfg, model, batch_size)
    total = sum(_count_frames(f) if is_video(f) else 1 for f in files)
    progress = Progress(total)
    fps: Dict[str, float] = {}
    next_id = 1

    def emit(done: List[Tuple[Frame, Dict[str, np.ndarray]]]) -> None:
        for frame, det in done:
            writer.add(frame, det, fps.get(frame.source, 0.0))
        progress.update(len(done))

    for path in files:
        if is_video(path):
            fps[path] = _video_fps(path)
            frames = read_video(path, cfg.INPUT.FORMAT)
            try:
                first = next(frames)
            except OSError as e:
                logger.error("cannot read %s, skipped: %s", path, e)
                failed.append(path)
                continue
            for index, image in enumerate(itertools.chain([first], frames)):
                emit(predictor.add(Frame(path, image, index, next_id)))
                next_id += 1
            emit(predictor.flush())  # a video's frames go to its own writer
            continue
        try:
            image = read_image(path, format=cfg.INPUT.FORMAT)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three on bad files
            logger.error("cannot read %s, skipped: %s", path, e)
            failed.append(path)
            continue
        emit(predictor.add(Frame(path, image, None, next_id)))
        next_id += 1
    emit(predictor.flush())
    progress.close()
    results_file, images_file = writer.finish()
    summary = {
        "images": progress.count,
        "detections": len(writer.results),
        "images_per_s": progress.rate(),
        "results_file": results_file,
        "images_file": images_file,
    }
    return failed, summary


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="model config (YAML)")
    parser.add_argument("--weights", required=True, help="checkpoint (.pth / .pkl)")
    parser.add_argument(
        "--input", nargs="+", required=True, help="image / video files, folders or globs"
    )
    parser.add_argument("--output", required=True, help="folder for drawings and JSON files")
    parser.add_argument(
        "--score-thresh",
        type=float,
        default=None,
        help="keep detections scoring above this (sets MODEL.RETINANET.SCORE_THRESH_TEST; "
        "default: the config's, as COCOEvaluator uses)",
    )
    parser.add_argument(
        "--draw-thresh", type=float, default=0.5, help="draw detections scoring at least this"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: config's)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config KEY VALUE pairs to override"
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_cfg(
            args.config_file, args.opts, weights=args.weights, device=args.device,
            score_thresh=args.score_thresh,
        )
        model = load_model(cfg)
        failed, summary = predict(
            cfg, model, args.input, args.output, batch_size=args.batch_size,
            draw_thresh=args.draw_thresh,
        )
    except (OSError, ValueError) as e:
        logger.error("%s", e)
        return 2
    logger.info(
        "%d images, %d detections, %.2f images/s; wrote %s and %s",
        summary["images"], summary["detections"], summary["images_per_s"],
        summary["results_file"], summary["images_file"],
    )
    if failed:
        logger.error("%d inputs could not be read: %s", len(failed), ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    setup_logging()  # here, not in main(): callers of main() keep their logging set-up
    sys.exit(main())
