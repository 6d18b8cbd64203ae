"""What a resumed run needs beyond detectron2's checkpoint to continue exactly where it stopped.

detectron2's checkpoint holds the model, optimizer, LR scheduler and iteration. Not in it:

- the position in the training data stream: a resumed run restarts ``TrainingSampler`` from its
  first index, so it trains again on the batches of iterations 0, 1, ..., and without a fixed
  seed (detectron2 0.6 with ``SEED -1``) from another shuffle (see
  :class:`~retinanet_plugin.data.sampler.ResumableTrainingSampler`, whose seed is saved);
- with detectron2 0.6 (the 2022 snapshot), the optimizer (SGD momentum and the learning rate
  the scheduler last set) and AMP's grad scaler: its ``DefaultTrainer.state_dict`` saves only the
  iteration and the hooks; later versions add them under ``"_trainer"``;
- the loss normaliser's moving average (``MODEL.RETINANET.LOSS_NORMALIZER = "ema"``), a plain
  attribute of the model, restarted from its initial value.

:func:`build_resumable_train_loader`, :func:`resume_checkpointables` and
:func:`continue_data_stream` restore them.
"""

import logging
from typing import Any, Dict, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.config import CfgNode
from detectron2.data import DatasetFromList, build_detection_train_loader
from detectron2.data.build import _train_loader_from_config
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm

from ..data.sampler import ResumableTrainingSampler, aspect_ratio_group
from ..loss_normalizer import LossNormalizer

__all__ = [
    "LossNormalizerStates",
    "build_resumable_train_loader",
    "continue_data_stream",
    "missing_trainer_state",
    "resumable_train_loader",
    "resume_checkpointables",
]

logger = logging.getLogger(__name__)


def build_resumable_train_loader(cfg: CfgNode, mapper: Optional[Any] = None):
    """detectron2's training loader, with a :class:`ResumableTrainingSampler` in place of
    ``TrainingSampler`` (same seed and the same images per batch, in another order when several
    loader workers each make whole batches); other samplers are kept as they are.

    Args:
        cfg (CfgNode): the training config.
        mapper (callable, optional): as :func:`build_detection_train_loader`.

    Returns:
        the loader, with the sampler as ``loader.resumable_sampler`` (None for other samplers).
    """
    return resumable_train_loader(
        _train_loader_from_config(cfg, mapper),
        per_image_seed=cfg.DATALOADER.PER_IMAGE_SEED,
        # detectron2 0.6 draws a random shuffle seed when SEED < 0; upstream uses SEED.
        seed_fixed=cfg.SEED >= 0,
    )


def resumable_train_loader(
    kwargs: Dict[str, Any], *, per_image_seed: bool = False, seed_fixed: bool = True
):
    """``build_detection_train_loader(**kwargs)`` with a :class:`ResumableTrainingSampler` in
    place of a ``TrainingSampler`` (the YAML and the lazy path's loaders alike).

    Args:
        kwargs: ``build_detection_train_loader``'s arguments, all given (``dataset`` a list of
            dataset dicts, ``sampler`` included).
        per_image_seed (bool): see :class:`ResumableTrainingSampler`.
        seed_fixed (bool): whether a new run of the config shuffles with the same seed.

    Returns:
        the loader, with the sampler as ``loader.resumable_sampler`` (None for other samplers).
    """
    kwargs = dict(kwargs)
    dataset_dicts = kwargs["dataset"]
    mapper = kwargs["mapper"]
    # Serialised once (as detectron2 does) and shared with the forked workers; a mapper that
    # replaces unreadable images draws the replacements from it.
    kwargs["dataset"] = DatasetFromList(dataset_dicts, copy=False)
    if getattr(mapper, "skip_unreadable", False):
        mapper.fallback_dataset = kwargs["dataset"]
    sampler = kwargs["sampler"]
    resumable = None
    if type(sampler) is TrainingSampler:
        grouping = kwargs["aspect_ratio_grouping"]
        resumable = ResumableTrainingSampler(
            sampler._size,
            shuffle=sampler._shuffle,
            seed=sampler._seed,
            per_image_seed=per_image_seed,
            images_per_batch=kwargs["total_batch_size"] // comm.get_world_size(),
            num_workers=kwargs["num_workers"],
            aspect_groups=[aspect_ratio_group(d) for d in dataset_dicts] if grouping else None,
            seed_fixed=seed_fixed,
        )
        kwargs["sampler"] = resumable
    loader = build_detection_train_loader(**kwargs)
    loader.resumable_sampler = resumable
    return loader


def continue_data_stream(simple_trainer: Any, start_iter: int) -> None:
    """Make the training loader of a resumed run continue at iteration ``start_iter``, after the
    checkpointer restored the sampler's state (:func:`resume_checkpointables`); logs where, and
    warns when the stream cannot be the uninterrupted run's.

    Args:
        simple_trainer: detectron2's ``SimpleTrainer`` / ``AMPTrainer`` (``trainer._trainer``).
        start_iter (int): the first iteration the resumed run trains.
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
    sampler.skip_batches(start_iter)
    differs = _why_stream_differs(sampler)
    if differs:
        logger.warning(
            "Training data continues at image %d of the sampler's stream, but not with the "
            "images an uninterrupted run would train on next: %s.",
            sampler.start,
            "; ".join(differs),
        )
    else:
        logger.info(
            "Training data continues at image %d of the sampler's stream, as an uninterrupted "
            "run's (images held back by aspect-ratio grouping, first: %d)",
            sampler.start,
            len(sampler.waiting),
        )
    # The loader iterator (and its workers) was made with the old start; make a new one.
    if hasattr(simple_trainer, "_data_loader_iter_obj"):  # detectron2 >= 2022: built lazily
        simple_trainer._data_loader_iter_obj = None
    else:  # detectron2 0.6: built in SimpleTrainer.__init__
        simple_trainer._data_loader_iter = iter(simple_trainer.data_loader)


def _why_stream_differs(sampler: ResumableTrainingSampler) -> List[str]:
    reasons = []
    if sampler.restored is None and not sampler.seed_fixed:
        reasons.append(
            "the checkpoint holds no sampler seed (written by an older retinanet_plugin) and "
            "SEED is negative, so this run shuffles the images with another seed"
        )
    reasons += [f"the stream is split differently ({c})" for c in sampler.layout_changes()]
    # The saved seed shuffles another set of images into another order.
    reasons += [
        f"the sampler's images changed ({c}), so the saved seed gives another stream"
        for c in sampler.data_changes()
    ]
    if not sampler.exact:
        reasons.append(
            "with DATALOADER.ASPECT_RATIO_GROUPING the images waiting in the aspect-ratio "
            "buckets cannot be known: some training images have no width / height in their "
            "dataset dicts"
        )
    return reasons


def resume_checkpointables(trainer: Any) -> Dict[str, Any]:
    """What the trainer's checkpointer must save and restore beyond detectron2's own: the loss
    normalisers' moving averages, the optimizer and grad scaler where detectron2's trainer
    state lacks them (:func:`missing_trainer_state`) and the training sampler's state.

    Args:
        trainer: a detectron2 ``DefaultTrainer``, or the ``SimpleTrainer`` / ``AMPTrainer`` of a
            lazy config's run (its hooks need not be registered yet).
    """
    model = trainer.model
    if isinstance(model, DistributedDataParallel):  # keys as in a one-process run
        model = model.module
    extra: Dict[str, Any] = {"loss_normalizers": LossNormalizerStates(model)}
    extra.update(missing_trainer_state(trainer))
    sampler = getattr(_loop(trainer).data_loader, "resumable_sampler", None)
    if sampler is not None:
        extra["data_sampler"] = sampler
    return extra


def missing_trainer_state(trainer: Any) -> Dict[str, Any]:
    """Checkpointables a ``DefaultTrainer``'s own state dict lacks (detectron2 0.6: the
    optimizer, AMP's grad scaler), to pass to its checkpointer; {} where it saves them itself.

    Args:
        trainer: a detectron2 ``DefaultTrainer``, or a ``SimpleTrainer`` / ``AMPTrainer`` (whose
            own state dict holds them wherever detectron2 saves the trainer: {}).
    """
    loop = _loop(trainer)
    if loop is trainer or "_trainer" in trainer.state_dict():
        return {}
    missing = {"optimizer": loop.optimizer}
    if getattr(loop, "grad_scaler", None) is not None:
        missing["grad_scaler"] = loop.grad_scaler
    return missing


def _loop(trainer: Any) -> Any:
    """The ``SimpleTrainer`` / ``AMPTrainer`` that runs the steps (a DefaultTrainer's
    ``_trainer``, or the trainer itself)."""
    return getattr(trainer, "_trainer", trainer)


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
