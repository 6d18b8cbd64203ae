"""What costs AP: each kind of error, and the AP gained if it alone were fixed.

In the manner of TIDE (Bolya et al., ECCV 2020) and the COCO ``analyze()`` decomposition, written
here from their definitions. For one IoU threshold t (the foreground threshold) and the
background threshold ``t_b`` (0.1, as TIDE), COCOeval first matches the detections as it does for
AP at t (per image and category, highest score first, area "all", at most 100 detections per
image and category). Every detection it leaves unmatched (a false positive; those matched to a
crowd region are ignored, as COCO ignores them) gets the first type that applies, comparing its
box with the non-crowd ground truth of its image, of every class:

1. **duplicate**: IoU >= t with a box of its own class, which a higher-scoring detection matched;
2. **classification**: IoU >= t with a box of another class (right place, wrong class);
3. **localisation**: t_b <= IoU < t with a box of its own class (right class, loose box);
4. **both**: t_b <= IoU < t with a box of another class (wrong class and loose box);
5. **background**: IoU < t_b with every box (a detection on nothing).

6. **missed**: a ground-truth box that no detection matched and that is not the box of a
   classification or localisation error (those would find it once fixed).

The "AP gained" of a type is COCOeval's AP at t with that type alone fixed, minus the AP at t as
it is: a classification error takes the class of its box, a localisation error takes its box
exactly (both become correct detections, unless the box is already matched or taken by a
higher-scoring fixed detection: then they are duplicates and removed); duplicates, "both" errors
and background detections are removed; missed boxes are removed from the ground truth. The gains
do not add up to the gap to 100: fixing one type changes what the others cost.

Every threshold of ``iou_thresholds`` is analysed on its own (a box at IoU 0.6 is correct at 0.5
and a localisation error at 0.75). Reported: the gain in AP50 (t = 0.5), AP75 (t = 0.75) and
AP@[.5:.95] (the mean of the gains over t = 0.50, 0.55, ..., 0.95; the mean of the ten APs is
COCO's AP).
"""

import contextlib
import copy
import io
from collections import defaultdict
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .data import average_precision, load_results, run_cocoeval

__all__ = [
    "BACKGROUND_IOU",
    "COCO_IOU_THRESHOLDS",
    "ERROR_TYPES",
    "ErrorBreakdown",
    "classify_errors",
    "error_breakdown",
]

ERROR_TYPES = ("classification", "localisation", "both", "duplicate", "background", "missed")
# TIDE's background threshold: below it a detection overlaps nothing.
BACKGROUND_IOU = 0.1
COCO_IOU_THRESHOLDS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2).tolist())
# COCO's detections per image (and category) for AP.
MAX_DETS = 100


class ErrorBreakdown(NamedTuple):
    """Attributes:
        iou_thresholds: the foreground thresholds analysed.
        background_iou: t_b.
        base_ap: {t: COCOeval's AP at t (percent)}.
        fixed_ap: {type: {t: AP at t with that type fixed}}.
        counts: {type: {t: number of errors of that type at t}}.
    """

    iou_thresholds: Tuple[float, ...]
    background_iou: float
    base_ap: Dict[float, float]
    fixed_ap: Dict[str, Dict[float, float]]
    counts: Dict[str, Dict[float, int]]

    def gain(self, error_type: str, metric: str = "AP") -> float:
        """AP gained if ``error_type`` were fixed: ``metric`` "AP50", "AP75" or "AP"
        (AP@[.5:.95], the mean over the ten COCO thresholds); NaN if not analysed."""
        thresholds = self._thresholds(metric)
        if thresholds is None:
            return float("nan")
        return float(np.mean([self.fixed_ap[error_type][t] - self.base_ap[t]
                              for t in thresholds]))

    def base(self, metric: str = "AP") -> float:
        thresholds = self._thresholds(metric)
        if thresholds is None:
            return float("nan")
        return float(np.mean([self.base_ap[t] for t in thresholds]))

    def _thresholds(self, metric: str) -> Optional[List[float]]:
        wanted = {"AP50": [0.5], "AP75": [0.75], "AP": list(COCO_IOU_THRESHOLDS)}[metric]
        have = [t for t in self.iou_thresholds if any(np.isclose(t, w) for w in wanted)]
        return have if len(have) == len(wanted) else None


class _Error(NamedTuple):
    det_id: int
    score: float
    kind: str
    gt_id: Optional[int]  # the box a classification / localisation error was aimed at


def _image_ious(gt: COCO, dt: COCO, image_id: int, det_ids: Sequence[int]):
    """IoU (D, G) of detections with the image's non-crowd ground truth, and those boxes' ids."""
    gts = [a for a in gt.imgToAnns.get(image_id, []) if not (a.get("iscrowd") or a.get("ignore"))]
    gt_ids = [a["id"] for a in gts]
    if not det_ids or not gts:
        return np.zeros((len(det_ids), len(gts))), gt_ids
    d = [dt.anns[i]["bbox"] for i in det_ids]
    g = [a["bbox"] for a in gts]
    # pycocotools' IoU, as COCOeval.computeIoU uses it (XYWH, no crowd boxes here).
    return np.asarray(mask_utils.iou(d, g, [0] * len(g))).reshape(len(d), len(g)), gt_ids


def classify_errors(
    gt: COCO, dt: COCO, E: COCOeval, background_iou: float = BACKGROUND_IOU
) -> Dict[float, Tuple[List[_Error], List[int]]]:
    """The false positives of each type and the missed boxes, at each threshold of ``E``.

    Args:
        E: COCOeval evaluated (``evaluate``) on ``gt`` / ``dt`` with area range "all" only.

    Returns:
        {t: (errors, missed gt ids)}, errors in descending score order.
    """
    thresholds = [float(t) for t in E.params.iouThrs]
    # Per image: the detections COCOeval looked at and their matches, one row per threshold.
    considered = defaultdict(list)  # image -> [(det id, score, matched (T,), ignored (T,))]
    matched_gt = defaultdict(set)  # t index -> gt ids matched
    for e in E.evalImgs:
        if e is None:
            continue
        for j, d in enumerate(e["dtIds"]):
            considered[e["image_id"]].append(
                (d, e["dtScores"][j], e["dtMatches"][:, j], e["dtIgnore"][:, j]))
        for t in range(len(thresholds)):
            matched_gt[t].update(int(g) for g, m in zip(e["gtIds"], e["gtMatches"][t]) if m > 0)
    errors = {t: [] for t in range(len(thresholds))}
    for image_id, dets in considered.items():
        det_ids = [d[0] for d in dets]
        ious, gt_ids = _image_ious(gt, dt, image_id, det_ids)
        gt_cats = np.array([gt.anns[g]["category_id"] for g in gt_ids])
        for row, (det_id, score, matches, ignored) in enumerate(dets):
            same = gt_cats == dt.anns[det_id]["category_id"]
            for t, thresh in enumerate(thresholds):
                if matches[t] > 0 or ignored[t]:
                    continue
                kind, target = _error_type(ious[row], same, thresh, background_iou)
                errors[t].append(_Error(det_id, float(score), kind,
                                        None if target is None else gt_ids[target]))
    images, cats = set(E.params.imgIds), set(E.params.catIds)
    boxes = [a["id"] for a in gt.dataset["annotations"]
             if a["image_id"] in images and a["category_id"] in cats
             and not (a.get("iscrowd") or a.get("ignore"))]
    out = {}
    for t, thresh in enumerate(thresholds):
        found = sorted(errors[t], key=lambda err: -err.score)
        aimed = {err.gt_id for err in found if err.kind in ("classification", "localisation")}
        missed = [g for g in boxes if g not in matched_gt[t] and g not in aimed]
        out[thresh] = (found, missed)
    return out


def _error_type(ious: np.ndarray, same: np.ndarray, t: float, t_b: float):
    """(type, index of the aimed ground-truth box or None) of one false positive."""
    best_same = ious[same].max(initial=0.0)
    best_other = ious[~same].max(initial=0.0)
    # COCOeval matches at IoU >= t (its threshold capped at 1 - 1e-10).
    t = min(t, 1 - 1e-10)
    if best_same >= t:
        return "duplicate", None
    if best_other >= t:
        return "classification", int(np.where(~same)[0][np.argmax(ious[~same])])
    if best_same >= t_b:
        return "localisation", int(np.where(same)[0][np.argmax(ious[same])])
    if best_other >= t_b:
        return "both", None
    return "background", None


def _fixed_results(
    gt: COCO, dt: COCO, errors: List[_Error], kind: str, matched: set
) -> List[Dict]:
    """The detections with the errors of ``kind`` fixed (see the module's docstring)."""
    changed = {}  # det id -> fixed detection, or None to remove it
    taken = set(matched)
    for err in errors:
        if err.kind != kind:
            continue
        if kind in ("classification", "localisation") and err.gt_id not in taken:
            taken.add(err.gt_id)
            fixed = dict(dt.anns[err.det_id])
            target = gt.anns[err.gt_id]
            if kind == "classification":
                fixed["category_id"] = target["category_id"]
            else:
                fixed["bbox"] = list(target["bbox"])
            changed[err.det_id] = fixed
        else:
            changed[err.det_id] = None
    out = []
    for det_id, ann in dt.anns.items():
        ann = changed.get(det_id, ann)
        if ann is not None:
            out.append({k: ann[k] for k in ("image_id", "category_id", "bbox", "score")})
    return out


def _without_missed(gt: COCO, missed: Sequence[int]) -> COCO:
    drop = set(missed)
    dataset = copy.copy(gt.dataset)
    dataset["annotations"] = [a for a in gt.dataset["annotations"] if a["id"] not in drop]
    fixed = COCO()
    fixed.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        fixed.createIndex()
    return fixed


def error_breakdown(
    gt: COCO,
    results: Sequence[Dict],
    *,
    iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
    background_iou: float = BACKGROUND_IOU,
    cocoeval_class: type = COCOeval,
    progress: Optional[Callable[[str], None]] = None,
) -> ErrorBreakdown:
    """Counts each type of error at each IoU threshold and the AP gained by fixing it alone.

    Args:
        gt: the ground truth (:func:`~.data.evaluator_ground_truth`).
        results: COCO results (dataset category ids), e.g. ``coco_instances_results.json``.
        iou_thresholds: foreground thresholds t to analyse (0.5 and 0.75 give AP50 / AP75 only).
        background_iou: t_b.
        cocoeval_class: computes the APs (pycocotools' ``COCOeval`` or a drop-in with the same
            ``eval["precision"]``, such as faster-coco-eval's); the matching that types the
            errors is always pycocotools'.
    """
    dt = load_results(gt, results)
    thresholds = tuple(float(t) for t in iou_thresholds)
    E = run_cocoeval(gt, dt, iou_thresholds=thresholds, all_areas_only=True,
                     max_dets=[MAX_DETS], accumulate=False)
    typed = classify_errors(gt, dt, E, background_iou)

    def ap_at(t: float, gt_: COCO, dt_: COCO) -> float:
        run = run_cocoeval(gt_, dt_, iou_thresholds=[t], all_areas_only=True,
                           max_dets=[MAX_DETS], cocoeval_class=cocoeval_class)
        return 100 * average_precision(run.eval["precision"])

    base_ap, counts = {}, {k: {} for k in ERROR_TYPES}
    fixed_ap = {k: {} for k in ERROR_TYPES}
    for i, t in enumerate(thresholds):
        errors, missed = typed[t]
        matched = {int(g) for e in E.evalImgs if e is not None
                   for g, m in zip(e["gtIds"], e["gtMatches"][i]) if m > 0}
        base_ap[t] = ap_at(t, gt, dt)
        for kind in ERROR_TYPES:
            if kind == "missed":
                counts[kind][t] = len(missed)
                fixed_ap[kind][t] = (ap_at(t, _without_missed(gt, missed), dt) if missed
                                     else base_ap[t])
                continue
            counts[kind][t] = sum(err.kind == kind for err in errors)
            if counts[kind][t] == 0:
                fixed_ap[kind][t] = base_ap[t]
                continue
            fixed = _fixed_results(gt, dt, errors, kind, matched)
            fixed_ap[kind][t] = ap_at(t, gt, load_results(gt, fixed))
        if progress is not None:
            progress(f"error breakdown: IoU {t:.2f} done")
    return ErrorBreakdown(thresholds, float(background_iou), base_ap, fixed_ap, counts)
