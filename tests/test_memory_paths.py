"""Memory: FocalRPN's anchor matching retries on CUDA OOM; dense inference goes image by image.

No GPU is needed: the OOM is raised by a patched ``pairwise_iou`` as torch raises it, and the
inference test records the size of every tensor ``nonzero`` scans.
"""

from unittest import mock

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

import retinanet_plugin.proposal_generator as proposal_generator

from small_config import small_focal_rpn_cfg, small_retinanet_cfg


def test_focal_rpn_matching_retries_after_cuda_oom(monkeypatch):
    rpn = build_model(small_focal_rpn_cfg()).proposal_generator
    anchors = [Boxes(torch.tensor([[0.0, 0, 20, 20], [10, 10, 50, 50], [60, 60, 90, 90]]))]
    gt = Instances((100, 100), gt_boxes=Boxes(torch.tensor([[12.0, 12, 48, 48], [0, 0, 19, 21]])))
    expected_labels, expected_boxes = rpn.label_and_sample_anchors(anchors, [gt])
    assert expected_labels[0].tolist() == [1, 1, 0]  # IoU 0.90, 0.81 and 0

    real_iou, calls = proposal_generator.pairwise_iou, []

    def iou_out_of_memory_twice(*args):
        calls.append(args)
        if len(calls) <= 2:  # the first try and the retry after emptying the cache
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_iou(*args)

    monkeypatch.setattr(proposal_generator, "pairwise_iou", iou_out_of_memory_twice)
    labels, boxes = rpn.label_and_sample_anchors(anchors, [gt])
    assert len(calls) == 3  # third try, with the inputs copied to the CPU
    assert torch.equal(labels[0], expected_labels[0]) and torch.equal(boxes[0], expected_boxes[0])


@pytest.fixture(scope="module")
def retinanet():
    cfg = small_retinanet_cfg(num_convs=1)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    cfg.MODEL.RETINANET.NUM_CLASSES = 4
    # Every score of an untrained head passes: the dense path on every level.
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    # Without weights, GroupNorm keeps the logits near the prior instead of saturating them.
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.FPN.NORM = "GN"
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_dense_inference_scans_one_image_at_a_time(retinanet):
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.rand(3, 64, 96, generator=g) * 255} for _ in range(3)]
    with torch.no_grad():
        images = retinanet.preprocess_image(inputs)
        features = retinanet.backbone(images.tensor)
        features = [features[f] for f in retinanet.head_in_features]
        logits, deltas = retinanet.head(features)
        anchors = retinanet.anchor_generator(features)
    scanned = []
    nonzero = torch.Tensor.nonzero

    def recording_nonzero(t, *args, **kwargs):
        scanned.append(t.numel())
        return nonzero(t, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "nonzero", recording_nonzero):
        batched = retinanet.inference(anchors, logits, deltas, images.image_sizes)
    # The largest mask of one image: P3 of a 64x96 input is 8x12, times A*K = 9 anchors x 4.
    one_image = 9 * 4 * 8 * 12
    assert scanned and max(scanned) == one_image
    # The same detections as each image's own head outputs give alone.
    for i, b in enumerate(batched):
        (a,) = retinanet.inference(
            anchors, [x[i : i + 1] for x in logits], [x[i : i + 1] for x in deltas],
            images.image_sizes[i : i + 1],
        )  # fmt: skip
        assert len(b) == len(a) == 100  # TEST.DETECTIONS_PER_IMAGE
        assert torch.equal(b.scores, a.scores) and torch.equal(b.pred_classes, a.pred_classes)
        assert torch.equal(b.pred_boxes.tensor, a.pred_boxes.tensor)
