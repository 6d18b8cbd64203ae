"""Export a FocalRetinaNet checkpoint to ONNX or TorchScript, post-processing included.

Example::

    python -m retinanet_plugin.tools.export \\
        --config-file configs/demo_deepforest_mobilenet_v2_fpn.yaml \\
        --weights output/demo/model_final.pth --format onnx --output output/demo/model.onnx \\
        --check-images datasets/deepforest/images/*.png

The file maps one (3, H, W) image (uint8 or float, pixel values 0-255, ``INPUT.FORMAT`` channel
order, already resized to the test resolution) to ``boxes`` (D, 4, XYXY pixels), ``scores`` (D,)
and ``classes`` (D,); H and W are free. After writing, the file is run (onnxruntime /
``torch.jit.load``) on the check images (read and resized by ``train_net.py``'s test-loader
mapper, as predict reads them) and compared with the eager model; a difference beyond
``--box-atol`` / ``--score-atol`` is an error (exit code 1). The graph honours the config's
test-time keys (per-class thresholds, soft-NMS, class-agnostic NMS, box voting); one it cannot
express (``TEST.AUG.ENABLED True``) is refused before anything is traced, naming the override.
"""

import argparse
import logging
import sys
from typing import List, Optional, Sequence

import torch

from detectron2.config import CfgNode

from ..export import EXPORT_FORMATS, ExportError, check_parity, export_model, load_exported
from ..postprocess import PostProcessing
from .model_setup import load_cfg, load_model, setup_logging, test_mapper, test_min_size

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
        "--check-images",
        nargs="*",
        default=[],
        help="images to check the exported file on (read and resized by the test loader's mapper); "
        "default: random images of three sizes",
    )
    parser.add_argument("--box-atol", type=float, default=1e-3, help="pixels (default 1e-3)")
    parser.add_argument("--score-atol", type=float, default=1e-5, help="(default 1e-5)")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides: KEY VALUE pairs (YAML), key=value words (.py)",
    )
    return parser.parse_args(argv)


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
        images = check_images(cfg, args.check_images)
        export_model(model, images[0], args.output, args.format)
        report = check_parity(
            model,
            load_exported(args.output, args.format),
            images,
            box_atol=args.box_atol,
            score_atol=args.score_atol,
        )
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


if __name__ == "__main__":
    setup_logging()  # here, not in main(): callers of main() keep their logging set-up
    sys.exit(main())
