"""Evaluation helpers: COCO AP with a fast implementation whatever detectron2 build is installed,
and the conversion of model outputs to COCO results that every tool shares."""

from .coco import FasterCOCOEvaluator, build_coco_evaluator, faster_cocoeval_class
from .results import coco_category_ids, instances_to_coco_results

__all__ = [
    "FasterCOCOEvaluator",
    "build_coco_evaluator",
    "coco_category_ids",
    "faster_cocoeval_class",
    "instances_to_coco_results",
]
