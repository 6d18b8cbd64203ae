"""Images that decode but are unusual train correctly: grayscale, RGBA, 16-bit, EXIF-rotated,
tiny, huge. Each goes through a COCO JSON, detectron2's loader (``load_coco_json``), the
training mapper and one forward / backward of the model from ``small_config.py``.

Every image is a flat background with one filled rectangle; the rectangle's pixels must be the
ones inside the ground-truth box the model receives, and the loss must be finite with a
gradient on every trained parameter.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data.datasets import load_coco_json
from detectron2.data.detection_utils import read_image as d2_read_image
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from retinanet_plugin.data import RobustDatasetMapper, check_coco_json
from retinanet_plugin.data.mapper import read_image

from small_config import small_retinanet_cfg

BACKGROUND, SHAPE = 40, 220  # gray levels; RGB images use these in every channel


@pytest.fixture(scope="module")
def cfg():
    cfg = small_retinanet_cfg(num_convs=1)
    cfg.MODEL.RETINANET.NUM_CLASSES = 1
    # Shortest side resized to 64 (at most 128 long); no flip, so boxes are predictable.
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 128
    cfg.INPUT.RANDOM_FLIP = "none"
    return cfg


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return build_model(cfg).train()


def _dataset(tmp_path, file_name, width, height, box):
    """COCO JSON of one image with one box (XYWH), checked, then read by detectron2."""
    coco = {
        "images": [{"id": 1, "file_name": file_name, "width": width, "height": height}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": list(box)}],
        "categories": [{"id": 1, "name": "shape"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    check_coco_json(path, num_classes=1, require_annotations=True)
    (record,) = load_coco_json(str(path), str(tmp_path), "unusual_images_test")
    return record


def _pixels(width, height, box, channels=None, dtype=np.uint8, scale=1):
    shape = (height, width) if channels is None else (height, width, channels)
    array = np.full(shape, BACKGROUND * scale, dtype)
    x, y, w, h = box
    array[y : y + h, x : x + w] = SHAPE * scale
    return array


def _map_and_train(cfg, model, record, expected_size, margin=1):
    """Maps the record, checks the box covers the shape's pixels, runs forward / backward.

    ``margin`` px along the box's edges are not compared: the resize blurs them over about
    one source pixel's width."""
    mapped = RobustDatasetMapper(cfg, is_train=True)(record)
    image, boxes = mapped["image"], mapped["instances"].gt_boxes.tensor
    assert tuple(image.shape) == (3, *expected_size)
    assert boxes.shape == (1, 4)
    x0, y0, x1, y1 = boxes[0].round().int().tolist()
    m = margin
    inside = image[:, y0 + m : y1 - m, x0 + m : x1 - m].float()
    outside = image.float().clone()
    outside[:, max(y0 - m, 0) : y1 + m, max(x0 - m, 0) : x1 + m] = float("nan")
    # Inside the box the shape, outside the background (+-12 for JPEG and resize blur).
    assert (inside - SHAPE).abs().max() <= 12, "box does not lie on the shape"
    assert (outside[~outside.isnan()] - BACKGROUND).abs().max() <= 12, "shape outside the box"

    model.zero_grad()
    with EventStorage():
        losses = model([mapped])
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert losses["loss_box_reg"] > 0  # the box got at least one foreground anchor
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return mapped


def test_grayscale(cfg, model, tmp_path):
    box = (20, 10, 30, 20)
    Image.fromarray(_pixels(80, 48, box), "L").save(tmp_path / "gray.png")
    record = _dataset(tmp_path, "gray.png", 80, 48, box)
    # 80x48 -> shortest side 64: 106.67 -> 107 x 64; scale 4/3.
    mapped = _map_and_train(cfg, model, record, (64, 107))
    # Exact scale, not truncated (see retinanet_plugin.data.mapper on integer boxes).
    assert torch.equal(mapped["image"][0], mapped["image"][1])  # gray copied to every channel
    assert mapped["instances"].gt_boxes.tensor[0].tolist() == pytest.approx(
        [20 * 107 / 80, 10 * 64 / 48, 50 * 107 / 80, 30 * 64 / 48], abs=1e-4
    )


def test_rgba(cfg, model, tmp_path):
    box = (8, 8, 24, 16)
    rgba = _pixels(64, 64, box, channels=4)
    rgba[..., 3] = 0  # fully transparent: detectron2 drops alpha, keeps the colour values
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    record = _dataset(tmp_path, "rgba.png", 64, 64, box)
    _map_and_train(cfg, model, record, (64, 64))


def test_16_bit_grayscale_keeps_its_contrast(cfg, model, tmp_path):
    box = (10, 20, 40, 30)
    # Values SHAPE * 257 and BACKGROUND * 257: their high bytes are SHAPE and BACKGROUND.
    Image.fromarray(_pixels(64, 64, box, dtype=np.uint16, scale=257)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    # detectron2's own reader clips 10280 and 56540 to 255 alike: the shape would vanish.
    assert np.unique(d2_read_image(str(tmp_path / "g16.png"), "BGR")).tolist() == [255]
    assert np.unique(read_image(str(tmp_path / "g16.png"), "BGR")).tolist() == [BACKGROUND, SHAPE]
    record = _dataset(tmp_path, "g16.png", 64, 64, box)
    _map_and_train(cfg, model, record, (64, 64))


def test_exif_rotated_jpeg(cfg, model, tmp_path):
    # As displayed (and as detectron2 loads it): 48 wide x 80 high, the shape at x 8..32,
    # y 40..70. Stored rotated the other way, with EXIF orientation 6 (rotate 90 cw to show).
    box = (8, 40, 24, 30)
    shown = Image.fromarray(_pixels(48, 80, box, channels=3))
    exif = Image.Exif()
    exif[0x0112] = 6
    shown.transpose(Image.ROTATE_90).save(tmp_path / "exif.jpg", quality=100, exif=exif)
    assert Image.open(tmp_path / "exif.jpg").size == (80, 48)  # stored landscape
    record = _dataset(tmp_path, "exif.jpg", 48, 80, box)
    # 48x80 -> 64 x 106.67 -> 64 wide x 107 high.
    _map_and_train(cfg, model, record, (107, 64))


def test_tiny_image_smaller_than_the_smallest_anchor(cfg, model, tmp_path):
    # 12x10 px, box 6x4: after the resize to 64 (x 6.4 / 7.7), the box (38 x 26 px) is still
    # smaller than the smallest anchor area (32 x 32 on P3) in height.
    box = (3, 3, 6, 4)
    Image.fromarray(_pixels(12, 10, box, channels=3)).save(tmp_path / "tiny.png")
    record = _dataset(tmp_path, "tiny.png", 12, 10, box)
    mapped = _map_and_train(cfg, model, record, (64, 77), margin=7)  # 6.4x upscale blurs 7 px
    x0, y0, x1, y1 = mapped["instances"].gt_boxes.tensor[0].tolist()
    assert y1 - y0 == pytest.approx(4 * 64 / 10) and y1 - y0 < 32


def test_huge_image(cfg, model, tmp_path):
    # 4800 x 3200 (15 MP) shrinks to 96 x 64: the box must shrink by the same 1/50.
    box = (1200, 800, 2000, 1600)
    Image.fromarray(_pixels(4800, 3200, box), "L").save(tmp_path / "huge.png")
    record = _dataset(tmp_path, "huge.png", 4800, 3200, box)
    mapped = _map_and_train(cfg, model, record, (64, 96))
    assert mapped["instances"].gt_boxes.tensor[0].tolist() == pytest.approx(
        [1200 / 50, 800 / 50, 3200 / 50, 2400 / 50], abs=1e-4
    )
