"""The detections picture drawn after training: the first test set's detections, as
COCOEvaluator saved them, beside its ground truth (``OUTPUT_DIR/val_predictions.png``).

Shared by both entry points of ``train_net.py``: a YAML config's ``Trainer`` and a Python (lazy)
config's trainer (:mod:`retinanet_plugin.engine.lazy_train`).
"""

import logging
import os
from typing import Optional, Tuple

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..visualize import save_prediction_grid

__all__ = [
    "PREDICTIONS_PICTURE",
    "RESULTS_FILE",
    "PredictionsPicture",
    "results_version",
    "save_predictions_picture",
    "yacs_picture_files",
]

PREDICTIONS_PICTURE = "val_predictions.png"
# What COCOEvaluator writes in its output_dir.
RESULTS_FILE = "coco_instances_results.json"

logger = logging.getLogger(__name__)


def results_version(results_file: Optional[str]) -> Optional[Tuple[int, int]]:
    """Identifies the results file (None if absent), to tell a rewrite from a stale one."""
    if results_file is None or not os.path.isfile(results_file):
        return None
    stat = os.stat(results_file)
    return stat.st_mtime_ns, stat.st_size


def save_predictions_picture(
    dataset_name: Optional[str],
    results_file: Optional[str],
    picture_file: str,
    stale_version: Optional[Tuple[int, int]] = None,
) -> None:
    """Draws the detections of ``results_file`` on the images of ``dataset_name`` (main
    process only).

    Args:
        stale_version: :func:`results_version` before this run evaluated; a results file still
            at that version was left by an earlier run and is not drawn.
    """
    if not comm.is_main_process() or dataset_name is None:
        return
    version = results_version(results_file)
    if version is None or version == stale_version:
        return
    path = save_prediction_grid(dataset_name, results_file, picture_file)
    logging.getLogger("detectron2").info("Detections drawn in %s", path)


def yacs_picture_files(cfg) -> Tuple[Optional[str], Optional[str], str]:
    """(first test set, its COCOEvaluator results file, the picture) of a YAML config's run,
    as :func:`save_predictions_picture` takes them."""
    picture = os.path.join(cfg.OUTPUT_DIR, PREDICTIONS_PICTURE)
    if not cfg.DATASETS.TEST:
        return None, None, picture
    name = cfg.DATASETS.TEST[0]
    return name, os.path.join(cfg.OUTPUT_DIR, "inference", name, RESULTS_FILE), picture


class PredictionsPicture(HookBase):
    """After a successful training and its final evaluation, draws the detections.

    detectron2 calls ``after_train`` in a ``finally``, after a failed step too, and EvalHook's
    final evaluation may not have run then; drawing would show the results file of an earlier run
    in the same output folder. So this draws only when every step ran (the trainer's ``iter``
    reaches ``max_iter`` only then) and the results file was rewritten since ``before_train``.

    Args:
        dataset_name, results_file, picture_file: as :func:`save_predictions_picture`; all None
            (a ``DefaultTrainer``): read from the trainer's yacs ``cfg`` (``DATASETS.TEST[0]``,
            its folder under ``OUTPUT_DIR/inference``, ``OUTPUT_DIR/val_predictions.png``).
    """

    def __init__(
        self,
        dataset_name: Optional[str] = None,
        results_file: Optional[str] = None,
        picture_file: Optional[str] = None,
    ):
        self._where = None if picture_file is None else (dataset_name, results_file, picture_file)

    def _target(self) -> Tuple[Optional[str], Optional[str], str]:
        return self._where if self._where is not None else yacs_picture_files(self.trainer.cfg)

    def before_train(self):
        self._stale_version = results_version(self._target()[1])

    def after_train(self):
        if self.trainer.iter < self.trainer.max_iter:
            return
        save_predictions_picture(*self._target(), self._stale_version)
