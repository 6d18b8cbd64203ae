"""The evaluation report: why the AP is what it is (per-class AP, precision-recall curves, a
confusion matrix, the AP each error type costs, the worst images), computed from COCOEvaluator's
results file and ground truth with pycocotools' COCOeval. See :mod:`.writer`."""

from .confusion import ConfusionResult, ImageErrors, confusion_matrix, worst_images
from .data import evaluator_ground_truth, load_results, read_results_file, run_cocoeval
from .errors import BACKGROUND_IOU, ERROR_TYPES, ErrorBreakdown, error_breakdown
from .per_class import ClassRow, PRCurve, per_class_table, pr_curves
from .writer import (
    ReportSettings,
    evaluation_reports,
    model_cost_of,
    report_settings,
    write_report,
)

__all__ = [
    "BACKGROUND_IOU",
    "ClassRow",
    "ConfusionResult",
    "ERROR_TYPES",
    "ErrorBreakdown",
    "ImageErrors",
    "PRCurve",
    "ReportSettings",
    "confusion_matrix",
    "error_breakdown",
    "evaluation_reports",
    "evaluator_ground_truth",
    "load_results",
    "model_cost_of",
    "per_class_table",
    "pr_curves",
    "read_results_file",
    "report_settings",
    "run_cocoeval",
    "worst_images",
    "write_report",
]
