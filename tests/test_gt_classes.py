"""FocalRetinaNet refuses ground-truth class ids outside [0, NUM_CLASSES), as detectron2 does.

Such ids used to train silently: id K counted as background in the classification loss but as
foreground in the box loss and the normaliser, id -1 turned its anchors into "ignore".
"""

import math
from unittest import mock

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from small_config import small_retinanet_cfg

NUM_CLASSES = 3
SIZE = (96, 128)


@pytest.fixture(autouse=True)
def eager_loss(monkeypatch):
    # The checks run before or beside the loss; compiling its kernel would only cost time.
    monkeypatch.setenv("RETINANET_PLUGIN_COMPILE", "0")


@pytest.fixture(scope="module")
def model():
    cfg = small_retinanet_cfg(num_convs=1)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    cfg.MODEL.RETINANET.NUM_CLASSES = NUM_CLASSES
    torch.manual_seed(0)
    return build_model(cfg).train()


def _inputs(second_image_classes):
    """Two images, as detectron2's DatasetMapper gives them, the second with the given ids."""
    g = torch.Generator().manual_seed(0)
    inputs = []
    for i, classes in enumerate([[0, 2], second_image_classes]):
        inst = Instances(SIZE)
        inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 60.0, 50.0], [40.0, 30.0, 120.0, 90.0]]))
        inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
        inputs.append({
            "image": torch.rand(3, *SIZE, generator=g) * 255,
            "instances": inst,
            "file_name": f"tiles/tile_{i}.png",
            "image_id": 100 + i,
        })  # fmt: skip
    return inputs


@pytest.mark.parametrize("bad", [NUM_CLASSES, NUM_CLASSES + 7, -1])
def test_out_of_range_class_id_raises_naming_key_id_and_image(model, bad):
    with EventStorage(), pytest.raises(ValueError) as info:
        model(_inputs([1, bad]))
    message = str(info.value)
    assert f"MODEL.RETINANET.NUM_CLASSES = {NUM_CLASSES}" in message
    assert f"[{bad}]" in message
    assert "tiles/tile_1.png" in message and "image_id 101" in message
    assert "tile_0" not in message


def test_ids_already_on_the_device_are_checked_in_the_loss(model):
    # DenseDetector.forward skips FocalRetinaNet's host-side check: the path of instances a
    # custom mapper already put on the model's device. The loss still refuses the id.
    with EventStorage(), pytest.raises(ValueError, match=r"image 1 of the batch.*\[3\].*= 3\)"):
        DenseDetector.forward(model, _inputs([1, NUM_CLASSES]))


def test_valid_ids_train(model):
    # 0 and K - 1 are the edges of the valid range.
    with EventStorage():
        losses = model(_inputs([0, NUM_CLASSES - 1]))
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert losses["loss_box_reg"].item() > 0


def test_class_check_adds_no_host_sync(model):
    """The check is read together with the foreground count: one transfer to the host either
    way (on CUDA each .item() / .tolist() is a device sync)."""
    with torch.no_grad(), EventStorage():
        images = model.preprocess_image(_inputs([0, 1]))
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        logits, deltas = model.head(features)
        gt = [x["instances"] for x in _inputs([0, 1])]
        anchors = Boxes.cat(model.anchor_generator(features))
        labels, boxes = model.label_anchors(anchors, gt)
        args = (
            anchors.tensor,
            torch.cat([x.permute(0, 2, 3, 1).reshape(2, -1, NUM_CLASSES) for x in logits], 1),
            labels,
            torch.cat([x.permute(0, 2, 3, 1).reshape(2, -1, 4) for x in deltas], 1),
            boxes,
        )
        reads = []
        item, tolist = torch.Tensor.item, torch.Tensor.tolist
        with mock.patch.object(torch.Tensor, "item", lambda t: reads.append(1) or item(t)), \
                mock.patch.object(torch.Tensor, "tolist", lambda t: reads.append(1) or tolist(t)):
            model.losses(*args)
            without_check = len(reads)
            model.losses(*args, gt_classes=[g.gt_classes for g in gt])
            with_check = len(reads) - without_check
    assert with_check == without_check >= 1  # the foreground count is read
