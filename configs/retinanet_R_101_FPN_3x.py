# RetinaNet R101-FPN, 270k iterations: retinanet_R_101_FPN_3x.yaml as a lazy config.
from .retinanet_R_50_FPN_3x import (  # noqa: F401  (the config's keys)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.backbone.bottom_up.stages.depth = 101
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-101.pkl"
