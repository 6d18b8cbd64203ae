"""Export of FocalRetinaNet to ONNX and TorchScript, post-processing included (the model's own
:class:`PostProcessing`; a test-time key the graph cannot express raises UnsupportedKeyError)."""

from ..postprocess import UnsupportedKeyError
from .exporter import (
    EXPORT_FORMATS,
    ExportError,
    ParityReport,
    check_parity,
    eager_detections,
    export_model,
    exported_instances,
    load_exported,
    match_detections,
)
from .graph import ExportableRetinaNet
from .metadata import METADATA_KEY, MetadataError, read_metadata
from .quantize import QuantizationReport, quantize_onnx
from .raw_export import (
    check_raw_parity,
    eager_raw_detections,
    export_raw_model,
    load_raw_exported,
    unpad,
)
from .raw_graph import RawImageRetinaNet, RawInputSpec, raw_input_spec

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ExportableRetinaNet",
    "METADATA_KEY",
    "MetadataError",
    "ParityReport",
    "QuantizationReport",
    "RawImageRetinaNet",
    "RawInputSpec",
    "UnsupportedKeyError",
    "check_parity",
    "check_raw_parity",
    "eager_raw_detections",
    "eager_detections",
    "export_model",
    "export_raw_model",
    "exported_instances",
    "load_exported",
    "load_raw_exported",
    "match_detections",
    "quantize_onnx",
    "raw_input_spec",
    "read_metadata",
    "unpad",
]
