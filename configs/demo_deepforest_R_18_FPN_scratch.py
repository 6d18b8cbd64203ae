# The CPU demo with a ResNet-18-FPN trained from scratch (no ImageNet weights), on the same data:
# demo_deepforest_R_18_FPN_scratch.yaml as a lazy config. GroupNorm instead of frozen BatchNorm
# (4 images per batch are too few for BatchNorm statistics), nothing frozen.
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import BasicStem, ResNet

from .demo_deepforest_mobilenet_v2_fpn import (  # noqa: F401  (the config's keys)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.backbone.bottom_up = L(ResNet)(
    stem=L(BasicStem)(in_channels=3, out_channels=64, norm="GN"),
    stages=L(ResNet.make_default_stages)(depth=18, norm="GN"),
    out_features=["res3", "res4", "res5"],
    freeze_at=0,
)
model.backbone.norm = "GN"
model.backbone.top_block.in_channels = 512  # C5 of ResNet-18
train.output_dir = "output/demo_R_18_scratch"
