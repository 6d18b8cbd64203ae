"""Training hooks of retinanet_plugin."""

import logging
from typing import Any, Optional

from detectron2.engine import HookBase, hooks
from detectron2.utils import comm

from ..analysis.curves import write_training_curves

__all__ = ["SkippedImagesHook", "TrainingCurvesHook"]

logger = logging.getLogger(__name__)


class SkippedImagesHook(HookBase):
    """Puts the number of images skipped so far (``DATALOADER.SKIP_UNREADABLE_IMAGES``) in the
    metrics as ``data/skipped_images``, every step (a shared integer read, no device work)."""

    def __init__(self, skipped: Any):
        """
        Args:
            skipped: a ``multiprocessing.Value`` counter (``RobustDatasetMapper.skipped``).
        """
        self.skipped = skipped

    def after_step(self) -> None:
        self.trainer.storage.put_scalar(
            "data/skipped_images", self.skipped.value, smoothing_hint=False
        )


class TrainingCurvesHook(HookBase):
    """Writes ``results.csv`` and ``training_curves.png`` (losses, learning rate, AP over
    iterations; :func:`retinanet_plugin.analysis.curves.write_training_curves`) from the run's
    ``metrics.json``, after each evaluation and at the end of training (main process only).

    Register it after detectron2's ``PeriodicWriter``: hooks run in order, so the writer has
    flushed the step's metrics (and, in ``after_train``, the final evaluation's) by then. A
    failure to read or draw is logged as a warning and never ends the run: the checkpoints and
    ``metrics.json`` are written by other hooks and are not touched here.

    Args:
        output_dir: the folder of ``metrics.json``; None: the trainer's ``cfg.OUTPUT_DIR`` (a
            ``DefaultTrainer``).
        test_set: the evaluated dataset, named in the picture; None: the trainer's
            ``cfg.DATASETS.TEST[0]`` when it has a cfg.
    """

    def __init__(self, output_dir: Optional[str] = None, test_set: Optional[str] = None):
        self._output_dir = output_dir
        self._test_set = test_set

    def _target(self):
        cfg = getattr(self.trainer, "cfg", None)
        output_dir = self._output_dir or cfg.OUTPUT_DIR
        test_set = self._test_set
        if test_set is None and cfg is not None and len(cfg.DATASETS.TEST):
            test_set = cfg.DATASETS.TEST[0]
        return output_dir, test_set

    def _write(self) -> None:
        if not comm.is_main_process():
            return
        try:
            output_dir, test_set = self._target()
            csv_path, picture = write_training_curves(output_dir, test_set=test_set)
        except FileNotFoundError as e:  # a run that ended before its first log line
            logger.info("Training curves not written: %s", e)
            return
        except Exception as e:  # a picture is never worth a training run
            logger.warning("Training curves not written (%s: %s); training goes on",
                           type(e).__name__, e)
            return
        logger.info("Training curves: %s, %s", csv_path, picture)

    def after_step(self) -> None:
        # An evaluation (EvalHook, registered before) put its AP at this iteration; it reaches
        # metrics.json when PeriodicWriter next flushes (this step, if the periods agree), so
        # the redraw waits for that flush. The last step's evaluation is drawn by after_train.
        next_iter = self.trainer.iter + 1
        if next_iter >= self.trainer.max_iter:
            return
        latest = self.trainer.storage.latest()
        if any(key.endswith("/AP") and it == self.trainer.iter
               for key, (_, it) in latest.items()):
            self._evaluation_waiting = True
        if getattr(self, "_evaluation_waiting", False) and self._writer_flushed(next_iter):
            self._evaluation_waiting = False
            self._write()

    def _writer_flushed(self, next_iter: int) -> bool:
        """Whether a ``PeriodicWriter`` of the trainer wrote metrics.json at this step (no
        writer found: assume it did)."""
        periods = [h._period for h in self.trainer._hooks if isinstance(h, hooks.PeriodicWriter)]
        return not periods or any(next_iter % p == 0 for p in periods)

    def after_train(self) -> None:
        self._write()
