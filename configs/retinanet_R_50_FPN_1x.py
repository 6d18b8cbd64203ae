# RetinaNet R50-FPN, 90k iterations: retinanet_R_50_FPN_1x.yaml as a Python (lazy) config.
# detectron2's own lazy RetinaNet (model, COCO data, SGD, 1x schedule, train settings from its
# configs/common) with the plugin's model, head, dataset mapper and evaluator. Every key can be
# overridden on the command line (model.num_classes=3, train.max_iter=1000, ...).
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from retinanet_plugin import FocalRetinaNet, FocalRetinaNetHead
from retinanet_plugin.data import RobustDatasetMapper
from retinanet_plugin.evaluation import build_coco_evaluator

_base = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
model = _base.model
dataloader = _base.dataloader
optimizer = _base.optimizer  # SGD, lr 0.01 (RetinaNet's rate, half of Faster R-CNN's)
lr_multiplier = _base.lr_multiplier  # steps at 60k and 80k of 90k, 1k warm-up iterations
train = _base.train

# detectron2's arguments keep their meaning; the plugin's (cls_loss, loss_normalizer, nms_type,
# soft_nms_*, box_voting_iou_thresh, crowd_ioa_thresh, ...) have defaults giving the paper's
# RetinaNet, as in Base-FocalRetinaNet.yaml.
model._target_ = FocalRetinaNet
model.head._target_ = FocalRetinaNetHead
dataloader.train.mapper._target_ = RobustDatasetMapper
dataloader.test.mapper._target_ = RobustDatasetMapper
dataloader.evaluator = L(build_coco_evaluator)(dataset_name="${..test.dataset.names}")

train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
