"""Images larger than the model's input, predicted by tiles (``predict --tile SIZE
--tile-overlap F``).

:class:`TiledPredictor` wraps any per-image predictor (a callable taking one (H, W, C) image and
returning its :class:`Instances` in that image's pixels: the eager model through the test
loader's resize, TTA, an exported backend) and is itself one, for images of any size:

1. **Windows.** Along each axis, the fewest SIZE-px windows that cover the image with at least
   ``floor(F * SIZE)`` px shared by neighbours, spread evenly (start i = round(i * (L - SIZE) /
   (n - 1)) for n windows over a length L), so no window needs padding. An axis no longer than
   SIZE is one window of its own length; an image no larger than a tile is one window, the whole
   image, whose result is the predictor's own, untouched (equal to untiled predict).
2. **Each window** goes through the predictor as any image would (predict: the test loader's
   resize ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` and the model's own post-processing: score
   threshold, NMS, ``TEST.DETECTIONS_PER_IMAGE`` per window); its boxes are shifted by the
   window's origin into the whole image's pixels.
3. **Cut objects.** A box within ``edge_margin`` px of an *internal* edge of its window (an edge
   that is not the image's border) may be part of an object cut by that edge. It is dropped when
   another window contains the box grown by ``edge_margin`` on every side (clipped to the image),
   so extends past the cut and sees those pixels with more context, *and* a detection of that
   window (same class, unless ``NMS_CLASS_AGNOSTIC``) covers at least ``cover`` (0.5) of the
   box's area: that window has found the object, whole when the object is no wider than the
   overlap. NMS cannot do this: a half of an object has IoU 0.5 at most with the whole box. A cut
   box that no other window contains (an object larger than the overlap, or overlap 0), or that
   no detection there covers (the other window missed the object), is kept: a cut box is only
   dropped for a detection of the same object that another window made.
4. **Cross-tile NMS.** An object inside an overlap strip is detected by each window that sees
   it. Greedily by decreasing score, a detection is removed when a kept, higher-scoring
   detection of *another* window overlaps it with IoU > the model's ``NMS_THRESH_TEST`` (same
   class, or any class with ``NMS_CLASS_AGNOSTIC``), as the model's hard NMS would.
   Detections of one window are never compared with each other: the model's own selection (hard
   or soft NMS, box voting) already ran on them, and running soft-NMS again would decay their
   scores twice. A cross-window pair above the threshold is the same pixels read twice, so it is
   removed rather than decayed, whatever ``NMS_TYPE``.
5. **Detection limit.** The whole image keeps its ``max_detections * ceil(H * W / SIZE^2)``
   highest-scoring detections: ``TEST.DETECTIONS_PER_IMAGE`` for each tile's worth of area, the
   model's density, so the overlap strips (seen twice) do not raise it and a one-tile image keeps
   the model's limit. Each window is also limited by the model itself.

Shape shorthand:
    D: detections of all windows, in the whole image's pixels
    T: windows
    M: detections kept
"""

import math
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from detectron2.structures import Boxes, Instances, pairwise_iou

from ..postprocess import PostProcessing

__all__ = [
    "DEFAULT_COVER",
    "DEFAULT_EDGE_MARGIN",
    "DEFAULT_OVERLAP",
    "TiledPredictor",
    "tile_starts",
]

DEFAULT_OVERLAP = 0.25  # 100 px of a 400 px tile, as the demo's training tiles share
# Pixels within which a box "touches" a window's edge: a cut object's box is clipped to the
# window's edge by the model's post-processing, or ends a few pixels short of it.
DEFAULT_EDGE_MARGIN = 4.0
# A cut box is dropped only when a detection of the window that sees it whole covers at least this
# fraction of it: the other window must have found the object, not merely contain it.
DEFAULT_COVER = 0.5

# (H, W, C) image -> its detections, in its pixels
ImagePredictor = Callable[[np.ndarray], Instances]
Window = Tuple[int, int, int, int]  # x0, y0, x1, y1 in the whole image's pixels


def tile_starts(length: int, size: int, overlap_px: int) -> List[int]:
    """Window origins along one axis: the fewest ``size``-px windows covering ``length`` with at
    least ``overlap_px`` shared by neighbours, spread evenly from 0 to ``length - size``.

    An axis no longer than ``size`` is one window at 0 (of the axis' own length).
    """
    if length <= size:
        return [0]
    stride = size - overlap_px
    n = math.ceil((length - size) / stride) + 1
    return [round(i * (length - size) / (n - 1)) for i in range(n)]


class TiledPredictor:
    """A per-image predictor for images of any size, by overlapping windows of ``size`` px (see
    the module docstring for the windows and the merge).

    Args:
        predictor (callable): (h, w, C) image -> :class:`Instances` of that image (``pred_boxes``
            XYXY in its pixels, ``scores``, ``pred_classes``). Called once per window, with a
            C-contiguous crop in the format the caller's images are in.
        size (int): window side in pixels (``--tile``); at least ``size_divisibility``.
        overlap (float): fraction of ``size`` shared by neighbouring windows, in [0, 1)
            (``--tile-overlap``).
        postprocessing (PostProcessing): the model's (``model.postprocessing``): its
            ``nms_thresh`` and ``class_agnostic`` rule the cross-window NMS, its
            ``max_detections`` the whole image's limit.
        size_divisibility (int): the backbone's; a smaller window is refused.
        edge_margin (float): pixels within which a box touches a window's internal edge.
        cover (float): fraction of a cut box's area that a detection of the window seeing it
            whole must cover for the cut box to be dropped.

    Raises:
        ValueError: an argument out of range, named by its command-line flag.
    """

    def __init__(
        self,
        predictor: ImagePredictor,
        size: int,
        overlap: float = DEFAULT_OVERLAP,
        *,
        postprocessing: PostProcessing,
        size_divisibility: int = 1,
        edge_margin: float = DEFAULT_EDGE_MARGIN,
        cover: float = DEFAULT_COVER,
    ):
        self.check_arguments(size, overlap, size_divisibility)
        if not edge_margin >= 0:
            raise ValueError(f"edge_margin must be >= 0 pixels, got {edge_margin!r}")
        self.predictor = predictor
        self.size = int(size)
        self.overlap = float(overlap)
        self.overlap_px = math.floor(self.size * self.overlap)  # < size, as overlap < 1
        self.postprocessing = postprocessing
        self.edge_margin = float(edge_margin)
        self.cover = float(cover)

    @staticmethod
    def check_arguments(size: int, overlap: float, size_divisibility: int = 1) -> None:
        """ValueError naming ``--tile`` or ``--tile-overlap`` when one is out of range."""
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
            raise ValueError(f"--tile must be an integer number of pixels, got {size!r}")
        minimum = max(1, int(size_divisibility))
        if size < minimum:
            raise ValueError(
                f"--tile {size} is smaller than the model's size divisibility ({minimum} px: "
                f"the backbone's coarsest stride); use --tile {minimum} or more"
            )
        if isinstance(overlap, bool) or not (
            isinstance(overlap, (int, float)) and 0 <= overlap < 1
        ):
            raise ValueError(
                f"--tile-overlap must be a fraction of the tile in [0, 1), got {overlap!r}"
            )

    def windows(self, height: int, width: int) -> List[Window]:
        """The windows of an image, row by row: (x0, y0, x1, y1)."""
        return [
            (x0, y0, min(x0 + self.size, width), min(y0 + self.size, height))
            for y0 in tile_starts(height, self.size, self.overlap_px)
            for x0 in tile_starts(width, self.size, self.overlap_px)
        ]

    def max_detections(self, height: int, width: int) -> int:
        """The whole image's limit: ``max_detections`` per tile's worth of area."""
        return self.postprocessing.max_detections * math.ceil(height * width / self.size**2)

    def __call__(self, image: np.ndarray) -> Instances:
        """Detections of ``image`` (H, W, C), in its pixels, by decreasing score."""
        height, width = image.shape[:2]
        windows = self.windows(height, width)
        if len(windows) == 1:
            return self.predictor(image)  # nothing to merge: the untiled result
        detections = []
        for x0, y0, x1, y1 in windows:
            found = self.predictor(np.ascontiguousarray(image[y0:y1, x0:x1]))
            if tuple(found.image_size) != (y1 - y0, x1 - x0):
                raise ValueError(
                    f"the predictor returned detections for a {found.image_size} image, not the "
                    f"{(y1 - y0, x1 - x0)} window it was given"
                )
            detections.append(found)
        return self.merge(windows, detections, (height, width))

    def merge(
        self,
        windows: Sequence[Window],
        detections: Sequence[Instances],
        image_size: Tuple[int, int],
    ) -> Instances:
        """One image's detections from its windows': shifted, cut objects handed over, cross-
        window duplicates removed, limited (module docstring, steps 3-5).

        Args:
            windows: T windows (x0, y0, x1, y1).
            detections: T :class:`Instances`, each in its window's pixels.
            image_size: (H, W) of the whole image.

        Returns:
            Instances: M detections in the whole image's pixels, by decreasing score (ties: by
            window, then by the window's order).
        """
        boxes, scores, classes, window_ids = [], [], [], []
        for i, ((x0, y0, _, _), found) in enumerate(zip(windows, detections)):
            shift = torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
            boxes.append(found.pred_boxes.tensor.float().cpu() + shift)
            scores.append(found.scores.cpu())
            classes.append(found.pred_classes.cpu().long())
            window_ids.append(torch.full((len(found),), i, dtype=torch.int64))
        boxes, scores = torch.cat(boxes).reshape(-1, 4), torch.cat(scores)
        classes, window_ids = torch.cat(classes), torch.cat(window_ids)
        window_boxes = torch.tensor(windows, dtype=torch.float32).reshape(-1, 4)

        # Detections are grouped by window: window w's are boxes[spans[w][0]:spans[w][1]].
        ends = torch.tensor([len(found) for found in detections]).cumsum(0).tolist()
        spans = list(zip([0] + ends[:-1], ends))
        handed = self._handed_over(
            boxes, scores, classes, window_ids, window_boxes, spans, image_size
        )
        keep = ~handed
        keep &= ~self._cross_window_duplicates(boxes, scores, classes, window_boxes, spans, handed)
        kept = keep.nonzero().squeeze(1)
        order = torch.argsort(scores[kept], descending=True, stable=True)
        kept = kept[order][: self.max_detections(*image_size)]
        merged = Instances(tuple(image_size))
        merged.pred_boxes = Boxes(boxes[kept])
        merged.scores = scores[kept]
        merged.pred_classes = classes[kept]
        return merged

    def _handed_over(
        self, boxes: Tensor, scores: Tensor, classes: Tensor, window_ids: Tensor,
        window_boxes: Tensor, spans: Sequence[Tuple[int, int]], image_size: Tuple[int, int],
    ) -> Tensor:
        """(D,) bool: boxes touching an internal edge of their window that another window
        contains with ``edge_margin`` to spare on every side and covers with a detection of its
        own that is not itself handed over (step 3). Boxes are decided from the lowest score up,
        so of two cut readings that cover each other (an object inside the overlap strip, cut
        in both windows) the higher-scoring one stays: an object is never handed to nothing."""
        height, width = image_size
        m = self.edge_margin
        own = window_boxes[window_ids]  # (D, 4)
        # An edge on the image's border cuts nothing.
        touches = (
            ((boxes[:, 0] <= own[:, 0] + m) & (own[:, 0] > 0))
            | ((boxes[:, 1] <= own[:, 1] + m) & (own[:, 1] > 0))
            | ((boxes[:, 2] >= own[:, 2] - m) & (own[:, 2] < width))
            | ((boxes[:, 3] >= own[:, 3] - m) & (own[:, 3] < height))
        )
        limits = torch.tensor([0, 0, width, height], dtype=torch.float32)
        grown = boxes + torch.tensor([-m, -m, m, m])
        grown = torch.maximum(torch.minimum(grown, limits[2:].repeat(2)), limits[:2].repeat(2))
        areas = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(1)
        handed = torch.zeros_like(touches)
        touching = touches.nonzero().squeeze(1)
        for i in touching[torch.argsort(scores[touching], stable=True)].tolist():
            inside = (window_boxes[:, :2] <= grown[i, :2]).all(1) & (
                window_boxes[:, 2:] >= grown[i, 2:]
            ).all(1)
            inside[window_ids[i]] = False
            # detections of the windows that contain box i
            others = [torch.arange(*spans[w]) for w in inside.nonzero().squeeze(1).tolist()]
            if not others:
                continue
            others = torch.cat(others)
            others = others[~handed[others]]
            if not self.postprocessing.class_agnostic:
                others = others[classes[others] == classes[i]]
            lo = torch.maximum(boxes[others, :2], boxes[i, :2])
            hi = torch.minimum(boxes[others, 2:], boxes[i, 2:])
            covered = (hi - lo).clamp(min=0).prod(1) >= self.cover * areas[i]
            handed[i] = bool(covered.any())
        return handed

    def _cross_window_duplicates(
        self, boxes: Tensor, scores: Tensor, classes: Tensor, window_boxes: Tensor,
        spans: Sequence[Tuple[int, int]], handed: Tensor,
    ) -> Tensor:
        """(D,) bool: detections that a kept, higher-scoring detection of another window
        overlaps with IoU > ``nms_thresh`` (same class unless class-agnostic), greedily by
        decreasing score (step 4). A box ``handed`` over (step 3) is not kept, so it removes
        nothing: a cut piece scoring above the whole reading it was handed to must not take
        that reading with it. Only detections inside the intersection of two windows are
        compared, so the cost grows with the overlap strips, not with the image."""
        pp = self.postprocessing
        # rank 0 = highest score; ties by position, as the final sort orders them
        rank = torch.empty_like(classes)
        rank[torch.argsort(scores, descending=True, stable=True)] = torch.arange(len(scores))
        beaten_by: dict = {}  # detection -> higher-ranked detections of other windows over it
        for a, b in _overlapping_pairs(window_boxes):
            region = torch.maximum(window_boxes[a], window_boxes[b])
            region[2:] = torch.minimum(window_boxes[a, 2:], window_boxes[b, 2:])
            in_a = _intersecting(boxes, spans[a], region)
            in_b = _intersecting(boxes, spans[b], region)
            if len(in_a) == 0 or len(in_b) == 0:
                continue
            over = pairwise_iou(Boxes(boxes[in_a]), Boxes(boxes[in_b])) > pp.nms_thresh
            if not pp.class_agnostic:
                over &= classes[in_a][:, None] == classes[in_b][None, :]
            for i, j in over.nonzero().tolist():
                hi, lo = int(in_a[i]), int(in_b[j])
                if rank[hi] > rank[lo]:
                    hi, lo = lo, hi
                beaten_by.setdefault(lo, []).append(hi)
        removed = torch.zeros(len(scores), dtype=torch.bool)
        for lo in sorted(beaten_by, key=lambda d: int(rank[d])):
            removed[lo] = any(not removed[hi] and not handed[hi] for hi in beaten_by[lo])
        return removed


def _overlapping_pairs(window_boxes: Tensor) -> List[Tuple[int, int]]:
    """(a, b), a < b, of windows whose areas intersect."""
    lo = torch.maximum(window_boxes[:, None, :2], window_boxes[None, :, :2])
    hi = torch.minimum(window_boxes[:, None, 2:], window_boxes[None, :, 2:])
    meets = ((hi - lo) > 0).all(-1).triu(diagonal=1)
    return [tuple(p) for p in meets.nonzero().tolist()]


def _intersecting(boxes: Tensor, span: Tuple[int, int], region: Tensor) -> Tensor:
    """Indices of the detections ``boxes[span[0]:span[1]]`` (one window's) whose boxes meet
    ``region`` (x0, y0, x1, y1): only they can overlap a detection of a window whose intersection
    with this one is ``region``."""
    own = boxes[span[0] : span[1]]
    meets = (
        (own[:, 0] < region[2]) & (own[:, 2] > region[0])
        & (own[:, 1] < region[3]) & (own[:, 3] > region[1])
    )  # fmt: skip
    return meets.nonzero().squeeze(1) + span[0]
