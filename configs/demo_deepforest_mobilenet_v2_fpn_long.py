# `make demo`'s recipe as a lazy config (demo_deepforest_mobilenet_v2_fpn_long.yaml): the CPU demo
# trained three times longer with the augmentations overhead imagery allows, and scored with
# Gaussian soft-NMS and box voting.
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T

from retinanet_plugin.data.augmentations import RandomRot90

from .demo_deepforest_mobilenet_v2_fpn import (  # noqa: F401  (the config's keys)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

# Crowns touch: a hard NMS at 0.5 deletes a neighbour that overlaps a stronger crown.
model.nms_type = "soft_gaussian"
# Each kept box becomes the score-weighted mean of its near-duplicates (IoU >= 0.8).
model.box_voting_iou_thresh = 0.8

dataloader.train.mapper.augmentations = [
    # Scale jitter around the 400 px the model is tested at.
    L(T.ResizeShortestEdge)(short_edge_length=(320, 480), max_size=480, sample_style="range"),
    L(T.RandomFlip)(horizontal=True),
    # Aerial tiles have no "up": flips both ways and quarter turns are as real as the originals.
    L(T.RandomFlip)(prob=0.5, horizontal=False, vertical=True),
    L(RandomRot90)(),
]

train.max_iter = 600  # 2400 images, about 36 passes over the 66 training tiles
lr_multiplier.scheduler.milestones = [480, 560]
lr_multiplier.scheduler.values = [1.0, 0.1, 0.01]
lr_multiplier.scheduler.num_updates = 600
lr_multiplier.warmup_length = 50 / 600
train.checkpointer.period = 300
# After each evaluation: per-class AP, PR curves, confusion matrix, the AP each error type costs,
# the worst images (docs/evaluation_report.md), in inference/<dataset>/report/.
dataloader.report = dict(enabled=True)
