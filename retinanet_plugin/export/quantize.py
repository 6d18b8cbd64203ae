"""Post-training int8 quantization of an exported ONNX file (onnxruntime.quantization).

What is quantized: the convolutions of the backbone, FPN and head (weights int8 per output
channel, activations uint8 with ranges calibrated on images) and a ReLU / ReLU6 (``Relu`` /
``Clip``) that directly follows one, which onnxruntime folds into the convolution's output range.
Everything after the head stays float32: GroupNorm, anchor decoding, top-k, NMS / soft-NMS, box
voting, the rescaling to the input's pixels. Those steps compare scores and coordinates, where
int8 rounding would change which boxes survive, and they cost little next to the convolutions.

How: the file is first optimised as onnxruntime's quantization pre-processing does
(``ORT_ENABLE_BASIC``: constant folding, a frozen BatchNorm's ``Mul`` / ``Add`` folded into its
convolution), then each quantized tensor's range is the minimum and maximum over the calibration
images, then :func:`onnxruntime.quantization.quantize_static` writes ``QLinearConv`` nodes
(QOperator format) from those ranges. The ranges are measured here rather than by onnxruntime's
calibrator because the raw-image graph (input ``images``, ``NHWC_uint8_BGR_raw``) runs the
detector inside the ``Loop`` over the batch, whose tensors onnxruntime's calibrator cannot read
(it can only add outputs to the main graph); onnxruntime's quantizer does quantize a ``Loop``
body given the ranges (``EnableSubgraph``, QOperator format only). Each range is read by a
``ReduceMin`` / ``ReduceMax`` pair added to a calibration copy of the graph, and inside the loop
carried out as a scan output, so one code path serves the main graph of the older single-image
file (input ``image``, ``CHW_resized``) and the loop body of the raw-image one.

Calibration images come from the config's training set (``DATASETS.TRAIN``), read as the graph
expects them: for a ``CHW_resized`` file the test loader's mapper's output (``INPUT.FORMAT``,
``ResizeShortestEdge`` to the test size), for a raw-image file the image as ``cv2.imread`` gives it
(the project's ``read_image`` in BGR, the mapper's reader), one image per batch.

The quantized file keeps every ``metadata_props`` entry of the float file and adds
:data:`QUANTIZATION_KEY` (JSON: format, op types, counts, calibration set).

fp16 / bf16 on CPU: onnxruntime 1.32's CPU provider has no float16 convolution kernel on x86 (a
float16 model is cast back to float32 around each such node, so it runs float32 convolutions with
extra casts) and no bfloat16 convolution at all (a bf16 ``Conv`` is refused at load as an invalid
type); only int8 gives the CPU a cheaper convolution.
"""

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np

from detectron2.data import DatasetCatalog

from .metadata import METADATA_KEY, RAW_LAYOUT, RESIZED_LAYOUT

__all__ = [
    "QUANTIZATION_KEY",
    "QUANTIZED_OP_TYPES",
    "QuantizationReport",
    "calibration_inputs",
    "conv_counts",
    "dataset_inputs",
    "input_layout",
    "matched_fraction",
    "onnx_detections",
    "quantize_onnx",
]

logger = logging.getLogger(__name__)

QUANTIZATION_KEY = "retinanet_plugin.quantization"
# Convolutions, and the activation directly after one (folded into its output range).
QUANTIZED_OP_TYPES = ("Conv", "Clip", "Relu")
_ACTIVATIONS = ("Clip", "Relu")


@dataclass
class QuantizationReport:
    """What :func:`quantize_onnx` did.

    Attributes:
        quantized_convs: ``QLinearConv`` nodes of the written file.
        float_convs: ``Conv`` nodes left in float32 (0 when every convolution was calibrated).
        quantized_activations: ``Clip`` / ``Relu`` nodes folded into a convolution's output.
        calibration_images: images the ranges were measured on.
        graph: "main graph", or "Loop body" for the raw-image file.
    """

    quantized_convs: int
    float_convs: int
    quantized_activations: int
    calibration_images: int
    graph: str


def input_layout(model) -> str:
    """The input layout of an exported ONNX model (``onnx.ModelProto``): its metadata's
    ``input_layout``; for a file without metadata (exported before 2026-12-05, or through the
    Python API without it), read from its input's rank: 4 (N, H, W, 3) raw images, 3 (3, H, W)
    a resized image."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)["input_layout"]
    rank = len(model.graph.input[0].type.tensor_type.shape.dim)
    return RAW_LAYOUT if rank == 4 else RESIZED_LAYOUT


def calibration_inputs(cfg: Any, layout: str, num_images: int) -> List[np.ndarray]:
    """``num_images`` images of the config's training set (the first of ``DATASETS.TRAIN``, or a
    ``.py`` config's ``dataloader.train``) as the exported graph takes them
    (:func:`dataset_inputs`).

    Raises:
        ValueError: no training dataset (and what :func:`dataset_inputs` raises).
    """
    from ..tools.model_setup import dataset_view  # tools import this package

    train = list(dataset_view(cfg).DATASETS.TRAIN)
    if not train:
        raise ValueError("DATASETS.TRAIN is empty: calibration reads images of the training set")
    return dataset_inputs(cfg, train[0], layout, num_images)


def dataset_inputs(cfg: Any, dataset: str, layout: str, num_images: int) -> List[np.ndarray]:
    """``num_images`` images of a registered dataset as the exported graph takes them.

    The images are spread evenly over the dataset, in its order, so the same config gives the
    same set.

    Args:
        cfg: a YAML (CfgNode) or ``.py`` config, loaded by ``model_setup.load_cfg`` (which
            registers its datasets).
        dataset (str): a registered dataset name.
        layout (str): ``CHW_resized``: (3, h, w) uint8 from the test loader's mapper;
            ``NHWC_uint8_BGR_raw``: (1, H, W, 3) uint8 BGR, the original image read by the
            mapper's reader (``read_image``), as ``cv2.imread`` gives it.
        num_images (int): at least 1; capped at the dataset's size.

    Raises:
        ValueError: an empty dataset, ``num_images`` < 1, an unknown layout.
        OSError: an image cannot be read (named).
    """
    from ..data.mapper import read_image  # the mapper's reader
    from ..tools.model_setup import test_mapper  # tools import this package

    if num_images < 1:
        raise ValueError(f"the number of images must be >= 1, got {num_images}")
    if layout not in (RAW_LAYOUT, RESIZED_LAYOUT):
        raise ValueError(f"input layout must be {RAW_LAYOUT} or {RESIZED_LAYOUT}, got {layout!r}")
    records = DatasetCatalog.get(dataset)
    if not records:
        raise ValueError(f"dataset {dataset} has no images")
    picks = np.unique(np.linspace(0, len(records) - 1, min(num_images, len(records))).round())
    chosen = [records[int(i)] for i in picks]
    logger.info("%d images of %s", len(chosen), dataset)
    if layout == RAW_LAYOUT:
        return [np.ascontiguousarray(read_image(r["file_name"], "BGR"))[None] for r in chosen]
    mapper = test_mapper(cfg)
    inputs = []
    for r in chosen:
        record = {k: v for k, v in r.items() if k != "annotations"}
        inputs.append(mapper(record)["image"].numpy())
    return inputs


def _subgraphs(graph) -> Iterable[Tuple[Any, Any]]:
    """(graph, node owning it or None), ``graph`` first, then each subgraph depth first."""
    import onnx

    yield graph, None
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                for sub, owner in _subgraphs(attr.g):
                    yield sub, owner if owner is not None else node


def _conv_graph(model) -> Tuple[Any, Optional[Any]]:
    """The graph holding the model's convolutions: the main graph, or the body of the ``Loop``
    that runs the detector per image. Returns (graph, its Loop node or None)."""
    holders = [
        (graph, owner) for graph, owner in _subgraphs(model.graph)
        if any(n.op_type == "Conv" for n in graph.node)
    ]
    if len(holders) != 1:
        raise ValueError(
            f"expected the convolutions in one graph, found them in {len(holders)}: not a "
            "file of retinanet_plugin.tools.export"
        )
    graph, owner = holders[0]
    if owner is not None and (owner.op_type != "Loop" or graph is not owner.attribute[0].g):
        raise ValueError(f"the convolutions are inside a {owner.op_type}, not the batch Loop")
    return graph, owner


def _nodes_to_quantize(graph) -> Tuple[List[str], List[str]]:
    """Names of the Conv nodes, and of the Clip / Relu nodes that are the only reader of a Conv's
    output (what onnxruntime folds into the convolution)."""
    producer = {out: n for n in graph.node for out in n.output}
    readers: Dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    activations = [
        n.name for n in graph.node
        if n.op_type in _ACTIVATIONS and n.input[0] in producer
        and producer[n.input[0]].op_type == "Conv" and readers[n.input[0]] == 1
    ]
    return convs, activations


def _move_weights_into(body, main) -> None:
    """Moves the convolutions' weights and biases from the main graph's initializers into the
    Loop body that reads them (an outer-scope value there), in place: onnxruntime's quantizer
    quantizes only the initializers of the graph it is quantizing."""
    wanted = {name for n in body.node if n.op_type == "Conv" for name in n.input[1:]}
    used_outside = {name for n in main.node for name in n.input}
    moving = [i for i in main.initializer if i.name in wanted and i.name not in used_outside]
    keep = [i for i in main.initializer if i.name not in {m.name for m in moving}]
    del main.initializer[:]
    main.initializer.extend(keep)
    body.initializer.extend(moving)


def _unshare_biases(graph) -> None:
    """Gives each Conv its own copy of a bias that several Convs share (the head runs once per
    pyramid level with the same weights), in place.

    An int8 convolution's bias is int32 at scale input_scale x weight_scale, and each level's
    input has its own scale; onnxruntime's quantizer quantizes a shared bias once, for the first
    level, and reuses it for the others (wrong by the ratio of the scales: with the fixture's
    head, no score passed the threshold). Shared weights stay shared: their scale does not
    depend on the input.
    """
    from onnx import numpy_helper

    initializers = {i.name: i for i in graph.initializer}
    readers: Dict[str, int] = {}
    for n in graph.node:
        if n.op_type == "Conv" and len(n.input) == 3:
            readers[n.input[2]] = readers.get(n.input[2], 0) + 1
    seen: Dict[str, int] = {}
    for n in graph.node:
        if n.op_type != "Conv" or len(n.input) != 3 or readers[n.input[2]] < 2:
            continue
        name = n.input[2]
        if name not in initializers:
            continue
        seen[name] = seen.get(name, 0) + 1
        if seen[name] == 1:
            continue  # the first reader keeps the original
        copy = numpy_helper.from_array(
            numpy_helper.to_array(initializers[name]), f"{name}.level{seen[name] - 1}"
        )
        graph.initializer.append(copy)
        n.input[2] = copy.name


def _activation_tensors(graph, names: Set[str]) -> List[str]:
    """The float activations the quantizer needs a range of: each chosen node's first input (the
    convolution's data; its weights are initializers) and its output."""
    constants = {i.name for i in graph.initializer}
    constants |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    tensors: Dict[str, None] = {}
    for n in graph.node:
        if n.name in names:
            for name in (n.input[0], n.output[0]):
                if name not in constants:
                    tensors[name] = None
    return list(tensors)


def _ort_basic_optimized(model, folder: str):
    """The model as onnxruntime's quantization pre-processing optimises it (``ORT_ENABLE_BASIC``,
    hardware-independent), subgraphs included."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    source = os.path.join(folder, "float.onnx")
    onnx.save(model, source)
    optimized = os.path.join(folder, "optimized.onnx")
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = optimized
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    model = onnx.load(optimized)
    _strip_value_info(model.graph)
    add_pre_process_metadata(model)  # what quant_pre_process marks; quantize_static reads it
    onnx.save(model, optimized)
    return model


def _with_range_outputs(model, tensors: Sequence[str]):
    """A copy of ``model`` that also outputs the minimum and maximum of each tensor of its
    convolutions' graph, as ``<name>.calib_min`` / ``.calib_max``: scalars from the main graph,
    (N,) from a Loop body (one scan output per iteration)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph, loop = _conv_graph(model)
    outputs = []
    for name in tensors:
        for op, suffix in (("ReduceMin", "calib_min"), ("ReduceMax", "calib_max")):
            out = f"{name}.{suffix}"
            graph.node.append(helper.make_node(op, [name], [out], keepdims=0))
            outputs.append(out)
    graph.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, []) for o in outputs)
    if loop is None:
        return model, outputs
    # Loop body outputs: cond, the carried values, then scan outputs; the Loop's outputs: the
    # carried values' finals, then the scans. Appending keeps both orders.
    scans = [f"{o}.scan" for o in outputs]
    loop.output.extend(scans)
    model.graph.output.extend(
        helper.make_tensor_value_info(s, TensorProto.FLOAT, [None]) for s in scans
    )
    return model, scans


def _measure_ranges(
    model, tensors: Sequence[str], inputs: Sequence[np.ndarray]
) -> Dict[str, Tuple[float, float]]:
    import onnxruntime

    calibration, outputs = _with_range_outputs(model, tensors)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(
        calibration.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name
    low = np.full(len(tensors), np.inf, dtype=np.float32)
    high = np.full(len(tensors), -np.inf, dtype=np.float32)
    for array in inputs:
        values = session.run(outputs, {input_name: array})
        low = np.minimum(low, [np.min(v) for v in values[0::2]])
        high = np.maximum(high, [np.max(v) for v in values[1::2]])
    return {name: (float(lo), float(hi)) for name, lo, hi in zip(tensors, low, high)}


def _strip_value_info(graph) -> None:
    # Shape inference leaves value_info that makes onnxruntime 1.32 reject a Reshape of an empty
    # candidate set ({0, 1, 4} to {0, -1}) on an image without detections; the graph runs
    # without those hints.
    for sub, _ in _subgraphs(graph):
        del sub.value_info[:]


def conv_counts(model) -> Tuple[int, int]:
    """(QLinearConv, Conv) nodes of an ``onnx.ModelProto``, subgraphs included."""
    ops = [n.op_type for graph, _ in _subgraphs(model.graph) for n in graph.node]
    return ops.count("QLinearConv"), ops.count("Conv")


def quantize_onnx(
    fp32_path: str,
    output: str,
    calibration: Sequence[np.ndarray],
    *,
    calibration_set: str = "",
) -> QuantizationReport:
    """Write an int8 copy of the exported ONNX file ``fp32_path`` to ``output``.

    Args:
        fp32_path (str): a file of ``retinanet_plugin.tools.export`` (either input layout).
        output (str): the int8 file; its folder is created; it appears only once complete.
        calibration: the graph's input for each calibration image (:func:`calibration_inputs`).
        calibration_set (str): where the images come from, stored in the file's
            :data:`QUANTIZATION_KEY` entry.

    Returns:
        QuantizationReport

    Raises:
        ValueError: no calibration input, a file without convolutions in one graph, or a file
            that is already quantized.
        OSError: ``output`` cannot be written (named).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        TensorsData,
        quantize_static,
    )
    from onnxruntime.quantization.calibrate import save_tensors_data

    if not calibration:
        raise ValueError("no calibration images: int8 ranges are measured on images")
    model = onnx.load(fp32_path)
    if conv_counts(model)[0]:
        raise ValueError(f"{fp32_path} is already quantized (it has QLinearConv nodes)")
    props = [(p.key, p.value) for p in model.metadata_props]
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, f".{os.path.basename(output)}.{os.getpid()}.part")
    with tempfile.TemporaryDirectory(prefix="retinanet_quantize.") as tmp:
        model = _ort_basic_optimized(model, tmp)
        graph, loop = _conv_graph(model)
        if loop is not None:
            _move_weights_into(graph, model.graph)
        _unshare_biases(graph)
        onnx.save(model, os.path.join(tmp, "optimized.onnx"))
        convs, activations = _nodes_to_quantize(graph)
        tensors = _activation_tensors(graph, set(convs) | set(activations))
        ranges = _measure_ranges(model, tensors, calibration)
        cache = os.path.join(tmp, "ranges.json")
        save_tensors_data(
            TensorsData(
                CalibrationMethod.MinMax,
                {k: (np.float32(lo), np.float32(hi)) for k, (lo, hi) in ranges.items()},
            ),
            cache,
        )
        source = os.path.join(tmp, "optimized.onnx")
        try:
            quantize_static(
                source,
                partial,
                calibration_data_reader=None,
                quant_format=QuantFormat.QOperator,
                op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                nodes_to_quantize=convs + activations,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=cache,
                extra_options={"EnableSubgraph": loop is not None},
            )
            quantized = onnx.load(partial)
            _strip_value_info(quantized.graph)
            int8_convs, float_convs = conv_counts(quantized)
            report = QuantizationReport(
                int8_convs, float_convs, len(activations), len(calibration),
                "main graph" if loop is None else "Loop body",
            )
            del quantized.metadata_props[:]
            for key, value in props:
                quantized.metadata_props.add(key=key, value=value)
            quantized.metadata_props.add(key=QUANTIZATION_KEY, value=json.dumps({
                "weights": "int8, per output channel",
                "activations": "uint8, min-max over the calibration images",
                "format": "QOperator (QLinearConv)",
                "op_types": list(QUANTIZED_OP_TYPES),
                "calibration_set": calibration_set,
                **asdict(report),
            }))
            onnx.save(quantized, partial)
            os.replace(partial, output)
        except OSError as e:
            raise OSError(f"cannot write the quantized model to {output}: {e}") from e
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    logger.info(
        "Wrote %s: %d QLinearConv (%d Clip/Relu folded), %d Conv left in float32, %s, "
        "calibrated on %d images", output, report.quantized_convs,
        report.quantized_activations, report.float_convs, report.graph,
        report.calibration_images,
    )
    return report


def onnx_detections(session, array: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's detections from an onnxruntime session of an exported file, either layout.

    Args:
        session: ``onnxruntime.InferenceSession``.
        array: the graph's input for one image: (3, h, w) for ``CHW_resized``, (1, H, W, 3) for
            the raw-image graph.

    Returns:
        boxes (D, 4) XYXY (pixels of the graph's input), scores (D,), classes (D,), without the
        raw graph's zero padding.
    """
    outputs = session.run(None, {session.get_inputs()[0].name: array})
    if len(outputs) == 3:
        return tuple(outputs)
    count = int(outputs[0][0])
    return tuple(o[0, :count] for o in outputs[1:])


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(A, B) IoU of XYXY boxes (A, 4) and (B, 4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def matched_fraction(
    ref: Tuple[np.ndarray, np.ndarray, np.ndarray],
    other: Tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    top: int,
    iou_thresh: float = 0.9,
) -> float:
    """Share of ``ref``'s ``top`` highest-scoring detections that ``other`` also finds: a box of
    the same class with IoU above ``iou_thresh`` among ``other``'s detections (any rank, since
    int8 rounding reorders near-equal scores), each matched at most once, greedily in ``ref``'s
    score order. 1.0 when ``ref`` has none.

    Args:
        ref, other: (boxes (D, 4) XYXY, scores (D,), classes (D,)) as :func:`onnx_detections`.
    """
    boxes, scores, classes = (np.asarray(x) for x in ref)
    order = np.argsort(-scores, kind="stable")[:top]
    if len(order) == 0:
        return 1.0
    other_boxes, other_classes = np.asarray(other[0]), np.asarray(other[2])
    if len(other_boxes) == 0:
        return 0.0
    iou = _iou(boxes[order].astype(np.float64), other_boxes.astype(np.float64))
    iou[classes[order][:, None] != other_classes[None, :]] = 0.0
    taken = np.zeros(len(other_boxes), dtype=bool)
    matched = 0
    for row in iou:
        row = np.where(taken, 0.0, row)
        best = int(row.argmax())
        if row[best] > iou_thresh:
            taken[best] = True
            matched += 1
    return matched / len(order)
