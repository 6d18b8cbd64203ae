"""Best IoU, foreground anchors and anchors kept after matching of every box, exactly as over
the whole anchor grid and detectron2's ``Matcher``, evaluating only the grid positions that can
reach the foreground threshold.

Shape shorthand:
    B: boxes (at training scale)
    A: cell anchors of one level (sizes x aspect ratios)
    P: (box, cell anchor) pairs of one level, B x A
    K: grid positions evaluated around one box, per cell anchor
"""

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .layout import AnchorLayout

# Elements of one (boxes x grid positions) IoU block: bounds memory whatever the dataset size.
_CHUNK_ELEMENTS = 1 << 22
# Boxes per call of box_anchor_stats' level loop (about 40 floats per box and cell anchor).
_BOX_CHUNK = 20000


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
        layout: anchors and padding (:func:`~.layout.anchor_layout`).
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
