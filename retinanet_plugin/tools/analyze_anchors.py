"""Do my anchors cover my objects? Anchor coverage of a dataset, and better anchors for it.

Run as::

    python -m retinanet_plugin.tools.analyze_anchors --config-file CONFIG [--dataset NAME]
        [--output DIR] [KEY VALUE ...]

For every ground-truth box of the training datasets, resized as training resizes it
(``ResizeShortestEdge`` with every ``INPUT.MIN_SIZE_TRAIN`` value and ``INPUT.MAX_SIZE_TRAIN``),
against the anchors the config's anchor generator places on the backbone's feature maps, it
finds the best anchor IoU and the number of anchors at or above the foreground threshold of
``MODEL.RETINANET.IOU_THRESHOLDS`` / ``IOU_LABELS`` (``MODEL.RPN``'s for a two-stage model,
whose anchors are the RPN's or FocalRPN's). A box is *foreground* when it has at
least one such anchor, *low-quality only* when it has none but ``ALLOW_LOW_QUALITY_MATCHES``
still makes its best anchor foreground (detectron2's ``Matcher``), and *uncovered* otherwise:
such a box trains nothing but background. It then searches anchor sizes and aspect ratios that
cover more boxes (see :func:`propose_anchors`).

An anchor with IoU >= the threshold with two overlapping boxes counts for both in ``num_fg``;
``kept_fg`` counts what each box keeps once the matcher gives every anchor to the box it
overlaps most.

Shape shorthand:
    B: box-and-training-size pairs (each box once per ``MIN_SIZE_TRAIN`` value)
    A: cell anchors of one level (sizes x aspect ratios)
    K: grid positions evaluated around one box, per cell anchor
"""

import argparse
import json
import logging
import math
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_anchor_generator, build_backbone
from detectron2.structures import BoxMode

from retinanet_plugin.config import load_config
from retinanet_plugin.data.registration import register_config_datasets

logger = logging.getLogger(__name__)

# COCO's area ranges (pycocotools' areaRng), applied at training scale.
AREA_BUCKETS = (("small (< 32^2)", 0.0, 32.0**2), ("medium", 32.0**2, 96.0**2),
                ("large (>= 96^2)", 96.0**2, math.inf))
# Box height / width (detectron2's ASPECT_RATIOS are height / width too).
ASPECT_BUCKETS = (("< 1/3 (wide)", 0.0, 1 / 3), ("1/3 - 2/3", 1 / 3, 2 / 3),
                  ("2/3 - 3/2", 2 / 3, 3 / 2), ("3/2 - 3", 3 / 2, 3.0),
                  (">= 3 (tall)", 3.0, math.inf))
POSITIVE_BINS = ((0, 0), (1, 1), (2, 2), (3, 3), (4, 5), (6, 10), (11, 10**9))
# Elements of one (boxes x grid positions) IoU block: bounds memory whatever the dataset size.
_CHUNK_ELEMENTS = 1 << 22
# Boxes per call of box_anchor_stats' level loop (about 40 floats per box and cell anchor).
_BOX_CHUNK = 20000


# ---------------------------------------------------------------------------------------------
# What training does: thresholds, resize, anchors
# ---------------------------------------------------------------------------------------------


# Meta-architectures whose anchors belong to a proposal generator (RPN or FocalRPN), matched
# with MODEL.RPN's keys; any other (FocalRetinaNet, detectron2's RetinaNet) reads MODEL.RETINANET.
_PROPOSAL_ARCHS = ("GeneralizedRCNN", "ProposalNetwork")


def anchor_head_key(cfg: CfgNode) -> str:
    """``MODEL.RPN`` for a two-stage or proposal-only model, else ``MODEL.RETINANET``: the node
    whose IN_FEATURES, IOU_THRESHOLDS and IOU_LABELS place and match the anchors."""
    return "MODEL.RPN" if cfg.MODEL.META_ARCHITECTURE in _PROPOSAL_ARCHS else "MODEL.RETINANET"


def _head_node(cfg: CfgNode) -> CfgNode:
    return cfg.MODEL.RPN if anchor_head_key(cfg) == "MODEL.RPN" else cfg.MODEL.RETINANET


def allow_low_quality_matches(cfg: CfgNode) -> bool:
    """RPN (and FocalRPN) always allow them, as detectron2 hard-codes; RetinaNet reads the
    plugin's ``MODEL.RETINANET.ALLOW_LOW_QUALITY_MATCHES`` (True, detectron2's, when absent)."""
    if anchor_head_key(cfg) == "MODEL.RPN":
        return True
    return bool(cfg.MODEL.RETINANET.get("ALLOW_LOW_QUALITY_MATCHES", True))


def matcher_thresholds(cfg: CfgNode) -> Tuple[float, float]:
    """(foreground threshold, background threshold) of the anchor matcher
    (:func:`anchor_head_key`'s ``IOU_THRESHOLDS`` / ``IOU_LABELS``).

    The foreground threshold is where the top run of intervals labelled 1 starts; the
    background threshold is the upper end of the intervals labelled 0 (both as detectron2's
    ``Matcher`` reads them).
    """
    key, node = anchor_head_key(cfg), _head_node(cfg)
    thresholds = [-math.inf] + list(node.IOU_THRESHOLDS) + [math.inf]
    labels = list(node.IOU_LABELS)
    if len(labels) != len(thresholds) - 1:
        raise ValueError(
            f"{key}.IOU_LABELS has {len(labels)} labels for "
            f"{len(thresholds) - 2} IOU_THRESHOLDS; it needs one more label than thresholds"
        )
    if labels[-1] != 1:
        raise ValueError(f"{key}.IOU_LABELS {labels} must end with 1 (foreground)")
    first_fg = len(labels) - 1
    while first_fg > 0 and labels[first_fg - 1] == 1:
        first_fg -= 1
    if 1 in labels[:first_fg]:
        raise ValueError(
            f"{key}.IOU_LABELS {labels}: foreground (1) must be one run of the "
            "highest IoU intervals"
        )
    bg = [thresholds[i + 1] for i, label in enumerate(labels) if label == 0]
    return float(thresholds[first_fg]), float(max(bg)) if bg else float(thresholds[first_fg])


def training_short_edges(cfg: CfgNode) -> List[int]:
    """The shorter-edge lengths training resizes to (``INPUT.MIN_SIZE_TRAIN``).

    With ``MIN_SIZE_TRAIN_SAMPLING: choice`` every value; with ``range`` five evenly spaced
    values from the interval's ends (training samples every integer in between).
    """
    sizes = cfg.INPUT.MIN_SIZE_TRAIN
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    style = cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    if style == "range":
        if len(sizes) != 2:
            raise ValueError(
                f"INPUT.MIN_SIZE_TRAIN {sizes} must be [min, max] with "
                "MIN_SIZE_TRAIN_SAMPLING range"
            )
        return sorted({int(round(x)) for x in np.linspace(sizes[0], sizes[1], 5)})
    if style != "choice":
        raise ValueError(f"INPUT.MIN_SIZE_TRAIN_SAMPLING must be choice or range, got {style!r}")
    return [int(s) for s in sizes]


@dataclass
class AnchorLayout:
    """Where anchors lie on an image: the generator's cell anchors, strides and offset, and how
    the backbone pads the image (which sets the feature-map sizes)."""

    cell_anchors: List[torch.Tensor]  # per level, (A, 4) XYXY around the grid point
    strides: List[int]
    offset: float
    size_divisibility: int
    square_size: int

    def grid_sizes(self, height: int, width: int) -> List[Tuple[int, int]]:
        """Feature-map (height, width) per level for one image of this size, alone in its
        batch: the padded size divided by the stride, rounded up, as stride-2 convolutions with
        padding give."""
        if self.square_size > 0:
            height = width = max(self.square_size, height, width)
        if self.size_divisibility > 1:
            d = self.size_divisibility
            height, width = -(-height // d) * d, -(-width // d) * d
        return [(-(-height // s), -(-width // s)) for s in self.strides]


def _backbone_cfg(cfg: CfgNode) -> CfgNode:
    cfg = cfg.clone()
    cfg.defrost()
    # Only the output shapes are needed: skip downloading ImageNet weights.
    if "MOBILENET" in cfg.MODEL:
        cfg.MODEL.MOBILENET.PRETRAINED = False
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def backbone_shapes(cfg: CfgNode) -> Tuple[Dict[str, ShapeSpec], int, int]:
    """(output shapes, size divisibility, square size) of the config's backbone, built once
    without weights."""
    backbone = build_backbone(_backbone_cfg(cfg))
    constraints = getattr(backbone, "padding_constraints", None) or {}
    divisibility = constraints.get("size_divisibility", backbone.size_divisibility)
    return backbone.output_shape(), int(divisibility or 0), int(constraints.get("square_size", 0))


def anchor_layout(cfg: CfgNode, shapes: Dict[str, ShapeSpec], divisibility: int,
                  square_size: int = 0) -> AnchorLayout:
    """Builds the config's anchor generator (detectron2's ``build_anchor_generator``) on the
    input features of the head that owns the anchors (:func:`anchor_head_key`)."""
    features = list(_head_node(cfg).IN_FEATURES)
    missing = [f for f in features if f not in shapes]
    if missing:
        raise ValueError(
            f"{anchor_head_key(cfg)}.IN_FEATURES names {missing}, which the backbone does not "
            f"output (it outputs {sorted(shapes)})"
        )
    generator = build_anchor_generator(cfg, [shapes[f] for f in features])
    if not hasattr(generator, "cell_anchors") or generator.box_dim != 4:
        raise ValueError(
            f"MODEL.ANCHOR_GENERATOR.NAME {cfg.MODEL.ANCHOR_GENERATOR.NAME!r}: only axis-aligned "
            "generators with cell_anchors, strides and offset (DefaultAnchorGenerator) are "
            "supported"
        )
    return AnchorLayout(
        cell_anchors=[c.detach().float().cpu() for c in generator.cell_anchors],
        strides=[int(s) for s in generator.strides],
        offset=float(generator.offset),
        size_divisibility=divisibility,
        square_size=square_size,
    )


# ---------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------


@dataclass
class BoxSet:
    """Ground-truth boxes as training sees them (crowd and empty boxes dropped)."""

    boxes: np.ndarray  # (N, 4) float64 XYXY_ABS in the original image
    image_hw: np.ndarray  # (N, 2) int64 (height, width) of the box's image
    num_images: int
    skipped_crowd: int = 0
    skipped_empty: int = 0
    # (N,) int64, non-decreasing: the image of each box; None = every box alone in its image.
    image_index: Optional[np.ndarray] = None


def boxes_from_dicts(dataset_dicts: Sequence[Dict[str, Any]]) -> BoxSet:
    """Collects the boxes of detectron2 dataset dicts (``height``, ``width``, ``annotations``).

    Crowd boxes are dropped, as ``DatasetMapper`` drops them before matching; so are boxes of
    zero width or height, which ``filter_empty_instances`` drops.
    """
    boxes, sizes, index, crowd, empty = [], [], [], 0, 0
    for i, d in enumerate(dataset_dicts):
        for key in ("height", "width"):
            if key not in d:
                raise ValueError(f"image {d.get('file_name', d.get('image_id'))!r} has no {key!r}")
        for ann in d.get("annotations", []):
            if ann.get("iscrowd", 0):
                crowd += 1
                continue
            box = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
                empty += 1
                continue
            boxes.append(box)
            sizes.append((d["height"], d["width"]))
            index.append(i)
    return BoxSet(
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        image_hw=np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
        num_images=len(dataset_dicts),
        skipped_crowd=crowd,
        skipped_empty=empty,
        image_index=np.asarray(index, dtype=np.int64),
    )


def resize_boxes(box_set: BoxSet, short_edge: int, max_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Boxes and image sizes after ``ResizeShortestEdge(short_edge, max_size)``, as training
    resizes them (``ResizeTransform`` scales x by new_w / w and y by new_h / h)."""
    if short_edge == 0:  # detectron2's NoOpTransform
        return box_set.boxes.copy(), box_set.image_hw.copy()
    new_hw = np.array(
        [ResizeShortestEdge.get_output_shape(int(h), int(w), short_edge, max_size)
         for h, w in box_set.image_hw],
        dtype=np.int64,
    ).reshape(-1, 2)
    scale = new_hw / np.maximum(box_set.image_hw, 1)
    boxes = box_set.boxes * np.concatenate([scale[:, 1:], scale[:, :1]] * 2, axis=1)
    return boxes, new_hw


# ---------------------------------------------------------------------------------------------
# Best IoU and foreground anchors of every box
# ---------------------------------------------------------------------------------------------


def box_anchor_stats(
    boxes: torch.Tensor,
    image_hw: torch.Tensor,
    layout: AnchorLayout,
    fg_threshold: float,
    image_index: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each box, its best IoU with any anchor and the number of anchors with IoU >=
    ``fg_threshold``, exactly as over the whole anchor grid, but evaluating only grid positions
    that can reach the threshold; and how many of those anchors the box keeps when the matcher
    gives each anchor to the box of its image it overlaps most.

    For one cell anchor, the overlap along x is a function of the distance between the anchor's
    and the box's centres that does not grow with that distance, and likewise along y; IoU grows
    with the overlap. So the best anchor of each shape sits at the grid point nearest the box
    centre (clipped to the grid), and an anchor reaches IoU t only if its x overlap is at least
    I_min / min(box h, anchor h), with I_min = t (area_box + area_anchor) / (1 + t): a window of
    a few grid cells around the nearest point. An anchor can only be taken by a box with a higher
    IoU, so by one for which it is foreground too: the competition is decided among these.

    Args:
        boxes (Tensor): (B, 4) XYXY at training scale.
        image_hw (Tensor): (B, 2) int (height, width) of each box's resized image.
        layout: anchors and padding (:func:`anchor_layout`).
        fg_threshold: IoU at or above which an anchor is foreground.
        image_index (Tensor or None): (B,) int, non-decreasing: which boxes share an image (in
            annotation order, as the matcher sees them). None: every box alone in its image.

    Returns:
        best_iou (Tensor): (B,) float32.
        num_fg (Tensor): (B,) int64.
        best_level (Tensor): (B,) int64, the level of the best anchor.
        kept_fg (Tensor): (B,) int64, foreground anchors still matched to the box after
            detectron2's ``Matcher`` gives each anchor to the box with the highest IoU (the first
            of the image on ties).
    """
    boxes = boxes.float()
    num = boxes.shape[0]
    if image_index is None:
        image_index = torch.arange(num)
    if num > 1 and bool((image_index[1:] < image_index[:-1]).any()):
        raise ValueError("image_index must be non-decreasing (the boxes of an image together)")
    # Chunks bound the (box, cell anchor) pair tensors; an image's boxes stay together.
    cuts = _image_aligned_cuts(image_index.numpy(), _BOX_CHUNK) if num > _BOX_CHUNK else []
    if len(cuts) > 2:
        parts = [box_anchor_stats(boxes[i:j], image_hw[i:j], layout, fg_threshold,
                                  image_index[i:j]) for i, j in zip(cuts[:-1], cuts[1:])]
        return tuple(torch.cat(p) for p in zip(*parts))
    best = torch.zeros(num)
    best_level = torch.zeros(num, dtype=torch.int64)
    num_fg = torch.zeros(num, dtype=torch.int64)
    if num == 0:
        return best, num_fg, best_level, num_fg.clone()
    hw_list = image_hw.tolist()
    grids = {(h, w): layout.grid_sizes(h, w) for h, w in set(map(tuple, hw_list))}
    level_base, anchors_per_image = _anchor_index_bases(layout, list(grids.values()))
    # Foreground (box, anchor) entries: anchor key, IoU, box.
    keys, ious, owners = [], [], []
    for level, (cells, stride) in enumerate(zip(layout.cell_anchors, layout.strides)):
        # One row per (box, cell anchor) pair: P = B x A.
        a = len(cells)
        pair_box = boxes.repeat_interleave(a, dim=0)
        pair_cell = cells.repeat(num, 1)
        grid = torch.tensor([grids[(h, w)][level] for h, w in hw_list]).repeat_interleave(a, 0)
        max_w = max(g[level][1] for g in grids.values())
        start = layout.offset * stride  # centre of grid point 0, as detectron2's shifts
        bw, bh = pair_box[:, 2] - pair_box[:, 0], pair_box[:, 3] - pair_box[:, 1]
        aw, ah = pair_cell[:, 2] - pair_cell[:, 0], pair_cell[:, 3] - pair_cell[:, 1]
        ox = (pair_box[:, 0] + pair_box[:, 2] - pair_cell[:, 0] - pair_cell[:, 2]) / 2 - start
        oy = (pair_box[:, 1] + pair_box[:, 3] - pair_cell[:, 1] - pair_cell[:, 3]) / 2 - start
        nx = torch.minimum(torch.round(ox / stride).long().clamp(min=0), grid[:, 1] - 1)
        ny = torch.minimum(torch.round(oy / stride).long().clamp(min=0), grid[:, 0] - 1)
        i_min = fg_threshold * (bw * bh + aw * ah) / (1 + fg_threshold)
        reach_x = (bw + aw) / 2 - i_min / torch.minimum(bh, ah).clamp(min=1e-12)
        reach_y = (bh + ah) / 2 - i_min / torch.minimum(bw, aw).clamp(min=1e-12)
        # +1: the nearest point is up to half a cell from the centre, or clipped to the grid.
        radius = torch.where(
            (reach_x >= 0) & (reach_y >= 0),
            torch.ceil(torch.maximum(reach_x, reach_y) / stride).long() + 1,
            torch.zeros_like(nx),
        )
        # Anchor identity, unique across levels and images: the image, then the anchor's index
        # in detectron2's anchors of all levels concatenated (per level y, x, cell anchor), on
        # the largest grid of the call.
        pair_key = (image_index.repeat_interleave(a) * anchors_per_image + level_base[level]
                    + torch.arange(a).repeat(num))
        pair_best = torch.zeros(len(radius))
        pair_fg = torch.zeros(len(radius), dtype=torch.int64)
        for r in torch.unique(radius).tolist():
            idx = torch.nonzero(radius == r).flatten()
            step = max(1, _CHUNK_ELEMENTS // (2 * r + 1) ** 2)
            for s in range(0, len(idx), step):
                sel = idx[s: s + step]
                iou, gx, gy = _window_iou(pair_box[sel], pair_cell[sel], nx[sel], ny[sel],
                                          grid[sel], r, stride, start)
                pair_best[sel] = iou.max(dim=1).values
                fg = iou >= fg_threshold
                pair_fg[sel] = fg.sum(dim=1)
                rows, cols = torch.nonzero(fg, as_tuple=True)
                keys.append(pair_key[sel][rows] + (gy[rows, cols] * max_w + gx[rows, cols]) * a)
                ious.append(iou[rows, cols])
                owners.append(sel[rows] // a)
        level_best = pair_best.view(num, a).max(dim=1).values
        better = level_best > best
        best = torch.where(better, level_best, best)
        best_level = torch.where(better, torch.full_like(best_level, level), best_level)
        num_fg += pair_fg.view(num, a).sum(dim=1)
    return best, num_fg, best_level, _kept_after_matching(keys, ious, owners, num)


def _anchor_index_bases(layout: AnchorLayout,
                        grids: Sequence[List[Tuple[int, int]]]) -> Tuple[List[int], int]:
    """Where each level's anchors start in the concatenation of all levels' anchors, and how
    many anchors it holds, on the largest grid of each level among ``grids`` (each image's
    per-level (height, width)). Every anchor of every image then has its own index; a smaller
    image leaves some unused."""
    bases, total = [], 0
    for level, cells in enumerate(layout.cell_anchors):
        bases.append(total)
        total += len(cells) * max(g[level][0] for g in grids) * max(g[level][1] for g in grids)
    return bases, total


def _image_aligned_cuts(image_index: np.ndarray, size: int) -> List[int]:
    """Chunk boundaries about ``size`` apart that never split an image's boxes (an image with
    more boxes than ``size`` is one chunk)."""
    cuts = [0]
    while cuts[-1] < len(image_index):
        end = cuts[-1] + size
        if end >= len(image_index):
            end = len(image_index)
        else:
            end = int(np.searchsorted(image_index, image_index[end], side="left"))
            if end <= cuts[-1]:  # one image larger than size
                end = int(np.searchsorted(image_index, image_index[cuts[-1]], side="right"))
        cuts.append(end)
    return cuts


def _kept_after_matching(keys, ious, owners, num: int) -> torch.Tensor:
    """Per box, the foreground anchors it wins: each anchor goes to its highest-IoU box, the
    first box on ties (``Matcher``'s argmax over ground truth in annotation order)."""
    if not keys:
        return torch.zeros(num, dtype=torch.int64)
    key, iou, owner = torch.cat(keys).numpy(), torch.cat(ious).numpy(), torch.cat(owners).numpy()
    order = np.lexsort((owner, -iou, key))
    key, owner = key[order], owner[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    return torch.from_numpy(np.bincount(owner[first], minlength=num).astype(np.int64))


def _window_iou(boxes, cells, nx, ny, grid, radius, stride, start):
    """(P, K) IoU of P boxes, each with its cell anchor placed at the (2r+1)^2 grid points
    around (nx, ny), and those points' (P, K) x and y indices; points off the grid get IoU -1.
    Arithmetic as detectron2's anchors (shift + cell anchor, float32) and ``pairwise_iou``."""
    offsets = torch.arange(-radius, radius + 1)
    k = len(offsets)
    gx = (nx[:, None] + offsets[None, :])[:, None, :].expand(-1, k, -1).reshape(len(boxes), -1)
    gy = (ny[:, None] + offsets[None, :])[:, :, None].expand(-1, -1, k).reshape(len(boxes), -1)
    valid = (gx >= 0) & (gx < grid[:, 1:2]) & (gy >= 0) & (gy < grid[:, 0:1])
    sx = gx.float() * stride + start
    sy = gy.float() * stride + start
    ax0, ay0 = sx + cells[:, 0:1], sy + cells[:, 1:2]
    ax1, ay1 = sx + cells[:, 2:3], sy + cells[:, 3:4]
    iw = (torch.minimum(ax1, boxes[:, 2:3]) - torch.maximum(ax0, boxes[:, 0:1])).clamp(min=0)
    ih = (torch.minimum(ay1, boxes[:, 3:4]) - torch.maximum(ay0, boxes[:, 1:2])).clamp(min=0)
    inter = iw * ih
    area_a = (ax1 - ax0) * (ay1 - ay0)
    area_b = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[:, None]
    iou = torch.where(inter > 0, inter / (area_b + area_a - inter), torch.zeros_like(inter))
    return torch.where(valid, iou, torch.full_like(iou, -1.0)), gx, gy


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


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

    @property
    def foreground(self) -> np.ndarray:
        return self.num_fg > 0

    @property
    def low_quality_only(self) -> np.ndarray:
        return ~self.foreground & (self.best_iou > 0) & self.allow_low_quality

    def objective(self) -> Tuple[int, float]:
        """What :func:`propose_anchors` maximises: covered pairs, then mean best IoU."""
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
    return Coverage(**dict(zip(names, cols)), fg_threshold=fg,
                    allow_low_quality=allow_low_quality_matches(cfg))


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


def coverage_tables(cov: Coverage, level_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Summary, per-bucket rows (area, side quartiles, aspect ratio, training size), the
    distribution of foreground anchors per box, and how many boxes have their best anchor on
    each level (named by ``level_names``, e.g. the head's IN_FEATURES)."""
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


def format_table(rows: Sequence[Dict[str, Any]], title: str) -> str:
    """A fixed-width text table of :func:`coverage_tables` rows."""
    head = f"{title:<28} {'boxes':>7} {'fg %':>7} {'low-q %':>8} {'none %':>7} " \
           f"{'med IoU':>8} {'fg/box':>7} {'kept %':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if not r["boxes"]:
            lines.append(f"{r['bucket']:<28} {0:>7}")
            continue
        lines.append(
            f"{r['bucket']:<28} {r['boxes']:>7} {r['foreground_pct']:>7.2f} "
            f"{r['low_quality_only_pct']:>8.2f} {r['uncovered_pct']:>7.2f} "
            f"{r['median_best_iou']:>8.3f} {r['mean_fg_anchors']:>7.2f} "
            f"{r['kept_after_matching_pct']:>7.2f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Proposal
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Outputs and command line
# ---------------------------------------------------------------------------------------------


def save_histogram(path: str, current: Coverage, proposal: Optional[Proposal],
                   bg_threshold: float) -> str:
    """PNG histogram of every box's best anchor IoU, in bins of 0.02, with the proposal's beside
    it when it differs; the matcher's thresholds are marked. Drawn with OpenCV (milliseconds,
    where importing matplotlib takes seconds)."""
    series = [(current.best_iou, (200, 120, 40), "config's anchors")]
    if proposal is not None and proposal.improved:
        series.append((proposal.coverage.best_iou, (40, 140, 240), "proposed anchors"))
    bins = 50
    counts = [np.histogram(np.clip(v, 0, 1), bins=bins, range=(0, 1))[0] for v, _, _ in series]
    top = max(1, max(int(c.max()) for c in counts))
    width, height, left, right, bottom, upper = 860, 420, 70, 20, 60, 50
    plot_w, plot_h = width - left - right, height - bottom - upper
    img = np.full((height, width, 3), 255, np.uint8)
    bar = plot_w / bins

    def x_of(iou: float) -> int:
        return int(round(left + iou * plot_w))

    def y_of(count: float) -> int:
        return int(round(upper + plot_h * (1 - count / top)))

    for k, (c, (_, color, _)) in enumerate(zip(counts, series)):
        share = bar / len(series)
        for i, n in enumerate(c.tolist()):
            if n:
                x0 = int(round(left + i * bar + k * share))
                cv2.rectangle(img, (x0, y_of(n)), (int(round(x0 + share)) - 1, y_of(0)), color,
                              -1)
    black, font = (0, 0, 0), cv2.FONT_HERSHEY_SIMPLEX
    cv2.line(img, (left, upper), (left, y_of(0)), black, 1)
    cv2.line(img, (left, y_of(0)), (left + plot_w, y_of(0)), black, 1)
    for t in np.linspace(0, 1, 11):
        cv2.line(img, (x_of(t), y_of(0)), (x_of(t), y_of(0) + 5), black, 1)
        cv2.putText(img, f"{t:.1f}", (x_of(t) - 10, y_of(0) + 20), font, 0.4, black, 1)
    for n in np.linspace(0, top, 5):
        cv2.putText(img, f"{n:.0f}", (8, y_of(n) + 4), font, 0.4, black, 1)
    for thr, color in ((current.fg_threshold, (0, 150, 0)), (bg_threshold, (0, 0, 200))):
        for y in range(upper, y_of(0), 8):  # dashed
            cv2.line(img, (x_of(thr), y), (x_of(thr), min(y + 4, y_of(0))), color, 1)
    cv2.putText(img, "best anchor IoU of each ground-truth box (training scale); boxes per bin",
                (left, height - 15), font, 0.45, black, 1)
    legend = [(color, f"{name} ({len(v)})") for v, color, name in series] + [
        ((0, 150, 0), f"foreground >= {current.fg_threshold:g}"),
        ((0, 0, 200), f"background < {bg_threshold:g}"),
    ]
    x = left
    for color, text in legend:
        cv2.rectangle(img, (x, 18), (x + 12, 30), color, -1)
        cv2.putText(img, text, (x + 16, 29), font, 0.42, black, 1)
        x += 24 + cv2.getTextSize(text, font, 0.42, 1)[0][0]
    if not cv2.imwrite(path, img):
        raise OSError(f"could not write {path}")
    return path


def load_dataset_dicts(name: str) -> List[Dict[str, Any]]:
    """A registered dataset's dicts, or a COCO JSON file's (``name`` ending in ``.json``; its
    images are not read). The DeepForest demo datasets are registered on demand, as
    ``train_net.py`` does."""
    if name.endswith(".json"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"--dataset {name}: no such COCO JSON file")
        return load_coco_json(name, image_root="")
    from retinanet_plugin.data.deepforest import DATASET_NAMES, register_deepforest

    if name in DATASET_NAMES.values() and name not in DatasetCatalog.list():
        register_deepforest()
    if name not in DatasetCatalog.list():
        raise KeyError(
            f"dataset {name!r} is not registered; pass a registered name (DATASETS.TRAIN) or a "
            "COCO JSON file"
        )
    return DatasetCatalog.get(name)


def analyze(cfg: CfgNode, datasets: Sequence[str], *, max_search_pairs: int = 20000,
            propose: bool = True) -> Tuple[Dict[str, Any], Coverage, Optional[Proposal]]:
    """The whole analysis: a JSON-able report, the config's coverage, and the proposal."""
    fg, bg = matcher_thresholds(cfg)
    short_edges = training_short_edges(cfg)
    dicts = [d for name in datasets for d in load_dataset_dicts(name)]
    box_set = boxes_from_dicts(dicts)
    if not len(box_set.boxes):
        raise ValueError(f"datasets {list(datasets)} hold no (non-crowd, non-empty) boxes")
    shapes, divisibility, square = backbone_shapes(cfg)
    layout = anchor_layout(cfg, shapes, divisibility, square)
    current = measure_coverage(box_set, cfg, layout, short_edges)
    levels = list(_head_node(cfg).IN_FEATURES)
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


def format_report(report: Dict[str, Any]) -> str:
    """The printed tables."""
    cov = report["coverage"]
    s = cov["summary"]
    out = [
        f"{report['boxes']} boxes in {report['images']} images of {report['datasets']}, at "
        f"training sizes {report['training_short_edges']} (max {report['max_size_train']}): "
        f"{s['boxes']} box-size pairs",
        f"matcher ({report['matcher']}): foreground IoU >= {report['fg_iou_threshold']:g}, "
        f"background < "
        f"{report['bg_iou_threshold']:g}, ALLOW_LOW_QUALITY_MATCHES "
        f"{report['allow_low_quality_matches']}",
        "",
    ]
    for key, title in (("by_area", "area (training scale)"),
                       ("by_side_quartile", "sqrt(area) quartile"),
                       ("by_aspect_ratio", "aspect ratio h/w"),
                       ("by_training_size", "training size"),):
        out += [format_table(cov[key], title), ""]
    out += [format_table([s], "all boxes"), ""]
    out.append("foreground anchors per box: " + ", ".join(
        f"{k}: {v}" for k, v in cov["fg_anchors_per_box"].items()))
    out.append("  kept after matching:      " + ", ".join(
        f"{k}: {v}" for k, v in cov["kept_fg_anchors_per_box"].items()))
    out.append("boxes whose best anchor is on each level: " + ", ".join(
        f"{k}: {n}" for k, n in cov["best_level"].items()))
    prop = report.get("proposal")
    if prop:
        ps = prop["coverage"]["summary"]
        out.append("")
        if prop["improved"]:
            out.append(
                f"Proposed anchors ({prop['candidates_scored']} candidates scored): boxes with a "
                f"foreground anchor {s['foreground_pct']:.2f}% -> {ps['foreground_pct']:.2f}%, "
                f"median best IoU {s['median_best_iou']:.3f} -> {ps['median_best_iou']:.3f}"
            )
        else:
            out.append(
                f"No candidate of {prop['candidates_scored']} covers more boxes than the config's "
                f"anchors ({s['foreground_pct']:.2f}% with a foreground anchor); keep them:"
            )
        out += ["  " + line for line in prop["config_lines"]]
        if prop["improved"]:
            out += ["", format_table(prop["coverage"]["by_area"], "proposed: area")]
    tiny = report.get("too_small_for_grid")
    if tiny and tiny["smaller"]:
        out += ["", textwrap.fill(
                f"{tiny['smaller']} of the {tiny['uncovered']} box-size pairs still without a "
                f"foreground anchor are smaller than {tiny['side_px']:g} px "
                f"({tiny['side_px'] / tiny['finest_stride']:.1f} strides of the finest level, "
                f"stride {tiny['finest_stride']}): off-grid by half a stride, such a "
                "box stays below the threshold with any anchor of its size; a finer level "
                "(smaller stride) would help them more than other anchor sizes.", width=96)]
    return "\n".join(out)


def setup_cfg(config_file: str, opts: Sequence[str]) -> CfgNode:
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
