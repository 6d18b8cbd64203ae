"""Writing the raw-image graph (:class:`RawImageRetinaNet`) to ONNX or TorchScript, running it,
and checking it against the eager model run as predict runs it.

Shape shorthand:
    N: images; H, W: their size (one size per batch)
    D: ``TEST.DETECTIONS_PER_IMAGE``
"""

import contextlib
import logging
import warnings
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.onnx import symbolic_helper

from detectron2.data import transforms as T

from ..meta_arch import FocalRetinaNet
from .exporter import (
    EXPORT_FORMATS,
    ONNX_OPSET,
    Detections,
    ParityReport,
    _describe,
    compare_detections,
    write_complete,
)
from .graph import ExportableRetinaNet
from .metadata import torchscript_extra_files, write_onnx_metadata
from .raw_graph import RawImageDetections, RawImagePreprocess, RawImageRetinaNet, RawInputSpec

__all__ = [
    "OUTPUT_NAMES",
    "RawOutputs",
    "check_raw_parity",
    "eager_raw_detections",
    "export_raw_model",
    "load_raw_exported",
    "unpad",
]

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
# TensorRT EfficientNMS's outputs.
OUTPUT_NAMES = ("num_detections", "boxes", "scores", "classes")
# num_detections (N,), boxes (N, D, 4), scores (N, D), classes (N, D)
RawOutputs = Tuple[Tensor, Tensor, Tensor, Tensor]


def export_raw_model(
    model: FocalRetinaNet,
    spec: RawInputSpec,
    sample_images: Tensor,
    path: str,
    export_format: str,
    metadata: Optional[Dict[str, Any]] = None,
) -> torch.jit.ScriptModule:
    """Write the graph from raw images to detections in their pixels (:class:`RawImageRetinaNet`)
    to ``path``.

    The resize and the detector are traced (the first on ``sample_images``, the second on its
    first image resized), then the loop over the batch is scripted around them, so N, H and W
    are all free; the ONNX file holds the loop as a ``Loop`` node.

    Args:
        model (FocalRetinaNet): the detector, weights loaded.
        spec (RawInputSpec): the test loader's format and resize (:func:`raw_input_spec`).
        sample_images (Tensor): (N, H, W, 3) uint8 BGR.
        path (str): output file; its folder is created; the file appears only once complete.
        export_format (str): "onnx" or "torchscript".
        metadata (dict, optional): stored in the file (:mod:`.metadata`).

    Returns:
        ScriptModule: the scripted graph (sharing ``model``'s weights).

    Raises:
        UnsupportedKeyError, OSError, ExportError: as :func:`export_model`.
    """
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {export_format!r}")
    if sample_images.dim() != 4 or sample_images.shape[-1] != 3:
        raise ValueError(
            f"sample images must be (N, H, W, 3), got shape {tuple(sample_images.shape)}"
        )
    detector = ExportableRetinaNet(model)  # refuses keys the graph cannot express
    preprocess = RawImagePreprocess(spec)
    sample_images = sample_images.to(model.device)
    scripted = None

    def write(partial: str) -> None:
        nonlocal scripted
        with torch.no_grad(), warnings.catch_warnings():
            # Tracer warnings about Python values are expected (detectron2's shape checks); a
            # real problem shows up in the parity check.
            warnings.simplefilter("ignore")
            scripted = _script(detector, preprocess, sample_images)
            _save(scripted, sample_images, partial, export_format, metadata)

    write_complete(
        path, write, f"FocalRetinaNet ({_describe(model)}) from raw images to {export_format}"
    )
    logger.info("Wrote %s model (raw images) to %s", export_format, path)
    return scripted


def _script(
    detector: ExportableRetinaNet, preprocess: RawImagePreprocess, sample_images: Tensor
) -> torch.jit.ScriptModule:
    traced_preprocess = torch.jit.trace(preprocess, (sample_images,), check_trace=False)
    resized, size = preprocess(sample_images)
    detections = RawImageDetections(detector)
    traced_detections = torch.jit.trace(detections, (resized[0], size), check_trace=False)
    return torch.jit.script(RawImageRetinaNet(traced_preprocess, traced_detections))


def _save(
    scripted: torch.jit.ScriptModule,
    sample_images: Tensor,
    path: str,
    export_format: str,
    metadata: Optional[Dict[str, Any]],
) -> None:
    if export_format == "torchscript":
        extra = torchscript_extra_files(metadata) if metadata else None
        torch.jit.save(scripted, path, _extra_files=extra)
        return
    with _transpose_of_unknown_rank():
        _onnx_export(scripted, sample_images, path)
    if metadata is not None:
        write_onnx_metadata(path, metadata)


def _transpose(g, self):
    rank = symbolic_helper._get_tensor_rank(self)
    if rank is not None and rank < 2:
        return self
    # Unknown rank: the graph's t() is that of XYXY box columns (N, 4); the parity check that
    # follows the export catches any other.
    return g.op("Transpose", self, perm_i=[1, 0])


@contextlib.contextmanager
def _transpose_of_unknown_rank() -> Iterator[None]:
    """The exporter writes ``Tensor.t()`` of a tensor of unknown rank as Identity (right for
    rank < 2 only); inside the batch loop's body, ranks are unknown, so soft-NMS's and box
    voting's coordinate columns (``boxes.t()``, retinanet_plugin/nms.py) came out untransposed.
    For the raw export only, ``t`` of an unknown rank becomes a 2-D Transpose."""
    torch.onnx.register_custom_op_symbolic("aten::t", _transpose, ONNX_OPSET)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::t", ONNX_OPSET)


def _onnx_export(scripted: torch.jit.ScriptModule, sample_images: Tensor, path: str) -> None:
    batch = {0: "batch"}
    torch.onnx.export(
        scripted,
        (sample_images,),
        path,
        dynamo=False,
        opset_version=ONNX_OPSET,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_axes={
            INPUT_NAME: {0: "batch", 1: "height", 2: "width"},
            **{name: batch for name in OUTPUT_NAMES},
        },
    )


def load_raw_exported(path: str, export_format: str) -> Callable[[np.ndarray], RawOutputs]:
    """A function running an exported raw-image file on a batch: onnxruntime for ONNX,
    ``torch.jit.load`` for TorchScript, both on CPU.

    Returns:
        callable: (N, H, W, 3) uint8 BGR array -> (num_detections, boxes, scores, classes) as
        CPU tensors.
    """
    if export_format == "torchscript":
        module = torch.jit.load(path, map_location="cpu")

        def run_torchscript(images: np.ndarray) -> RawOutputs:
            with torch.no_grad():
                outputs = module(torch.from_numpy(np.ascontiguousarray(images)))
            return tuple(t.cpu() for t in outputs)

        return run_torchscript
    if export_format == "onnx":
        import onnxruntime  # only needed to run ONNX files

        options = onnxruntime.SessionOptions()
        # onnxruntime warns that it cannot rename equal weights inside the batch loop's
        # subgraph (a skipped optimisation, not an error).
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )

        def run_onnx(images: np.ndarray) -> RawOutputs:
            outputs = session.run(None, {INPUT_NAME: np.ascontiguousarray(images)})
            return tuple(torch.from_numpy(o) for o in outputs)

        return run_onnx
    raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {export_format!r}")


def unpad(outputs: RawOutputs, index: int) -> Detections:
    """Image ``index``'s detections of a batch, without the zero padding."""
    count = int(outputs[0][index])
    return tuple(o[index, :count] for o in outputs[1:])


def eager_raw_detections(
    model: FocalRetinaNet,
    spec: RawInputSpec,
    augmentations: T.AugmentationList,
    image: np.ndarray,
) -> Detections:
    """The eager model's detections of one BGR image, as predict gets them: converted to
    ``INPUT.FORMAT``, resized by the test loader's augmentations, boxes mapped back to the
    image by the model's ``detector_postprocess``.

    Args:
        image (ndarray): (H, W, 3) uint8 BGR.
        augmentations: ``test_augmentations(cfg)``.
    """
    from ..tools.model_setup import to_model_input  # tools import this package

    converted = image[:, :, ::-1] if spec.input_format == "RGB" else image
    height, width = image.shape[:2]
    inputs = {
        "image": to_model_input(None, np.ascontiguousarray(converted), augmentations),
        "height": height,
        "width": width,
    }
    with torch.no_grad():
        instances = model([inputs])[0]["instances"].to("cpu")
    return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def check_raw_parity(
    model: FocalRetinaNet,
    spec: RawInputSpec,
    augmentations: T.AugmentationList,
    run_exported: Callable[[np.ndarray], RawOutputs],
    images: Sequence[np.ndarray],
    *,
    box_atol: float = 1e-3,
    score_atol: float = 1e-5,
) -> ParityReport:
    """:func:`check_parity` for the raw-image graph: each (H, W, 3) uint8 BGR image, run alone
    (a batch of one), against :func:`eager_raw_detections`; in original pixels.

    Raises:
        ExportError: the first image that differs.
    """
    report = ParityReport(len(images), 0, 0.0, 0.0)
    for image in images:
        size = f"{image.shape[1]}x{image.shape[0]}"
        compare_detections(
            report,
            unpad(run_exported(image[None]), 0),
            eager_raw_detections(model, spec, augmentations, image),
            size,
            _describe(model),
            box_atol=box_atol,
            score_atol=score_atol,
        )
    return report
