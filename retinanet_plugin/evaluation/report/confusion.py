"""Confusion matrix with a background row and column, and the images with the most errors.

Matching: pycocotools' ``COCOeval`` with ``useCats=0`` (class-agnostic) at one IoU threshold, on
the detections scoring at least a score threshold, area range "all", every detection of an image
kept. COCOeval's own greedy rule then pairs them: detections in descending score order, each
with the still unmatched ground-truth box of any class with the highest IoU >= the threshold;
a detection matched to a crowd region (``iscrowd``) and the crowd regions themselves are not
counted, as COCO ignores them.

Counts, rows = ground truth (K classes, then background), columns = detections (K classes, then
background):

- ``[g, d]``: a ground-truth box of class g matched to a detection of class d (the diagonal:
  correct; off it: a confusion);
- ``[g, K]``: a ground-truth box of class g that no detection matched (missed);
- ``[K, d]``: a detection of class d that matched no ground truth (a false detection on the
  background);
- ``[K, K]``: always 0.

Per image, *missed* counts the ground-truth boxes not matched to a detection of their own class
(row g off the diagonal) and *false* the detections not matched to ground truth of their own
class (column d off the diagonal), so a confusion counts once in each; the worst images are those
with the most missed + false.
"""

from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
from pycocotools.coco import COCO

from .data import load_results, run_cocoeval

__all__ = ["ConfusionResult", "ImageErrors", "confusion_matrix", "worst_images"]


class ImageErrors(NamedTuple):
    image_id: int
    missed: int
    false: int
    num_gt: int
    num_dets: int  # detections at or above the score threshold, crowd matches excluded
    # XYWH boxes of the missed ground truth and of the false detections, to mark them.
    missed_boxes: Tuple[Tuple[float, ...], ...] = ()
    false_boxes: Tuple[Tuple[float, ...], ...] = ()

    @property
    def errors(self) -> int:
        return self.missed + self.false


class ConfusionResult(NamedTuple):
    """Attributes:
        matrix: (K + 1, K + 1) int64 counts, rows ground truth, columns detections, index K the
            background.
        category_ids: K category ids, the order of rows and columns.
        names: K class names.
        score_thresh, iou_thresh: the thresholds of the matching.
        images: per image errors, every image of the ground truth.
    """

    matrix: np.ndarray
    category_ids: List[int]
    names: List[str]
    score_thresh: float
    iou_thresh: float
    images: List[ImageErrors]


def confusion_matrix(
    gt: COCO, results: Sequence[Dict], *, score_thresh: float, iou_thresh: float
) -> ConfusionResult:
    """Counts of ground truth vs detections (see the module's docstring).

    Args:
        gt: the ground truth (:func:`~.data.evaluator_ground_truth`).
        results: COCO results (dataset category ids).
        score_thresh: detections scoring below this are left out.
        iou_thresh: a detection and a ground-truth box pair when their IoU is at least this.
    """
    if not 0 <= score_thresh <= 1 or not 0 < iou_thresh <= 1:
        raise ValueError(f"score threshold must be in [0, 1] and IoU threshold in (0, 1], got "
                         f"{score_thresh} and {iou_thresh}")
    cat_ids = sorted(gt.getCatIds())
    index = {c: i for i, c in enumerate(cat_ids)}
    bg = len(cat_ids)
    kept = [r for r in results if r["score"] >= score_thresh]
    dt = load_results(gt, kept)
    per_image = max([len(dt.getAnnIds(imgIds=i)) for i in gt.getImgIds()] + [1])
    E = run_cocoeval(gt, dt, iou_thresholds=[iou_thresh], all_areas_only=True,
                     max_dets=[per_image], use_cats=False, accumulate=False)
    matrix = np.zeros((bg + 1, bg + 1), dtype=np.int64)
    by_image = {e["image_id"]: e for e in E.evalImgs if e is not None}
    images = []
    for image_id in sorted(gt.getImgIds()):
        m = np.zeros_like(matrix)
        e = by_image.get(image_id)
        missed, false = [], []
        if e is not None:
            gt_class = {g: index[gt.anns[g]["category_id"]] for g in e["gtIds"]}
            for g, matched, ignored in zip(e["gtIds"], e["gtMatches"][0], e["gtIgnore"]):
                if not ignored and matched == 0:
                    m[gt_class[g], bg] += 1
                    missed.append(tuple(gt.anns[g]["bbox"]))
            for d, matched, ignored in zip(e["dtIds"], e["dtMatches"][0], e["dtIgnore"][0]):
                if ignored:
                    continue
                d_class = index[dt.anns[d]["category_id"]]
                row = gt_class[int(matched)] if matched > 0 else bg
                m[row, d_class] += 1
                if row != d_class:  # on the background, or on a box of another class
                    false.append(tuple(dt.anns[d]["bbox"]))
                    if row != bg:
                        missed.append(tuple(gt.anns[int(matched)]["bbox"]))
        matrix += m
        diagonal = np.trace(m[:bg, :bg])
        images.append(ImageErrors(
            image_id=image_id,
            missed=int(m[:bg].sum() - diagonal),
            false=int(m[:, :bg].sum() - diagonal),
            num_gt=int(m[:bg].sum()),
            num_dets=int(m[:, :bg].sum()),
            missed_boxes=tuple(missed),
            false_boxes=tuple(false),
        ))  # fmt: skip
    names = [gt.cats[c]["name"] for c in cat_ids]
    return ConfusionResult(matrix, cat_ids, names, float(score_thresh), float(iou_thresh), images)


def worst_images(confusion: ConfusionResult, k: int) -> List[ImageErrors]:
    """The ``k`` images with the most missed + false detections (ties: the smaller image id
    first); images without an error are never listed."""
    ranked = sorted((im for im in confusion.images if im.errors > 0),
                    key=lambda im: (-im.errors, im.image_id))
    return ranked[:k]
