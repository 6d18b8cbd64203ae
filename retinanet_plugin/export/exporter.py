"""Writing :class:`ExportableRetinaNet` to ONNX or TorchScript, and checking the file against
the eager model."""

import errno
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from ..meta_arch import FocalRetinaNet
from .graph import ExportableRetinaNet
from .metadata import torchscript_extra_files, write_onnx_metadata

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ParityReport",
    "check_parity",
    "compare_detections",
    "eager_detections",
    "export_model",
    "exported_instances",
    "load_exported",
    "match_detections",
]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "torchscript")
# Opset 17: NonMaxSuppression, TopK with a dynamic k and Range, all present since opset 11, and
# onnxruntime >= 1.11 runs it.
ONNX_OPSET = 17

Detections = Tuple[Tensor, Tensor, Tensor]  # boxes (D, 4), scores (D,), classes (D,)


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported graph does not reproduce it."""


@dataclass
class ParityReport:
    """Largest differences between exported and eager detections over the checked images."""

    num_images: int
    num_detections: int
    max_box_diff: float
    max_score_diff: float


def _describe(model: FocalRetinaNet) -> str:
    return (
        f"backbone {type(model.backbone).__name__}, head {type(model.head).__name__}, anchor "
        f"generator {type(model.anchor_generator).__name__}"
    )


def export_model(
    model: FocalRetinaNet,
    sample_image: Tensor,
    path: str,
    export_format: str,
    metadata: Optional[Dict[str, Any]] = None,
) -> ExportableRetinaNet:
    """Trace ``model``'s whole inference on ``sample_image`` and write it to ``path``.

    The graph's input is one (3, H, W) image, uint8 or float, in ``INPUT.FORMAT``; its outputs
    are ``boxes`` (D, 4), ``scores`` (D,) and ``classes`` (D,) (see :class:`ExportableRetinaNet`).
    H and W are dynamic. Tracing records operators, not Python control flow: a component whose
    output depends on Python-side values of the input (``int(x.shape[-1])``, ``if x.sum() > 0``)
    is frozen at the sample's values, which :func:`check_parity` on another image size exposes.

    Args:
        model (FocalRetinaNet): the detector, weights loaded.
        sample_image (Tensor): (3, H, W) image the graph is traced with.
        path (str): output file (``.onnx`` / ``.ts`` or ``.pt`` by convention); its folder is
            created if missing. The file appears only once complete.
        export_format (str): "onnx" or "torchscript".
        metadata (dict, optional): stored in the file (:mod:`.metadata`, input layout
            "CHW_resized").

    Returns:
        ExportableRetinaNet: the traced module (sharing ``model``'s weights).

    Raises:
        UnsupportedKeyError: a test-time key cannot be expressed in the graph (raised before
            tracing; the message names the key and the override that exports without it).
        OSError: ``path`` cannot be written (found before tracing where possible); the message
            names the path.
        ExportError: tracing or conversion failed; the message names the model's components and
            the underlying error.
    """
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {export_format!r}")
    if sample_image.dim() != 3 or sample_image.shape[0] != 3:
        raise ValueError(f"sample image must be (3, H, W), got shape {tuple(sample_image.shape)}")
    wrapper = ExportableRetinaNet(model)  # refuses keys the graph cannot express
    sample_image = sample_image.to(model.device)
    write_complete(
        path,
        lambda partial: _trace(wrapper, sample_image, partial, export_format, metadata),
        f"FocalRetinaNet ({_describe(model)}) to {export_format}",
    )
    logger.info("Wrote %s model to %s", export_format, path)
    return wrapper


def write_complete(path: str, write: Callable[[str], None], what: str) -> None:
    """Runs ``write(partial)`` into a file beside ``path`` (:func:`_partial_file`), then renames
    it to ``path``: the file appears only when complete.

    Raises:
        ExportError: ``write`` failed ("cannot export <what>: ...").
        OSError: the folder cannot be written, naming ``path``.
    """
    partial = _partial_file(path)
    try:
        write(partial)
    except Exception as e:
        os.remove(partial)
        raise ExportError(f"cannot export {what}: {type(e).__name__}: {e}") from e
    try:
        os.replace(partial, path)
    except OSError as e:
        os.remove(partial)
        raise _write_error(path, e) from e


def _write_error(path: str, error: OSError) -> OSError:
    return OSError(f"cannot write the exported model to {path}: {error.strerror or error}")


def _partial_file(path: str) -> str:
    """Create ``path``'s folder and an empty file beside ``path`` to trace into (renamed to
    ``path`` once complete), so that an unwritable output fails before tracing and an
    interrupted export leaves no truncated model behind."""
    folder, name = os.path.split(os.path.abspath(path))
    partial = os.path.join(folder, f".{name}.{os.getpid()}.part")
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "it is a folder", path)
        os.makedirs(folder, exist_ok=True)
        open(partial, "wb").close()
    except OSError as e:
        raise _write_error(path, e) from e
    return partial


def _trace(
    wrapper: ExportableRetinaNet,
    sample_image: Tensor,
    path: str,
    export_format: str,
    metadata: Optional[Dict[str, Any]] = None,
):
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings about Python values are expected (detectron2's shape checks); a real
        # problem shows up in the parity check.
        warnings.simplefilter("ignore")
        if export_format == "torchscript":
            traced = torch.jit.trace(wrapper, (sample_image,), check_trace=False)
            extra = torchscript_extra_files(metadata) if metadata else None
            torch.jit.save(traced, path, _extra_files=extra)
            return
        torch.onnx.export(
            wrapper,
            (sample_image,),
            path,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["image"],
            output_names=["boxes", "scores", "classes"],
            dynamic_axes={
                "image": {1: "height", 2: "width"},
                "boxes": {0: "detections"},
                "scores": {0: "detections"},
                "classes": {0: "detections"},
            },
        )
    if metadata is not None:
        write_onnx_metadata(path, metadata)


def load_exported(path: str, export_format: str) -> Callable[[Tensor], Detections]:
    """A function running an exported file on one (3, H, W) image: onnxruntime for ONNX,
    ``torch.jit.load`` for TorchScript, both on CPU.

    Returns:
        callable: image -> (boxes, scores, classes) as CPU tensors.
    """
    if export_format == "torchscript":
        module = torch.jit.load(path, map_location="cpu")

        def run_torchscript(image: Tensor) -> Detections:
            with torch.no_grad():
                return tuple(t.cpu() for t in module(image.cpu()))

        return run_torchscript
    if export_format == "onnx":
        import onnxruntime  # only needed to run ONNX files

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

        def run_onnx(image: Tensor) -> Detections:
            outputs = session.run(None, {"image": image.cpu().numpy()})
            return tuple(torch.from_numpy(o) for o in outputs)

        return run_onnx
    raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {export_format!r}")


def exported_instances(
    run_exported: Callable[[Tensor], Detections], inputs: Dict[str, Any]
) -> Instances:
    """An exported graph's detections of one input as the test loader gives it, in the form the
    eager model returns them.

    The graph sees the image at the test resolution, as the model does; its boxes are then
    scaled to the original "height" x "width", clipped and emptied boxes dropped by the eager
    model's own last step (detectron2's ``detector_postprocess``), so that
    :func:`~retinanet_plugin.evaluation.instances_to_coco_results` turns them into the COCO
    results ``COCOEvaluator`` would write for the same detections.

    Args:
        run_exported (callable): from :func:`load_exported`.
        inputs (dict): the test loader's mapper output (``build_dataset_mapper(cfg,
            is_train=False)``): "image" (3, H', W') resized, optional "height" and "width" of
            the original image (default H', W').

    Returns:
        Instances: ``pred_boxes`` (XYXY, original pixels), ``scores``, ``pred_classes``.
    """
    image = inputs["image"]
    boxes, scores, classes = run_exported(image)
    resized = Instances(
        tuple(image.shape[-2:]),
        pred_boxes=Boxes(boxes.float()),
        scores=scores.float(),
        pred_classes=classes.long(),
    )
    height = inputs.get("height", image.shape[-2])
    width = inputs.get("width", image.shape[-1])
    return detector_postprocess(resized, height, width)


def eager_detections(model: FocalRetinaNet, image: Tensor) -> Detections:
    """The eager model's detections of one (3, H, W) image, in the image's coordinates."""
    with torch.no_grad():
        instances = model([{"image": image.to(model.device)}])[0]["instances"].to("cpu")
    return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def match_detections(
    boxes: Tensor,
    classes: Tensor,
    ref_boxes: Tensor,
    ref_classes: Tensor,
    scores: Optional[Tensor] = None,
    ref_scores: Optional[Tensor] = None,
) -> Tensor:
    """For each detection, the index of the reference detection of the same class that is nearest
    (largest coordinate difference, and with scores, also 100 x the score difference), or -1 if
    it has none.

    Exported and eager scores differ by float rounding (1e-7), which can swap two detections of
    nearly equal score, so detections are paired by box and class rather than by rank. Soft-NMS
    keeps duplicates at decayed scores, which box voting can give the very same box: with scores
    given, such twins pair by their score. The factor 100 makes a score difference of 1e-5 (the
    default tolerance) weigh as much as 1e-3 px (the box tolerance).

    Args:
        boxes (Tensor): (D, 4); classes (Tensor): (D,).
        ref_boxes (Tensor): (D', 4); ref_classes (Tensor): (D',).
        scores (Tensor, optional): (D,); ref_scores (Tensor, optional): (D',).

    Returns:
        Tensor: (D,) int64 indices into the reference.
    """
    if len(boxes) == 0 or len(ref_boxes) == 0:
        return torch.full((len(boxes),), -1, dtype=torch.int64)
    dist = (boxes.float()[:, None, :] - ref_boxes.float()[None, :, :]).abs().amax(dim=2)
    if scores is not None and ref_scores is not None:
        score_dist = (scores.float()[:, None] - ref_scores.float()[None, :]).abs() * 100
        dist = torch.maximum(dist, score_dist)
    dist[classes.long()[:, None] != ref_classes.long()[None, :]] = float("inf")
    best, idx = dist.min(dim=1)
    return idx.masked_fill(~torch.isfinite(best), -1)


def check_parity(
    model: FocalRetinaNet,
    run_exported: Callable[[Tensor], Detections],
    images: Sequence[Tensor],
    *,
    box_atol: float = 1e-3,
    score_atol: float = 1e-5,
) -> ParityReport:
    """Compare exported and eager detections image by image.

    Each image must give the same number of detections, and each exported detection must pair
    (:func:`match_detections`, one to one) with an eager one of the same class whose box is
    within ``box_atol`` pixels and score within ``score_atol``.

    Raises:
        ExportError: the first image that differs, with its size and the differences.
    """
    report = ParityReport(len(images), 0, 0.0, 0.0)
    for image in images:
        size = f"{image.shape[-1]}x{image.shape[-2]}"
        compare_detections(
            report, run_exported(image), eager_detections(model, image), size, _describe(model),
            box_atol=box_atol, score_atol=score_atol,
        )
    return report


def compare_detections(
    report: ParityReport,
    detections: Detections,
    reference: Detections,
    size: str,
    components: str,
    *,
    box_atol: float,
    score_atol: float,
) -> None:
    """Holds one image's exported detections to the eager ones (as :func:`check_parity`
    describes) and adds them to ``report``.

    Args:
        size (str): the image's "WxH", for the error; components (str): the model's backbone,
            head and anchor generator, for the error.

    Raises:
        ExportError: they differ.
    """
    boxes, scores, classes = detections
    ref_boxes, ref_scores, ref_classes = reference
    if len(boxes) != len(ref_boxes):
        raise ExportError(
            f"exported model gives {len(boxes)} detections on a {size} image, the eager "
            f"model {len(ref_boxes)} ({components}); a component whose output depends "
            "on Python values of the input (int(x.shape[-1]), data-dependent if) is traced "
            "as a constant"
        )
    report.num_detections += len(boxes)
    if len(boxes) == 0:
        return
    pair = match_detections(boxes, classes, ref_boxes, ref_classes, scores, ref_scores)
    if (pair < 0).any() or len(set(pair.tolist())) != len(pair):
        raise ExportError(
            f"exported and eager detections on a {size} image do not pair up by class and "
            f"box ({components})"
        )
    box_diff = (boxes.float() - ref_boxes[pair]).abs().max().item()
    score_diff = (scores.float() - ref_scores[pair]).abs().max().item()
    if not box_diff <= box_atol or not score_diff <= score_atol:
        raise ExportError(
            f"exported model differs from the eager one on a {size} image: boxes by "
            f"{box_diff:.3g} px (tolerance {box_atol}), scores by {score_diff:.3g} "
            f"(tolerance {score_atol})"
        )
    report.max_box_diff = max(report.max_box_diff, box_diff)
    report.max_score_diff = max(report.max_score_diff, score_diff)
