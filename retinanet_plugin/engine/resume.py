"""What a resumed run needs beyond detectron2's checkpoint to continue exactly where it stopped.

detectron2's checkpoint holds the model, optimizer, LR scheduler and iteration. Not in it:

- the position in the training data stream: a resumed run restarts ``TrainingSampler`` from its
  first index, so it trains again on the batches of iterations 0, 1, ... (see
  :class:`~retinanet_plugin.data.sampler.ResumableTrainingSampler`);
- with detectron2 0.6 (the 2022 snapshot), the optimizer (SGD momentum and the learning rate
  the scheduler last set) and AMP's grad scaler: its ``DefaultTrainer.state_dict`` saves only the
  iteration and the hooks; later versions add them under ``"_trainer"``;
- the loss normaliser's moving average (``MODEL.RETINANET.LOSS_NORMALIZER = "ema"``), a plain
  attribute of the model, restarted from its initial value.

:func:`build_resumable_train_loader`, :func:`missing_trainer_state`,
:class:`LossNormalizerStates` and :func:`continue_data_stream` restore them.
"""

import logging
from typing import Any, Dict, Optional

import torch

from detectron2.config import CfgNode
from detectron2.data import DatasetFromList, build_detection_train_loader
from detectron2.data.build import _train_loader_from_config
from detectron2.data.samplers import TrainingSampler

from ..data.sampler import ResumableTrainingSampler
from ..loss_normalizer import LossNormalizer

__all__ = [
    "LossNormalizerStates",
    "build_resumable_train_loader",
    "continue_data_stream",
    "missing_trainer_state",
]

logger = logging.getLogger(__name__)


def build_resumable_train_loader(cfg: CfgNode, mapper: Optional[Any] = None):
    """detectron2's training loader, with a :class:`ResumableTrainingSampler` in place of
    ``TrainingSampler`` (same seed, so the same stream); other samplers are kept as they are.

    Args:
        cfg (CfgNode): the training config.
        mapper (callable, optional): as :func:`build_detection_train_loader`.

    Returns:
        the loader, with the sampler as ``loader.resumable_sampler`` (None for other samplers).
    """
    kwargs = _train_loader_from_config(cfg, mapper)
    # Serialised once (as detectron2 does) and shared with the forked workers; a mapper that
    # replaces unreadable images draws the replacements from it.
    kwargs["dataset"] = DatasetFromList(kwargs["dataset"], copy=False)
    if getattr(mapper, "skip_unreadable", False):
        mapper.fallback_dataset = kwargs["dataset"]
    sampler = kwargs["sampler"]
    resumable = None
    if type(sampler) is TrainingSampler:
        resumable = ResumableTrainingSampler(
            sampler._size,
            shuffle=sampler._shuffle,
            seed=sampler._seed,
            per_image_seed=cfg.DATALOADER.PER_IMAGE_SEED,
        )
        kwargs["sampler"] = resumable
    loader = build_detection_train_loader(**kwargs)
    loader.resumable_sampler = resumable
    return loader


def continue_data_stream(simple_trainer: Any, start_iter: int, images_per_batch: int) -> None:
    """Make the training loader of a resumed run continue at iteration ``start_iter``.

    Args:
        simple_trainer: detectron2's ``SimpleTrainer`` / ``AMPTrainer`` (``trainer._trainer``).
        start_iter (int): the first iteration the resumed run trains.
        images_per_batch (int): images per batch in this process.
    """
    if start_iter == 0:
        return
    sampler = getattr(simple_trainer.data_loader, "resumable_sampler", None)
    if sampler is None:
        logger.warning(
            "Resuming at iteration %d with a training sampler that cannot skip ahead: the data "
            "stream restarts from its beginning.",
            start_iter,
        )
        return
    sampler.start = start_iter * images_per_batch
    logger.info("Training data continues at image %d of the sampler's stream", sampler.start)
    # The loader iterator (and its workers) was made with the old start; make a new one.
    if hasattr(simple_trainer, "_data_loader_iter_obj"):  # detectron2 >= 2022: built lazily
        simple_trainer._data_loader_iter_obj = None
    else:  # detectron2 0.6: built in SimpleTrainer.__init__
        simple_trainer._data_loader_iter = iter(simple_trainer.data_loader)


def missing_trainer_state(trainer: Any) -> Dict[str, Any]:
    """Checkpointables a ``DefaultTrainer``'s own state dict lacks (detectron2 0.6: the
    optimizer, AMP's grad scaler), to pass to its checkpointer; {} where it saves them itself.

    Args:
        trainer: a detectron2 ``DefaultTrainer`` (its hooks need not be registered yet).
    """
    if "_trainer" in trainer.state_dict():
        return {}
    missing = {"optimizer": trainer._trainer.optimizer}
    if getattr(trainer._trainer, "grad_scaler", None) is not None:
        missing["grad_scaler"] = trainer._trainer.grad_scaler
    return missing


class LossNormalizerStates:
    """Checkpointable (``state_dict`` / ``load_state_dict``) holding the moving averages of every
    :class:`LossNormalizer` in a model, keyed by the owning module's name."""

    def __init__(self, model: torch.nn.Module):
        self._normalizers = {
            name: module.loss_normalizer
            for name, module in model.named_modules()
            if isinstance(getattr(module, "loss_normalizer", None), LossNormalizer)
        }

    def state_dict(self) -> Dict[str, float]:
        return {name: normalizer.value for name, normalizer in self._normalizers.items()}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        for name, value in state.items():
            if name in self._normalizers:
                self._normalizers[name].value = float(value)
