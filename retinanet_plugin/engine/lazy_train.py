"""``train_net.py`` for a Python (lazy) config: what its YAML ``Trainer`` does, from lazy keys.

detectron2's ``tools/lazyconfig_train_net.py`` trains a lazy config with its own trainer pieces;
this module composes the same pieces (``SimpleTrainer`` / ``AMPTrainer``, ``hooks``,
``default_writers``, ``create_ddp_model``, ``instantiate``) with what the plugin's YAML path adds
(shared with it, not copied):

- datasets named by path (``dataloader.coco_instances``) registered, and checked before the
  model is built (``dataloader.check``, as ``DATASETS.CHECK``); a data error ends the run with
  its problems (:func:`retinanet_plugin.engine.run_main`);
- :class:`~retinanet_plugin.RetinaNetCheckpointer` (atomic saves, loads that cannot run code)
  and an exact resume: the resumable sampler continues the data stream
  (``dataloader.per_image_seed`` as ``DATALOADER.PER_IMAGE_SEED``), the loss normaliser's
  moving average is saved;
- COCOEvaluator writing to ``<train.output_dir>/inference/<test set>``, the detections picture
  and the non-finite loss guard;
- test-time augmentation when ``dataloader.tta`` holds a ``DatasetMapperTTA`` node
  (``L(DatasetMapperTTA)(min_sizes=..., max_size=..., flip=...)``, as ``TEST.AUG.*``).

The config's keys are those of detectron2's ``configs/common/train.py``: ``train.output_dir``,
``init_checkpoint``, ``max_iter``, ``amp.enabled`` (and the plugin's ``amp.precision``, see
:mod:`retinanet_plugin.precision`), ``ddp``, ``checkpointer``, ``eval_period``,
``log_period``, ``device``, ``seed``.
"""

import argparse
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional

from detectron2.config import instantiate
from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import RetinaNetCheckpointer
from ..data.registration import check_datasets
from ..evaluation.report import evaluation_reports, model_cost_of, report_settings
from ..lazy import dataset_config, load_lazy_config, tta_model
from ..precision import autocast_dtype, build_step_trainer, training_dtype
from .hooks import SkippedImagesHook, TrainingCurvesHook
from .launch import wrap_ddp_on_cpu
from .loss_guard import BatchRecorder, guard_nonfinite_losses
from .predictions_picture import (
    PREDICTIONS_PICTURE,
    RESULTS_FILE,
    PredictionsPicture,
    results_version,
    save_predictions_picture,
)
from .resume import continue_data_stream, resumable_train_loader, resume_checkpointables

__all__ = [
    "build_lazy_train_loader",
    "lazy_main",
    "lazy_test",
    "lazy_test_with_tta",
    "setup_lazy",
]

logger = logging.getLogger(__name__)

# The loader's _target_ in a config loaded back from YAML (a dotted name).
_TRAIN_LOADER_NAME = "detectron2.data.build.build_detection_train_loader"


def setup_lazy(args: argparse.Namespace) -> Any:
    """The config of ``--config-file`` (a ``.py``) with the ``key=value`` overrides, its datasets
    registered and checked (``dataloader.check``) before anything is built; as ``setup`` of
    ``train_net.py`` does for YAML."""
    cfg = load_lazy_config(args.config_file, args.opts)
    default_setup(cfg, args)
    # The plugin's own messages (dataset checks, skipped images) in the console and log.txt.
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="retinanet_plugin")
    check_datasets(dataset_config(cfg.dataloader, cfg.model), train=not args.eval_only)
    return cfg


def _test_names(cfg: Any) -> List[str]:
    return list(dataset_config(cfg.dataloader).DATASETS.TEST)


def _inference_dir(cfg: Any, folder: str = "inference") -> str:
    # One folder per test loader, named as the YAML path names it for one dataset.
    return os.path.join(cfg.train.output_dir, folder, "+".join(_test_names(cfg)))


def _build_evaluator(cfg: Any, folder: str) -> Any:
    """``dataloader.evaluator`` writing to ``folder`` unless the config sets its output_dir."""
    node = cfg.dataloader.evaluator
    if node.get("output_dir") is not None:
        return instantiate(node)
    node.output_dir = _inference_dir(cfg, folder)
    try:  # set in place: the node's ${..} interpolations need its parent
        return instantiate(node)
    finally:
        node.output_dir = None


def _results_file(cfg: Any) -> Optional[str]:
    """Where COCOEvaluator saves the detections of the only test set; None otherwise."""
    if "evaluator" not in cfg.dataloader or len(_test_names(cfg)) != 1:
        return None
    folder = cfg.dataloader.evaluator.get("output_dir") or _inference_dir(cfg)
    return os.path.join(folder, RESULTS_FILE)


def _picture(cfg: Any) -> Dict[str, Any]:
    names = _test_names(cfg)
    return {
        "dataset_name": names[0] if len(names) == 1 else None,
        "results_file": _results_file(cfg),
        "picture_file": os.path.join(cfg.train.output_dir, PREDICTIONS_PICTURE),
    }


def _run_test(cfg: Any, model: Any, folder: str) -> Dict[str, Any]:
    if "evaluator" not in cfg.dataloader or not _test_names(cfg):
        return {}  # as DATASETS.TEST () in YAML: nothing to evaluate
    # Then the report (dataloader.report) of the plain evaluation's detections, one test set.
    report = _results_file(cfg) if folder == "inference" else None
    targets = [(_test_names(cfg)[0], report)] if report else []
    with evaluation_reports(targets, report_settings(cfg), model_cost_of(cfg, model)):
        results = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), _build_evaluator(cfg, folder)
        )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def lazy_test(cfg: Any, model: Any) -> Dict[str, Any]:
    """Evaluates ``model`` on ``dataloader.test`` with ``dataloader.evaluator``; {} without an
    evaluator or test set."""
    return _run_test(cfg, model, "inference")


def lazy_test_with_tta(cfg: Any, model: Any) -> Dict[str, Any]:
    """Evaluates with test-time augmentation (``dataloader.tta``); result keys end in "_TTA"."""
    logger.info("Running inference with test-time augmentation ...")
    results = _run_test(cfg, tta_model(cfg, model), "inference_TTA")
    return OrderedDict((k + "_TTA", v) for k, v in results.items())


def _tta_enabled(cfg: Any) -> bool:
    return cfg.dataloader.get("tta") is not None


def _kwargs(**kwargs: Any) -> Dict[str, Any]:
    return kwargs


def build_lazy_train_loader(cfg: Any) -> BatchRecorder:
    """``dataloader.train`` with the resumable sampler, wrapped for the loss guard.

    A ``build_detection_train_loader`` node is built with its own arguments and a
    :class:`~retinanet_plugin.data.sampler.ResumableTrainingSampler` for detectron2's
    ``TrainingSampler`` (seeded with ``train.seed`` when >= 0); another loader is instantiated
    as it is (a resumed run then restarts its data stream, with a warning).
    """
    node = cfg.dataloader.train
    target = node._target_
    if target not in (build_detection_train_loader, _TRAIN_LOADER_NAME):
        return BatchRecorder(instantiate(node))
    # The node's arguments, built where they are (interpolations need the parent node).
    node._target_ = _kwargs
    try:
        kwargs = instantiate(node)
    finally:
        node._target_ = target
    kwargs.setdefault("aspect_ratio_grouping", True)
    kwargs.setdefault("num_workers", 0)
    seed = cfg.train.get("seed", -1)
    if kwargs.get("sampler") is None:
        # detectron2's default sampler, seeded as the YAML path's (None: a shared random seed).
        kwargs["sampler"] = TrainingSampler(
            len(kwargs["dataset"]), seed=seed if seed >= 0 else None
        )
    mapper = kwargs["mapper"]
    if isinstance(kwargs["dataset"], list):
        loader = resumable_train_loader(
            kwargs, per_image_seed=cfg.dataloader.get("per_image_seed", False), seed_fixed=seed >= 0
        )
    else:
        loader = build_detection_train_loader(**kwargs)
    skipped = mapper.skipped if getattr(mapper, "skip_unreadable", False) else None
    return BatchRecorder(loader, skipped=skipped)


def _train(cfg: Any, args: argparse.Namespace) -> Dict[str, Any]:
    # train.amp.precision as SOLVER.AMP.PRECISION (checked before anything is built): float16 on
    # CUDA is detectron2's AMPTrainer, bfloat16 (the "auto" choice on CPU) AutocastTrainer.
    amp = cfg.train.amp
    dtype = training_dtype(
        amp.enabled, amp.get("precision", "auto"), cfg.train.device, "train.amp.precision"
    )
    # Settings read only at the first evaluation are checked now, not after the training.
    test_amp = cfg.model.get("test_amp_precision")
    if test_amp is not None:
        autocast_dtype(test_amp, cfg.train.device, "TEST.AMP.PRECISION (model.test_amp_precision)")
    report_settings(cfg)
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = build_lazy_train_loader(cfg)
    # Lets a CPU model be wrapped in DistributedDataParallel (--num-gpus > 1 on CPU).
    with wrap_ddp_on_cpu():
        model = create_ddp_model(model, **cfg.train.ddp)
    trainer = build_step_trainer(model, loader, optimizer, dtype, cfg.train.device)
    # A non-finite loss names itself, the iteration and the batch's image ids.
    guard_nonfinite_losses(trainer, loader)
    checkpointer = RetinaNetCheckpointer(
        model,
        cfg.train.output_dir,
        fine_tune=True,
        trainer=trainer,
        **resume_checkpointables(trainer),
    )
    results: Dict[str, Any] = {}

    def test_and_keep() -> Dict[str, Any]:
        results.clear()
        results.update(lazy_test(cfg, model))
        return results

    main = comm.is_main_process()
    writers = default_writers(cfg.train.output_dir, cfg.train.max_iter)
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
        hooks.EvalHook(cfg.train.eval_period, test_and_keep),
        hooks.PeriodicWriter(writers, period=cfg.train.log_period) if main else None,
        # After the final plain evaluation, as the YAML Trainer does.
        hooks.EvalHook(0, lambda: lazy_test_with_tta(cfg, model)) if _tta_enabled(cfg) else None,
        # Last: it runs after EvalHook's final evaluation has saved the detections.
        PredictionsPicture(**_picture(cfg)),
        SkippedImagesHook(loader.skipped) if loader.skipped is not None else None,
        TrainingCurvesHook(cfg.train.output_dir, _picture(cfg)["dataset_name"]),  # after writers
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # The checkpoint holds the iteration that had finished.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    continue_data_stream(trainer, start_iter)
    trainer.train(start_iter, cfg.train.max_iter)
    return results


def _evaluate(cfg: Any, args: argparse.Namespace) -> Dict[str, Any]:
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    RetinaNetCheckpointer(model, save_dir=cfg.train.output_dir).resume_or_load(
        cfg.train.init_checkpoint, resume=args.resume
    )
    model = create_ddp_model(model)
    picture = _picture(cfg)
    stale_version = results_version(picture["results_file"])
    results = lazy_test(cfg, model)
    if _tta_enabled(cfg):
        results.update(lazy_test_with_tta(cfg, model))
    save_predictions_picture(**picture, stale_version=stale_version)
    return results


def lazy_main(args: argparse.Namespace) -> Dict[str, Any]:
    """``train_net.py``'s ``main`` for a ``.py`` config: trains (and evaluates after, every
    ``train.eval_period`` steps and at the end) or, with ``--eval-only``, evaluates
    ``train.init_checkpoint`` (the last checkpoint with ``--resume``).

    Returns:
        the last evaluation's results ({} without an evaluator).
    """
    cfg = setup_lazy(args)
    if args.eval_only:
        return _evaluate(cfg, args)
    return _train(cfg, args)
