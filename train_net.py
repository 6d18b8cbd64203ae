#!/usr/bin/env python
"""Train and evaluate retinanet_plugin models with detectron2's DefaultTrainer.

Examples::

    # COCO, 8 GPUs
    python train_net.py --config-file configs/retinanet_R_50_FPN_1x.yaml --num-gpus 8
    # evaluate a checkpoint
    python train_net.py --config-file configs/retinanet_R_50_FPN_1x.yaml --eval-only \
        MODEL.WEIGHTS output/model_final.pth
    # the CPU demo (see `make demo`), also with two processes on CPU: --num-gpus 2
    python train_net.py --config-file configs/demo_deepforest_mobilenet_v2_fpn.yaml

    # a Python (lazy) config: the same plugin behaviour, detectron2's key=value overrides
    python train_net.py --config-file configs/demo_deepforest_mobilenet_v2_fpn.py \
        train.max_iter=100 --resume

Datasets: the COCO JSON files listed in ``DATASETS.COCO_INSTANCES`` are registered in
``setup()`` (see ``configs/custom_coco_example.yaml``); the DeepForest datasets
(``deepforest_tree_train`` / ``deepforest_tree_val``) are registered when the config names them,
from ``$DETECTRON2_DATASETS/deepforest`` (default ``./datasets/deepforest``; prepare it with
``python -m retinanet_plugin.data.deepforest``). Every dataset the run uses is then checked
(``DATASETS.CHECK``) before a model is built. A ``.py`` config names and registers its own
(``dataloader.coco_instances``) and is trained by :mod:`retinanet_plugin.engine.lazy_train`.
"""

import logging
import os
from collections import OrderedDict

from detectron2.data import build_detection_test_loader
from detectron2.engine import DefaultTrainer, default_setup, hooks
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from retinanet_plugin import RetinaNetCheckpointer
from retinanet_plugin.config import load_config
from retinanet_plugin.data import build_dataset_mapper, check_datasets
from retinanet_plugin.data.registration import register_config_datasets
from retinanet_plugin.engine import (
    BatchRecorder,
    SkippedImagesHook,
    TrainingCurvesHook,
    argument_parser,
    guard_nonfinite_losses,
    run_main,
    warn_on_schedule,
    wrap_ddp_on_cpu,
)
from retinanet_plugin.engine.lazy_train import lazy_main
from retinanet_plugin.engine.predictions_picture import (
    PREDICTIONS_PICTURE,  # noqa: F401  (the picture's name, re-exported)
    RESULTS_FILE,
    PredictionsPicture,
    results_version,
    save_predictions_picture,
    yacs_picture_files,
)
from retinanet_plugin.engine.resume import (
    build_resumable_train_loader,
    continue_data_stream,
    resume_checkpointables,
)
from retinanet_plugin.evaluation import build_coco_evaluator
from retinanet_plugin.evaluation.report import evaluation_reports, model_cost_of, report_settings
from retinanet_plugin.lazy import is_lazy_config, load_lazy_config
from retinanet_plugin.precision import yacs_amp_trainer
from retinanet_plugin.test_time_augmentation import FocalRetinaNetWithTTA


def _inference_dir(cfg, dataset_name, folder="inference"):
    return os.path.join(cfg.OUTPUT_DIR, folder, dataset_name)


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        # Lets DefaultTrainer wrap a CPU model in DistributedDataParallel (--num-gpus > 1 on CPU)
        # and, with SOLVER.AMP.ENABLED, build the trainer of SOLVER.AMP.PRECISION (bfloat16 on
        # CPU: retinanet_plugin.precision.AutocastTrainer).
        with wrap_ddp_on_cpu(), yacs_amp_trainer(cfg):
            super().__init__(cfg)
        # A non-finite loss names itself, the iteration and the batch's image ids.
        guard_nonfinite_losses(self._trainer, self._trainer.data_loader)

    @classmethod
    def build_train_loader(cls, cfg):
        # The plugin's one mapper: 16-bit grayscale keeps its contrast, integer boxes are not
        # truncated, DATALOADER.SKIP_UNREADABLE_IMAGES skips images that fail to decode,
        # MODEL.RETINANET.CROWD_IGNORE keeps the crowd regions detectron2's mapper drops. The
        # sampler can continue the data stream where a killed run stopped; BatchRecorder keeps
        # the last batch's image ids for the loss guard.
        mapper = build_dataset_mapper(cfg, is_train=True)
        loader = build_resumable_train_loader(cfg, mapper=mapper)
        skipped = mapper.skipped if getattr(mapper, "skip_unreadable", False) else None
        return BatchRecorder(loader, skipped=skipped)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=build_dataset_mapper(cfg, is_train=False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = _inference_dir(cfg, dataset_name)
        # detectron2's compiled COCOeval if built, else faster-coco-eval, else pycocotools: the
        # same AP, at very different speeds on large sets.
        return build_coco_evaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        if evaluators is not None:  # test_with_TTA's own folders: no report
            return super().test(cfg, model, evaluators)
        # Then each test set's report (TEST.REPORT.*) from the detections COCOEvaluator wrote.
        targets = [(name, os.path.join(_inference_dir(cfg, name), RESULTS_FILE))
                   for name in cfg.DATASETS.TEST]
        with evaluation_reports(targets, report_settings(cfg), model_cost_of(cfg, model)):
            return super().test(cfg, model)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluates with test-time augmentation (TEST.AUG.*); result keys end in "_TTA"."""
        logging.getLogger("detectron2.trainer").info(
            "Running inference with test-time augmentation ..."
        )
        evaluators = [
            cls.build_evaluator(cfg, name, output_folder=_inference_dir(cfg, name, "inference_TTA"))
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, FocalRetinaNetWithTTA(cfg, model), evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in res.items())

    def build_hooks(self):
        # DefaultTrainer.__init__ made a DetectionCheckpointer just before calling build_hooks;
        # ours (atomic saves, loads that cannot run code) replaces it before the hooks take it.
        # It also saves what an exact resume needs beyond detectron2's trainer state (the loss
        # normaliser's moving average, the sampler's seed, the optimizer under detectron2 0.6).
        old = self.checkpointer
        self.checkpointer = RetinaNetCheckpointer(
            old.model,
            old.save_dir,
            fine_tune=True,
            **old.checkpointables,
            **resume_checkpointables(self),
        )
        ret = super().build_hooks()
        if self.cfg.TEST.AUG.ENABLED:
            # After the final plain evaluation, as detectron2's R-CNN train_net.py does.
            ret.append(hooks.EvalHook(0, lambda: self.test_with_TTA(self.cfg, self.model)))
        # Appended last: it runs after EvalHook's final evaluation has saved the detections.
        ret.append(PredictionsPicture())
        skipped = getattr(self._trainer.data_loader, "skipped", None)
        ret.append(TrainingCurvesHook())  # after the writers: results.csv, training_curves.png
        return ret + ([SkippedImagesHook(skipped)] if skipped is not None else [])

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        continue_data_stream(self._trainer, self.start_iter)


def _merged_cfg(args):
    return load_config(args.config_file, args.opts)


def configured_device(args):
    """MODEL.DEVICE (a .py config: train.device) of the config ``setup(args)`` builds; read
    before the processes start, as it decides how they are joined (NCCL for CUDA, GLOO for
    CPU)."""
    if is_lazy_config(args.config_file):
        return load_lazy_config(args.config_file, args.opts).train.device
    return _merged_cfg(args).MODEL.DEVICE


def setup(args):
    """Creates the config from --config-file and the trailing KEY VALUE opts, registers the
    datasets it names and checks them (DATASETS.CHECK) before anything is built."""
    cfg = _merged_cfg(args)
    cfg.freeze()
    default_setup(cfg, args)
    # The plugin's own messages (dataset checks, skipped images) in the console and log.txt.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="retinanet_plugin")
    register_config_datasets(cfg)
    check_datasets(cfg, train=not args.eval_only)
    if not args.eval_only:
        warn_on_schedule(cfg, args.config_file)  # STEPS, WARMUP_ITERS beyond MAX_ITER
    return cfg


def main(args):
    if is_lazy_config(args.config_file):
        # A Python (lazy) config: the same plugin behaviour from its keys.
        return lazy_main(args)
    cfg = setup(args)

    if args.eval_only:
        model = Trainer.build_model(cfg)
        RetinaNetCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        stale_version = results_version(yacs_picture_files(cfg)[1])
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        save_predictions_picture(*yacs_picture_files(cfg), stale_version)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    # Flags may also follow the KEY VALUE pairs ("... SOLVER.MAX_ITER 10 --resume").
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    # A dataset that fails its check ends the run with its problems, not a traceback (also
    # while a .py config, which registers its datasets, is read for its device).
    run_main(main, args, device=lambda: configured_device(args))
