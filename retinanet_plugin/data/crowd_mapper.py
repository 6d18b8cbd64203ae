"""A DatasetMapper that keeps COCO crowd regions (iscrowd=1) for the model instead of dropping them.

detectron2's :class:`DatasetMapper` discards crowd annotations. :class:`CrowdDatasetMapper`
appends them to ``instances`` with ``gt_is_crowd = True`` (False for every other instance), so
that ``FocalRetinaNet`` (``MODEL.RETINANET.CROWD_IGNORE``) can ignore the background anchors
inside them; the model never matches a crowd instance to an anchor.
"""

from typing import Dict, List

import torch

from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.structures import Boxes, Instances

from .augmentations import extra_train_augmentations

__all__ = ["CrowdDatasetMapper"]


class CrowdDatasetMapper(DatasetMapper):
    """detectron2's DatasetMapper, plus the crowd boxes as instances marked ``gt_is_crowd``.

    Crowd boxes go through the same geometric transforms and clipping as the other boxes; those
    left empty are dropped. Only boxes are kept (crowd masks are RLE, which a box detector does not
    need), so instance masks and keypoints must be off.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.use_instance_mask or self.use_keypoint:
            raise ValueError(
                "CrowdDatasetMapper keeps crowd regions as boxes only: it needs "
                "MODEL.MASK_ON and MODEL.KEYPOINT_ON off"
            )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict:
        ret = super().from_config(cfg, is_train)
        if is_train:
            ret["augmentations"] = ret["augmentations"] + extra_train_augmentations(cfg)
        return ret

    def _transform_annotations(self, dataset_dict: Dict, transforms, image_shape) -> None:
        crowd = [a for a in dataset_dict["annotations"] if a.get("iscrowd", 0) == 1]
        super()._transform_annotations(dataset_dict, transforms, image_shape)
        instances = dataset_dict["instances"]
        instances.gt_is_crowd = torch.zeros(len(instances), dtype=torch.bool)
        crowd_instances = self._crowd_instances(crowd, transforms, image_shape)
        if len(crowd_instances):
            dataset_dict["instances"] = Instances.cat([instances, crowd_instances])

    def _crowd_instances(self, annotations: List[Dict], transforms, image_shape) -> Instances:
        boxes = [
            utils.transform_instance_annotations(
                {"bbox": a["bbox"], "bbox_mode": a["bbox_mode"]}, transforms, image_shape
            )["bbox"]
            for a in annotations
        ]
        instances = Instances(image_shape)
        instances.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        instances.gt_classes = torch.tensor(
            [a["category_id"] for a in annotations], dtype=torch.int64
        )
        instances.gt_is_crowd = torch.ones(len(annotations), dtype=torch.bool)
        return instances[instances.gt_boxes.nonempty()]

