"""Do my anchors cover my objects? Anchor coverage of a dataset, and better anchors for it.

Run as::

    python -m retinanet_plugin.tools.analyze_anchors --config-file CONFIG [--dataset NAME]
        [--output DIR] [--search-pairs N] [--no-proposal] [KEY VALUE ...]

Prints the coverage tables and the proposed anchors, and writes ``anchor_report.json`` and
``best_iou_histogram.png`` to ``--output``. The analysis itself, and what its figures mean,
is :mod:`retinanet_plugin.anchors`; this module is its command line.
"""

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, Optional, Sequence

from detectron2.config import CfgNode

# The package's public API, importable from here too for callers of this module.
from retinanet_plugin.anchors import (  # noqa: F401
    AnchorLayout,
    BoxSet,
    Coverage,
    Proposal,
    allow_low_quality_matches,
    analyze,
    anchor_head_key,
    anchor_head_node,
    anchor_layout,
    backbone_shapes,
    box_anchor_stats,
    boxes_from_dicts,
    coverage_tables,
    format_report,
    format_table,
    load_dataset_dicts,
    matcher_thresholds,
    measure_coverage,
    propose_anchors,
    resize_boxes,
    save_histogram,
    too_small_for_grid,
    training_short_edges,
)
from retinanet_plugin.config import load_config
from retinanet_plugin.data.registration import register_config_datasets
from retinanet_plugin.tools.model_setup import refuse_lazy_config


def setup_cfg(config_file: str, opts: Sequence[str]) -> CfgNode:
    """The config as ``train_net.py`` reads it (the safe YAML reader), its datasets registered.
    A Python (.py) config is refused by name: the analysis reads the YAML keys throughout."""
    refuse_lazy_config(config_file, "analyze_anchors")
    cfg = load_config(config_file, opts)
    register_config_datasets(cfg)
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m retinanet_plugin.tools.analyze_anchors", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--dataset", action="append",
                        help="registered dataset name or COCO JSON file (repeatable); "
                        "default: the config's DATASETS.TRAIN")
    parser.add_argument("--output", default=None,
                        help="folder for anchor_report.json and best_iou_histogram.png "
                        "(default: OUTPUT_DIR/anchor_analysis)")
    parser.add_argument("--search-pairs", type=int, default=20000,
                        help="box-and-size pairs the proposal search scores candidates on")
    parser.add_argument("--no-proposal", action="store_true", help="only measure coverage")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    cfg = setup_cfg(args.config_file, args.opts)
    datasets = args.dataset or list(cfg.DATASETS.TRAIN)
    report, current, proposal = analyze(cfg, datasets, max_search_pairs=args.search_pairs,
                                        propose=not args.no_proposal)
    report["config_file"] = args.config_file
    out_dir = args.output or os.path.join(cfg.OUTPUT_DIR, "anchor_analysis")
    os.makedirs(out_dir, exist_ok=True)
    report["histogram"] = save_histogram(os.path.join(out_dir, "best_iou_histogram.png"),
                                         current, proposal, report["bg_iou_threshold"])
    with open(os.path.join(out_dir, "anchor_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    sys.stdout.write(format_report(report) + "\n")
    sys.stdout.write(f"\nWrote {out_dir}/anchor_report.json and {report['histogram']}\n")
    return report


if __name__ == "__main__":
    main()
