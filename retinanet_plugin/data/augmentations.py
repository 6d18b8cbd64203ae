"""Training augmentations for overhead and other orientation-free imagery.

detectron2's ``build_augmentation`` gives a resize and one random flip (``INPUT.RANDOM_FLIP``:
horizontal *or* vertical). Aerial tiles, microscopy and similar images have no "up": a crown seen
rotated by 90 degrees is still a crown. Three keys add what such data allows (all off by default,
which keeps detectron2's pipeline):

* ``INPUT.VERTICAL_FLIP``: a top-bottom flip with probability 0.5, on top of RANDOM_FLIP's;
* ``INPUT.ROTATE_90``: a rotation by 0, 90, 180 or 270 degrees, each with probability 1/4. It is
  exact: the pixels are moved, not resampled, and an axis-aligned box stays the same box;
* ``INPUT.COLOR_JITTER``: brightness, contrast and saturation, each scaled by a factor drawn
  uniformly from [1 - s, 1 + s] (s = the key's value; 0 = off).

The extras run after detectron2's resize and flip (and its crop, when ``INPUT.CROP.ENABLED``),
in training only; they draw from NumPy's global generator like detectron2's own augmentations,
so ``DATALOADER.PER_IMAGE_SEED`` makes them reproducible too.
"""

from typing import List

import numpy as np

from detectron2.data import transforms as T


class Rot90Transform(T.Transform):
    """Rotate an (H, W, ...) image counter-clockwise by ``k`` quarter turns (``np.rot90``).

    A point (x, y) of the input (pixel edges at integer coordinates) goes to
    k=1: (y, W - x); k=2: (W - x, H - y); k=3: (H - y, x).
    """

    def __init__(self, h: int, w: int, k: int):
        super().__init__()
        if k not in (1, 2, 3):
            raise ValueError(f"k must be 1, 2 or 3 quarter turns, got {k}")
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.rot90(img, self.k, axes=(0, 1)))

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        x, y = coords[:, 0].copy(), coords[:, 1].copy()
        if self.k == 1:
            coords[:, 0], coords[:, 1] = y, self.w - x
        elif self.k == 2:
            coords[:, 0], coords[:, 1] = self.w - x, self.h - y
        else:
            coords[:, 0], coords[:, 1] = self.h - y, x
        return coords

    def inverse(self) -> T.Transform:
        h, w = (self.w, self.h) if self.k % 2 else (self.h, self.w)
        return Rot90Transform(h, w, 4 - self.k)


class RandomRot90(T.Augmentation):
    """0, 90, 180 or 270 degrees counter-clockwise, uniformly."""

    def get_transform(self, image: np.ndarray) -> T.Transform:
        k = int(np.random.randint(4))
        if k == 0:
            return T.NoOpTransform()
        return Rot90Transform(image.shape[0], image.shape[1], k)


def extra_train_augmentations(cfg) -> List[T.Augmentation]:
    """The augmentations ``INPUT.VERTICAL_FLIP``, ``INPUT.ROTATE_90`` and
    ``INPUT.COLOR_JITTER`` ask for (empty with the defaults)."""
    augs: List[T.Augmentation] = []
    if cfg.INPUT.VERTICAL_FLIP:
        augs.append(T.RandomFlip(prob=0.5, horizontal=False, vertical=True))
    if cfg.INPUT.ROTATE_90:
        augs.append(RandomRot90())
    strength = float(cfg.INPUT.COLOR_JITTER)
    if not 0.0 <= strength < 1.0:
        raise ValueError(f"INPUT.COLOR_JITTER must be in [0, 1), got {strength}")
    if strength > 0:
        low, high = 1.0 - strength, 1.0 + strength
        augs += [T.RandomBrightness(low, high), T.RandomContrast(low, high),
                 T.RandomSaturation(low, high)]
    return augs
