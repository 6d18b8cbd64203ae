"""Do my anchors cover my objects? Anchor coverage of a dataset, and better anchors for it.

For every ground-truth box of the training datasets, resized as training resizes it
(``ResizeShortestEdge`` with every ``INPUT.MIN_SIZE_TRAIN`` value and ``INPUT.MAX_SIZE_TRAIN``),
against the anchors the config's anchor generator places on the backbone's feature maps, the
analysis finds the best anchor IoU and the number of anchors at or above the foreground threshold
of ``MODEL.RETINANET.IOU_THRESHOLDS`` / ``IOU_LABELS`` (``MODEL.RPN``'s for a two-stage model,
whose anchors are the RPN's or FocalRPN's). A box is *foreground* when it has at least one such
anchor, *low-quality only* when it has none but ``ALLOW_LOW_QUALITY_MATCHES`` still makes its
best anchor foreground (detectron2's ``Matcher``), and *uncovered* otherwise: such a box trains
nothing but background. It then tries changes that could cover more boxes: anchor sizes and
aspect ratios (:func:`propose_anchors`), a pyramid level finer or coarser; each is measured by
re-running the analysis on the changed config, and one that gains at least a margin is advised.

An anchor with IoU >= the threshold with two overlapping boxes counts for both in ``num_fg``;
``kept_fg`` counts what each box keeps once the matcher gives every anchor to the box it
overlaps most.

One module per step, each importing only those before it:
``layout`` (where the anchors lie), ``thresholds`` (how the matcher labels them), ``boxes``
(the ground truth at training scale), ``matching`` (per-box IoU statistics), ``coverage``
(per-box results and tables), ``proposal`` (the search),
``levels`` (the keys that move the anchors a pyramid level finer or coarser), ``advice`` (changes
as override words, and the verdict), ``analysis`` (the whole report), ``report`` (text) and
``histogram`` (the PNG). The command line is ``python -m retinanet_plugin.tools.analyze_anchors``.
"""

from .advice import DEFAULT_MIN_GAIN, Advice, verdict, yaml_arguments
from .analysis import analyze, config_coverage
from .boxes import (
    BoxSet,
    boxes_from_dicts,
    dataset_class_names,
    load_dataset_dicts,
    resize_boxes,
    training_short_edges,
)
from .coverage import Coverage, coverage_tables, measure_coverage, too_small_for_grid
from .histogram import save_histogram
from .layout import (
    AnchorLayout,
    anchor_head_key,
    anchor_head_node,
    anchor_layout,
    backbone_shapes,
)
from .levels import LevelMove, coarser_level_moves, finer_level_moves
from .matching import box_anchor_stats
from .proposal import Proposal, propose_anchors
from .report import format_report, format_table
from .thresholds import allow_low_quality_matches, matcher_thresholds

__all__ = [
    "DEFAULT_MIN_GAIN",
    "Advice",
    "AnchorLayout",
    "LevelMove",
    "coarser_level_moves",
    "config_coverage",
    "dataset_class_names",
    "finer_level_moves",
    "verdict",
    "yaml_arguments",
    "BoxSet",
    "Coverage",
    "Proposal",
    "allow_low_quality_matches",
    "analyze",
    "anchor_head_key",
    "anchor_head_node",
    "anchor_layout",
    "backbone_shapes",
    "box_anchor_stats",
    "boxes_from_dicts",
    "coverage_tables",
    "format_report",
    "format_table",
    "load_dataset_dicts",
    "matcher_thresholds",
    "measure_coverage",
    "propose_anchors",
    "resize_boxes",
    "save_histogram",
    "too_small_for_grid",
    "training_short_edges",
]
