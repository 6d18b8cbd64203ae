"""Run a FocalRetinaNet checkpoint on images, folders, globs and videos.

Example::

    python -m retinanet_plugin.tools.predict \\
        --config-file configs/demo_deepforest_mobilenet_v2_fpn.yaml \\
        --weights output/demo/model_final.pth --input datasets/deepforest/images clip.mp4 \\
        --output output/predict

Image files go through the mapper of ``train_net.py``'s test loader
(``build_dataset_mapper(cfg, is_train=False)``: the plugin's ``read_image`` in ``INPUT.FORMAT``,
``ResizeShortestEdge`` to ``MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``), the boxes are mapped back to the
original image, and the COCO results are made by the conversion ``COCOEvaluator`` uses
(:mod:`retinanet_plugin.evaluation.results`). An image of a registered dataset of the config
(``DATASETS.TEST``, then ``TRAIN``, registered as ``train_net.py`` registers them; matched by its
path under the dataset's image root) gets the dataset's image id and category ids, so the results
file equals ``COCOEvaluator``'s for those images and can be scored against the dataset. Other
inputs and video frames get ids of predict's own, which ``images.json`` and the log say.

With ``TEST.AUG.ENABLED True`` (a trailing override), the model runs with test-time
augmentation, wrapped in :class:`FocalRetinaNetWithTTA` exactly as ``train_net.py``'s
``Trainer.test_with_TTA`` wraps it (``TEST.AUG.MIN_SIZES``, ``MAX_SIZE``, ``FLIP``): the results
file then equals the evaluator's ``inference_TTA/`` results, and the log and ``images.json``
(``"test_augmentation"``) say so. Each test-time key is checked against the path that runs
(:meth:`PostProcessing.check`, "eager" or "tta") before any image is read.

Up to ``--batch-size`` consecutive inputs run as one batch when they pad to the same size
(padding a smaller image to a larger one's size would change its detections). The evaluator runs
one image at a time; on CPU, oneDNN's convolutions round differently for a batch of two than for
one image, so batched scores and boxes can differ from the evaluator's in the last bits.

Writes to ``--output``: the drawn images (same file names; ``.png`` for an extension OpenCV
cannot write, e.g. ``.jfif``, ``.tga`` or none, logged), one annotated ``.mp4`` per video,
``coco_instances_results.json`` (COCO results: image_id, category_id, XYWH bbox, score) and
``images.json`` (COCO ``images`` with the id, ``id_from`` (the dataset's name, or "predict"),
file name, size and, for video frames, the frame index of each input; ``categories`` and
``categories_from``; ``test_augmentation``: null, or the ``TEST.AUG`` sizes and flip used).
Both JSON files are written however the run ends (an error, Ctrl-C, a SIGTERM), with every image
processed until then. Inputs that cannot be read are logged by name and skipped; the exit code is
then 1.
"""

import argparse
import contextlib
import glob
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import convert_image_to_rgb, convert_PIL_to_numpy
from detectron2.structures import Instances

from ..data.mapper import (
    UNREADABLE_IMAGE_ERRORS,
    RobustDatasetMapper,
    build_dataset_mapper,
    read_image,
)
from ..evaluation.results import instances_to_coco_results
from ..postprocess import PostProcessing
from ..test_time_augmentation import FocalRetinaNetWithTTA
from ..visualize import draw_detections
from .model_setup import (
    Categories,
    config_datasets,
    dataset_categories,
    dataset_classes,
    load_cfg,
    load_model,
    setup_logging,
    to_model_input,
)

try:  # an optional nicety: without tqdm, progress is logged
    from tqdm import tqdm
except ImportError:
    tqdm = None

logger = logging.getLogger("retinanet_plugin.tools.predict")  # not __name__: "__main__" under -m

IMAGE_EXTENSIONS = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
VIDEO_EXTENSIONS = {".avi", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".webm"}
RESULTS_FILE = "coco_instances_results.json"
IMAGES_FILE = "images.json"
OWN_IDS = "predict"  # images.json's "id_from" of an id that is predict's own, not a dataset's
FALLBACK_EXTENSION = ".png"  # for drawings of inputs whose extension OpenCV cannot write


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
    image: np.ndarray  # (H, W, C) in INPUT.FORMAT, original size, for the drawing
    # The model's input, as the test loader gives it: "image" (C, H', W') resized, "height" and
    # "width" of the original, "image_id".
    inputs: Dict[str, Any]
    frame_index: Optional[int] = None  # position in a video
    id_from: str = OWN_IDS  # the dataset whose image id this is, or OWN_IDS

    @property
    def image_id(self) -> int:
        return self.inputs["image_id"]


def match_dataset(cfg, files: Sequence[str]) -> Tuple[Optional[str], Dict[str, Dict[str, Any]]]:
    """The dataset that ``files`` are images of.

    The first dataset of ``DATASETS.TEST``, then ``DATASETS.TRAIN`` (registered), with
    ``MODEL.RETINANET.NUM_CLASSES`` classes, that has a record whose ``file_name`` is one of
    ``files`` (same real path). Only datasets whose ``image_root`` holds one of the files are
    loaded.

    Returns:
        The dataset's name (None without one) and its records by real path of the image.
    """
    paths = {os.path.realpath(f) for f in files}
    for name in config_datasets(cfg):
        root = MetadataCatalog.get(name).get("image_root")
        prefix = os.path.join(os.path.realpath(root), "") if root else None
        if prefix is None or not any(p.startswith(prefix) for p in paths):
            continue
        logger.info("Inputs under the image root of dataset %s: loading it for image ids", name)
        try:
            records = DatasetCatalog.get(name)
        # What detectron2's COCO loader raises on a missing or malformed file.
        except (OSError, ValueError, KeyError, AssertionError) as e:
            logger.warning("cannot load dataset %s to match image ids: %s", name, e)
            continue
        by_path = {os.path.realpath(r["file_name"]): r for r in records}
        if paths & by_path.keys() and dataset_classes(name, cfg.MODEL.RETINANET.NUM_CLASSES):
            return name, by_path
    return None, {}


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
    """Batches :class:`Frame` s of equal padded size and runs the model on them.

    Args:
        model: the detector, or its :class:`FocalRetinaNetWithTTA` wrapper.
        batch_size (int): frames per call of ``model``.
        size_divisibility (int): the backbone's; frames that pad to the same size batch.
    """

    def __init__(self, model, batch_size: int, size_divisibility: int):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.size_divisibility = max(1, size_divisibility)
        self._pending: List[Frame] = []

    def _padded_size(self, tensor: torch.Tensor) -> Tuple[int, int]:
        d = self.size_divisibility
        return (-(-tensor.shape[-2] // d) * d, -(-tensor.shape[-1] // d) * d)

    def add(self, frame: Frame) -> List[Tuple[Frame, Instances]]:
        """Queue ``frame``; returns the detections of the batch this completes, if any."""
        done = []
        if self._pending and self._padded_size(self._pending[0].inputs["image"]) != (
            self._padded_size(frame.inputs["image"])
        ):
            done = self.flush()
        self._pending.append(frame)
        if len(self._pending) >= self.batch_size:
            done += self.flush()
        return done

    @torch.no_grad()
    def flush(self) -> List[Tuple[Frame, Instances]]:
        """Run the queued frames; returns each with its detections (on the CPU, boxes in
        original pixels)."""
        if not self._pending:
            return []
        batch, self._pending = self._pending, []
        outputs = self.model([frame.inputs for frame in batch])
        return [(frame, out["instances"].to("cpu")) for frame, out in zip(batch, outputs)]


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
        self,
        out_dir: str,
        image_format: str,
        categories: Categories,
        draw_thresh: float,
        test_augmentation: Optional[Dict[str, Any]] = None,
    ):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.image_format = out_dir, image_format
        self.categories = categories
        self.test_augmentation = test_augmentation
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


def _image_frame(
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


def _log_image_ids(images: Sequence[Dict[str, Any]], dataset: Optional[str]) -> None:
    own = [im["id"] for im in images if im["id_from"] == OWN_IDS]
    if dataset is not None:
        logger.info(
            "%d of %d images are images of dataset %s: their image ids and category ids are the "
            "dataset's", len(images) - len(own), len(images), dataset,
        )
    if not own:
        return
    if dataset is None:
        logger.info(
            "Image ids are predict's own (%d..%d; images.json names each file): no input is an "
            "image of a registered dataset of DATASETS.TEST / TRAIN (matched by its path under "
            "the dataset's image root)", min(own), max(own),
        )
        return
    logger.warning(
        "%d of %d images are not in dataset %s: their ids (%d..%d, after the dataset's) are "
        "predict's own (\"id_from\": \"%s\" in images.json)",
        len(own), len(images), dataset, min(own), max(own), OWN_IDS,
    )


def evaluation_model(cfg, model) -> Tuple[torch.nn.Module, Optional[Dict[str, Any]]]:
    """The model as ``train_net.py`` evaluates it: itself, or with ``TEST.AUG.ENABLED`` wrapped
    in :class:`FocalRetinaNetWithTTA` as ``Trainer.test_with_TTA`` wraps it.

    Raises:
        UnsupportedKeyError: a test-time key that the path (eager or TTA) cannot honour, named
            with the override that runs without it (:meth:`PostProcessing.check`).

    Returns:
        The model to run, and for ``images.json`` the augmentation (None without).
    """
    if not cfg.TEST.AUG.ENABLED:
        PostProcessing.from_config(cfg).check("eager")
        return model, None
    PostProcessing.from_config(cfg).check("tta")
    augmentation = {
        "min_sizes": list(cfg.TEST.AUG.MIN_SIZES),
        "max_size": cfg.TEST.AUG.MAX_SIZE,
        "flip": cfg.TEST.AUG.FLIP,
    }
    logger.info(
        "TEST.AUG.ENABLED: test-time augmentation (shortest edges %s, max size %d, flip %s; "
        "FocalRetinaNetWithTTA as train_net.py's Trainer.test_with_TTA), so the results are "
        "those of the evaluator's inference_TTA/, not inference/",
        augmentation["min_sizes"], augmentation["max_size"], augmentation["flip"],
    )
    return FocalRetinaNetWithTTA(cfg, model), augmentation


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

    ``model`` runs as the evaluator runs it (:func:`evaluation_model`: with ``TEST.AUG.ENABLED``,
    with test-time augmentation). The JSON files are written however this returns or raises,
    with every image done by then.

    Raises:
        UnsupportedKeyError: before any input is read, for a test-time key the path cannot
            honour.

    Returns:
        list[str]: inputs that could not be read (patterns matching nothing, unreadable images
        or videos), each already logged as an error; dict: a summary (``images``, ``detections``,
        ``images_per_s``, ``results_file``, ``images_file``).
    """
    size_divisibility = model.backbone.size_divisibility
    model, test_augmentation = evaluation_model(cfg, model)
    files, failed = expand_inputs(inputs)
    for pattern in failed:
        logger.error("no such file, folder or glob match: %s", pattern)
    dataset, records = match_dataset(cfg, [f for f in files if not is_video(f)])
    if dataset is None:
        categories = dataset_categories(cfg)
    else:
        categories = dataset_classes(dataset, cfg.MODEL.RETINANET.NUM_CLASSES)
    writer = Writer(out_dir, cfg.INPUT.FORMAT, categories, draw_thresh, test_augmentation)
    predictor = Predictor(model, batch_size, size_divisibility)
    if batch_size > 1 and test_augmentation is None:
        logger.info(
            "--batch-size %d: the evaluator runs one image at a time; batched convolutions may "
            "round differently, so scores and boxes may differ from COCOEvaluator's in the last "
            "bits", batch_size,
        )
    mapper = build_dataset_mapper(cfg, is_train=False)  # train_net.py's test-loader mapper
    total = sum(_count_frames(f) if is_video(f) else 1 for f in files)
    progress = Progress(total)
    fps: Dict[str, float] = {}
    next_id = max((r["image_id"] for r in records.values()), default=0) + 1

    def emit(done: List[Tuple[Frame, Instances]]) -> None:
        for frame, instances in done:
            writer.add(frame, instances, fps.get(frame.source, 0.0))
        progress.update(len(done))

    finished = False
    try:
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
                    height, width = image.shape[:2]
                    model_inputs = {"image": to_model_input(cfg, image), "height": height,
                                    "width": width, "image_id": next_id}
                    emit(predictor.add(Frame(path, image, model_inputs, index)))
                    next_id += 1
                emit(predictor.flush())  # a video's frames go to its own writer
                continue
            try:
                frame = _image_frame(path, mapper, records, dataset, next_id)
            except UNREADABLE_IMAGE_ERRORS + (ValueError,) as e:
                logger.error("cannot read %s, skipped: %s", path, e)
                failed.append(path)
                continue
            next_id += frame.id_from == OWN_IDS
            emit(predictor.add(frame))
        emit(predictor.flush())
        finished = True
    finally:
        progress.close()
        results_file, images_file = writer.finish()
        if not finished:
            logger.error(
                "Stopped after %d images; their results are in %s and %s",
                len(writer.images), results_file, images_file,
            )
    _log_image_ids(writer.images, dataset)
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


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (``kill``, a job scheduler's stop) raises SystemExit in the main thread, so
    :func:`predict` writes the results so far as it does on any other exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    with _sigterm_as_exit():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
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
