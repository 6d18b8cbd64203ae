"""Export to ONNX / TorchScript: the exported file gives the eager model's detections."""

import dataclasses
import logging

import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from detectron2.data.detection_utils import read_image as d2_read_image
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_model

from retinanet_plugin.data import build_dataset_mapper
from retinanet_plugin.export import (
    ExportableRetinaNet,
    ExportError,
    check_parity,
    export_model,
    load_exported,
    match_detections,
)
from retinanet_plugin.tools import export as export_tool
from retinanet_plugin.tools.model_setup import to_model_input

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
        # Scores within 1e-7 may swap ranks between runtimes: pair by class, box and score.
        pair = match_detections(
            boxes, classes, ref.pred_boxes.tensor, ref.pred_classes, scores, ref.scores
        )
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
             "--output", output, "--input", "resized"]
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


def test_match_detections_pairs_twin_boxes_by_score():
    # Soft-NMS keeps a duplicate at a decayed score; box voting can give it the very same box.
    # By box alone both exported twins would pair with the first reference (argmin's first).
    ref_boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    ref_scores = torch.tensor([0.9, 0.2])
    classes = torch.tensor([0, 0])
    boxes, scores = ref_boxes.flip(0), torch.tensor([0.2, 0.9]) + 1e-7
    assert match_detections(boxes, classes, ref_boxes, classes).tolist() == [0, 0]
    assert match_detections(boxes, classes, ref_boxes, classes, scores, ref_scores).tolist() == [
        1, 0,
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Test-time keys: honoured in the graph, or refused by name before any tracing
# --------------------------------------------------------------------------------------------
# Each variant sets test-time keys to values that change the eager detections of the fixture's
# images (checked below, so that a graph ignoring a key cannot pass); together they set every
# key the exported graph honours (test_variants_cover_every_key_the_graph_honours).
KEY_VARIANTS = {
    "per_class_thresholds": ["MODEL.RETINANET.SCORE_THRESH_TEST_PER_CLASS", "[0.05, 0.07, 0.06]"],
    "class_agnostic": ["MODEL.RETINANET.NMS_CLASS_AGNOSTIC", "True"],
    "soft_linear": ["MODEL.RETINANET.NMS_TYPE", "soft_linear", "MODEL.RETINANET.NMS_THRESH_TEST",
                    "0.3"],
    "soft_gaussian": ["MODEL.RETINANET.NMS_TYPE", "soft_gaussian",
                      "MODEL.RETINANET.SOFT_NMS_SIGMA", "0.3",
                      "MODEL.RETINANET.SOFT_NMS_SCORE_THRESH", "0.04"],
    "box_voting": ["MODEL.RETINANET.BOX_VOTING", "True",
                   "MODEL.RETINANET.BOX_VOTING_IOU_THRESH", "0.6"],
    # The `make demo` recipe's suppression (configs/demo_deepforest_mobilenet_v2_fpn_long.yaml),
    # class-agnostic on top.
    "demo": ["MODEL.RETINANET.NMS_TYPE", "soft_gaussian", "MODEL.RETINANET.BOX_VOTING", "True",
             "MODEL.RETINANET.NMS_CLASS_AGNOSTIC", "True"],
    "thresholds_and_limits": ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.055",
                              "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "40",
                              "TEST.DETECTIONS_PER_IMAGE", "30"],
}  # fmt: skip


def _variant(detector, opts):
    """The fixture's weights in a model built with the KEY VALUE ``opts``."""
    cfg, model = detector
    cfg = cfg.clone()
    cfg.merge_from_list(list(opts))
    variant = build_model(cfg).eval()
    variant.load_state_dict(model.state_dict())
    return cfg, variant


def test_variants_cover_every_key_the_graph_honours():
    from retinanet_plugin.postprocess import TEST_TIME_KEYS

    honoured = {k.key for k in TEST_TIME_KEYS if "export" in k.paths}
    set_by_variants = {key for opts in KEY_VARIANTS.values() for key in opts[::2]}
    assert honoured - set_by_variants == set()


@pytest.mark.parametrize("export_format", ["torchscript", "onnx"])
@pytest.mark.parametrize("variant", sorted(KEY_VARIANTS))
def test_graph_honours_test_time_key(detector, tmp_path, export_format, variant):
    _, model = _variant(detector, KEY_VARIANTS[variant])
    images = _images()  # the traced size and three others
    with torch.no_grad():
        plain = [model_output(detector[1], im) for im in images]
        keyed = [model_output(model, im) for im in images]
    assert any(not _same_output(a, b) for a, b in zip(plain, keyed)), "the key changes nothing"
    path = str(tmp_path / "model")
    export_model(model, images[0], path, export_format)
    _assert_same_detections(model, load_exported(path, export_format), images)


def model_output(model, image):
    instances = model([{"image": image}])[0]["instances"]
    return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def _same_output(a, b):
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("export_format", ["torchscript", "onnx"])
def test_graph_with_every_option_on_an_image_without_candidates(detector, tmp_path, export_format):
    """Soft-NMS, box voting and per-class thresholds run on zero candidates in the graph too."""
    cfg = detector[0].clone()
    cfg.merge_from_list(KEY_VARIANTS["demo"] + KEY_VARIANTS["per_class_thresholds"])
    model = _tiny_detector(cfg, "TinyBackbone")
    noise = _images()[0]
    flat = torch.full_like(noise, 128)
    high, low = sorted([noise, flat], key=lambda im: -_max_logit(model, im))
    middle = torch.sigmoid(torch.tensor((_max_logit(model, high) + _max_logit(model, low)) / 2))
    model.test_score_thresh_per_class = [middle.item()] * model.num_classes
    path = str(tmp_path / "model")
    export_model(model, high, path, export_format)
    run = load_exported(path, export_format)
    boxes, scores, classes = run(low)
    assert boxes.shape == (0, 4) and scores.shape == (0,) and classes.shape == (0,)
    _assert_same_detections(model, run, [high])


def _forbid_tracing(monkeypatch):
    def traced(*args, **kwargs):
        raise AssertionError("traced before the refusal")

    monkeypatch.setattr(torch.jit, "trace", traced)
    monkeypatch.setattr(torch.onnx, "export", traced)


# TEST.AUG runs several sizes, a graph one; TEST.AMP runs the eager model in bf16, the graph in
# float32 (an export with it would be checked against a reference it does not compute).
@pytest.mark.parametrize("key, messages", [
    ("TEST.AUG.ENABLED", ["TEST.AUG.ENABLED True cannot be expressed in an exported graph",
                          "export with TEST.AUG.ENABLED False"]),
    ("TEST.AMP.ENABLED", ["TEST.AMP.ENABLED True", "export with TEST.AMP.ENABLED False"]),
])
def test_cli_refuses_a_test_time_key_by_name_before_tracing(
    detector, tmp_path, caplog, monkeypatch, key, messages
):
    cfg, model = detector
    config_file, weights = save_detector(cfg, model, str(tmp_path))
    _forbid_tracing(monkeypatch)
    output = tmp_path / "model.onnx"
    with caplog.at_level(logging.ERROR, logger="retinanet_plugin"):
        rc = export_tool.main(
            ["--config-file", config_file, "--weights", weights, "--format", "onnx",
             "--output", str(output), key, "True"]
        )  # fmt: skip
    assert rc == 1
    for message in messages:
        assert message in caplog.text
    assert not output.exists()


def test_a_key_the_graph_lacks_is_refused_by_name_before_tracing(detector, tmp_path, monkeypatch):
    """The refusal reads the key table: a key marked as not honoured by the graph is named with
    the override that exports without it (soft-NMS stands in for such a key)."""
    import retinanet_plugin.postprocess as postprocess

    keys = [
        dataclasses.replace(k, paths=tuple(p for p in k.paths if p != "export"))
        if k.key == "MODEL.RETINANET.NMS_TYPE" else k
        for k in postprocess.TEST_TIME_KEYS
    ]  # fmt: skip
    monkeypatch.setattr(postprocess, "TEST_TIME_KEYS", tuple(keys))
    _, model = _variant(detector, ["MODEL.RETINANET.NMS_TYPE", "soft_gaussian"])
    _forbid_tracing(monkeypatch)
    with pytest.raises(ValueError) as info:
        export_model(model, _images()[0], str(tmp_path / "model.ts"), "torchscript")
    assert "MODEL.RETINANET.NMS_TYPE soft_gaussian cannot be expressed in an exported graph" in (
        str(info.value)
    )
    assert "export with MODEL.RETINANET.NMS_TYPE hard" in str(info.value)


# --------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------
def test_cli_creates_the_output_folder(detector, tmp_path, caplog):
    cfg, model = detector
    config_file, weights = save_detector(cfg, model, str(tmp_path))
    output = tmp_path / "new" / "folder" / "model.onnx"
    with caplog.at_level(logging.INFO, logger="retinanet_plugin"):
        rc = export_tool.main(
            ["--config-file", config_file, "--weights", weights, "--format", "onnx",
             "--output", str(output), "--input", "resized"]
        )  # fmt: skip
    assert rc == 0, caplog.text
    assert output.is_file() and "max box difference" in caplog.text


def test_cli_names_the_file_it_cannot_write_not_the_model(detector, tmp_path, caplog, monkeypatch):
    cfg, model = detector
    config_file, weights = save_detector(cfg, model, str(tmp_path))
    output = tmp_path / "taken"
    output.mkdir()  # a folder where the file should go
    _forbid_tracing(monkeypatch)  # an unwritable output is found before the model is traced
    with caplog.at_level(logging.ERROR, logger="retinanet_plugin"):
        rc = export_tool.main(
            ["--config-file", config_file, "--weights", weights, "--format", "torchscript",
             "--output", str(output)]
        )  # fmt: skip
    assert rc == 1
    assert str(output) in caplog.text
    assert "FocalRetinaNet" not in caplog.text and "backbone" not in caplog.text


# --------------------------------------------------------------------------------------------
# Check images: read as every tool reads them
# --------------------------------------------------------------------------------------------
def test_check_images_are_read_by_the_test_loaders_mapper(detector, tmp_path):
    """--check-images go through train_net.py's test-loader mapper, as predict's and the
    evaluator's images do: a 16-bit grayscale PNG keeps its contrast (detectron2's read_image
    clips values in the thousands to 255, a white image), and the resize is the test one."""
    cfg, _ = detector
    generator = torch.Generator().manual_seed(2)
    values = torch.randint(1000, 60000, (90, 120), generator=generator, dtype=torch.int32)
    path = str(tmp_path / "gray16.png")
    Image.fromarray(values.numpy().astype("uint16")).save(path)
    (image,) = export_tool.check_images(cfg, [path])
    mapper = build_dataset_mapper(cfg, is_train=False)
    expected = mapper({"file_name": path, "image_id": 0})["image"]
    torch.testing.assert_close(image, expected, rtol=0, atol=0)
    # 90x120 resized to the test short side of 160: 160x213
    assert tuple(image.shape) == (3, 160, 213)
    clipped = to_model_input(cfg, d2_read_image(path, format=cfg.INPUT.FORMAT))
    assert clipped.float().mean() > 250 and image.float().mean() < 200
