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
from collections import OrderedDict

from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.engine import (
    DefaultTrainer,
    HookBase,
    default_argument_parser,
    default_setup,
    hooks,
)
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm

from retinanet_plugin import RetinaNetCheckpointer, add_retinanet_plugin_config
from retinanet_plugin.data import CrowdDatasetMapper
from retinanet_plugin.data.deepforest import DATASET_NAMES, register_deepforest
from retinanet_plugin.engine import launch, wrap_ddp_on_cpu
from retinanet_plugin.test_time_augmentation import FocalRetinaNetWithTTA
from retinanet_plugin.utils import has_compiled_ops
from retinanet_plugin.visualize import save_prediction_grid

PREDICTIONS_PICTURE = "val_predictions.png"


def _inference_dir(cfg, dataset_name, folder="inference"):
    return os.path.join(cfg.OUTPUT_DIR, folder, dataset_name)


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
        if not cfg.MODEL.RETINANET.CROWD_IGNORE:
            return super().build_train_loader(cfg)
        # detectron2's mapper drops crowd regions; the model needs them to ignore their anchors.
        return build_detection_train_loader(cfg, mapper=CrowdDatasetMapper(cfg, is_train=True))

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
        ret = super().build_hooks()
        if self.cfg.TEST.AUG.ENABLED:
            # After the final plain evaluation, as detectron2's R-CNN train_net.py does.
            ret.append(hooks.EvalHook(0, lambda: self.test_with_TTA(self.cfg, self.model)))
        # Appended last: it runs after EvalHook's final evaluation has saved the detections.
        return ret + [PredictionsPicture()]


def setup(args):
    """Creates the config from --config-file and the trailing KEY VALUE opts."""
    cfg = get_cfg()
    add_retinanet_plugin_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
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
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
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
