"""Export a FocalRetinaNet checkpoint to ONNX or TorchScript, post-processing included.

Example::

    python -m retinanet_plugin.tools.export \\
        --config-file configs/demo_deepforest_mobilenet_v2_fpn.yaml \\
        --weights output/demo/model_final.pth --format onnx --output output/demo/model.onnx \\
        --check-images datasets/deepforest/images/*.png

``--input raw`` (the default) writes the graph from raw images to detections in their own
pixels: input ``images``, (N, H, W, 3) uint8 BGR (as ``cv2.imread`` gives; N, H, W free);
inside, the channel order of ``INPUT.FORMAT``, the test resize (``ResizeShortestEdge`` to
``MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` with PIL's bilinear filter, bit-exact), the detector and
the boxes scaled back to the image and clipped; outputs ``num_detections`` (N,), ``boxes``
(N, D, 4), ``scores`` (N, D), ``classes`` (N, D), zero-padded to D = ``TEST.DETECTIONS_PER_IMAGE``
(TensorRT's EfficientNMS layout). ``--input resized`` writes the single-image graph of earlier
versions: one (3, H, W) image (uint8 or float, pixel values 0-255, ``INPUT.FORMAT`` channel order,
already resized to the test resolution) to ``boxes`` (D, 4), ``scores`` (D,) and ``classes``
(D,). Either file carries the metadata of :mod:`retinanet_plugin.export.metadata` (class names,
category ids, the resize, the config).

After writing, the file is run (onnxruntime / ``torch.jit.load``) on the check images (read as
predict reads them, and for ``--input resized`` resized by ``train_net.py``'s test-loader
mapper) and compared with the eager model; a difference beyond ``--box-atol`` / ``--score-atol``
is an error (exit code 1). The graph honours the config's test-time keys (per-class thresholds,
soft-NMS, class-agnostic NMS, box voting); one it cannot express (``TEST.AUG.ENABLED True``) is
refused before anything is traced, naming the override.
"""

import argparse
import logging
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch

from detectron2.config import CfgNode
from detectron2.data import transforms as T

from ..data.mapper import read_image
from ..engine.cli import FilesThenOverrides, move_trailing_overrides
from ..export import (
    EXPORT_FORMATS,
    ExportError,
    ParityReport,
    check_parity,
    check_raw_parity,
    export_model,
    export_raw_model,
    load_exported,
    load_raw_exported,
    raw_input_spec,
)
from ..export.metadata import RAW_LAYOUT, RESIZED_LAYOUT, build_metadata
from ..export.resize import INTERPOLATION
from ..postprocess import PostProcessing
from .model_setup import (
    dataset_categories,
    load_cfg,
    load_model,
    setup_logging,
    test_augmentations,
    test_mapper,
    test_min_size,
)

INPUT_KINDS = ("raw", "resized")

logger = logging.getLogger("retinanet_plugin.tools.export")  # not __name__: "__main__" under -m


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config-file", required=True, help="model config (YAML, or a Python (lazy) .py config)"
    )
    parser.add_argument("--weights", required=True, help="checkpoint (.pth / .pkl)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    parser.add_argument("--output", required=True, help="file to write")
    parser.add_argument(
        "--input",
        choices=INPUT_KINDS,
        default="raw",
        help="raw (default): (N, H, W, 3) uint8 BGR images of any size, resized inside, boxes in "
        "their pixels; resized: one (3, H, W) image already resized to the test resolution in "
        "INPUT.FORMAT (the graph of earlier versions)",
    )
    parser.add_argument(
        "--check-images",
        nargs="*",
        default=[],
        action=FilesThenOverrides,
        help="images to check the exported file on (read as predict reads them; with --input "
        "resized, resized by the test loader's mapper); default: random images of three sizes",
    )
    parser.add_argument("--box-atol", type=float, default=1e-3, help="pixels (default 1e-3)")
    parser.add_argument("--score-atol", type=float, default=1e-5, help="(default 1e-5)")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides: KEY VALUE pairs (YAML), key=value words (.py)",
    )
    args = parser.parse_args(argv)
    # Overrides written after the images (--check-images a.png MODEL.DEVICE cpu) are overrides.
    move_trailing_overrides(args)
    return args


def check_images(cfg, paths: Sequence[str]) -> List[torch.Tensor]:
    """Images the export is traced and checked with: ``paths`` read and resized by the mapper of
    ``train_net.py``'s test loader (``build_dataset_mapper(cfg, is_train=False)``, or a .py
    config's ``dataloader.test.mapper``; as predict reads them), or, without paths, random
    images of three sizes around the test size.

    Raises:
        OSError: an image cannot be decoded (named).
    """
    if paths:
        mapper = test_mapper(cfg)
        return [mapper({"file_name": p, "image_id": i})["image"] for i, p in enumerate(paths)]
    side = test_min_size(cfg) or 800
    generator = torch.Generator().manual_seed(0)
    # Odd sizes on purpose: the graph must pad them to the backbone's size divisibility.
    sizes = [(side, side * 4 // 3 + 1), (side * 3 // 4 + 3, side), (side // 2 + 5, side // 2 + 7)]
    return [
        torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8)
        for h, w in sizes
    ]


def raw_check_images(cfg, paths: Sequence[str]) -> List[np.ndarray]:
    """Images the raw-image export is traced and checked with: ``paths`` read in BGR by the test
    loader's reader (the plugin's ``read_image``, as predict reads them), or, without paths,
    random images of three sizes, larger and smaller than the test size.

    Returns:
        list[ndarray]: (H, W, 3) uint8 BGR.

    Raises:
        OSError: an image cannot be decoded (named).
    """
    if paths:
        images = []
        for path in paths:
            try:
                images.append(np.ascontiguousarray(read_image(path, format="BGR")))
            except (OSError, SyntaxError, ValueError) as e:
                raise OSError(f"cannot read check image {path}: {e}") from e
        return images
    side = test_min_size(cfg) or 800
    rng = np.random.default_rng(0)
    # Odd sizes: a shrink by about 1.7 (the widened filter), a small upscale, a wide image.
    sizes = [(side * 5 // 3 + 1, side * 2 + 3), (side * 3 // 4 + 3, side - 5), (side // 2, side)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def export_metadata(cfg, config_file: str, model, input_kind: str) -> dict:
    """The metadata stored in the file (:mod:`retinanet_plugin.export.metadata`): the test
    loader's format and resize, the classes as predict and ``COCOEvaluator`` name them
    (:func:`dataset_categories`), the model's detection limit and score threshold (what the graph
    holds, whichever kind of config), the config."""
    image_format = test_mapper(cfg).image_format
    if input_kind == "raw":
        spec = raw_input_spec(image_format, test_augmentations(cfg).augs)
        min_size, max_size, interpolation = spec.min_size, spec.max_size, INTERPOLATION
    else:  # any format and resize: the caller does them
        resizes = [a for a in test_augmentations(cfg).augs if isinstance(a, T.ResizeShortestEdge)]
        min_size = test_min_size(cfg)
        max_size = int(resizes[0].max_size) if resizes else 0
        interpolation = "none: the caller resizes"
    categories = dataset_categories(cfg)
    pp = model.postprocessing
    return build_metadata(
        cfg,
        config_file,
        input_layout=RAW_LAYOUT if input_kind == "raw" else RESIZED_LAYOUT,
        input_format=image_format,
        min_size_test=min_size,
        max_size_test=max_size,
        interpolation=interpolation,
        class_names=categories.names,
        category_ids=categories.ids,
        detections_per_image=pp.max_detections,
        score_thresh_test=pp.score_thresh,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_cfg(args.config_file, args.opts, weights=args.weights, lazy=True)
        # Before anything is traced: a test-time key the graph cannot express (TEST.AUG.*) is
        # refused by name (a YAML config's before the model is even built).
        if isinstance(cfg, CfgNode):
            PostProcessing.from_config(cfg).check("export")
        elif cfg.dataloader.get("tta") is not None:
            raise ValueError(
                "dataloader.tta: the exported graph has no test-time augmentation; export with "
                "dataloader.tta=null"
            )
        model = load_model(cfg)
        model.postprocessing.check("export")
        if args.input == "raw":
            report = _export_raw(cfg, model, args)
        else:
            report = _export_resized(cfg, model, args)
    except (ExportError, ValueError, OSError) as e:
        logger.error("%s", e)
        return 1
    logger.info(
        "Checked %s against the eager model on %d images (%d detections): max box difference "
        "%.3g px, max score difference %.3g",
        args.output, report.num_images, report.num_detections, report.max_box_diff,
        report.max_score_diff,
    )
    return 0


def _export_raw(cfg, model, args) -> ParityReport:
    spec = raw_input_spec(test_mapper(cfg).image_format, test_augmentations(cfg).augs)
    metadata = export_metadata(cfg, args.config_file, model, "raw")
    images = raw_check_images(cfg, args.check_images)
    export_raw_model(
        model, spec, torch.from_numpy(images[0][None]), args.output, args.format, metadata
    )
    return check_raw_parity(
        model,
        spec,
        test_augmentations(cfg),
        load_raw_exported(args.output, args.format),
        images,
        box_atol=args.box_atol,
        score_atol=args.score_atol,
    )


def _export_resized(cfg, model, args) -> ParityReport:
    images = check_images(cfg, args.check_images)
    metadata = export_metadata(cfg, args.config_file, model, "resized")
    export_model(model, images[0], args.output, args.format, metadata)
    return check_parity(
        model,
        load_exported(args.output, args.format),
        images,
        box_atol=args.box_atol,
        score_atol=args.score_atol,
    )


if __name__ == "__main__":
    setup_logging()  # here, not in main(): callers of main() keep their logging set-up
    sys.exit(main())
