"""Export to ONNX / TorchScript: the exported file gives the eager model's detections."""

import logging

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_model

from retinanet_plugin.export import (
    ExportableRetinaNet,
    ExportError,
    check_parity,
    export_model,
    load_exported,
    match_detections,
)
from retinanet_plugin.tools import export as export_tool

from detector_fixture import save_detector, small_detector

# Odd sizes on purpose (the graph pads them to the backbone's divisibility of 32 itself); the
# first is the one the graph is traced with, the others test that H and W are not frozen.
SIZES = [(128, 160), (200, 249), (96, 96), (64, 300)]


@pytest.fixture(scope="module")
def detector():
    return small_detector()


def _images():
    generator = torch.Generator().manual_seed(1)
    return [
        torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8)
        for h, w in SIZES
    ]


def _assert_same_detections(model, run, images):
    for image in images:
        with torch.no_grad():
            ref = model([{"image": image}])[0]["instances"]
        boxes, scores, classes = run(image)
        assert len(ref) > 0, "the fixture must give detections"
        assert len(boxes) == len(ref), tuple(image.shape)
        # Scores within 1e-7 may swap ranks between runtimes: pair by class and box.
        pair = match_detections(boxes, classes, ref.pred_boxes.tensor, ref.pred_classes)
        assert sorted(pair.tolist()) == list(range(len(ref)))  # one to one, all of the same class
        torch.testing.assert_close(boxes, ref.pred_boxes.tensor[pair], rtol=0, atol=1e-3)
        torch.testing.assert_close(scores, ref.scores[pair], rtol=0, atol=1e-5)


def _op_types(graph):
    """Operator types of an ONNX graph and of the subgraphs of its If / Loop nodes."""
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                ops |= _op_types(attr.g)
    return ops


def test_torchscript_matches_eager_on_several_sizes(detector, tmp_path):
    _, model = detector
    images = _images()
    path = str(tmp_path / "model.ts")
    export_model(model, images[0], path, "torchscript")
    run = load_exported(path, "torchscript")
    _assert_same_detections(model, run, images)
    # float input gives the same as uint8
    boxes_u8 = run(images[1])[0]
    torch.testing.assert_close(run(images[1].float())[0], boxes_u8, rtol=0, atol=0)
    # The detection limit is inside the graph: at least one image reaches it.
    assert max(len(run(im)[0]) for im in images) == model.max_detections_per_image == 100


def test_onnx_cli_exports_a_graph_onnxruntime_runs_like_eager(detector, tmp_path, caplog):
    cfg, model = detector
    config_file, weights = save_detector(cfg, model, str(tmp_path))
    output = str(tmp_path / "model.onnx")
    with caplog.at_level(logging.INFO, logger="retinanet_plugin"):
        rc = export_tool.main(
            ["--config-file", config_file, "--weights", weights, "--format", "onnx",
             "--output", output]
        )
    assert rc == 0, caplog.text
    assert "max box difference" in caplog.text
    ops = _op_types(onnx.load(output).graph)
    # Top-k, per-class NMS and padding to the size divisibility are in the graph (NMS inside the
    # If that skips it when there is no candidate).
    assert {"TopK", "NonMaxSuppression", "Pad"} <= ops, ops
    _assert_same_detections(model, load_exported(output, "onnx"), _images())


class TinyBackbone(Backbone):
    """One strided conv and poolings, P3-P7: exports in a second."""

    def __init__(self, cfg, input_shape):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=8, padding=1)

    def pyramid(self, p3):
        features = {"p3": F.relu(p3)}
        for level in range(4, 8):
            features[f"p{level}"] = F.max_pool2d(features[f"p{level - 1}"], 1, stride=2)
        return features

    def forward(self, x):
        return self.pyramid(self.conv(x))

    def output_shape(self):
        return {f"p{i}": ShapeSpec(channels=16, stride=2**i) for i in range(3, 8)}


class FrozenShapeBackbone(TinyBackbone):
    """Reads the input size as Python ints: tracing freezes it at the sample's size."""

    def forward(self, x):
        height, width = int(x.shape[-2]), int(x.shape[-1])
        return self.pyramid(self.conv(x)[..., : height // 8, : width // 8])


BACKBONE_REGISTRY.register(TinyBackbone)
BACKBONE_REGISTRY.register(FrozenShapeBackbone)


def _tiny_detector(cfg, backbone_name):
    cfg = cfg.clone()
    cfg.MODEL.BACKBONE.NAME = backbone_name
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    return build_model(cfg).eval()


def _max_logit(model, image):
    with torch.no_grad():
        features = model.backbone(model.preprocess_image([{"image": image.float()}]).tensor)
        logits, _ = model.head([features[f] for f in model.head_in_features])
    return max(x.max().item() for x in logits)


@pytest.mark.parametrize("export_format", ["torchscript", "onnx"])
def test_image_without_candidates_gives_no_detections(detector, tmp_path, export_format):
    """Traced on an image with candidates, the graph also runs on one without (torchvision's
    coordinate-offset NMS takes a max over the boxes, guarded by a scripted emptiness test)."""
    model = _tiny_detector(detector[0], "TinyBackbone")
    noise = _images()[0]
    flat = torch.full_like(noise, 128)
    high, low = sorted([noise, flat], key=lambda im: -_max_logit(model, im))
    # A threshold between the two images' best scores: candidates in one, none in the other.
    middle = (_max_logit(model, high) + _max_logit(model, low)) / 2
    model.test_score_thresh = torch.sigmoid(torch.tensor(middle)).item()
    path = str(tmp_path / "model")
    export_model(model, high, path, export_format)
    run = load_exported(path, export_format)
    boxes, scores, classes = run(low)
    assert boxes.shape == (0, 4) and scores.shape == (0,) and classes.shape == (0,)
    _assert_same_detections(model, run, [high])


def test_untraceable_backbone_is_named(detector, tmp_path):
    model = _tiny_detector(detector[0], "FrozenShapeBackbone")
    with torch.no_grad():
        model.head.cls_score.bias.fill_(0.0)  # every score about 0.5: detections everywhere
    model.max_detections_per_image = 1000
    small, large = (torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in SIZES[2:4])
    path = str(tmp_path / "frozen.ts")
    export_model(model, small, path, "torchscript")
    with pytest.raises(ExportError, match="FrozenShapeBackbone"):
        check_parity(model, load_exported(path, "torchscript"), [small, large])


def test_wrapper_refuses_other_meta_architectures():
    with pytest.raises(TypeError, match="FocalRetinaNet"):
        ExportableRetinaNet(nn.Conv2d(3, 3, 1))


def test_match_detections_pairs_by_class_and_nearest_box():
    ref_boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]])
    ref_classes = torch.tensor([0, 1, 0])
    # Reordered, shifted by 1e-4, and one detection whose class exists nowhere nearby.
    boxes = torch.tensor([[50.0, 50, 60, 60], [0, 0, 10, 10.0001], [0, 0, 10, 10], [1, 1, 2, 2]])
    classes = torch.tensor([0, 1, 0, 2])
    assert match_detections(boxes, classes, ref_boxes, ref_classes).tolist() == [2, 1, 0, -1]
