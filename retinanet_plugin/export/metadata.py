"""The metadata an exported file carries: how to feed it and how to read its outputs.

Every exported file holds one JSON object under :data:`METADATA_KEY`: in an ONNX file as an
entry of the model's ``metadata_props``, in a TorchScript file as the extra file
``metadata.json`` (``torch.jit.save(..., _extra_files=...)``). Its keys (``format_version`` 1):

- ``input_layout``: ``"NHWC_uint8_BGR_raw"`` (the raw-image graph: (N, H, W, 3) uint8 BGR
  images of any size, resized inside) or ``"CHW_resized"`` (the single-image graph: one
  (3, H, W) image already resized to the test resolution, in ``input_format``);
- ``input_format``: the config's ``INPUT.FORMAT``; ``min_size_test``, ``max_size_test``: its test
  resize; ``interpolation``: how the graph resizes (or "none: the caller resizes");
- ``class_names``, ``category_ids``: the model's K classes and, for class i, the dataset's COCO
  category id (as ``COCOEvaluator`` maps contiguous classes back);
- ``detections_per_image``, ``score_thresh_test``;
- ``config``: the config as text (a YAML config's ``cfg.dump()``, a ``.py`` config's
  ``LazyConfig.to_py`` or, if that fails, its source), ``config_file``: the path it was read from.

:func:`read_metadata` reads it back from either kind of file with only the standard library and
``onnx`` (no model is loaded).
"""

import json
import logging
import os
import zipfile
from typing import Any, Dict, Optional

from detectron2.config import CfgNode, LazyConfig

__all__ = [
    "FORMAT_VERSION",
    "INPUT_LAYOUTS",
    "METADATA_KEY",
    "MetadataError",
    "build_metadata",
    "read_metadata",
    "torchscript_extra_files",
    "write_onnx_metadata",
]

logger = logging.getLogger(__name__)

METADATA_KEY = "retinanet_plugin.metadata"
TORCHSCRIPT_FILE = "metadata.json"  # the TorchScript extra file
FORMAT_VERSION = 1
RAW_LAYOUT = "NHWC_uint8_BGR_raw"
RESIZED_LAYOUT = "CHW_resized"
INPUT_LAYOUTS = (RAW_LAYOUT, RESIZED_LAYOUT)


class MetadataError(ValueError):
    """An exported file has no readable metadata."""


def _config_text(cfg: Any, config_file: str) -> str:
    if isinstance(cfg, CfgNode):
        return cfg.dump()
    try:
        return LazyConfig.to_py(cfg)
    except Exception as e:  # to_py fails on objects it cannot write as code; keep the source
        logger.info("LazyConfig.to_py cannot write %s (%s): storing its source", config_file, e)
        with open(config_file) as f:
            return f.read()


def build_metadata(
    cfg: Any,
    config_file: str,
    *,
    input_layout: str,
    input_format: str,
    min_size_test: int,
    max_size_test: int,
    interpolation: str,
    class_names,
    category_ids,
    detections_per_image: int,
    score_thresh_test: float,
) -> Dict[str, Any]:
    """The metadata object of an exported file (see the module's docstring for each key)."""
    if input_layout not in INPUT_LAYOUTS:
        raise ValueError(f"input_layout must be one of {INPUT_LAYOUTS}, got {input_layout!r}")
    return {
        "format_version": FORMAT_VERSION,
        "input_layout": input_layout,
        "input_format": input_format,
        "min_size_test": int(min_size_test),
        "max_size_test": int(max_size_test),
        "interpolation": interpolation,
        "class_names": list(class_names),
        "category_ids": [int(i) for i in category_ids],
        "detections_per_image": int(detections_per_image),
        "score_thresh_test": float(score_thresh_test),
        "config": _config_text(cfg, config_file),
        "config_file": config_file,
    }


def write_onnx_metadata(path: str, metadata: Dict[str, Any]) -> None:
    """Stores ``metadata`` in the ONNX file ``path`` (rewritten in place; an existing entry is
    replaced)."""
    import onnx  # only needed for ONNX files

    model = onnx.load(path)
    props = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))
    onnx.save(model, path)


def torchscript_extra_files(metadata: Dict[str, Any]) -> Dict[str, str]:
    """The ``_extra_files`` argument of ``torch.jit.save`` that stores ``metadata``."""
    return {TORCHSCRIPT_FILE: json.dumps(metadata)}


def read_metadata(path: str) -> Dict[str, Any]:
    """The metadata object of an exported ONNX or TorchScript file.

    Raises:
        OSError: the file cannot be read.
        MetadataError: the file is neither an ONNX nor a TorchScript file of this exporter, or
            carries no metadata (an export made before 2026-12-05), or a newer format version.
    """
    if zipfile.is_zipfile(path):
        text = _torchscript_metadata(path)
    else:
        text = _onnx_metadata(path)
    if text is None:
        raise MetadataError(
            f"{path} carries no {METADATA_KEY} metadata (exported before it existed, or not by "
            "retinanet_plugin.tools.export): export it again"
        )
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as e:
        raise MetadataError(f"{path}: its {METADATA_KEY} is not JSON: {e}") from e
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if version != FORMAT_VERSION:
        raise MetadataError(
            f"{path}: metadata format_version {version!r}; this version reads {FORMAT_VERSION}"
        )
    return metadata


def _torchscript_metadata(path: str) -> Optional[str]:
    # torch.jit.save stores an extra file as <archive name>/extra/<name>.
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith(f"/extra/{TORCHSCRIPT_FILE}"):
                return archive.read(name).decode("utf-8")
    return None


def _onnx_metadata(path: str) -> Optional[str]:
    import onnx  # only needed for ONNX files

    if not os.path.isfile(path):
        raise OSError(f"no such file: {path}")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise MetadataError(
            f"{path} is neither an ONNX nor a TorchScript file ({type(e).__name__}: {e})"
        ) from e
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return prop.value
    return None
