"""Run a FocalRetinaNet checkpoint on images, folders, globs and videos.

Example::

    python -m retinanet_plugin.tools.predict \\
        --config-file configs/demo_deepforest_mobilenet_v2_fpn.yaml \\
        --weights output/demo/model_final.pth --input datasets/deepforest/images clip.mp4 \\
        --output output/predict

The command line of :func:`retinanet_plugin.predict.predict`, whose module says how inputs are
read, matched to a dataset's image ids and batched, and what is written to ``--output``: the
drawings, ``coco_instances_results.json`` and ``images.json``, the two JSON files however the run
ends (an error, Ctrl-C, a SIGTERM). Inputs that cannot be read are logged by name and skipped;
the exit code is then 1.
"""

import argparse
import contextlib
import logging
import signal
import sys
import threading
from typing import Iterator, Optional, Sequence

from ..engine.cli import FilesThenOverrides, move_trailing_overrides
from ..predict import expand_inputs, is_video, predict
from ..predict.backends import BACKENDS, load_backend
from .model_setup import load_cfg, load_model, setup_logging

# The command line; the library it runs is retinanet_plugin.predict (re-exported here: the names
# code imports from this module).
__all__ = ["expand_inputs", "is_video", "main", "parse_args", "predict"]

logger = logging.getLogger("retinanet_plugin.tools.predict")  # not __name__: "__main__" under -m


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config-file", required=True, help="model config (YAML, or a Python (lazy) .py config)"
    )
    parser.add_argument(
        "--weights",
        required=True,
        help="checkpoint (.pth / .pkl); with --backend onnxruntime / torchscript, the file "
        "written by retinanet_plugin.tools.export (raw-image input)",
    )
    parser.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default="eager",
        help="eager (default): the PyTorch model; onnxruntime / torchscript: the exported file "
        "given as --weights, on CPU (docs/deployment.md)",
    )
    parser.add_argument(
        "--input", nargs="+", required=True, action=FilesThenOverrides,
        help="image / video files, folders or globs (config overrides may follow them)",
    )
    parser.add_argument("--output", required=True, help="folder for drawings and JSON files")
    parser.add_argument(
        "--score-thresh",
        type=float,
        default=None,
        help="keep detections scoring above this (sets MODEL.RETINANET.SCORE_THRESH_TEST, or "
        "model.test_score_thresh; default: the config's, as COCOEvaluator uses)",
    )
    parser.add_argument(
        "--draw-thresh", type=float, default=0.5, help="draw detections scoring at least this"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: config's)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--tile",
        type=int,
        default=None,
        metavar="SIZE",
        help="predict large images by overlapping SIZE-px windows, merged in the image's pixels "
        "(docs/predict.md, 'Large images: tiles'; default: whole images)",
    )
    parser.add_argument(
        "--tile-overlap",
        type=float,
        default=None,
        metavar="F",
        help="fraction of --tile shared by neighbouring windows, in [0, 1) (default 0.25)",
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides: KEY VALUE pairs (YAML), key=value words (.py)",
    )
    args = parser.parse_args(argv)
    # Overrides written after the files (--input a.png MODEL.DEVICE cpu) are overrides.
    moved = move_trailing_overrides(args)
    if not args.input:
        parser.error(
            "--input names no image, video, folder or glob before the config overrides "
            f"({' '.join(moved)}); a file named like a config key is written ./{moved[0]}"
        )
    return args


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (``kill``, a job scheduler's stop) raises SystemExit in the main thread, so
    :func:`predict` writes the results so far as it does on any other exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    with _sigterm_as_exit():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        cfg = load_cfg(
            args.config_file, args.opts, weights=args.weights, device=args.device,
            score_thresh=args.score_thresh, lazy=True,
        )
        if args.backend == "eager":
            model = load_model(cfg)
        else:
            if args.device not in (None, "cpu"):
                raise ValueError(f"--backend {args.backend} runs on the CPU: drop --device")
            model = load_backend(args.backend, args.weights, cfg)
        failed, summary = predict(
            cfg, model, args.input, args.output, batch_size=args.batch_size,
            draw_thresh=args.draw_thresh, tile=args.tile, tile_overlap=args.tile_overlap,
        )
    except (OSError, ValueError) as e:
        logger.error("%s", e)
        return 2
    logger.info(
        "%d images, %d detections, %.2f images/s; wrote %s and %s",
        summary["images"], summary["detections"], summary["images_per_s"],
        summary["results_file"], summary["images_file"],
    )
    if failed:
        logger.error("%d inputs could not be read: %s", len(failed), ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    setup_logging()  # here, not in main(): callers of main() keep their logging set-up
    sys.exit(main())
