"""A detectron2 ``DatasetMapper`` for unusual image files, optionally skipping unreadable ones.

detectron2's ``read_image`` handles grayscale, RGBA, palette and EXIF-rotated files (it applies
the EXIF orientation), but converts a 16-bit grayscale PNG by *clipping* each value to 255, so a
typical 16-bit image (values in the thousands) turns almost white. :func:`read_image` keeps the
high byte instead (value >> 8), which is what Pillow itself does for 16-bit RGB PNGs, so 16-bit
grayscale and 16-bit colour files map the same intensity to the same 8-bit value. Everything else
is detectron2's code path.

:class:`RobustDatasetMapper` is detectron2's ``DatasetMapper`` reading images that way, and,
with ``skip_unreadable`` (``DATALOADER.SKIP_UNREADABLE_IMAGES``), returning None for an image
that fails to decode: detectron2's ``MapDataset`` then draws another image. Each skip is logged
with the file name and image id and counted in :attr:`RobustDatasetMapper.skipped`, a counter
shared with data-loader worker processes.
"""

import copy
import logging
import multiprocessing as mp
from typing import Any, Dict, Optional

import numpy as np
import torch
from PIL import Image

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager

__all__ = ["UNREADABLE_IMAGE_ERRORS", "RobustDatasetMapper", "read_image"]

logger = logging.getLogger(__name__)

# Pillow modes of 16- and 32-bit integer single-channel images.
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
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

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict[str, Any]:
        ret = super().from_config(cfg, is_train)
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

    def __call__(self, dataset_dict: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """Maps one dataset dict as detectron2's ``DatasetMapper`` does (None: skipped)."""
        image = self._read(dataset_dict)
        if image is None:
            return None
        dataset_dict = copy.deepcopy(dataset_dict)
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
