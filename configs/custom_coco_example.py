# Train on your own COCO instances files: custom_coco_example.yaml as a lazy config, with the CPU
# demo recipe (ImageNet MobileNetV2-FPN, focal loss). The datasets below are registered by this
# file when it is loaded, and checked before training by train_net.py (dataloader.check).
#
#   python -m retinanet_plugin.data.coco_check datasets/my_coco/train.json \
#       datasets/my_coco/val.json --image-root datasets/my_coco/images
#
# Anchors (16-406 px) and input size (shorter side 400) are the demo's: check that they suit
# your objects.
from retinanet_plugin.lazy import coco_instances, register_datasets

from .demo_deepforest_mobilenet_v2_fpn import (  # noqa: F401  (the config's keys)
    dataloader,
    lr_multiplier,
    model,
    optimizer,
    train,
)

model.num_classes = 3  # = the number of categories in your JSON; a mismatch stops the run
model.max_detections_per_image = 100

# [name, json_file, image_root]; relative paths are relative to this file's folder.
dataloader.coco_instances = coco_instances(
    [
        ["my_coco_train", "../datasets/my_coco/train.json", "../datasets/my_coco/images"],
        ["my_coco_val", "../datasets/my_coco/val.json", "../datasets/my_coco/images"],
    ],
    relative_to=__file__,
)
dataloader.train.dataset.names = "my_coco_train"
dataloader.test.dataset.names = "my_coco_val"
dataloader.check = "header"  # "decode" to decode every image once before training, "off" to skip
# True: skip (and count) images that fail to decode
dataloader.train.mapper.skip_unreadable = False
# Shorter side 400, aspect ratio kept up to 5:3.
dataloader.train.mapper.augmentations[0].max_size = 667
dataloader.test.mapper.augmentations[0].max_size = 667
train.output_dir = "output/custom_coco"
# After each evaluation: per-class AP, PR curves, confusion matrix, the AP each error type costs,
# the worst images (docs/evaluation_report.md), in inference/<dataset>/report/.
dataloader.report = dict(enabled=True)

register_datasets(dataloader)
