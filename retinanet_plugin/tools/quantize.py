"""Quantize an exported ONNX file to int8 for CPU inference (onnxruntime.quantization).

Example::

    python -m retinanet_plugin.tools.quantize \\
        --config-file configs/demo_deepforest_mobilenet_v2_fpn_long.yaml \\
        --onnx output/demo/model.onnx --output output/demo/model_int8.onnx

The convolutions of the backbone, FPN and head become int8 ``QLinearConv`` nodes, their ranges
measured on ``--calibration-images`` images of the config's training set (``DATASETS.TRAIN``)
read as the graph takes them (the test loader's mapper for a file of resized images, the
original BGR image for a raw-image file); decoding and NMS stay float32
(:mod:`retinanet_plugin.export.quantize`). The int8 file keeps the float file's metadata. Then
both files run on ``--check-images`` images of the config's test set (``DATASETS.TEST``) and the
log says which share of the float file's top ``--check-top`` detections the int8 file finds
again (same class, IoU > 0.9): int8 is an approximation, so this is a report, not a pass / fail.
"""

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import numpy as np
import onnx

from ..export.quantize import (
    calibration_inputs,
    dataset_inputs,
    input_layout,
    matched_fraction,
    onnx_detections,
    quantize_onnx,
)
from .model_setup import dataset_view, load_cfg, setup_logging

logger = logging.getLogger("retinanet_plugin.tools.quantize")  # not __name__: "__main__" under -m


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config-file", required=True,
        help="the exported model's config (YAML or .py): its training set calibrates",
    )
    parser.add_argument("--onnx", required=True, help="float32 ONNX file of tools/export.py")
    parser.add_argument("--output", required=True, help="int8 ONNX file to write")
    parser.add_argument(
        "--calibration-images", type=int, default=32,
        help="training images to measure activation ranges on (default 32)",
    )
    parser.add_argument(
        "--check-images", type=int, default=4,
        help="test-set images to compare float and int8 detections on (0: none; default 4)",
    )
    parser.add_argument(
        "--check-top", type=int, default=20,
        help="compare the float file's top detections of each image (default 20)",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[],
        help="config overrides: KEY VALUE pairs (YAML), key=value words (.py)",
    )
    return parser.parse_args(argv)


def _check(cfg, fp32_path: str, int8_path: str, layout: str, num_images: int, top: int) -> None:
    import onnxruntime

    test = list(dataset_view(cfg).DATASETS.TEST)
    if num_images < 1 or not test:
        return
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    sessions = [
        onnxruntime.InferenceSession(p, options, providers=["CPUExecutionProvider"])
        for p in (fp32_path, int8_path)
    ]
    fractions = [
        matched_fraction(*(onnx_detections(s, array) for s in sessions), top=top)
        for array in dataset_inputs(cfg, test[0], layout, num_images)
    ]
    logger.info(
        "int8 against float32 on %d images of %s: %.1f%% of the float file's top %d "
        "detections found again (same class, IoU > 0.9; worst image %.1f%%)",
        len(fractions), test[0], 100 * np.mean(fractions), top, 100 * min(fractions),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if os.path.abspath(args.output) == os.path.abspath(args.onnx):
            raise ValueError(f"--output {args.output} is the float file --onnx reads: choose "
                             "another path (the check compares the two)")
        cfg = load_cfg(args.config_file, args.opts, lazy=True)
        try:
            model = onnx.load(args.onnx, load_external_data=False)
        except Exception as e:  # onnx raises DecodeError, OSError, ... for a file it cannot read
            raise ValueError(f"cannot read ONNX file {args.onnx}: {e}") from e
        layout = input_layout(model)
        del model
        calibration = calibration_inputs(cfg, layout, args.calibration_images)
        train = list(dataset_view(cfg).DATASETS.TRAIN)[0]
        report = quantize_onnx(
            args.onnx, args.output, calibration,
            calibration_set=f"{len(calibration)} images of {train}",
        )
        if report.quantized_convs == 0:
            raise ValueError(f"no convolution of {args.onnx} was quantized")
        _check(cfg, args.onnx, args.output, layout, args.check_images, args.check_top)
    except (ValueError, OSError) as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    setup_logging()  # here, not in main(): callers of main() keep their logging set-up
    sys.exit(main())
