"""Evaluation helpers: COCO AP with a fast implementation whatever detectron2 build is installed."""

from .coco import FasterCOCOEvaluator, build_coco_evaluator, faster_cocoeval_class

__all__ = ["FasterCOCOEvaluator", "build_coco_evaluator", "faster_cocoeval_class"]
