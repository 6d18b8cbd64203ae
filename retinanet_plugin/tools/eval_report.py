"""The evaluation report of a COCO results file: why the AP is what it is.

Usage::

    python -m retinanet_plugin.tools.eval_report --config-file configs/X.yaml \
        --results OUTPUT_DIR/inference/<dataset>/coco_instances_results.json \
        [--dataset NAME] [--output DIR] [--score-thresh S] [--iou-thresh T] \
        [--worst-images K] [--no-model-cost] [KEY VALUE ...]

The same report ``train_net.py`` writes after each evaluation (``TEST.REPORT.*``), from a results
file ``COCOEvaluator`` (or ``retinanet_plugin.tools.predict`` on a dataset's images) wrote: the
config gives the datasets (registered as ``train_net.py`` registers them; ``--dataset`` defaults
to its first test set), the report's thresholds (``TEST.REPORT``; a ``.py`` config:
``dataloader.report``) and the model whose parameters and FLOPs are counted (built from the
config; no weights are needed for the count). Files: see
:mod:`retinanet_plugin.evaluation.report.writer`; default folder ``report`` beside the results
file.
"""

import argparse
import logging
import os
from typing import Any, Dict, Optional, Sequence

from detectron2.data import DatasetCatalog

from ..data.deepforest import DATASET_NAMES, register_deepforest
from ..evaluation.report import report_settings, write_report
from ..evaluation.report.writer import REPORT_FOLDER
from .model_setup import dataset_view, load_cfg, setup_logging

__all__ = ["main", "parse_args"]

# Named explicitly: run with `python -m`, this module is "__main__".
logger = logging.getLogger("retinanet_plugin.tools.eval_report")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Evaluation report (per-class AP, PR curves, confusion matrix, the AP each "
        "error type costs, the worst images) of a COCO results file."
    )
    parser.add_argument("--config-file", required=True, help="YAML or Python (lazy) .py config")
    parser.add_argument("--results", required=True,
                        help="COCO results JSON (COCOEvaluator's coco_instances_results.json)")
    parser.add_argument("--dataset", default=None,
                        help="registered dataset the results are on (default: the config's "
                        "first test set)")
    parser.add_argument("--output", default=None,
                        help=f"report folder (default: {REPORT_FOLDER}/ beside --results)")
    parser.add_argument("--score-thresh", type=float, default=None,
                        help="confusion matrix / worst images: detections scoring at least this "
                        "(default TEST.REPORT.SCORE_THRESH)")
    parser.add_argument("--iou-thresh", type=float, default=None,
                        help="confusion matrix / worst images: IoU of a match "
                        "(default TEST.REPORT.IOU_THRESH)")
    parser.add_argument("--worst-images", type=int, default=None,
                        help="how many worst images to draw (default TEST.REPORT.WORST_IMAGES)")
    parser.add_argument("--no-model-cost", action="store_true",
                        help="skip the model's parameters and FLOPs")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides: KEY VALUE pairs (YAML), key=value words (.py)")
    args = parser.parse_args(argv)
    if args.score_thresh is not None and not 0 <= args.score_thresh <= 1:
        parser.error(f"--score-thresh must be in [0, 1], got {args.score_thresh}")
    if args.iou_thresh is not None and not 0 < args.iou_thresh <= 1:
        parser.error(f"--iou-thresh must be in (0, 1], got {args.iou_thresh}")
    if args.worst_images is not None and args.worst_images < 0:
        parser.error(f"--worst-images must be >= 0, got {args.worst_images}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    cfg = load_cfg(args.config_file, args.opts, lazy=True, tool="eval_report")
    datasets = dataset_view(cfg).DATASETS
    dataset = args.dataset or (datasets.TEST[0] if datasets.TEST else None)
    if dataset is None:
        raise ValueError("no --dataset given and the config has no test set (DATASETS.TEST)")
    if dataset in DATASET_NAMES.values() and dataset not in DatasetCatalog.list():
        register_deepforest()
    if dataset not in DatasetCatalog.list():
        raise ValueError(f"--dataset {dataset} is not registered (the config registers "
                         f"{sorted(set(datasets.TRAIN) | set(datasets.TEST))})")
    settings = report_settings(cfg)._replace(enabled=True)
    for key in ("score_thresh", "iou_thresh", "worst_images"):
        if getattr(args, key) is not None:
            settings = settings._replace(**{key: getattr(args, key)})
    cost: Any = "Skipped (--no-model-cost)."
    if not args.no_model_cost and settings.model_cost:
        cost = _model_cost(cfg)
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.results)),
                                         REPORT_FOLDER)
    title = f"Evaluation report: {dataset} ({os.path.basename(args.config_file)})"
    return write_report(dataset, args.results, output, settings, model_cost=cost, title=title)


def _model_cost(cfg: Any) -> Any:
    from ..analysis import model_cost

    try:
        return model_cost(cfg)
    except Exception as e:  # the report stands without it
        logger.warning("model cost not computed: %s: %s", type(e).__name__, e)
        return f"Not computed: {type(e).__name__}: {e}"


if __name__ == "__main__":
    main()
