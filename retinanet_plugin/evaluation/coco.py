"""COCO box AP through faster-coco-eval when detectron2's compiled COCOeval is absent.

detectron2's ``COCOEvaluator(use_fast_impl=True)`` evaluates with ``COCOeval_opt``, whose
per-image matching and accumulation are in ``detectron2._C``; the offline (pure-Python) install
of this project lacks them, and the official pycocotools ``COCOeval`` it falls back to is slow on
COCO-sized sets (Python loops over images x categories). faster-coco-eval (PyPI) ships the same
algorithm in C++ as ``COCOeval_faster``, a drop-in for pycocotools' class: same constructor,
``params``, ``eval["precision"]`` and ``stats``, and it accepts pycocotools ``COCO`` objects.

Both the 2022 detectron2 snapshot and current upstream pick the evaluator class inside
``COCOEvaluator._eval_predictions`` by reading the module-level name ``COCOeval_opt`` of
``detectron2.evaluation.coco_evaluation`` at call time (upstream passes it as ``cocoeval_fn``,
the snapshot's ``_evaluate_predictions_on_coco`` reads it itself). :class:`FasterCOCOEvaluator`
binds that name to faster-coco-eval's class for the duration of its own evaluation only, so
everything else of ``COCOEvaluator`` (result conversion, category mapping, the saved
``coco_instances_results.json``, the AP table and per-category AP) is detectron2's own.
"""

import logging
from typing import Optional
from unittest import mock

from detectron2.evaluation import COCOEvaluator, coco_evaluation

from ..utils import has_compiled_ops

__all__ = ["FasterCOCOEvaluator", "build_coco_evaluator", "faster_cocoeval_class"]

logger = logging.getLogger(__name__)


def faster_cocoeval_class() -> Optional[type]:
    """faster-coco-eval's pycocotools-compatible ``COCOeval_faster``, or None if not installed."""
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        return None
    return COCOeval_faster


class FasterCOCOEvaluator(COCOEvaluator):
    """detectron2's :class:`COCOEvaluator` computing AP with faster-coco-eval's ``COCOeval``.

    Takes the same arguments as ``COCOEvaluator`` except ``use_fast_impl`` (always the fast
    path, here faster-coco-eval's). Raises ImportError naming the package when it is missing.
    """

    def __init__(self, dataset_name: str, *args, **kwargs):
        if "use_fast_impl" in kwargs:
            raise TypeError("FasterCOCOEvaluator always uses the fast implementation; "
                            "drop use_fast_impl")
        self._cocoeval_class = faster_cocoeval_class()
        if self._cocoeval_class is None:
            raise ImportError(
                "FasterCOCOEvaluator needs the PyPI package faster-coco-eval "
                "(pip install -r requirements.txt)"
            )
        super().__init__(dataset_name, *args, use_fast_impl=True, **kwargs)

    def _eval_predictions(self, predictions, img_ids=None):
        with mock.patch.object(coco_evaluation, "COCOeval_opt", self._cocoeval_class):
            return super()._eval_predictions(predictions, img_ids=img_ids)


def build_coco_evaluator(dataset_name: str, output_dir: Optional[str] = None) -> COCOEvaluator:
    """The fastest exact COCO evaluator available for ``dataset_name``.

    detectron2's compiled ``COCOeval_opt`` when ``detectron2._C`` is a real build, else
    faster-coco-eval (:class:`FasterCOCOEvaluator`), else the official pycocotools ``COCOeval``.
    All three give the same AP (tested in tests/test_evaluation.py).
    """
    if has_compiled_ops():
        return COCOEvaluator(dataset_name, output_dir=output_dir, use_fast_impl=True)
    if faster_cocoeval_class() is not None:
        return FasterCOCOEvaluator(dataset_name, output_dir=output_dir)
    logger.warning(
        "Neither detectron2's compiled ops nor faster-coco-eval are installed: evaluating with "
        "pycocotools, which is slow on large sets (pip install faster-coco-eval)"
    )
    return COCOEvaluator(dataset_name, output_dir=output_dir, use_fast_impl=False)
