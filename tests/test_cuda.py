"""CUDA-only checks, run by scripts/gpu_check.sh on a GPU machine and skipped without CUDA: the
fused focal loss (Triton through Inductor) against the Eq. 5 reference, head outputs and
detections on CUDA against CPU with the same weights, and mixed-precision (autocast +
GradScaler) training steps.

Written without a GPU at hand (none was lent to this project yet); correct by reading."""

import pytest
import torch
from torch.nn import functional as F

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from retinanet_plugin.losses import sigmoid_focal_loss_from_labels
from retinanet_plugin.losses.focal import sigmoid_focal_loss_reference

from small_config import small_retinanet_cfg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _logits_labels(num_anchors=20_000, num_classes=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, num_anchors, num_classes, generator=g) * 3 - 4
    labels = torch.full((2, num_anchors), num_classes, dtype=torch.int64)
    fg = torch.rand(2, num_anchors, generator=g) < 0.01
    labels[fg] = torch.randint(0, num_classes, (int(fg.sum()),), generator=g)
    labels[torch.rand(2, num_anchors, generator=g) < 0.02] = -1
    return logits, labels


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_fused_loss_on_cuda_equals_eq5_reference(gamma):
    logits, labels = _logits_labels()
    x = logits.cuda().requires_grad_()
    loss = sigmoid_focal_loss_from_labels(x, labels.cuda(), 0.25, gamma, "sum")
    loss.backward()

    ref_x = logits.detach().double().requires_grad_()
    keep = (labels >= 0).unsqueeze(-1).double()
    targets = F.one_hot(labels.clamp(min=0, max=80), 81)[..., :80].double()
    ref = (sigmoid_focal_loss_reference(ref_x, targets, 0.25, gamma) * keep).sum()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(x.grad.cpu().double(), ref_x.grad, rtol=1e-4, atol=1e-7)


def test_fused_loss_under_autocast_is_float32():
    logits, labels = _logits_labels(num_anchors=5_000)
    x = logits.cuda().half().requires_grad_()
    with torch.autocast("cuda"):
        loss = sigmoid_focal_loss_from_labels(x, labels.cuda(), 0.25, 2.0, "sum")
    assert loss.dtype == torch.float32
    expected = sigmoid_focal_loss_from_labels(x.detach().float(), labels.cuda(), 0.25, 2.0, "sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert x.grad.dtype == torch.float16 and torch.isfinite(x.grad).all()


def _cfg(device):
    cfg = small_retinanet_cfg(num_convs=2)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    cfg.MODEL.DEVICE = device
    return cfg


def test_head_and_detections_on_cuda_equal_cpu(monkeypatch):
    """Same weights: the head's outputs agree, and post-processing the same head outputs on
    either device gives the same detections."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full float32 convolutions
    torch.manual_seed(0)
    cpu = build_model(_cfg("cpu")).eval()
    with torch.no_grad():
        cpu.head.cls_score.bias.add_(3.0)  # scores above the threshold
    gpu = build_model(_cfg("cuda")).eval()
    gpu.load_state_dict(cpu.state_dict())
    inputs = [{"image": torch.rand(3, 256, 320) * 255}]

    outputs = {}
    with torch.no_grad():
        for name, model in (("cpu", cpu), ("cuda", gpu)):
            images = model.preprocess_image(inputs)
            features = model.backbone(images.tensor)
            features = [features[f] for f in model.head_in_features]
            outputs[name] = (features, *model.head(features), images.image_sizes)
        for a, b in zip(outputs["cpu"][1] + outputs["cpu"][2],
                        outputs["cuda"][1] + outputs["cuda"][2]):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-3)

        features, logits, deltas, sizes = outputs["cpu"]
        det_cpu = cpu.inference(cpu.anchor_generator(features), logits, deltas, sizes)[0]
        det_gpu = gpu.inference(
            gpu.anchor_generator([f.cuda() for f in features]),
            [x.cuda() for x in logits], [x.cuda() for x in deltas], sizes,
        )[0].to("cpu")
    assert len(det_cpu) > 0 and len(det_gpu) == len(det_cpu)
    torch.testing.assert_close(det_gpu.scores, det_cpu.scores)
    torch.testing.assert_close(det_gpu.pred_classes, det_cpu.pred_classes)
    torch.testing.assert_close(det_gpu.pred_boxes.tensor, det_cpu.pred_boxes.tensor, rtol=1e-5,
                               atol=1e-3)


def test_amp_training_steps_on_cuda():
    """autocast + GradScaler as detectron2's AMPTrainer: finite losses, and within a few steps
    (the scaler halves its scale after each overflow) an optimizer step that moves the weights."""
    torch.manual_seed(0)
    model = build_model(_cfg("cuda")).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda")
    inst = Instances((256, 320))
    inst.gt_boxes = Boxes(torch.tensor([[20.0, 30.0, 120.0, 150.0], [150.0, 40.0, 300.0, 200.0]]))
    inst.gt_classes = torch.tensor([3, 17])
    inputs = [{"image": torch.rand(3, 256, 320) * 255, "instances": inst}]
    before = [p.detach().clone() for p in model.parameters()]
    stepped = False
    with EventStorage():
        for _ in range(20):
            with torch.autocast("cuda"):
                losses = model(inputs)
            assert all(torch.isfinite(v) for v in losses.values()), losses
            optimizer.zero_grad()
            scaler.scale(sum(losses.values())).backward()
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            if scaler.get_scale() >= scale:  # no overflow: the step was taken
                stepped = True
                break
    assert stepped
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(b, p) for b, p in zip(before, after))
