"""INPUT.VERTICAL_FLIP / ROTATE_90 / COLOR_JITTER: boxes follow the pixels exactly."""

import numpy as np
import pytest

from detectron2.config import get_cfg
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from retinanet_plugin import add_retinanet_plugin_config
from retinanet_plugin.data.augmentations import Rot90Transform, extra_train_augmentations
from retinanet_plugin.data.mapper import build_dataset_mapper

H, W = 30, 50


def _image_with_box(box):
    """(H, W, 3) zeros with the box's pixels (x0 <= x < x1, y0 <= y < y1) set to 255."""
    x0, y0, x1, y1 = box
    img = np.zeros((H, W, 3), dtype=np.uint8)
    img[y0:y1, x0:x1] = 255
    return img


def _bright_box(img):
    """The bright region's box in pixel-edge coordinates (x0, y0, x1, y1)."""
    ys, xs = np.nonzero(img[..., 0] > 127)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_moves_boxes_with_the_pixels_and_inverts(k):
    box = [4, 7, 19, 12]
    img = _image_with_box(box)
    t = Rot90Transform(H, W, k)
    rotated = t.apply_image(img)
    assert rotated.shape[:2] == ((W, H) if k % 2 else (H, W))
    new_box = t.apply_box(np.array([box], dtype=np.float64))[0]
    assert new_box.tolist() == _bright_box(rotated)
    # np.rot90 is the reference for the pixels.
    np.testing.assert_array_equal(rotated, np.rot90(img, k))
    back = t.inverse()
    np.testing.assert_array_equal(back.apply_image(rotated), img)
    np.testing.assert_allclose(back.apply_box(new_box[None])[0], box)


def _cfg(**input_keys):
    cfg = get_cfg()
    add_retinanet_plugin_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (H,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.RANDOM_FLIP = "none"
    for key, value in input_keys.items():
        cfg.INPUT[key] = value
    return cfg


def test_defaults_keep_detectrons_augmentations():
    cfg = _cfg()
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    assert extra_train_augmentations(cfg) == []
    ours = build_dataset_mapper(cfg, is_train=True).augmentations.augs
    theirs = DatasetMapper(cfg, is_train=True).augmentations.augs
    assert [type(a) for a in ours] == [type(a) for a in theirs]


@pytest.mark.parametrize("crowd", [False, True])
def test_mapper_rotates_and_flips_boxes_with_the_image(tmp_path, crowd):
    import cv2

    box = [4, 7, 19, 12]
    path = str(tmp_path / "tile.png")
    cv2.imwrite(path, _image_with_box(box)[..., ::-1])
    record = {"file_name": path, "image_id": 1, "height": H, "width": W,
              "annotations": [{"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0,
                               "iscrowd": 0}]}
    cfg = _cfg(VERTICAL_FLIP=True, ROTATE_90=True)
    cfg.MODEL.RETINANET.CROWD_IGNORE = crowd
    mapper = build_dataset_mapper(cfg, is_train=True)
    kinds = set()
    np.random.seed(0)
    for _ in range(40):
        out = mapper(dict(record))
        img = out["image"].permute(1, 2, 0).numpy()
        got = out["instances"].gt_boxes.tensor[0].tolist()
        assert got == [float(v) for v in _bright_box(img)]
        kinds.add((img.shape[0], tuple(got)))
    # Both orientations and several placements were drawn (8 are possible).
    assert {h for h, _ in kinds} == {H, W}
    assert len(kinds) >= 5


def test_color_jitter_changes_pixels_not_boxes_and_checks_its_range():
    cfg = _cfg(COLOR_JITTER=0.4)
    augs = extra_train_augmentations(cfg)
    assert [type(a) for a in augs] == [T.RandomBrightness, T.RandomContrast, T.RandomSaturation]
    img = (np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8)
    np.random.seed(1)
    aug_input = T.AugInput(img.copy(), boxes=np.array([[1.0, 2.0, 10.0, 20.0]]))
    T.AugmentationList(augs)(aug_input)
    assert not np.array_equal(aug_input.image, img)
    np.testing.assert_array_equal(aug_input.boxes, [[1.0, 2.0, 10.0, 20.0]])
    with pytest.raises(ValueError, match="INPUT.COLOR_JITTER"):
        extra_train_augmentations(_cfg(COLOR_JITTER=1.5))
