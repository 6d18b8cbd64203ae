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

The DeepForest datasets (``deepforest_tree_train`` / ``deepforest_tree_val``) are registered
when the config names them, from ``$DETECTRON2_DATASETS/deepforest`` (default
``./datasets/deepforest``; prepare it with ``python -m retinanet_plugin.data.deepforest``).
"""

import logging
import os

from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, HookBase, default_argument_parser, default_setup
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from retinanet_plugin import RetinaNetCheckpointer, add_retinanet_plugin_config
from retinanet_plugin.config import load_config_file
from retinanet_plugin.data.deepforest import DATASET_NAMES, register_deepforest
from retinanet_plugin.engine import launch, wrap_ddp_on_cpu
from retinanet_plugin.engine.resume import (
    LossNormalizerStates,
    build_resumable_train_loader,
    continue_data_stream,
    missing_trainer_state,
)
from retinanet_plugin.utils import has_compiled_ops
from retinanet_plugin.visualize import save_prediction_grid

PREDICTIONS_PICTURE = "val_predictions.png"


def _inference_dir(cfg, dataset_name):
    return os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)


def save_predictions_picture(cfg):
    """Draws the first test set's detections, saved by COCOEvaluator, with its ground truth."""
    if not cfg.DATASETS.TEST or not comm.is_main_process():
        return
    dataset_name = cfg.DATASETS.TEST[0]
    results = os.path.join(_inference_dir(cfg, dataset_name), "coco_instances_results.json")
    if os.path.isfile(results):
        path = save_prediction_grid(
            dataset_name, results, os.path.join(cfg.OUTPUT_DIR, PREDICTIONS_PICTURE)
        )
        logging.getLogger("detectron2").info("Detections drawn in %s", path)


class PredictionsPicture(HookBase):
    """After training (and the final evaluation before it), draws the detections."""

    def after_train(self):
        save_predictions_picture(self.trainer.cfg)


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        # Lets DefaultTrainer wrap a CPU model in DistributedDataParallel (--num-gpus > 1 on CPU).
        with wrap_ddp_on_cpu():
            super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = _inference_dir(cfg, dataset_name)
        # The fast COCOeval needs detectron2's compiled ops; the official pycocotools one gives
        # the same AP.
        return COCOEvaluator(
            dataset_name, output_dir=output_folder, use_fast_impl=has_compiled_ops()
        )

    @classmethod
    def build_train_loader(cls, cfg):
        # Its sampler can continue the data stream where a killed run stopped.
        return build_resumable_train_loader(cfg)

    def build_hooks(self):
        # DefaultTrainer.__init__ made a DetectionCheckpointer just before calling build_hooks;
        # ours (atomic saves, loads that cannot run code) replaces it before the hooks take it.
        # It also saves the loss normaliser's moving average, which the model does not hold.
        old = self.checkpointer
        self.checkpointer = RetinaNetCheckpointer(
            old.model,
            old.save_dir,
            fine_tune=True,
            loss_normalizers=LossNormalizerStates(old.model),
            **old.checkpointables,
            **missing_trainer_state(self),
        )
        # Appended last: it runs after EvalHook's final evaluation has saved the detections.
        return super().build_hooks() + [PredictionsPicture()]

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        images_per_batch = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        continue_data_stream(self._trainer, self.start_iter, images_per_batch)


def setup(args):
    """Creates the config from --config-file and the trailing KEY VALUE opts."""
    cfg = get_cfg()
    add_retinanet_plugin_config(cfg)
    load_config_file(cfg, args.config_file)  # refuses YAML tags that would run code
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # The plugin's own messages (e.g. resuming, removing an unfinished save) in the log too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="retinanet_plugin")
    if set(DATASET_NAMES.values()) & set(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST):
        register_deepforest()
    return cfg


def main(args):
    cfg = setup(args)

    if args.eval_only:
        model = Trainer.build_model(cfg)
        RetinaNetCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        save_predictions_picture(cfg)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
