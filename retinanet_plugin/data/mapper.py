"""A detectron2 ``DatasetMapper`` for unusual image files, optionally skipping unreadable ones.

detectron2's ``read_image`` handles grayscale, RGBA, palette and EXIF-rotated files (it applies
the EXIF orientation), but converts a 16-bit grayscale PNG by *clipping* each value to 255, so a
typical 16-bit image (values in the thousands) turns almost white. :func:`read_image` keeps the
high byte instead (value >> 8), which is what Pillow itself does for 16-bit RGB PNGs, so 16-bit
grayscale and 16-bit colour files map the same intensity to the same 8-bit value. Everything else
is detectron2's code path, except that a file that fails to decode raises: detectron2's
``read_image`` returns a corrupt PNG as an array of zeros without an error (its EXIF lookup
decodes the PNG and swallows the decoding error).

Integer boxes (common in hand-made COCO files) are made float before the resize: detectron2's
``ResizeTransform.apply_coords`` scales coordinates in place, which truncates an integer array,
so ``[20, 10, 30, 20]`` resized by 1.3375 would start at x = 26 instead of 26.75.

:class:`RobustDatasetMapper` is detectron2's ``DatasetMapper`` reading images that way, and,
with ``skip_unreadable`` (``DATALOADER.SKIP_UNREADABLE_IMAGES``), replacing an image that fails
to decode by another one drawn at random from :attr:`RobustDatasetMapper.fallback_dataset`
(:func:`build_robust_train_loader` sets it to the training set; without one the mapper returns
None and detectron2's ``MapDataset`` draws another, which detectron2 0.6 cannot do on Python
>= 3.11: ``random.sample`` of a set). Each skip is logged with the file name and image id and
counted in :attr:`RobustDatasetMapper.skipped`, a counter shared with data-loader workers.
"""

import copy
import logging
import multiprocessing as mp
import os
import random
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager

from .augmentations import extra_train_augmentations

__all__ = [
    "UNREADABLE_IMAGE_ERRORS",
    "RobustDatasetMapper",
    "build_robust_train_loader",
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
    """detectron2's ``DatasetMapper`` with :func:`read_image` and optional skipping.

    Attributes:
        skipped: ``multiprocessing.Value`` counting the images skipped so far, in this process
            and in data-loader workers started after the mapper was built.
        fallback_dataset: dataset dicts to draw a replacement from when skipping (indexable),
            or None.
    """

    @configurable
    def __init__(self, is_train: bool, *, skip_unreadable: bool = False, **kwargs: Any):
        """
        Args:
            is_train, kwargs: as for detectron2's ``DatasetMapper``.
            skip_unreadable: return None (skip the image) instead of raising when the image
                file cannot be decoded.
        """
        super().__init__(is_train, **kwargs)
        self.skip_unreadable = skip_unreadable
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


def build_robust_train_loader(cfg) -> Tuple[Any, RobustDatasetMapper]:
    """detectron2's training loader with :class:`RobustDatasetMapper`, whose replacements for
    skipped images come from the training set itself, and a sampler that can resume.

    Returns:
        (loader, mapper): the mapper for its :attr:`~RobustDatasetMapper.skipped` counter.
    """
    from ..engine.resume import build_resumable_train_loader  # engine imports data

    mapper = RobustDatasetMapper(cfg, is_train=True)
    return build_resumable_train_loader(cfg, mapper=mapper), mapper
