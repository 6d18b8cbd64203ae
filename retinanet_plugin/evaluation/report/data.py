"""Ground truth and detections as COCOEvaluator scores them, and quiet COCOeval runs.

The report scores the ``coco_instances_results.json`` that ``COCOEvaluator`` wrote against the
ground truth it read: the ``COCO`` object ``COCOEvaluator`` itself builds for the dataset (the
file of the metadata's ``json_file``, or the ``<dataset>_coco_format.json`` cache it converts with
``convert_to_coco_json`` when the dataset has no COCO file). Matching and AP are pycocotools'
``COCOeval``, as detectron2 runs it for box AP (``iouType="bbox"``, ``maxDets`` [1, 10, 100]).

Shape shorthand (``COCOeval.eval``):
    T: IoU thresholds (10: 0.50, 0.55, ..., 0.95)
    R: recall thresholds (101: 0, 0.01, ..., 1)
    K: categories
    A: area ranges (all, small, medium, large)
    M: detections per image (1, 10, 100)
"""

import contextlib
import copy
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectron2.evaluation import COCOEvaluator

__all__ = [
    "average_precision",
    "evaluator_ground_truth",
    "load_results",
    "read_results_file",
    "run_cocoeval",
]


def evaluator_ground_truth(dataset_name: str, output_dir: Optional[str] = None) -> COCO:
    """The ground truth of ``dataset_name`` as ``COCOEvaluator`` reads it.

    Args:
        dataset_name: a registered dataset.
        output_dir: where ``COCOEvaluator`` keeps its converted copy for a dataset without a COCO
            JSON file (its own ``output_dir``, the folder of the results file).

    Returns:
        COCO: the evaluator's own ``_coco_api``.
    """
    # The evaluator's own object: the same file, conversion and cache as the AP it reported.
    evaluator = COCOEvaluator(dataset_name, output_dir=output_dir, use_fast_impl=False)
    gt = evaluator._coco_api
    if "annotations" not in gt.dataset:
        raise ValueError(f"dataset {dataset_name} has no annotations: nothing to report on")
    return gt


def read_results_file(path: str) -> List[Dict[str, Any]]:
    """COCO results (``image_id``, ``category_id``, XYWH ``bbox``, ``score``) from ``path``.

    Raises:
        FileNotFoundError / ValueError: naming the file and what is wrong with it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"results file {path}: no such file")
    with open(path) as f:
        try:
            results = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"results file {path} is not valid JSON: {e}") from e
    if not isinstance(results, list):
        raise ValueError(f"results file {path}: expected a list of detections, got "
                         f"{type(results).__name__}")
    for i, r in enumerate(results):
        missing = [k for k in ("image_id", "category_id", "bbox", "score")
                   if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"results file {path}: detection {i} lacks {missing}")
    return results


def load_results(gt: COCO, results: Sequence[Dict[str, Any]], source: str = "results") -> COCO:
    """Detections as a ``COCO`` object, as ``COCOEvaluator`` loads them (``gt.loadRes``).

    Unlike ``loadRes``, an empty list gives an empty set (every AP 0), and detections of images
    or categories the ground truth lacks are refused by name (``source``: where they came from).
    """
    images, categories = set(gt.getImgIds()), set(gt.getCatIds())
    unknown_images = sorted({r["image_id"] for r in results} - images)
    if unknown_images:
        raise ValueError(f"{source}: image ids {unknown_images[:10]} are not in the ground truth "
                         "(results of another dataset?)")
    unknown_cats = sorted({r["category_id"] for r in results} - categories)
    if unknown_cats:
        raise ValueError(f"{source}: category ids {unknown_cats} are not in the ground truth "
                         f"(its ids: {sorted(categories)})")
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            # loadRes adds "area" and "id" to the dicts it is given.
            return gt.loadRes(copy.deepcopy(list(results)))
        empty = COCO()
        empty.dataset = {"images": list(gt.dataset["images"]), "annotations": [],
                         "categories": copy.deepcopy(gt.dataset.get("categories", []))}
        empty.createIndex()
    return empty


def run_cocoeval(
    gt: COCO,
    dt: COCO,
    *,
    iou_thresholds: Optional[Sequence[float]] = None,
    all_areas_only: bool = False,
    max_dets: Optional[Sequence[int]] = None,
    use_cats: bool = True,
    accumulate: bool = True,
    cocoeval_class: type = COCOeval,
) -> COCOeval:
    """``COCOeval(gt, dt, "bbox")`` evaluated (and accumulated), its prints swallowed.

    Args:
        iou_thresholds: replaces ``params.iouThrs`` (default: COCO's ten).
        all_areas_only: evaluate area range "all" only (the others cost time and are not read).
        max_dets: replaces ``params.maxDets`` (default [1, 10, 100]).
        use_cats: False matches detections to ground truth of any class (``params.useCats``).
        cocoeval_class: pycocotools' ``COCOeval`` or a drop-in with the same ``eval`` arrays.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        E = cocoeval_class(gt, dt, "bbox")
        if iou_thresholds is not None:
            E.params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
        if all_areas_only:
            E.params.areaRng = E.params.areaRng[:1]
            E.params.areaRngLbl = E.params.areaRngLbl[:1]
        if max_dets is not None:
            E.params.maxDets = list(max_dets)
        E.params.useCats = int(use_cats)
        E.evaluate()
        if accumulate:
            E.accumulate()
    return E


def average_precision(precision: np.ndarray) -> float:
    """COCO's AP of a slice of ``eval["precision"]``: the mean of its valid entries (-1 marks a
    class without ground truth), as ``COCOeval.summarize`` averages; 0-1, NaN if none."""
    valid = precision[precision > -1]
    return float(np.mean(valid)) if valid.size else float("nan")
