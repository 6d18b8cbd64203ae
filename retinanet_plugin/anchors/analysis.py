"""The whole anchor analysis of a config and its datasets, as one JSON-able report."""

from typing import Any, Dict, Optional, Sequence, Tuple

from detectron2.config import CfgNode
from detectron2.modeling import Backbone

from .boxes import boxes_from_dicts, load_dataset_dicts, training_short_edges
from .coverage import Coverage, coverage_tables, measure_coverage, too_small_for_grid
from .layout import anchor_head_key, anchor_head_node, anchor_layout, backbone_shapes
from .proposal import Proposal, propose_anchors
from .thresholds import matcher_thresholds


def analyze(cfg: CfgNode, datasets: Sequence[str], *, max_search_pairs: int = 20000,
            propose: bool = True, backbone: Optional[Backbone] = None,
            ) -> Tuple[Dict[str, Any], Coverage, Optional[Proposal]]:
    """The whole analysis: a JSON-able report, the config's coverage, and the proposal.

    ``backbone``: the model's backbone when ``cfg`` cannot build it (a Python config's, whose
    other keys :func:`retinanet_plugin.lazy.yacs_keys` converts); default: built from ``cfg``.
    """
    fg, bg = matcher_thresholds(cfg)
    short_edges = training_short_edges(cfg)
    dicts = [d for name in datasets for d in load_dataset_dicts(name)]
    box_set = boxes_from_dicts(dicts)
    if not len(box_set.boxes):
        raise ValueError(f"datasets {list(datasets)} hold no (non-crowd, non-empty) boxes")
    shapes, divisibility, square = backbone_shapes(cfg, backbone)
    layout = anchor_layout(cfg, shapes, divisibility, square)
    current = measure_coverage(box_set, cfg, layout, short_edges)
    levels = list(anchor_head_node(cfg).IN_FEATURES)
    report: Dict[str, Any] = {
        "datasets": list(datasets),
        "images": box_set.num_images,
        "boxes": int(len(box_set.boxes)),
        "skipped_crowd_boxes": box_set.skipped_crowd,
        "skipped_empty_boxes": box_set.skipped_empty,
        "training_short_edges": list(short_edges),
        "max_size_train": int(cfg.INPUT.MAX_SIZE_TRAIN),
        "matcher": anchor_head_key(cfg),
        "fg_iou_threshold": fg,
        "bg_iou_threshold": bg,
        "allow_low_quality_matches": current.allow_low_quality,
        "anchors": {
            "sizes": [list(map(float, s)) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES],
            "aspect_ratios": [
                list(map(float, r)) for r in cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS
            ],
            "strides": layout.strides,
            "offset": layout.offset,
        },
        "coverage": coverage_tables(current, levels),
    }
    proposal = None
    if propose:
        proposal = propose_anchors(box_set, cfg, shapes, divisibility, short_edges,
                                   square_size=square, max_search_pairs=max_search_pairs,
                                   baseline=current)
        report["proposal"] = {
            "improved": proposal.improved,
            "candidates_scored": proposal.candidates,
            "sizes": proposal.sizes,
            "aspect_ratios": proposal.aspect_ratios,
            "config_lines": proposal.config_lines(),
            "coverage": coverage_tables(proposal.coverage, levels),
        }
    final = proposal.coverage if proposal is not None else current
    report["too_small_for_grid"] = too_small_for_grid(final, min(layout.strides))
    return report, current, proposal
