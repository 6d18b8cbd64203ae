"""Coverage of a dataset's boxes by the config's anchors: per box-and-training-size pair, and
as tables by area, box side, aspect ratio and training size.

Shape shorthand:
    B: box-and-training-size pairs (each box once per ``MIN_SIZE_TRAIN`` value)
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from detectron2.config import CfgNode

from .boxes import BoxSet, resize_boxes
from .layout import AnchorLayout
from .matching import box_anchor_stats
from .thresholds import allow_low_quality_matches, matcher_thresholds

# COCO's area ranges (pycocotools' areaRng), applied at training scale.
AREA_BUCKETS = (("small (< 32^2)", 0.0, 32.0**2), ("medium", 32.0**2, 96.0**2),
                ("large (>= 96^2)", 96.0**2, math.inf))
# Box height / width (detectron2's ASPECT_RATIOS are height / width too).
ASPECT_BUCKETS = (("< 1/3 (wide)", 0.0, 1 / 3), ("1/3 - 2/3", 1 / 3, 2 / 3),
                  ("2/3 - 3/2", 2 / 3, 3 / 2), ("3/2 - 3", 3 / 2, 3.0),
                  (">= 3 (tall)", 3.0, math.inf))
POSITIVE_BINS = ((0, 0), (1, 1), (2, 2), (3, 3), (4, 5), (6, 10), (11, 10**9))


@dataclass
class Coverage:
    """Per box-and-training-size pair (shape (B,)): training-scale box size and the matching."""

    area: np.ndarray
    aspect: np.ndarray  # height / width
    best_iou: np.ndarray
    num_fg: np.ndarray
    best_level: np.ndarray
    short_edge: np.ndarray  # the MIN_SIZE_TRAIN value of the pair
    kept_fg: np.ndarray  # foreground anchors left to the box after matching (neighbours' taken)
    fg_threshold: float
    allow_low_quality: bool
    category: Optional[np.ndarray] = None  # the box's category_id; None: unknown

    @property
    def foreground(self) -> np.ndarray:
        return self.num_fg > 0

    @property
    def low_quality_only(self) -> np.ndarray:
        return ~self.foreground & (self.best_iou > 0) & self.allow_low_quality

    def objective(self) -> Tuple[int, float]:
        """What :func:`~.proposal.propose_anchors` maximises: covered pairs, then mean best IoU."""
        return int(self.foreground.sum()), float(self.best_iou.mean()) if len(self.best_iou) else 0


def measure_coverage(box_set: BoxSet, cfg: CfgNode, layout: AnchorLayout,
                     short_edges: Sequence[int]) -> Coverage:
    """Runs :func:`box_anchor_stats` on the boxes resized to each training size."""
    fg, _ = matcher_thresholds(cfg)
    index = None if box_set.image_index is None else torch.from_numpy(box_set.image_index)
    parts = []
    for short in short_edges:
        boxes, hw = resize_boxes(box_set, short, cfg.INPUT.MAX_SIZE_TRAIN)
        best, num_fg, level, kept = box_anchor_stats(
            torch.from_numpy(boxes), torch.from_numpy(hw), layout, fg, index
        )
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        parts.append((w * h, h / w, best.numpy(), num_fg.numpy(), level.numpy(),
                      np.full(len(boxes), short), kept.numpy()))
    cols = [np.concatenate(c) for c in zip(*parts)] if parts else [np.zeros(0)] * 7
    names = ("area", "aspect", "best_iou", "num_fg", "best_level", "short_edge", "kept_fg")
    category = None
    if box_set.category is not None:
        category = np.tile(box_set.category, len(short_edges))  # pairs in short-edge order
    return Coverage(**dict(zip(names, cols)), fg_threshold=fg,
                    allow_low_quality=allow_low_quality_matches(cfg), category=category)


def _row(cov: Coverage, mask: np.ndarray, label: str) -> Dict[str, Any]:
    n = int(mask.sum())

    def pct(x):
        return round(100.0 * float(x[mask].sum()) / n, 2) if n else None

    return {
        "bucket": label,
        "boxes": n,
        "foreground_pct": pct(cov.foreground),
        "low_quality_only_pct": pct(cov.low_quality_only),
        "uncovered_pct": pct(~cov.foreground & ~cov.low_quality_only),
        # Boxes still holding a foreground anchor once each anchor went to its best box.
        "kept_after_matching_pct": pct(cov.kept_fg > 0),
        "median_best_iou": round(float(np.median(cov.best_iou[mask])), 4) if n else None,
        "mean_fg_anchors": round(float(cov.num_fg[mask].mean()), 2) if n else None,
    }


def coverage_tables(cov: Coverage, level_names: Optional[Sequence[str]] = None,
                    class_names: Optional[Dict[int, str]] = None) -> Dict[str, Any]:
    """Summary, per-bucket rows (area, side quartiles, aspect ratio, training size, and class
    when ``cov`` knows the boxes' categories), the distribution of foreground anchors per box,
    and how many boxes have their best anchor on each level (named by ``level_names``, e.g. the
    head's IN_FEATURES). ``class_names``: category_id -> name (every named class gets a row,
    an unnamed id is shown as its number)."""
    side = np.sqrt(cov.area)
    tables: Dict[str, Any] = {"summary": _row(cov, np.ones(len(side), bool), "all")}
    tables["by_area"] = [_row(cov, (cov.area >= lo) & (cov.area < hi), name)
                         for name, lo, hi in AREA_BUCKETS]
    if len(side):
        q = np.quantile(side, [0.25, 0.5, 0.75])
        edges = [0.0, *q.tolist(), math.inf]
        labels = ["q0-25", "q25-50", "q50-75", "q75-100"]
        rows = []
        for i, name in enumerate(labels):
            mask = (side >= edges[i]) & (side < edges[i + 1]) if i < 3 else side >= edges[i]
            lo = side[mask].min() if mask.any() else float("nan")
            hi = side[mask].max() if mask.any() else float("nan")
            rows.append(_row(cov, mask, f"{name} ({lo:.0f}-{hi:.0f} px)"))
        tables["by_side_quartile"] = rows
    tables["by_aspect_ratio"] = [_row(cov, (cov.aspect >= lo) & (cov.aspect < hi), name)
                                 for name, lo, hi in ASPECT_BUCKETS]
    tables["by_training_size"] = [_row(cov, cov.short_edge == s, f"short edge {s}")
                                  for s in np.unique(cov.short_edge).tolist()]
    if cov.category is not None:
        known = dict(class_names or {})
        ids = sorted(set(known) | set(np.unique(cov.category).tolist()))
        tables["by_class"] = [_row(cov, cov.category == i, known.get(i, str(i))) for i in ids]
    for key, counts in (("fg_anchors_per_box", cov.num_fg),
                        ("kept_fg_anchors_per_box", cov.kept_fg)):
        tables[key] = {
            (f"{lo}" if lo == hi else f"{lo}+" if hi >= 10**9 else f"{lo}-{hi}"):
                int(((counts >= lo) & (counts <= hi)).sum())
            for lo, hi in POSITIVE_BINS
        }
    counts = np.bincount(cov.best_level, minlength=len(level_names or ())).tolist()
    names = list(level_names) if level_names else [str(i) for i in range(len(counts))]
    tables["best_level"] = dict(zip(names, counts))
    return tables


def too_small_for_grid(cov: Coverage, stride: int) -> Dict[str, Any]:
    """How many boxes without a foreground anchor are smaller than the finest grid allows.

    A square box of side b whose centre sits half a stride h = stride / 2 from the nearest grid
    point along both axes reaches, with a same-size anchor, IoU (b - h)^2 / (2 b^2 - (b - h)^2);
    that is below t for b < h / (1 - sqrt(2t / (1 + t))), 2.72 strides at t = 0.5. Depending on
    where such boxes lie, no anchor size helps them; a finer level (smaller stride) would.
    """
    t = cov.fg_threshold
    side = 0.5 * stride / (1 - math.sqrt(2 * t / (1 + t)))
    uncovered = ~cov.foreground
    small = uncovered & (np.sqrt(cov.area) < side)
    return {"finest_stride": int(stride), "side_px": round(side, 1),
            "uncovered": int(uncovered.sum()), "smaller": int(small.sum())}
