"""Per-class AP, AP50, AP75, AR@100 and precision-recall curves, read from one COCOeval run.

Every number is an entry of ``COCOeval.eval`` after the run detectron2's ``COCOEvaluator`` makes
(bbox, default params): a class's AP is the mean over IoU thresholds and the 101 recall
thresholds of the interpolated precision (area "all", 100 detections per image), its AP50 the
mean at IoU 0.5 alone, and its precision-recall curve at IoU t is that 101-point interpolated
precision against recall, so the area under the plotted curve (101-point rule) is the class's AP
at t.

Shape shorthand: as :mod:`retinanet_plugin.evaluation.report.data`.
"""

from typing import Dict, List, NamedTuple, Sequence

import numpy as np
from pycocotools.cocoeval import COCOeval

from .data import average_precision

__all__ = ["ClassRow", "PRCurve", "per_class_table", "pr_curves"]

# Indices into COCOeval.eval arrays: area range "all", the last (largest) maxDets.
_ALL_AREAS, _MAX_DETS = 0, -1


class ClassRow(NamedTuple):
    """One class of the table; AP values in percent, NaN for a class without ground truth."""

    category_id: int
    name: str
    num_gt: int
    num_dets: int
    ap: float
    ap50: float
    ap75: float
    ar100: float


class PRCurve(NamedTuple):
    """Interpolated precision (R,) at the recall thresholds (R,) of one class at one IoU."""

    category_id: int
    name: str
    iou: float
    recall: np.ndarray
    precision: np.ndarray
    ap: float  # percent: the 101-point mean of ``precision``


def _iou_index(E: COCOeval, iou: float) -> int:
    index = np.where(np.isclose(E.params.iouThrs, iou))[0]
    if index.size == 0:
        raise ValueError(f"IoU {iou} is not one of the evaluation's thresholds "
                         f"{E.params.iouThrs.tolist()}")
    return int(index[0])


def _counts(E: COCOeval) -> Dict[str, Dict[int, int]]:
    gt = {k: 0 for k in E.params.catIds}
    for ann in E.cocoGt.dataset["annotations"]:
        if ann["category_id"] in gt and not ann.get("iscrowd", 0):
            gt[ann["category_id"]] += 1
    dets = {k: 0 for k in E.params.catIds}
    for ann in E.cocoDt.dataset["annotations"]:
        if ann["category_id"] in dets:
            dets[ann["category_id"]] += 1
    return {"gt": gt, "dets": dets}


def per_class_table(E: COCOeval) -> List[ClassRow]:
    """AP, AP50, AP75 and AR@100 (percent) of each category, in ``params.catIds`` order.

    Args:
        E: an evaluated and accumulated ``COCOeval`` with COCO's default params.
    """
    precision, recall = E.eval["precision"], E.eval["recall"]  # (T, R, K, A, M), (T, K, A, M)
    i50, i75 = _iou_index(E, 0.5), _iou_index(E, 0.75)
    counts = _counts(E)
    rows = []
    for k, cat_id in enumerate(E.params.catIds):
        p = precision[:, :, k, _ALL_AREAS, _MAX_DETS]
        r = recall[:, k, _ALL_AREAS, _MAX_DETS]
        rows.append(ClassRow(
            category_id=cat_id,
            name=E.cocoGt.cats[cat_id]["name"],
            num_gt=counts["gt"][cat_id],
            num_dets=counts["dets"][cat_id],
            ap=100 * average_precision(p),
            ap50=100 * average_precision(p[i50]),
            ap75=100 * average_precision(p[i75]),
            ar100=100 * average_precision(r),
        ))  # fmt: skip
    return rows


def pr_curves(E: COCOeval, ious: Sequence[float] = (0.5, 0.75)) -> List[PRCurve]:
    """The precision-recall curve of each category with ground truth at each IoU of ``ious``.

    Precision where recall was never reached is 0, as COCOeval counts it in AP.
    """
    curves = []
    for iou in ious:
        t = _iou_index(E, iou)
        for k, cat_id in enumerate(E.params.catIds):
            p = E.eval["precision"][t, :, k, _ALL_AREAS, _MAX_DETS]
            if not (p > -1).any():
                continue  # no ground truth of this class: no curve
            curves.append(PRCurve(cat_id, E.cocoGt.cats[cat_id]["name"], float(iou),
                                  np.asarray(E.params.recThrs, dtype=np.float64),
                                  p.astype(np.float64), 100 * average_precision(p)))
    return curves
