"""Search for anchor sizes and aspect ratios that cover more of a dataset's boxes."""

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec

from .boxes import BoxSet
from .coverage import Coverage, measure_coverage
from .layout import anchor_layout

logger = logging.getLogger(__name__)


@dataclass
class Proposal:
    """Anchor sizes and aspect ratios proposed for a dataset, and what they cover there."""

    sizes: List[List[float]]
    aspect_ratios: List[List[float]]
    coverage: Coverage
    improved: bool  # False: no candidate beat the config, which is proposed unchanged
    candidates: int  # how many (sizes, ratios) pairs the search scored

    def config_lines(self) -> List[str]:
        """KEY VALUE pairs for a YAML file or train_net.py's command line."""
        return [
            f"MODEL.ANCHOR_GENERATOR.SIZES {self.sizes}",
            f"MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS {self.aspect_ratios}",
        ]


def _with_anchors(cfg: CfgNode, sizes, ratios) -> CfgNode:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [list(s) for s in sizes]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [list(r) for r in ratios]
    return cfg


def _ratio_candidates(aspects: np.ndarray, original: List[List[float]]) -> List[List[List[float]]]:
    """The config's aspect ratios, and as many ratios (height / width) fitted to the boxes:
    log-space quantiles and a 1-D k-means in log space started from them. The number of ratios
    is kept, so the head's output shape (and a checkpoint) still fits."""
    candidates = [[list(map(float, r)) for r in original]]
    n = len(original[0])
    if any(len(r) != n for r in original) or not len(aspects):
        return candidates
    logs = np.log(aspects)
    quantiles = np.quantile(logs, (np.arange(n) + 0.5) / n)
    centres = quantiles.copy()
    for _ in range(50):
        assign = np.abs(logs[:, None] - centres[None, :]).argmin(axis=1)
        new = np.array([logs[assign == k].mean() if (assign == k).any() else centres[k]
                        for k in range(n)])
        if np.allclose(new, centres):
            break
        centres = new
    for c in (quantiles, np.sort(centres)):
        ratios = [[round(float(x), 3) for x in np.exp(c)]]
        if ratios not in candidates:
            candidates.append(ratios)
    return candidates


def _scaled(sizes: List[List[float]], factor: float) -> List[List[float]]:
    return [[round(float(s) * factor, 2) for s in level] for level in sizes]


def propose_anchors(
    box_set: BoxSet,
    cfg: CfgNode,
    shapes: Dict[str, ShapeSpec],
    divisibility: int,
    short_edges: Sequence[int],
    *,
    square_size: int = 0,
    max_search_pairs: int = 20000,
    seed: int = 0,
    baseline: Optional[Coverage] = None,
) -> Proposal:
    """Searches anchor sizes and aspect ratios that cover more boxes.

    Sizes: the config's SIZES times one factor (so each level keeps its scales per octave and
    its own size range), on a grid of 2^(k/2) from 1/8 to 4, then refined in steps of 2^(1/8)
    and 2^(1/24) around the best. Aspect ratios: the config's, and as many fitted to the boxes
    (:func:`_ratio_candidates`). Each candidate is scored on up to ``max_search_pairs``
    box-and-size pairs (a seeded sample) by covered pairs, then mean best IoU; the winner is
    measured on every box and proposed only if it covers more boxes than the config (or as many,
    with a higher mean best IoU). Otherwise the config's anchors are proposed, with
    ``improved=False``: the proposal never covers fewer boxes than the config.
    """
    sizes0 = [list(map(float, s)) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES]
    ratios0 = [list(map(float, r)) for r in cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS]
    max_boxes = max(1, max_search_pairs // max(1, len(short_edges)))
    sample = box_set
    if len(box_set.boxes) > max_boxes:
        keep = np.sort(np.random.default_rng(seed).choice(len(box_set.boxes), max_boxes, False))
        # A sample of boxes, not of images: kept_fg is approximate on it (coverage is exact).
        index = None if box_set.image_index is None else box_set.image_index[keep]
        sample = BoxSet(box_set.boxes[keep], box_set.image_hw[keep], box_set.num_images,
                        image_index=index)
    work_cfg = _with_anchors(cfg, sizes0, ratios0)  # one clone, its anchor keys set per candidate

    def measure(boxes: BoxSet, sizes, ratios) -> Coverage:
        work_cfg.MODEL.ANCHOR_GENERATOR.SIZES = [list(s) for s in sizes]
        work_cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [list(r) for r in ratios]
        layout = anchor_layout(work_cfg, shapes, divisibility, square_size)
        return measure_coverage(boxes, work_cfg, layout, short_edges)

    first = measure(sample, sizes0, ratios0)
    ratio_sets = _ratio_candidates(first.aspect, ratios0)
    scored: Dict[Tuple[float, int], Tuple[int, float]] = {(1.0, 0): first.objective()}

    def score(candidate: Tuple[float, int]) -> Tuple[Tuple[int, float], bool]:
        factor, r = candidate
        key = (round(factor, 6), r)
        if key not in scored:
            scored[key] = measure(sample, _scaled(sizes0, factor), ratio_sets[r]).objective()
        return scored[key], key == (1.0, 0)  # ties go to the config's own anchors

    # Coarse to fine over the size factor: steps of 2^(1/2) from 1/8 to 4 with every ratio set,
    # then 2^(1/8) and 2^(1/24) around the best.
    factor, r = max(((2.0 ** (k / 2), r) for r in range(len(ratio_sets)) for k in range(-6, 5)),
                    key=score)
    for step, reach in ((8, 3), (24, 2)):
        factor, r = max(((factor * 2.0 ** (j / step), r) for j in range(-reach, reach + 1)),
                        key=score)
    logger.info("Scored %d anchor candidates on %d boxes", len(scored), len(sample.boxes))

    if baseline is None:
        baseline = measure(box_set, sizes0, ratios0)
    sizes, ratios = _scaled(sizes0, factor), ratio_sets[r]
    best = measure(box_set, sizes, ratios)
    if best.objective() > baseline.objective():
        return Proposal(sizes, ratios, best, True, len(scored))
    return Proposal(sizes0, ratios0, baseline, False, len(scored))
