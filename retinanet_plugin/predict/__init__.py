"""FocalRetinaNet on images, folders, globs and videos, as the evaluator runs it
(:func:`predict`; its command line is :mod:`retinanet_plugin.tools.predict`).

``cfg`` is a YAML config (CfgNode) or a Python (lazy) one; each key below has its lazy
counterpart, read by the same code as ``train_net.py``'s lazy path: the test loader's mapper
(``dataloader.test.mapper``), the datasets of ``dataloader.test`` / ``train`` (registered by the
config), the model's ``num_classes`` and test-time keys, ``dataloader.tta`` for ``TEST.AUG.*``.

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
``categories_from``; ``test_augmentation``: null, or the ``TEST.AUG`` sizes and flip used;
``backend``: ``{"name": "eager"}``, or the exported file's runtime and path; ``tiles``: null, or
``--tile`` and ``--tile-overlap``).
Both JSON files are written however the run ends (an error, Ctrl-C, a SIGTERM), with every image
processed until then. Inputs that cannot be read are logged by name and skipped.

Modules: :mod:`.inputs` (files, folders, globs, videos, :class:`Frame`), :mod:`.dataset_ids`
(inputs matched to a dataset's image ids), :mod:`.runner` (:func:`evaluation_model`,
:class:`Predictor`), :mod:`.writer` (drawings and the JSON files), :mod:`.progress`.
"""

import itertools
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from detectron2.structures import Instances

from ..data.mapper import UNREADABLE_IMAGE_ERRORS
from ..tools.model_setup import (
    dataset_categories,
    dataset_classes,
    dataset_view,
    test_mapper,
    to_model_input,
)
from .backends import ExportedModel, exported_predictor
from .dataset_ids import log_image_ids, match_dataset
from .inputs import (
    IMAGE_EXTENSIONS,
    OWN_IDS,
    VIDEO_EXTENSIONS,
    Frame,
    count_frames,
    expand_inputs,
    image_frame,
    is_video,
    read_video,
    video_fps,
)
from .progress import Progress
from .runner import Predictor, evaluation_model
from .tiles import DEFAULT_OVERLAP, TiledPredictor
from .writer import FALLBACK_EXTENSION, IMAGES_FILE, RESULTS_FILE, Writer

__all__ = [
    "FALLBACK_EXTENSION",
    "IMAGES_FILE",
    "IMAGE_EXTENSIONS",
    "OWN_IDS",
    "RESULTS_FILE",
    "VIDEO_EXTENSIONS",
    "Frame",
    "Predictor",
    "Progress",
    "TiledPredictor",
    "Writer",
    "evaluation_model",
    "expand_inputs",
    "is_video",
    "match_dataset",
    "predict",
    "read_video",
]

# The tool's logger, so the log lines read as those of ``python -m retinanet_plugin.tools.predict``.
logger = logging.getLogger("retinanet_plugin.tools.predict")


def predict(
    cfg,
    model,
    inputs: Sequence[str],
    out_dir: str,
    *,
    batch_size: int = 1,
    draw_thresh: float = 0.5,
    tile: Optional[int] = None,
    tile_overlap: Optional[float] = None,
) -> Tuple[List[str], Dict[str, Any]]:
    """Run ``model`` on every file of ``inputs`` and write the outputs to ``out_dir``.

    ``model`` is the eager model, or an exported file (:class:`~.backends.ExportedModel`, from
    :func:`~.backends.load_backend`), which gets each image at its original size.

    ``model`` runs as the evaluator runs it (:func:`evaluation_model`: with ``TEST.AUG.ENABLED``,
    with test-time augmentation). The JSON files are written however this returns or raises,
    with every image done by then.

    With ``tile`` (px), each image and video frame is predicted by overlapping windows of that
    size sharing ``tile_overlap`` of it (default 0.25), each window through the same mapper
    resize and model as an untiled image, merged in the whole image's pixels
    (:class:`TiledPredictor`; an image no larger than a window is predicted whole, as untiled).

    Raises:
        ValueError: a tile size or overlap out of range, or ``tile`` with ``batch_size`` > 1
            (windows run one at a time), before any input is read.
        UnsupportedKeyError: before any input is read, for a test-time key the path cannot
            honour.

    Returns:
        list[str]: inputs that could not be read (patterns matching nothing, unreadable images
        or videos), each already logged as an error; dict: a summary (``images``, ``detections``,
        ``images_per_s``, ``results_file``, ``images_file``).
    """
    exported = isinstance(model, ExportedModel)  # --backend onnxruntime / torchscript
    size_divisibility = 1 if exported else model.backbone.size_divisibility
    postprocessing = model.postprocessing  # the eager model's: TTA and tiles read the same keys
    if tile is None and tile_overlap is not None:
        raise ValueError("--tile-overlap needs --tile SIZE")
    if tile is not None:
        if batch_size > 1:
            raise ValueError(
                f"--tile runs its windows one at a time: drop --batch-size {batch_size}"
            )
        tile_overlap = DEFAULT_OVERLAP if tile_overlap is None else tile_overlap
        TiledPredictor.check_arguments(tile, tile_overlap, size_divisibility)
    if exported:  # the file resizes each image itself and runs no TTA
        predictor, test_augmentation = exported_predictor(cfg, model, batch_size), None
    else:
        model, test_augmentation = evaluation_model(cfg, model)
    files, failed = expand_inputs(inputs)
    for pattern in failed:
        logger.error("no such file, folder or glob match: %s", pattern)
    dataset, records = match_dataset(cfg, [f for f in files if not is_video(f)])
    if dataset is None:
        categories = model.categories if exported else dataset_categories(cfg)
    else:
        categories = dataset_classes(dataset, dataset_view(cfg).MODEL.RETINANET.NUM_CLASSES)
    # train_net.py's test-loader mapper: its image format (INPUT.FORMAT) and resize.
    mapper = test_mapper(cfg)
    image_format = mapper.image_format
    writer = Writer(
        out_dir, image_format, categories, draw_thresh, test_augmentation,
        backend={"name": model.backend, "file": model.path} if exported else None,
        tiles=None if tile is None else {"size": tile, "overlap": tile_overlap},
    )
    if not exported:
        predictor = Predictor(model, batch_size, size_divisibility)
    tiler = None
    if tile is not None:
        tiler = _tiled_predictor(cfg, predictor, mapper, tile, tile_overlap, postprocessing)
    if batch_size > 1 and test_augmentation is None and not exported:
        logger.info(
            "--batch-size %d: the evaluator runs one image at a time; batched convolutions may "
            "round differently, so scores and boxes may differ from COCOEvaluator's in the last "
            "bits", batch_size,
        )
    total = sum(count_frames(f) if is_video(f) else 1 for f in files)
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
                fps[path] = video_fps(path)
                frames = read_video(path, image_format)
                try:
                    first = next(frames)
                except OSError as e:
                    logger.error("cannot read %s, skipped: %s", path, e)
                    failed.append(path)
                    continue
                for index, image in enumerate(itertools.chain([first], frames)):
                    height, width = image.shape[:2]
                    model_inputs = {
                        "image": to_model_input(cfg, image, mapper.augmentations),
                        "height": height, "width": width, "image_id": next_id,
                    }
                    frame = Frame(path, image, model_inputs, index)
                    emit([(frame, tiler(image))] if tiler else predictor.add(frame))
                    next_id += 1
                emit(predictor.flush())  # a video's frames go to its own writer
                continue
            try:
                frame = image_frame(path, mapper, records, dataset, next_id)
            except UNREADABLE_IMAGE_ERRORS + (ValueError,) as e:
                logger.error("cannot read %s, skipped: %s", path, e)
                failed.append(path)
                continue
            next_id += frame.id_from == OWN_IDS
            emit([(frame, tiler(frame.image))] if tiler else predictor.add(frame))
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
    log_image_ids(writer.images, dataset)
    summary = {
        "images": progress.count,
        "detections": len(writer.results),
        "images_per_s": progress.rate(),
        "results_file": results_file,
        "images_file": images_file,
    }
    return failed, summary


def _tiled_predictor(cfg, predictor: Predictor, mapper, size, overlap, postprocessing):
    """:class:`TiledPredictor` over the untiled path: each window is a frame of ``predictor``
    (batch size 1), read by the test loader's augmentations as a video frame is."""
    def run_window(image):
        height, width = image.shape[:2]
        inputs = {"image": to_model_input(cfg, image, mapper.augmentations),
                  "height": height, "width": width}
        ((_, instances),) = predictor.add(Frame("", image, inputs))
        return instances

    tiler = TiledPredictor(
        run_window, size, overlap,
        postprocessing=postprocessing, size_divisibility=predictor.size_divisibility,
    )
    logger.info(
        "--tile %d: windows of %d px sharing at least %d px (--tile-overlap %g), each resized and "
        "predicted as an image; boxes cut by a window edge handed to the window that sees them "
        "whole, cross-window duplicates removed at IoU > %g, at most %d detections per %dx%d px "
        "of image", size, size, tiler.overlap_px, tiler.overlap, postprocessing.nms_thresh,
        postprocessing.max_detections, size, size,
    )
    return tiler
