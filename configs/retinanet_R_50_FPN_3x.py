# RetinaNet R50-FPN, 270k iterations: retinanet_R_50_FPN_3x.yaml as a lazy config.
from detectron2 import model_zoo

from .retinanet_R_50_FPN_1x import dataloader, model, optimizer, train  # noqa: F401

lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_3x  # 210k, 250k
train.max_iter = 270000
