# CPU demo: demo_deepforest_mobilenet_v2_fpn.yaml as a lazy config. RetinaNet with focal loss,
# ImageNet MobileNetV2-FPN, DeepForest tree crowns (one class, 400x400 tiles), 200 steps. Prepare
# the data first with `python -m retinanet_plugin.data.deepforest` (this config registers it).
# The base of demo_deepforest_mobilenet_v2_fpn_{ce,long}.py and demo_deepforest_R_18_FPN_scratch.py.
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.solver import WarmupParamScheduler

from retinanet_plugin.backbone import MobileNetV2
from retinanet_plugin.lazy import clipped_optimizer, mobilenet_v2_features, register_datasets

from .retinanet_R_50_FPN_1x import dataloader, model, optimizer, train

model.backbone = L(FPN)(
    bottom_up=L(MobileNetV2)(
        features=L(mobilenet_v2_features)(pretrained=True, norm="FrozenBN"),
        out_features=["res3", "res4", "res5"],
        # stem, res2, res3 keep their ImageNet weights: their backward dominates on CPU
        freeze_at=3,
    ),
    in_features=["res3", "res4", "res5"],
    out_channels=128,  # half the paper's 256: the head dominates the cost on CPU
    top_block=L(LastLevelP6P7)(in_channels=1280, out_channels="${..out_channels}"),  # P6 from C5
)
# What torchvision's ImageNet MobileNetV2 was trained with.
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
# Crowns are 8-107 px (median 39): anchors from 16 px on P3 to 256 px on P7, 3 scales per octave.
model.anchor_generator.sizes = [
    [x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [16, 32, 64, 128, 256]
]
model.num_classes = 1
model.head.input_shape = [ShapeSpec(channels=128)] * 5
model.head.conv_dims = [128, 128]
# GroupNorm in the subnets: without it 150 steps left the classifier at its prior.
model.head.norm = "GN"
model.max_detections_per_image = 300  # a tile holds up to ~100 crowns

dataloader.train.dataset.names = "deepforest_tree_train"
dataloader.train.dataset.filter_empty = False  # tiles without trees are negatives worth seeing
dataloader.test.dataset.names = "deepforest_tree_val"
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.augmentations[0].short_edge_length = (400,)
dataloader.train.mapper.augmentations[0].max_size = 400
dataloader.test.mapper.augmentations[0].short_edge_length = 400
dataloader.test.mapper.augmentations[0].max_size = 400
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 1  # decoding 400x400 PNGs is cheap; the cores are for the model
dataloader.test.num_workers = 1

# Without GN and clipping, lr 0.01 diverged to NaN within 60 steps.
optimizer.update(_target_=clipped_optimizer, clip_type="norm", clip_value=5.0)
optimizer.lr = 0.01
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[160], num_updates=200),
    warmup_length=50 / 200,
    warmup_method="linear",
    warmup_factor=0.001,
)
train.max_iter = 200  # 800 images, about 12 passes over the 66 training tiles
train.checkpointer.period = 50
train.eval_period = 0  # evaluate once, after training
train.init_checkpoint = ""  # the backbone's ImageNet weights come from mobilenet_v2_features
train.output_dir = "output/demo"
train.device = "cpu"
train.seed = 0

register_datasets(dataloader)  # deepforest_tree_{train,val}, under $DETECTRON2_DATASETS
