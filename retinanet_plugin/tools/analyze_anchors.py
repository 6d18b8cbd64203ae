"""Do my anchors cover my objects? Anchor coverage of a dataset, and better anchors for it.

Run as::

    python -m retinanet_plugin.tools.analyze_anchors --config-file CONFIG [--dataset NAME]
        [--output DIR] [--search-pairs N] [--min-gain POINTS] [--no-proposal] [KEY VALUE ...]

Prints a one-line verdict (the anchors fit, or which change to make and the coverage it gives),
the coverage tables (per class too), and the changes tried, each measured by loading the config
with it as ``train_net.py`` would and re-running the analysis; a change that gains at least
``--min-gain`` percentage points of boxes with a foreground anchor is printed as override words
to paste after ``train_net.py --config-file CONFIG``. Writes ``anchor_report.json`` and
``best_iou_histogram.png`` to ``--output``. The analysis itself, and what its figures mean,
is :mod:`retinanet_plugin.anchors`; this module is its command line.

``CONFIG`` is a YAML or a Python (lazy) ``.py`` config (with ``key=value`` overrides). The
analysis reads YAML keys: a ``.py`` config's are converted from the nodes that mean the same
(:func:`retinanet_plugin.lazy.yacs_keys`) and its backbone is instantiated from
``model.backbone``; the anchors so built are checked against the config's own anchor generator.
"""

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from detectron2.config import CfgNode, instantiate
from detectron2.modeling import Backbone

# The package's public API, importable from here too for callers of this module.
from retinanet_plugin.anchors import (  # noqa: F401
    DEFAULT_MIN_GAIN,
    Advice,
    AnchorLayout,
    BoxSet,
    Coverage,
    LevelMove,
    Proposal,
    allow_low_quality_matches,
    analyze,
    anchor_head_key,
    anchor_head_node,
    anchor_layout,
    backbone_shapes,
    box_anchor_stats,
    boxes_from_dicts,
    coarser_level_moves,
    config_coverage,
    coverage_tables,
    dataset_class_names,
    finer_level_moves,
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
    verdict,
    yaml_arguments,
)
from retinanet_plugin.anchors.advice import literal
from retinanet_plugin.config import load_config
from retinanet_plugin.data.registration import register_config_datasets
from retinanet_plugin.lazy import (
    anchor_owner,
    backbone_without_weights,
    is_lazy_config,
    load_lazy_config,
    yacs_keys,
)


def setup_cfg(config_file: str, opts: Sequence[str]) -> CfgNode:
    """The config as ``train_net.py`` reads it (the safe YAML reader), its datasets registered;
    a ``.py`` config's YAML keys (:func:`retinanet_plugin.lazy.yacs_keys`)."""
    return setup(config_file, opts)[0]


def setup(config_file: str, opts: Sequence[str]) -> Tuple[CfgNode, Optional[Backbone]]:
    """The YAML keys of ``config_file`` with ``opts``, its datasets registered, and for a
    ``.py`` config its backbone (built without weights), which no key describes."""
    if not is_lazy_config(config_file):
        cfg = load_config(config_file, opts)
        register_config_datasets(cfg)
        return cfg, None
    lazy = load_lazy_config(config_file, opts)  # registers its datasets
    backbone = backbone_without_weights(lazy)
    cfg = yacs_keys(lazy)
    _check_anchors(cfg, lazy, backbone)
    return cfg, backbone


def lazy_arguments(lazy: Any, changes: Dict[str, Any], strides: List[int]) -> List[str]:
    """YAML changes as ``key=value`` words for a ``.py`` config: each key's node (the table of
    :mod:`retinanet_plugin.lazy.yacs_keys`), plus what a lazy config states that YAML derives:
    the anchor generator's ``strides`` when the head's levels move, and the bottom-up network's
    ``out_features`` when the FPN takes a new stage.

    Raises:
        ValueError: a key this writer cannot place in the config (named).
    """
    head, owner = anchor_owner(lazy.model)
    prefix = "model.proposal_generator" if head == "RPN" else "model"
    places = {
        "MODEL.ANCHOR_GENERATOR.SIZES": f"{prefix}.anchor_generator.sizes",
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": f"{prefix}.anchor_generator.aspect_ratios",
        f"MODEL.{head}.IN_FEATURES": ("model.proposal_generator.in_features" if head == "RPN"
                                      else "model.head_in_features"),
        "MODEL.FPN.IN_FEATURES": "model.backbone.in_features",
    }
    words = {}
    for key, value in changes.items():
        if key == "MODEL.RESNETS.OUT_FEATURES":
            continue  # the bottom-up's out_features, below
        if key not in places:
            raise ValueError(f"{key}: no node of a .py config is known to hold it")
        words[places[key]] = value
    bottom_up = lazy.model.get("backbone", {}).get("bottom_up", None)
    if "MODEL.FPN.IN_FEATURES" in changes and bottom_up is not None \
            and bottom_up.get("out_features") is not None:
        fpn_in = list(changes["MODEL.FPN.IN_FEATURES"])
        words["model.backbone.bottom_up.out_features"] = fpn_in + [
            f for f in bottom_up.out_features if f not in fpn_in]
    if strides and owner.anchor_generator.get("strides") is not None:
        words[f"{prefix}.anchor_generator.strides"] = list(strides)
    return [f"{key}={literal(value)}" for key, value in words.items()]


def _check_anchors(cfg: CfgNode, lazy: Any, backbone: Backbone) -> None:
    """The anchors that ``cfg``'s keys build (detectron2's ``build_anchor_generator`` on the
    backbone's shapes, as the analysis builds them) are the config's own generator's."""
    shapes, divisibility, square = backbone_shapes(cfg, backbone)
    layout = anchor_layout(cfg, shapes, divisibility, square)
    generator = instantiate(anchor_owner(lazy.model)[1].anchor_generator)
    cells = [c.float().cpu() for c in generator.cell_anchors]
    same = (
        [int(s) for s in generator.strides] == layout.strides
        and float(generator.offset) == layout.offset
        and all(torch.equal(a, b) for a, b in zip(cells, layout.cell_anchors))
        and len(cells) == len(layout.cell_anchors)
    )
    if not same:
        raise ValueError(
            "the config's anchor generator does not place its anchors on the strides of the "
            f"head's input features {layout.strides}; analyze_anchors cannot analyse it"
        )


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m retinanet_plugin.tools.analyze_anchors", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="YAML or Python (lazy) .py config")
    parser.add_argument("--dataset", action="append",
                        help="registered dataset name or COCO JSON file (repeatable); "
                        "default: the config's DATASETS.TRAIN")
    parser.add_argument("--output", default=None,
                        help="folder for anchor_report.json and best_iou_histogram.png "
                        "(default: OUTPUT_DIR/anchor_analysis)")
    parser.add_argument("--search-pairs", type=int, default=20000,
                        help="box-and-size pairs the proposal search scores candidates on")
    parser.add_argument("--min-gain", type=float, default=DEFAULT_MIN_GAIN, metavar="POINTS",
                        help="advise a change only if it gives at least this many more "
                        "percentage points of boxes a foreground anchor (default %(default)g)")
    parser.add_argument("--no-proposal", action="store_true",
                        help="only measure coverage: try no change")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides: KEY VALUE pairs (YAML), key=value words (.py)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    cfg, backbone = setup(args.config_file, args.opts)
    datasets = args.dataset or list(cfg.DATASETS.TRAIN)
    lazy = is_lazy_config(args.config_file)
    if lazy:
        lazy_cfg = load_lazy_config(args.config_file, args.opts)

        def arguments(changes, strides):
            return lazy_arguments(lazy_cfg, changes, strides)
    else:
        def arguments(changes, strides):
            return yaml_arguments(changes)

    def reload(words):
        # The changed config as the user's command line would read it: the file, their
        # overrides, then the advised ones.
        return setup(args.config_file, list(args.opts) + list(words))

    report, current, proposal = analyze(
        cfg, datasets, max_search_pairs=args.search_pairs, propose=not args.no_proposal,
        backbone=backbone, min_gain=args.min_gain, arguments=arguments, reload=reload)
    report["config_file"] = args.config_file
    report["syntax"] = "lazy" if lazy else "yaml"
    out_dir = args.output or os.path.join(cfg.OUTPUT_DIR, "anchor_analysis")
    os.makedirs(out_dir, exist_ok=True)
    report["histogram"] = save_histogram(os.path.join(out_dir, "best_iou_histogram.png"),
                                         current, proposal, report["bg_iou_threshold"])
    with open(os.path.join(out_dir, "anchor_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    sys.stdout.write(format_report(report, report["syntax"]) + "\n")
    sys.stdout.write(f"\nWrote {out_dir}/anchor_report.json and {report['histogram']}\n")
    return report


if __name__ == "__main__":
    main()
