"""Test-time augmentation for FocalRetinaNet, the dense-detector counterpart of detectron2's
``GeneralizedRCNNWithTTA``.

Each image is resized to every ``TEST.AUG.MIN_SIZES`` (capped by ``TEST.AUG.MAX_SIZE``) and, with
``TEST.AUG.FLIP``, also flipped (detectron2's :class:`DatasetMapperTTA`). The pre-NMS candidates
of every version are mapped back to the original image and pooled, and one final suppression
(the model's own: per-class or class-agnostic, hard or soft NMS, optional box voting) selects
the detections, as mmdetection does for dense detectors. Pooling before the NMS, rather than
merging each version's final detections, lets a box found in several versions suppress its
duplicates with its best score. Candidates and selection are the model's own
(:func:`find_candidates`, :func:`select_detections`, read from its :class:`PostProcessing`).
"""

import copy
import dataclasses
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from detectron2.data.detection_utils import read_image
from detectron2.layers import cat
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.test_time_augmentation import DatasetMapperTTA

from .meta_arch import FocalRetinaNet
from .postprocess import PostProcessing

__all__ = ["FocalRetinaNetWithTTA"]


class FocalRetinaNetWithTTA(nn.Module):
    """A :class:`FocalRetinaNet` with test-time augmentation; called like the model in eval mode.

    Args:
        cfg (CfgNode or None): the config; ``TEST.AUG.*`` defines the augmentations. None with
            ``tta_mapper`` (a lazy config's ``L(DatasetMapperTTA)(min_sizes=..., max_size=...,
            flip=...)``, instantiated).
        model (FocalRetinaNet): the detector (unwrapped from DistributedDataParallel if needed).
        tta_mapper (callable, optional): dataset dict -> list of augmented dataset dicts, each
            with a "transforms" entry mapping the original image to it. Default
            ``DatasetMapperTTA(cfg)``.
        batch_size (int): augmented images run through the model this many at a time.
    """

    def __init__(self, cfg, model: nn.Module, tta_mapper=None, batch_size: int = 3):
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if not isinstance(model, FocalRetinaNet):
            raise TypeError(
                f"FocalRetinaNetWithTTA needs a FocalRetinaNet (MODEL.META_ARCHITECTURE), got "
                f"{type(model).__name__}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if cfg is None and tta_mapper is None:
            raise ValueError("FocalRetinaNetWithTTA needs a cfg (TEST.AUG.*) or a tta_mapper")
        self.model = model
        # The model's mode, not nn.Module's default (training): detectron2's
        # inference_on_dataset puts the wrapper in eval mode and afterwards back in its mode, which
        # would otherwise leave an eval-mode model in training mode after a TTA evaluation.
        self.training = model.training
        self.postprocessing.check("tta")
        self.tta_mapper = tta_mapper if tta_mapper is not None else DatasetMapperTTA(cfg)
        self.batch_size = batch_size

    @property
    def postprocessing(self) -> PostProcessing:
        """The model's test-time keys, with test-time augmentation on."""
        return dataclasses.replace(self.model.postprocessing, test_augmentation=True)

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, object]]:
        """
        Args:
            batched_inputs (list[dict]): as for the model in eval mode; an input without "image"
                is read from its "file_name".

        Returns:
            list[dict]: one {"instances": Instances} per input, in the coordinates of its
            "height" x "width" (default: the image's size).
        """
        return [self._inference_one_image(self._with_image(x)) for x in batched_inputs]

    def _with_image(self, dataset_dict: Dict) -> Dict:
        ret = copy.copy(dataset_dict)
        if "image" not in ret:
            image = read_image(ret.pop("file_name"), self.model.input_format)
            ret["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        ret.setdefault("height", ret["image"].shape[1])
        ret.setdefault("width", ret["image"].shape[2])
        return ret

    def _inference_one_image(self, dataset_dict: Dict) -> Dict[str, object]:
        orig_shape = (dataset_dict["height"], dataset_dict["width"])
        augmented = self.tta_mapper(dataset_dict)
        tfms = [x.pop("transforms") for x in augmented]
        boxes, scores, classes = [], [], []
        for start in range(0, len(augmented), self.batch_size):
            chunk = augmented[start : start + self.batch_size]
            for (boxes_i, scores_i, classes_i), tfm in zip(
                self._candidates(chunk), tfms[start : start + self.batch_size]
            ):
                # Candidates are not clipped yet, as in the model (detector_postprocess clips
                # the final boxes); inverting a flip or resize is defined outside the image too.
                original = tfm.inverse().apply_box(boxes_i.detach().cpu().numpy())
                boxes.append(torch.as_tensor(original, dtype=boxes_i.dtype, device=boxes_i.device))
                scores.append(scores_i)
                classes.append(classes_i)
        merged = self.model.select_detections(cat(boxes), cat(scores), cat(classes), orig_shape)
        return {"instances": detector_postprocess(merged, *orig_shape)}

    def _candidates(self, inputs: List[Dict]) -> List[Tuple[Tensor, Tensor, Tensor]]:
        """The model's pre-NMS candidates of each input, in that input's coordinates."""
        model = self.model
        images = model.preprocess_image(inputs)
        with model.inference_autocast():  # TEST.AMP, as the model's own inference
            features = model.backbone(images.tensor)
            features = [features[f] for f in model.head_in_features]
            pred_logits, pred_deltas = model.head(features)
        anchors = model.anchor_generator(features)
        return model.candidates(anchors, pred_logits, pred_deltas, len(inputs))

