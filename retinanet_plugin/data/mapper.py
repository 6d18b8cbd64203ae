"""The dataset mapper of every loader the plugin builds (:func:`build_dataset_mapper`).

:class:`RobustDatasetMapper` is detectron2's ``DatasetMapper`` with these options, all set from
the config:

- robust image reading (always): detectron2's ``read_image`` handles grayscale, RGBA, palette and
  EXIF-rotated files, but converts a 16-bit grayscale PNG by *clipping* each value to 255, so a
  typical 16-bit image (values in the thousands) turns almost white. :func:`read_image` keeps the
  high byte instead (value >> 8), which is what Pillow itself does for 16-bit RGB PNGs, so 16-bit
  grayscale and 16-bit colour files map the same intensity to the same 8-bit value. Everything
  else is detectron2's code path, except that a file that fails to decode raises: detectron2's
  ``read_image`` returns a corrupt PNG as an array of zeros without an error (its EXIF lookup
  decodes the PNG and swallows the decoding error).
- integer boxes (always; common in hand-made COCO files) are made float before the resize:
  detectron2's ``ResizeTransform.apply_coords`` scales coordinates in place, which truncates an
  integer array, so ``[20, 10, 30, 20]`` resized by 1.3375 would start at x = 26 instead of 26.75.
- skipping unreadable images (``DATALOADER.SKIP_UNREADABLE_IMAGES``, training only): an image
  that fails to decode is replaced by another one drawn at random from
  :attr:`RobustDatasetMapper.fallback_dataset` (the training loader sets it to the training set;
  without one the mapper returns None and detectron2's ``MapDataset`` draws another, which
  detectron2 0.6 cannot do on Python >= 3.11: ``random.sample`` of a set). Each skip is logged
  with the file name and image id and counted in :attr:`RobustDatasetMapper.skipped`, a counter
  shared with data-loader workers.
- crowd regions (``MODEL.RETINANET.CROWD_IGNORE``, training only): detectron2's mapper drops
  COCO ``iscrowd=1`` annotations; with ``keep_crowd`` they are appended to ``instances`` with
  ``gt_is_crowd = True`` (False for every other instance), so that ``FocalRetinaNet`` can ignore
  the background anchors inside them; the model never matches a crowd instance to an anchor.
- the extra training augmentations ``INPUT.VERTICAL_FLIP``, ``ROTATE_90`` and ``COLOR_JITTER``
  (:mod:`retinanet_plugin.data.augmentations`), after detectron2's resize and flip.
"""

import copy
import logging
import multiprocessing as mp
import os
import random
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances
from detectron2.utils.file_io import PathManager

from .augmentations import extra_train_augmentations

__all__ = [
    "UNREADABLE_IMAGE_ERRORS",
    "RobustDatasetMapper",
    "build_dataset_mapper",
    "read_image",
]

logger = logging.getLogger(__name__)

# Pillow modes of 16- and 32-bit integer single-channel images.
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# Consecutive undecodable draws after which the data is declared unusable.
MAX_CONSECUTIVE_SKIPS = 20
# What a file that cannot be decoded raises: OSError (missing, truncated, unidentified),
# SyntaxError (some broken PNGs), DecompressionBombError (beyond Pillow's pixel limit).
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)


def read_image(file_name: str, format: Optional[str] = None) -> np.ndarray:
    """detectron2's ``read_image``, except that 16-bit grayscale keeps its contrast.

    Args:
        file_name: image path (any path detectron2's ``PathManager`` opens).
        format: as in detectron2 ("BGR", "RGB", "L", ...).

    Returns:
        np.ndarray: (H, W, C) uint8 (float for "YUV-BT.601"), EXIF orientation applied.
    """
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        # Decode now, so that a corrupt file raises: detectron2's EXIF lookup decodes a PNG as a
        # side effect and swallows its errors, after which the image loads as zeros.
        image.load()
        if image.mode not in _WIDE_INTEGER_MODES:
            image = utils._apply_exif_orientation(image)
            return utils.convert_PIL_to_numpy(image, format)
        image = utils._apply_exif_orientation(image)
        # 0..65535 -> 0..255 by the high byte (Pillow's own 16-bit RGB -> RGB conversion).
        values = np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8
        return utils.convert_PIL_to_numpy(Image.fromarray(values.astype(np.uint8), "L"), format)


class RobustDatasetMapper(DatasetMapper):
    """detectron2's ``DatasetMapper`` with :func:`read_image`, float boxes, optional skipping of
    unreadable images, optional crowd regions and the extra augmentations (see the module
    docstring). Build it with :func:`build_dataset_mapper`.

    Attributes:
        skipped: ``multiprocessing.Value`` counting the images skipped so far, in this process
            and in data-loader workers started after the mapper was built.
        fallback_dataset: dataset dicts to draw a replacement from when skipping (indexable),
            or None.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        skip_unreadable: bool = False,
        keep_crowd: bool = False,
        **kwargs: Any,
    ):
        """
        Args:
            is_train, kwargs: as for detectron2's ``DatasetMapper``.
            skip_unreadable: return None (skip the image) instead of raising when the image
                file cannot be decoded.
            keep_crowd: keep crowd annotations (``iscrowd=1``) as instances marked
                ``gt_is_crowd``, boxes only (instance masks and keypoints must be off).
        """
        super().__init__(is_train, **kwargs)
        if keep_crowd and (self.use_instance_mask or self.use_keypoint):
            raise ValueError(
                "Crowd regions (MODEL.RETINANET.CROWD_IGNORE) are kept as boxes only: they need "
                "MODEL.MASK_ON and MODEL.KEYPOINT_ON off"
            )
        self.skip_unreadable = skip_unreadable
        self.keep_crowd = keep_crowd
        self.skipped = mp.Value("q", 0)
        self.fallback_dataset: Optional[Sequence[Dict[str, Any]]] = None
        self._rng: Optional[random.Random] = None

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict[str, Any]:
        ret = super().from_config(cfg, is_train)
        if is_train:
            ret["augmentations"] = ret["augmentations"] + extra_train_augmentations(cfg)
        # Skipping only in training: an evaluation that drops images would report a wrong AP.
        ret["skip_unreadable"] = is_train and cfg.DATALOADER.SKIP_UNREADABLE_IMAGES
        # Evaluation drops every annotation, crowd or not.
        ret["keep_crowd"] = is_train and cfg.MODEL.RETINANET.CROWD_IGNORE
        return ret

    def _read(self, dataset_dict: Dict[str, Any]) -> Optional[np.ndarray]:
        file_name = dataset_dict["file_name"]
        try:
            return read_image(file_name, format=self.image_format)
        except UNREADABLE_IMAGE_ERRORS as e:
            where = f"{file_name} (image id {dataset_dict.get('image_id')!r})"
            if not self.skip_unreadable:
                raise type(e)(
                    f"{where}: cannot decode the image ({e}); set "
                    "DATALOADER.SKIP_UNREADABLE_IMAGES True to skip such images"
                ) from e
            with self.skipped.get_lock():
                self.skipped.value += 1
            logger.warning("Skipping %s: cannot decode the image (%s)", where, e)
            return None

    def _replacement(self) -> Optional[Dict[str, Any]]:
        if not self.fallback_dataset:
            return None
        if self._rng is None:  # per process: forked data-loader workers draw differently
            self._rng = random.Random(os.getpid())
        return self.fallback_dataset[self._rng.randrange(len(self.fallback_dataset))]

    def __call__(self, dataset_dict: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """Maps one dataset dict as detectron2's ``DatasetMapper`` does; an undecodable image
        raises, or with ``skip_unreadable`` is replaced (None: skipped, no replacement)."""
        first = dataset_dict
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            image = self._read(dataset_dict)
            if image is not None:
                return self._map(dataset_dict, image)
            dataset_dict = self._replacement()
            if dataset_dict is None:
                return None
        raise OSError(
            f"{MAX_CONSECUTIVE_SKIPS} images in a row failed to decode (first {first['file_name']}"
            f", last {dataset_dict['file_name']}); see the log for each"
        )

    def _map(self, dataset_dict: Dict[str, Any], image: np.ndarray) -> Dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)
        for anno in dataset_dict.get("annotations", ()):
            anno["bbox"] = [float(v) for v in anno["bbox"]]  # see the module docstring
        utils.check_image_size(dataset_dict, image)
        sem_seg = None
        if "sem_seg_file_name" in dataset_dict:
            sem_seg = utils.read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(
                dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk
            )
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict

    def _transform_annotations(self, dataset_dict: Dict[str, Any], transforms, image_shape):
        if not self.keep_crowd:
            return super()._transform_annotations(dataset_dict, transforms, image_shape)
        crowd = [a for a in dataset_dict["annotations"] if a.get("iscrowd", 0) == 1]
        super()._transform_annotations(dataset_dict, transforms, image_shape)  # drops crowd
        instances = dataset_dict["instances"]
        instances.gt_is_crowd = torch.zeros(len(instances), dtype=torch.bool)
        crowd_instances = _crowd_instances(crowd, transforms, image_shape)
        if len(crowd_instances):
            dataset_dict["instances"] = Instances.cat([instances, crowd_instances])


def _crowd_instances(annotations: List[Dict[str, Any]], transforms, image_shape) -> Instances:
    """Crowd boxes through the same transforms and clipping as the other boxes; those left
    empty are dropped."""
    boxes = [
        utils.transform_instance_annotations(
            {"bbox": a["bbox"], "bbox_mode": a["bbox_mode"]}, transforms, image_shape
        )["bbox"]
        for a in annotations
    ]
    instances = Instances(image_shape)
    # One array first: torch builds a tensor from a list of arrays element by element.
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    instances.gt_boxes = Boxes(torch.from_numpy(boxes))
    instances.gt_classes = torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)
    instances.gt_is_crowd = torch.ones(len(annotations), dtype=torch.bool)
    return instances[instances.gt_boxes.nonempty()]


def build_dataset_mapper(cfg, is_train: bool, **overrides: Any) -> RobustDatasetMapper:
    """The mapper of every loader the plugin builds, for training and for evaluation
    (``train_net.py``, the tools): :class:`RobustDatasetMapper` with its options from ``cfg``.

    Args:
        cfg (CfgNode): the run's config.
        is_train (bool): training (augmentations, annotations kept) or evaluation.
        overrides: constructor arguments that replace what ``cfg`` gives (e.g.
            ``augmentations``).
    """
    return RobustDatasetMapper(cfg, is_train=is_train, **overrides)
