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

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ExportableRetinaNet",
    "METADATA_KEY",
    "MetadataError",
    "ParityReport",
    "UnsupportedKeyError",
    "check_parity",
    "eager_detections",
    "export_model",
    "exported_instances",
    "load_exported",
    "match_detections",
    "read_metadata",
]
