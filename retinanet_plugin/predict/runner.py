"""The model as the evaluator runs it (:func:`evaluation_model`), and the :class:`Predictor`
that runs it on batches of frames."""

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch

from detectron2.config import CfgNode
from detectron2.structures import Instances

from ..lazy import tta_augmentation, tta_model
from ..postprocess import PostProcessing
from ..test_time_augmentation import FocalRetinaNetWithTTA
from .inputs import Frame

__all__ = ["Predictor", "evaluation_model"]

# The tool's logger, so the log lines read as those of ``python -m retinanet_plugin.tools.predict``.
logger = logging.getLogger("retinanet_plugin.tools.predict")


def evaluation_model(cfg, model) -> Tuple[torch.nn.Module, Optional[Dict[str, Any]]]:
    """The model as ``train_net.py`` evaluates it: itself, or with ``TEST.AUG.ENABLED`` wrapped
    in :class:`FocalRetinaNetWithTTA` as ``Trainer.test_with_TTA`` wraps it (a ``.py`` config:
    with ``dataloader.tta``, by :func:`~retinanet_plugin.lazy.tta_model`, as its lazy path
    evaluates it).

    Raises:
        UnsupportedKeyError: a test-time key that the path (eager or TTA) cannot honour, named
            with the override that runs without it (:meth:`PostProcessing.check`).

    Returns:
        The model to run, and for ``images.json`` the augmentation (None without).
    """
    if not isinstance(cfg, CfgNode):
        augmentation = tta_augmentation(cfg)
        if augmentation is None:
            model.postprocessing.check("eager")
            return model, None
        _log_augmentation("dataloader.tta", augmentation)
        return tta_model(cfg, model), augmentation  # checks the "tta" path
    if not cfg.TEST.AUG.ENABLED:
        PostProcessing.from_config(cfg).check("eager")
        return model, None
    PostProcessing.from_config(cfg).check("tta")
    augmentation = {
        "min_sizes": list(cfg.TEST.AUG.MIN_SIZES),
        "max_size": cfg.TEST.AUG.MAX_SIZE,
        "flip": cfg.TEST.AUG.FLIP,
    }
    _log_augmentation("TEST.AUG.ENABLED", augmentation)
    return FocalRetinaNetWithTTA(cfg, model), augmentation


def _log_augmentation(key: str, augmentation: Dict[str, Any]) -> None:
    logger.info(
        "%s: test-time augmentation (shortest edges %s, max size %d, flip %s; "
        "FocalRetinaNetWithTTA as train_net.py's Trainer.test_with_TTA), so the results are "
        "those of the evaluator's inference_TTA/, not inference/",
        key, augmentation["min_sizes"], augmentation["max_size"], augmentation["flip"],
    )


class Predictor:
    """Batches :class:`Frame` s of equal padded size and runs the model on them.

    Args:
        model: the detector, or its :class:`FocalRetinaNetWithTTA` wrapper.
        batch_size (int): frames per call of ``model``.
        size_divisibility (int): the backbone's; frames that pad to the same size batch.
    """

    def __init__(self, model, batch_size: int, size_divisibility: int):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.size_divisibility = max(1, size_divisibility)
        self._pending: List[Frame] = []

    def _padded_size(self, tensor: torch.Tensor) -> Tuple[int, int]:
        d = self.size_divisibility
        return (-(-tensor.shape[-2] // d) * d, -(-tensor.shape[-1] // d) * d)

    def add(self, frame: Frame) -> List[Tuple[Frame, Instances]]:
        """Queue ``frame``; returns the detections of the batch this completes, if any."""
        done = []
        if self._pending and self._padded_size(self._pending[0].inputs["image"]) != (
            self._padded_size(frame.inputs["image"])
        ):
            done = self.flush()
        self._pending.append(frame)
        if len(self._pending) >= self.batch_size:
            done += self.flush()
        return done

    @torch.no_grad()
    def flush(self) -> List[Tuple[Frame, Instances]]:
        """Run the queued frames; returns each with its detections (on the CPU, boxes in
        original pixels)."""
        if not self._pending:
            return []
        batch, self._pending = self._pending, []
        outputs = self.model([frame.inputs for frame in batch])
        return [(frame, out["instances"].to("cpu")) for frame, out in zip(batch, outputs)]
