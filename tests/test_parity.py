"""FocalRetinaNet against detectron2's RetinaNet with the same weights: losses, gradients and
detections must agree.

Both models are built from detectron2's model-zoo config COCO-Detection/retinanet_R_50_FPN_1x
with a ResNet-18 trunk to keep the test fast on CPU (the comparison does not depend on the trunk).
"""

import math

import pytest
import torch

from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from retinanet_plugin import FocalRetinaNet, LossNormalizer

from small_config import small_retinanet_cfg

IMAGE_SIZES = [(200, 249), (320, 480)]


def _cfg():
    # Two convs per head branch: the head dominates the CPU time, and two test the same.
    return small_retinanet_cfg(num_convs=2)


@pytest.fixture(scope="module")
def models():
    cfg = _cfg()
    torch.manual_seed(0)
    return calibrated_pair(RetinaNet(cfg), FocalRetinaNet(cfg))


def calibrated_pair(theirs, ours):
    """``ours`` with the weights of ``theirs``, both with trained-like head outputs.

    Shared with tests/test_lazy_parity.py, which builds the two models from detectron2's lazy
    config instead of its YAML config.
    """
    incompatible = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    with torch.no_grad():
        # With two subnet convs instead of four the random head's outputs have a std of about 13
        # (measured on these images): scores would saturate at 1.0, where the order of equal
        # scores decides the top-k. Scaling the output convs by 0.1 brings the std to about 1.3.
        theirs.head.cls_score.weight.mul_(0.1)
        theirs.head.bbox_pred.weight.mul_(0.1)
        # Trained-like scores: the prior bias (sigmoid = 0.01) plus 1.5 and a spread over classes
        # puts many anchors of every level above the 0.05 threshold, so that the per-level top-k
        # (1000) and the NMS both have work to do.
        bias = theirs.head.cls_score.bias
        bias.add_(1.5 + 0.5 * torch.randn(bias.shape, generator=torch.Generator().manual_seed(1)))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _images(seed, sizes=IMAGE_SIZES):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(3, h, w, generator=g) * 255} for h, w in sizes]


def _sorted(instances):
    # By score, equal scores by box: float32 sigmoids of ~1M distinct logits do collide.
    order = torch.argsort(instances.pred_boxes.tensor[:, 0], stable=True)
    order = order[torch.argsort(instances.scores[order], descending=True, stable=True)]
    return (
        instances.scores[order],
        instances.pred_boxes.tensor[order],
        instances.pred_classes[order],
    )


def _assert_same_detections(ours, theirs):
    assert len(ours) == len(theirs)
    assert len(ours) > 0  # a comparison of two empty sets would prove nothing
    for a, b in zip(_sorted(ours), _sorted(theirs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_state_dicts_have_the_same_keys(models):
    theirs, ours = models
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_detections_equal_detectron2(models):
    """A batch of two images of different sizes (both padded to 320x480)."""
    check_detections_equal(*models)


def check_detections_equal(theirs, ours):
    """Both models' detections of :data:`IMAGE_SIZES` random images are the same."""
    theirs.eval()
    ours.eval()
    inputs = _images(seed=2)
    with torch.no_grad():
        ours_out = ours([dict(x) for x in inputs])
        theirs_out = theirs([dict(x) for x in inputs])
    for a, b in zip(ours_out, theirs_out):
        _assert_same_detections(a["instances"], b["instances"])


def test_detections_equal_detectron2_when_topk_binds(models):
    """Per-level top-k must select the same candidates when far more than k pass the threshold
    (one image: the single-image path)."""
    check_detections_equal_when_topk_binds(*models)


def check_detections_equal_when_topk_binds(theirs, ours):
    """As :func:`check_detections_equal`, on a 320x480 image whose P3 alone has over ten times
    ``test_topk_candidates`` scores above the threshold."""
    ours.eval()
    theirs.eval()
    inputs = _images(seed=3, sizes=IMAGE_SIZES[1:])
    with torch.no_grad():
        images = ours.preprocess_image(inputs)
        features = ours.backbone(images.tensor)
        features = [features[f] for f in ours.head_in_features]
        logits, deltas = ours.head(features)
    thresh = math.log(0.05 / 0.95)
    # P3 of the 320x480 image: 40 x 60 locations x 9 anchors x K classes (1.7M scores for
    # K = 80); with the calibrated bias most of them pass.
    assert (logits[0][0] > thresh).sum() > 10 * ours.test_topk_candidates
    logits_before = [x.clone() for x in logits]
    ours_det = ours.forward_inference(images, features, (logits, deltas))
    theirs_det = theirs.forward_inference(
        images, features, ([x.clone() for x in logits], [x.clone() for x in deltas])
    )
    for a, b in zip(ours_det, theirs_det):
        _assert_same_detections(a, b)
    # No in-place sigmoid on the head's outputs.
    for a, b in zip(logits, logits_before):
        assert torch.equal(a, b)


def _gt(image_size, boxes, classes):
    inst = Instances(image_size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def test_training_losses_and_head_gradients_equal_detectron2(models):
    check_training_equal(*models)


def check_training_equal(theirs, ours, parameters=("head",)):
    """Losses of a two-image batch, and the gradients of the ``parameters`` submodules, are the
    same; returns their largest differences (absolute for losses, relative to the largest
    gradient element of each tensor for gradients)."""
    sizes = [(128, 150), (160, 192)]  # smaller than the eval sizes: backward is the slow part
    inputs = _images(seed=4, sizes=sizes)
    inputs[0]["instances"] = _gt(sizes[0], [[10, 20, 100, 110], [60, 40, 140, 120]], [3, 7])
    inputs[1]["instances"] = _gt(sizes[1], [[30, 30, 180, 150]], [0])
    results = []
    for model in (theirs, ours):
        model.train()
        model.zero_grad()
        # Both start from the EMA's initial value (detectron2 keeps it as a float attribute).
        model.__dict__.pop("loss_normalizer", None)
        if model is ours:
            ours.loss_normalizer = LossNormalizer()
        with EventStorage():
            losses = model([dict(x) for x in inputs])
            sum(losses.values()).backward()
        grads = {
            f"{m}.{n}": p.grad.clone()
            for m in parameters
            for n, p in getattr(model, m).named_parameters()
            if p.grad is not None
        }
        results.append((losses, grads))
    (theirs_losses, theirs_grads), (ours_losses, ours_grads) = results
    assert ours_losses.keys() == theirs_losses.keys() == {"loss_cls", "loss_box_reg"}
    differences = {}
    for key in theirs_losses:
        expected = theirs_losses[key].item()
        assert expected > 0
        differences[key] = abs(ours_losses[key].item() - expected)
        assert differences[key] <= 1e-5 * abs(expected), key
    assert ours_grads.keys() == theirs_grads.keys() and theirs_grads
    for name, expected in theirs_grads.items():
        scale = expected.abs().max()
        torch.testing.assert_close(ours_grads[name], expected, rtol=1e-4, atol=1e-5 * scale)
        differences[name] = ((ours_grads[name] - expected).abs().max() / scale).item()
    return differences

