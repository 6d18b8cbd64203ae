"""Predict with an exported file instead of the eager model (``--backend onnxruntime`` /
``torchscript``).

The file is the raw-image graph of ``retinanet_plugin.tools.export`` (input layout
"NHWC_uint8_BGR_raw"): it converts, resizes and post-processes inside, so each frame goes in at
its original size and its boxes come back in its own pixels. :class:`ExportedModel` is the
per-image callable (``image (H, W, 3) uint8 BGR -> Instances``) and, through
:meth:`ExportedModel.predictor`, a drop-in for :class:`~retinanet_plugin.predict.runner.Predictor`
that batches consecutive frames of one size. Its metadata (:mod:`retinanet_plugin.export.metadata`)
gives the class names and category ids, and is checked against the config predict runs with
(:func:`check_metadata`).
"""

import logging
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import yaml

from detectron2.config import CfgNode, instantiate
from detectron2.structures import Boxes, Instances

from ..export.metadata import RAW_LAYOUT, read_metadata
from ..export.raw_export import load_raw_exported, unpad
from ..export.raw_graph import raw_input_spec
from ..postprocess import PostProcessing
from ..tools.model_setup import Categories, test_augmentations, test_mapper
from .inputs import Frame

__all__ = [
    "BACKENDS",
    "ExportedModel",
    "ExportedPredictor",
    "check_metadata",
    "exported_predictor",
    "load_backend",
]

logger = logging.getLogger("retinanet_plugin.tools.predict")

# --backend values, and the export format each runs.
BACKENDS = {"eager": None, "onnxruntime": "onnx", "torchscript": "torchscript"}
# Config keys that do not change what the graph computes.
_IGNORED_KEYS = ("MODEL.WEIGHTS", "MODEL.DEVICE", "OUTPUT_DIR", "SEED", "DATALOADER.", "SOLVER.")


class ExportedModel:
    """An exported raw-image file run by onnxruntime or TorchScript (CPU).

    Args:
        path (str): the file.
        backend (str): "onnxruntime" or "torchscript".
        postprocessing (PostProcessing, optional): the config's test-time keys, for what reads
            them beside the model (predict's ``--tile`` merge).

    Raises:
        MetadataError: the file has no metadata, or not the raw-image layout.
    """

    def __init__(self, path: str, backend: str, postprocessing: Optional[PostProcessing] = None):
        if BACKENDS.get(backend) is None:
            raise ValueError(
                f"backend must be one of {sorted(k for k in BACKENDS if BACKENDS[k])}, got "
                f"{backend!r}"
            )
        self.path, self.backend = path, backend
        self.metadata = read_metadata(path)
        if self.metadata["input_layout"] != RAW_LAYOUT:
            raise ValueError(
                f"{path} takes {self.metadata['input_layout']} input (exported with --input "
                f"resized); predict runs files exported from raw images: export again without "
                "--input resized"
            )
        # A TorchScript file is a zip archive, an ONNX file a protobuf: name the mix-up rather
        # than let the other runtime fail on the bytes.
        is_torchscript = zipfile.is_zipfile(path)
        if is_torchscript != (backend == "torchscript"):
            kind, right = ("a TorchScript", "torchscript") if is_torchscript else (
                "an ONNX", "onnxruntime")
            raise ValueError(f"{path} is {kind} file: use --backend {right}")
        self._run = load_raw_exported(path, BACKENDS[backend])
        self.input_format = self.metadata["input_format"]
        self.postprocessing = postprocessing

    @property
    def categories(self) -> Categories:
        """The classes the file was exported with (names, COCO category ids)."""
        meta = self.metadata
        return Categories(list(meta["class_names"]), list(meta["category_ids"]), None)

    def run_batch(self, images: np.ndarray) -> List[Instances]:
        """Detections of (N, H, W, 3) uint8 BGR images of one size, each in its own pixels."""
        outputs = self._run(images)
        height, width = images.shape[1:3]
        results = []
        for i in range(images.shape[0]):
            boxes, scores, classes = unpad(outputs, i)
            results.append(
                Instances(
                    (height, width),
                    pred_boxes=Boxes(boxes.float()),
                    scores=scores.float(),
                    pred_classes=classes.long(),
                )
            )
        return results

    def __call__(self, image: np.ndarray) -> Instances:
        """Detections of one (H, W, 3) uint8 BGR image, boxes in its pixels."""
        return self.run_batch(np.ascontiguousarray(image)[None])[0]

    def to_bgr(self, image: np.ndarray) -> np.ndarray:
        """An image in the file's ``INPUT.FORMAT`` (as predict reads it) as BGR."""
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        return np.ascontiguousarray(image)

    def predictor(self, batch_size: int) -> "ExportedPredictor":
        return ExportedPredictor(self, batch_size)


class ExportedPredictor:
    """:class:`~retinanet_plugin.predict.runner.Predictor` for an :class:`ExportedModel`:
    consecutive frames of one original size run as one batch of up to ``batch_size``.
    The graph runs each image of a batch alone, so batching does not change any output."""

    def __init__(self, model: ExportedModel, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.model, self.batch_size = model, batch_size
        self.size_divisibility = 1  # the graph pads itself
        self._pending: List[Frame] = []

    def add(self, frame: Frame) -> List[Tuple[Frame, Instances]]:
        """Queue ``frame``; returns the detections of the batch this completes, if any."""
        done = []
        if self._pending and self._pending[0].image.shape != frame.image.shape:
            done = self.flush()
        self._pending.append(frame)
        if len(self._pending) >= self.batch_size:
            done += self.flush()
        return done

    def flush(self) -> List[Tuple[Frame, Instances]]:
        """Run the queued frames; returns each with its detections (boxes in original pixels)."""
        if not self._pending:
            return []
        batch, self._pending = self._pending, []
        images = np.stack([self.model.to_bgr(frame.image) for frame in batch])
        return list(zip(batch, self.model.run_batch(images)))


def exported_predictor(cfg: Any, model: ExportedModel, batch_size: int) -> ExportedPredictor:
    """predict's predictor for an exported file; test-time augmentation, which the file cannot
    run, is refused by its key.

    Raises:
        UnsupportedKeyError / ValueError: ``TEST.AUG.ENABLED True`` or ``dataloader.tta``.
    """
    if isinstance(cfg, CfgNode):
        PostProcessing.from_config(cfg).check("export")
    elif cfg.dataloader.get("tta") is not None:
        raise ValueError(
            f"dataloader.tta: {model.path} has no test-time augmentation; predict with "
            "dataloader.tta=null, or with --backend eager"
        )
    return model.predictor(batch_size)


def load_backend(backend: str, path: str, cfg: Any) -> ExportedModel:
    """The exported file ``path`` for ``--backend``, checked against ``cfg``
    (:func:`check_metadata`)."""
    if isinstance(cfg, CfgNode):
        postprocessing = PostProcessing.from_config(cfg)
        test_amp = cfg.TEST.AMP.PRECISION if cfg.TEST.AMP.ENABLED else None
    else:  # a .py config's keys are its model's constructor arguments
        postprocessing = instantiate(cfg.model).postprocessing
        test_amp = cfg.model.get("test_amp_precision")
    if test_amp is not None:
        # As tools.export refuses it: an exported file runs in float32.
        raise ValueError(
            f"TEST.AMP.ENABLED True (model.test_amp_precision={test_amp!r}) cannot be honoured "
            f"by --backend {backend}: {path} runs in float32; predict with TEST.AMP.ENABLED "
            "False (a .py config: model.test_amp_precision=None), or without --backend"
        )
    model = ExportedModel(path, backend, postprocessing)
    check_metadata(model.metadata, cfg, path)
    return model


def check_metadata(metadata: Dict[str, Any], cfg: Any, path: str) -> None:
    """Refuses a file whose metadata contradicts the config predict reads its images with;
    warns about other differing config keys.

    Refused, by name: another ``INPUT.FORMAT``, test resize, class count, score threshold or
    detection limit than the config's (predict would report the file's detections as the
    config's). Warned: any other differing key of a YAML config (``MODEL.WEIGHTS``, the device,
    the output folder, data-loader and solver keys aside).

    Raises:
        ValueError: the first contradicting entry, with both values.
    """
    spec = raw_input_spec(test_mapper(cfg).image_format, test_augmentations(cfg).augs)
    expected = {
        "input_format": spec.input_format,
        "min_size_test": spec.min_size,
        "max_size_test": spec.max_size,
    }
    if isinstance(cfg, CfgNode):
        num_classes = cfg.MODEL.RETINANET.NUM_CLASSES
        expected["score_thresh_test"] = cfg.MODEL.RETINANET.SCORE_THRESH_TEST
        expected["detections_per_image"] = cfg.TEST.DETECTIONS_PER_IMAGE
    else:
        num_classes = cfg.model.num_classes
        for key, attr in (("score_thresh_test", "test_score_thresh"),
                          ("detections_per_image", "max_detections_per_image")):  # fmt: skip
            if cfg.model.get(attr) is not None:
                expected[key] = cfg.model[attr]
    if len(metadata["class_names"]) != num_classes:
        expected["number of classes"] = num_classes
        metadata = {**metadata, "number of classes": len(metadata["class_names"])}
    for key, value in expected.items():
        got = metadata.get(key)
        same = np.isclose(got, value) if isinstance(value, float) else got == value
        if not same:
            raise ValueError(
                f"{path} was exported with {key} {got!r}, the config {value!r}: export it again "
                "with this config, or predict with the config it was exported with (its "
                "metadata holds it: retinanet_plugin.export.read_metadata)"
            )
    if isinstance(cfg, CfgNode):
        differing = _differing_keys(metadata.get("config", ""), cfg)
        if differing:
            logger.warning(
                "%s was exported with a config that differs from --config-file in %d keys: %s",
                path, len(differing), ", ".join(differing[:10]) + (" ..." if len(differing) > 10
                                                                   else ""),
            )


def _differing_keys(config_text: str, cfg: CfgNode) -> List[str]:
    """Keys whose values differ between two YAML configs (the exported file's, ``cfg``)."""
    try:
        exported = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return ["(the file's config is not YAML)"]
    current = yaml.safe_load(cfg.dump())
    keys: List[str] = []
    _compare(exported if isinstance(exported, dict) else {}, current, "", keys)
    return [k for k in keys if not k.startswith(_IGNORED_KEYS)]


def _compare(a: Dict[str, Any], b: Dict[str, Any], prefix: str, out: List[str]) -> None:
    for key in sorted(set(a) | set(b)):
        name = prefix + str(key)
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            _compare(va, vb, name + ".", out)
        elif va != vb:
            out.append(name)
