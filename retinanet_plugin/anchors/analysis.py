"""The whole anchor analysis of a config and its datasets, as one JSON-able report: coverage,
the changes tried (better anchor sizes, a finer or coarser pyramid level), each measured by
re-running the analysis on the changed config, and a one-line verdict."""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from detectron2.config import CfgNode
from detectron2.modeling import Backbone

from .advice import DEFAULT_MIN_GAIN, Advice, foreground_pct, verdict, yaml_arguments
from .boxes import (
    BoxSet,
    boxes_from_dicts,
    dataset_class_names,
    load_dataset_dicts,
    resize_boxes,
    training_short_edges,
)
from .coverage import Coverage, coverage_tables, measure_coverage, too_small_for_grid
from .layout import (
    AnchorLayout,
    anchor_head_key,
    anchor_head_node,
    anchor_layout,
    backbone_shapes,
    build_backbone_for_shapes,
)
from .levels import coarser_level_moves, finer_level_moves
from .proposal import Proposal, propose_anchors
from .thresholds import matcher_thresholds

# (YAML changes, strides of the head's levels or []) -> override words for the config.
Arguments = Callable[[Dict[str, Any], List[int]], List[str]]
# Override words -> (the config loaded with them, its backbone or None to build it from cfg).
Reload = Callable[[List[str]], Tuple[CfgNode, Optional[Backbone]]]


def _merged(cfg: CfgNode) -> Reload:
    """The default reload: ``cfg`` with the words merged as ``train_net.py`` merges its opts."""

    def reload(words: List[str]) -> Tuple[CfgNode, Optional[Backbone]]:
        changed = cfg.clone()
        changed.defrost()
        changed.merge_from_list(list(words))
        return changed, None

    return reload


def config_coverage(cfg: CfgNode, box_set: BoxSet, backbone: Optional[Backbone] = None,
                    ) -> Coverage:
    """The coverage of ``box_set`` by ``cfg``'s anchors at ``cfg``'s training sizes: the
    analysis's own measurement of a config (the changed configs' included)."""
    return _layout_and_coverage(cfg, box_set, backbone)[1]


def _layout_and_coverage(cfg: CfgNode, box_set: BoxSet, backbone: Optional[Backbone] = None,
                         ) -> Tuple[AnchorLayout, Coverage]:
    shapes, divisibility, square = backbone_shapes(cfg, backbone)
    layout = anchor_layout(cfg, shapes, divisibility, square)
    return layout, measure_coverage(box_set, cfg, layout, training_short_edges(cfg))


def _anchor_count(layout: AnchorLayout, hw: Tuple[int, int]) -> int:
    """Anchors the head scores on one image of size ``hw`` (its cost grows with them)."""
    return int(sum(gh * gw * len(cells) for (gh, gw), cells
                   in zip(layout.grid_sizes(*hw), layout.cell_anchors)))


def _measure(advice: Advice, reload: Reload, box_set: BoxSet, hw: Tuple[int, int]) -> Advice:
    """Loads the config with the advice's words and measures it; a config the change does not
    build (a backbone the keys were not derived right for) is reported, not raised."""
    try:
        cfg, backbone = reload(advice.arguments)
        layout, advice.coverage = _layout_and_coverage(cfg, box_set, backbone)
        advice.extra["anchors_per_image"] = _anchor_count(layout, hw)
    except (ValueError, KeyError, AssertionError, TypeError) as e:
        advice.error = f"{type(e).__name__}: {e}"
    return advice


def _too_large(cov: Coverage, largest_anchor: float) -> int:
    """Pairs without a foreground anchor whose side (sqrt of the area) exceeds the largest
    anchor: a coarser level could hold them."""
    return int((~cov.foreground & (np.sqrt(cov.area) > largest_anchor)).sum())


def analyze(cfg: CfgNode, datasets: Sequence[str], *, max_search_pairs: int = 20000,
            propose: bool = True, backbone: Optional[Backbone] = None,
            min_gain: float = DEFAULT_MIN_GAIN, arguments: Optional[Arguments] = None,
            reload: Optional[Reload] = None,
            ) -> Tuple[Dict[str, Any], Coverage, Optional[Proposal]]:
    """The whole analysis: a JSON-able report, the config's coverage, and the proposal.

    With ``propose``, three kinds of change are tried: the proposal's anchor sizes and aspect
    ratios (:func:`propose_anchors`, when it beats the config), one pyramid level finer (when
    boxes without a foreground anchor are too small for the finest grid,
    :func:`too_small_for_grid`) and one level coarser (when some are larger than the largest
    anchor). Each is written as override words and measured by loading the config with them
    and re-running this analysis's measurement (:func:`config_coverage`); the report's verdict
    advises the one that gains the most, if it gains at least ``min_gain`` percentage points of
    boxes with a foreground anchor.

    Args:
        backbone: the model's backbone when ``cfg`` cannot build it (a Python config's, whose
            other keys :func:`retinanet_plugin.lazy.yacs_keys` converts); default: built from
            ``cfg``.
        min_gain: the margin, in percentage points of box-size pairs with a foreground anchor.
        arguments: writes YAML changes as this config's override words (default: KEY VALUE
            words, :func:`~.advice.yaml_arguments`); a ``.py`` config's command line passes its
            ``key=value`` writer.
        reload: loads the config with override words (default: ``cfg`` with them merged); the
            command line passes its own loader, so the changed config is read as the user's.
    """
    fg, bg = matcher_thresholds(cfg)
    short_edges = training_short_edges(cfg)
    dicts, class_names = [], {}
    for name in datasets:
        dicts += load_dataset_dicts(name)
        class_names.update(dataset_class_names(name))
    box_set = boxes_from_dicts(dicts)
    if not len(box_set.boxes):
        raise ValueError(f"datasets {list(datasets)} hold no (non-crowd, non-empty) boxes")
    if backbone is None:
        backbone = build_backbone_for_shapes(cfg)
    shapes, divisibility, square = backbone_shapes(cfg, backbone)
    layout = anchor_layout(cfg, shapes, divisibility, square)
    current = measure_coverage(box_set, cfg, layout, short_edges)
    levels = list(anchor_head_node(cfg).IN_FEATURES)
    first = BoxSet(box_set.boxes[:1], box_set.image_hw[:1], 1)
    _, first_hw = resize_boxes(first, max(short_edges), cfg.INPUT.MAX_SIZE_TRAIN)
    hw = (int(first_hw[0, 0]), int(first_hw[0, 1]))
    sizes = [list(map(float, s)) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES]
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
            "sizes": sizes,
            "aspect_ratios": [
                list(map(float, r)) for r in cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS
            ],
            "strides": layout.strides,
            "offset": layout.offset,
        },
        "coverage": coverage_tables(current, levels, class_names),
        "too_small_for_grid": too_small_for_grid(current, min(layout.strides)),
        # The head's anchors on the dataset's first image at the largest training size.
        "anchors_per_image": {"image_hw": list(hw), "count": _anchor_count(layout, hw)},
        "min_gain": float(min_gain),
    }
    arguments = arguments or (lambda changes, strides: yaml_arguments(changes))
    reload = reload or _merged(cfg)
    proposal, advice, not_tried = None, [], {}
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
            "coverage": coverage_tables(proposal.coverage, levels, class_names),
        }
        if proposal.improved:
            changes = {"MODEL.ANCHOR_GENERATOR.SIZES": proposal.sizes,
                       "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": proposal.aspect_ratios}
            advice.append(Advice("anchors", "the proposed anchor sizes and aspect ratios",
                                 changes, arguments(changes, [])))
        else:
            not_tried["anchors"] = (f"no anchor sizes / aspect ratios of "
                                    f"{proposal.candidates} scored cover more boxes")
        moves: List[Tuple[str, Any]] = []
        if report["too_small_for_grid"]["smaller"]:
            moves.append(("finer level", finer_level_moves(cfg, backbone)))
        else:
            not_tried["finer level"] = "no box without a foreground anchor is too small for " \
                                       "the finest grid"
        if _too_large(current, max(max(s) for s in sizes)):
            moves.append(("coarser level", coarser_level_moves(cfg, shapes)))
        else:
            not_tried["coarser level"] = "no box without a foreground anchor is larger than " \
                                         "the largest anchor"
        for kind, (found, reason) in moves:
            if not found:
                not_tried[kind] = reason
            advice += [Advice(kind, m.title, m.changes, arguments(m.changes, m.strides))
                       for m in found]
        for a in advice:
            _measure(a, reload, box_set, hw)
    report["advice"] = [_advice_entry(a, current, min_gain, levels, class_names) for a in advice]
    report["not_tried"] = not_tried
    if propose:
        v = verdict(current, advice, min_gain)
        report["verdict"], report["advised"] = v["line"], v["advised"]
    else:
        report["verdict"] = (f"{foreground_pct(current):.2f}% of boxes have a foreground anchor "
                             "(--no-proposal: no change tried)")
        report["advised"] = None
    return report, current, proposal


def _advice_entry(a: Advice, baseline: Coverage, min_gain: float, levels: Sequence[str],
                  class_names: Dict[int, str]) -> Dict[str, Any]:
    entry: Dict[str, Any] = {"kind": a.kind, "title": a.title, "changes": a.changes,
                             "arguments": a.arguments}
    if a.coverage is None:
        entry["error"] = a.error
        return entry
    gain = a.gain(baseline)
    entry.update({
        "foreground_pct": foreground_pct(a.coverage),
        "gain_points": round(gain, 2),
        "helps": gain >= min_gain - 1e-9,
        "mean_best_iou": round(float(a.coverage.best_iou.mean()), 4),
        "anchors_per_image": a.extra["anchors_per_image"],
        # The changed config's levels: its head's IN_FEATURES when the change sets them.
        "coverage": coverage_tables(a.coverage, next(
            (v for k, v in a.changes.items() if k.endswith(".IN_FEATURES")
             and not k.startswith("MODEL.FPN")), levels), class_names),
    })
    return entry
