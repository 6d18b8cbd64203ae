"""The raw-image graph (issue 17): cv2.imread's BGR images of any size in, predict's detections
in the images' own pixels out, with the metadata a deployer reads."""

import atexit
import functools
import json
import os
import shutil
import tempfile

import cv2
import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from detectron2.data import transforms as T
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_model

from retinanet_plugin.data import build_dataset_mapper
from retinanet_plugin.export import (
    check_raw_parity,
    export_raw_model,
    load_raw_exported,
    match_detections,
    raw_input_spec,
    read_metadata,
    unpad,
)
from retinanet_plugin.export.raw_graph import RawImagePreprocess
from retinanet_plugin.predict import predict
from retinanet_plugin.tools import export as export_tool
from retinanet_plugin.tools import model_setup

from detector_fixture import save_detector
from small_config import small_retinanet_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TILE = os.path.join(
    REPO, "datasets", "deepforest", "images", "2019_YELL_2_541000_4977000_image_crop_x0_y0.png"
)
RAW = os.path.join(
    REPO, "datasets", "deepforest", "raw", "2019_YELL_2_541000_4977000_image_crop.png"
)
MAX_DETECTIONS = 40
DATASET = "deepforest_tree_val"  # DeepForest's validation set: its one class "Tree" has id 1


class RawTestBackbone(Backbone):
    """A strided conv and poolings, P3-P7: exports in about a second."""

    def __init__(self, cfg, input_shape):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=8, padding=1)

    def forward(self, x):
        features = {"p3": F.relu(self.conv(x))}
        for level in range(4, 8):
            features[f"p{level}"] = F.max_pool2d(features[f"p{level - 1}"], 1, stride=2)
        return features

    def output_shape(self):
        return {f"p{i}": ShapeSpec(channels=8, stride=2**i) for i in range(3, 8)}


BACKBONE_REGISTRY.register(RawTestBackbone)


def tiny_detector():
    """One class like DeepForest's, RGB as the demo, test resize 160 / 256 (the 400 px tile
    shrinks by 2.5, the 1249x1035 image to 193x160: the widened PIL filter), hard NMS,
    MAX_DETECTIONS per image; the classification bias puts about 150 candidates of the tile above
    the threshold, so that the limit is reached and NMS has work."""
    cfg = small_retinanet_cfg(num_convs=1)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    cfg.MODEL.BACKBONE.NAME = "RawTestBackbone"
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    cfg.MODEL.RETINANET.NUM_CLASSES = 1
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TEST = 160
    cfg.INPUT.MAX_SIZE_TEST = 256
    cfg.TEST.DETECTIONS_PER_IMAGE = MAX_DETECTIONS
    cfg.DATASETS.TEST = (DATASET,)
    cfg.DATASETS.TRAIN = ()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = build_dataset_mapper(cfg, is_train=False)({"file_name": TILE, "image_id": 0})["image"]
    with torch.no_grad():
        features = model.backbone(model.preprocess_image([{"image": image}]).tensor)
        logits, _ = model.head([features[f] for f in model.head_in_features])
        bias = model.head.cls_score.bias
        raw = torch.cat([(x - bias.view(1, -1, 1, 1)).flatten() for x in logits])
        # sigmoid(x) > 0.05 <=> x > logit(0.05) = -2.944
        bias.fill_(-2.944 - raw.quantile(1 - 150 / raw.numel()).item())
    return cfg, model


@functools.lru_cache(maxsize=None)
def exported_files():
    """The tiny detector, its config file and weights, and the raw-image ONNX and TorchScript
    files ``tools.export`` writes for them (default --input raw), made once per test session
    (tests/test_predict_backend.py runs them too)."""
    folder = tempfile.mkdtemp(prefix="test_export_raw_")
    atexit.register(shutil.rmtree, folder, True)
    cfg, model = tiny_detector()
    config_file, weights = save_detector(cfg, model, folder)
    files = {}
    for export_format in ("onnx", "torchscript"):
        files[export_format] = os.path.join(folder, f"model.{export_format}")
        rc = export_tool.main(
            ["--config-file", config_file, "--weights", weights, "--format", export_format,
             "--output", files[export_format], "--check-images", TILE]
        )  # fmt: skip
        assert rc == 0
    return cfg, model, config_file, weights, files


def deepforest_images(tmp_path):
    """Real images of three sizes: a 400x400 tile, a whole 1249x1035 image, and an odd
    517x333 crop of it; (path, BGR image as cv2.imread gives it)."""
    crop = os.path.join(str(tmp_path), "crop_517x333.png")
    cv2.imwrite(crop, cv2.imread(RAW)[101:434, 203:720])
    return [(p, cv2.imread(p)) for p in (TILE, RAW, crop)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("raw")
    cfg, model, _, _, files = exported_files()
    images = deepforest_images(tmp)
    spec = raw_input_spec(
        model_setup.test_mapper(cfg).image_format, model_setup.test_augmentations(cfg).augs
    )
    # predict's own results of the same files: the reference.
    _, summary = predict(cfg, model, [p for p, _ in images], str(tmp / "predict"))
    with open(summary["results_file"]) as f:
        results = json.load(f)
    with open(summary["images_file"]) as f:
        ids = {im["file_name"]: im["id"] for im in json.load(f)["images"]}
    reference = {path: [r for r in results if r["image_id"] == ids[path]] for path, _ in images}
    return cfg, model, spec, images, files, reference


def _xyxy(results):
    boxes = torch.tensor([r["bbox"] for r in results], dtype=torch.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    scores = torch.tensor([r["score"] for r in results], dtype=torch.float64)
    classes = torch.tensor([r["category_id"] for r in results], dtype=torch.int64)
    return boxes, scores, classes


def _max_differences(detections, results, category_ids):
    """Counts equal and one-to-one pairing with predict's results; the largest box and score
    differences."""
    boxes, scores, classes = detections
    classes = torch.tensor(category_ids)[classes]  # as a deployer maps them, by the metadata
    ref_boxes, ref_scores, ref_classes = _xyxy(results)
    assert len(boxes) == len(ref_boxes) > 0
    pair = match_detections(
        boxes.double(), classes, ref_boxes, ref_classes, scores.double(), ref_scores
    )
    assert sorted(pair.tolist()) == list(range(len(ref_boxes)))
    return (
        (boxes.double() - ref_boxes[pair]).abs().max().item(),
        (scores.double() - ref_scores[pair]).abs().max().item(),
    )


@pytest.mark.parametrize("export_format", ["onnx", "torchscript"])
def test_raw_graph_gives_predicts_detections(setup, export_format):
    """On real images of three sizes read by cv2.imread, the file's detections are predict's
    (count, class, boxes in the image's pixels, scores), image by image and in a batch."""
    _, _, _, images, files, reference = setup
    run = load_raw_exported(files[export_format], export_format)
    category_ids = read_metadata(files[export_format])["category_ids"]
    for path, image in images:
        outputs = run(image[None])
        # TensorRT EfficientNMS layout, zero-padded to D.
        assert [o.dtype for o in outputs] == [torch.int64, torch.float32, torch.float32,
                                              torch.int64]  # fmt: skip
        assert [tuple(o.shape) for o in outputs] == [
            (1,), (1, MAX_DETECTIONS, 4), (1, MAX_DETECTIONS), (1, MAX_DETECTIONS)
        ]  # fmt: skip
        count = int(outputs[0][0])
        assert all((o[0, count:] == 0).all() for o in outputs[1:])
        box_diff, score_diff = _max_differences(
            unpad(outputs, 0), reference[path], category_ids
        )
        # ONNX: onnxruntime's float rounding; the JSON's XYWH -> XYXY adds ~1e-5 px.
        assert box_diff <= 1e-3 and score_diff <= 1e-5, (path, box_diff, score_diff)
        assert (outputs[1][0, :count, 2:] <= torch.tensor(image.shape[1::-1])).all()
    # The limit is reached on the tile (detections_per_image in the graph).
    assert len(reference[images[0][0]]) == MAX_DETECTIONS
    # A batch of two images of one size: each image's detections as alone.
    tile = images[0][1]
    batch = np.stack([tile, np.ascontiguousarray(tile[::-1])])
    outputs = run(batch)
    alone = run(batch[1:])
    assert outputs[0].tolist()[1] == alone[0].tolist()[0]
    torch.testing.assert_close(outputs[1][1], alone[1][0], rtol=0, atol=1e-4)
    torch.testing.assert_close(unpad(outputs, 0)[1], unpad(run(batch[:1]), 0)[1], rtol=0, atol=1e-4)


def test_onnx_resize_is_detectron2s_pil_resize_to_the_bit(setup, tmp_path):
    """The graph's resize (ONNX, onnxruntime) gives the test loader's image, pixel for pixel:
    detectron2's ResizeShortestEdge size and PIL's bilinear filter, from BGR to RGB."""
    cfg, _, spec, images, _, _ = setup
    path = str(tmp_path / "resize.onnx")
    preprocess = RawImagePreprocess(spec)
    sample = torch.from_numpy(images[0][1][None])
    torch.onnx.export(
        torch.jit.trace(preprocess, (sample,)), (sample,), path, dynamo=False,
        input_names=["images"], dynamic_axes={"images": {1: "h", 2: "w"}},
    )  # fmt: skip
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    mapper = build_dataset_mapper(cfg, is_train=False)
    for path, image in images:
        resized = session.run(None, {"images": image[None]})[0][0]
        expected = mapper({"file_name": path, "image_id": 0})["image"].numpy()
        assert resized.shape == expected.shape
        assert np.array_equal(resized, expected.astype(np.float32)), path
    # 1249x1035 -> short side 160: 160 x int(1249 * 160 / 1035 + 0.5) = 160 x 193
    assert session.run(None, {"images": images[1][1][None]})[0].shape == (1, 3, 160, 193)


def test_onnx_file_refuses_other_layouts(setup):
    """The ONNX file takes uint8 (N, H, W, 3): a float image or an unbatched one is refused by
    onnxruntime with the input named (docs/deployment.md states the layout)."""
    _, _, _, images, files, _ = setup
    session = onnxruntime.InferenceSession(files["onnx"], providers=["CPUExecutionProvider"])
    image = images[2][1]
    with pytest.raises(Exception, match="images.*float|float.*images|tensor\\(float\\)"):
        session.run(None, {"images": image[None].astype(np.float32)})
    with pytest.raises(Exception, match="Invalid rank for input: images"):
        session.run(None, {"images": image})


def test_cli_writes_the_metadata_contract(setup):
    """``tools.export`` (default --input raw) on a config naming DeepForest: the file carries
    class names and COCO category ids as COCOEvaluator maps them (DeepForest's "Tree" is id 1),
    the resize, limits and the config; --input resized is marked as such."""
    _, model, config_file, _, files = exported_files()
    for export_format in ("onnx", "torchscript"):
        metadata = read_metadata(files[export_format])
        assert {k: v for k, v in metadata.items() if k not in ("config", "interpolation")} == {
            "format_version": 1,
            "input_layout": "NHWC_uint8_BGR_raw",
            "input_format": "RGB",
            "min_size_test": 160,
            "max_size_test": 256,
            "class_names": ["Tree"],
            "category_ids": [1],
            "detections_per_image": MAX_DETECTIONS,
            "score_thresh_test": 0.05,
            "config_file": config_file,
        }
        assert metadata["interpolation"].startswith("PIL bilinear")
        stored = yaml.safe_load(metadata["config"])
        with open(config_file) as f:
            written = yaml.safe_load(f)
        # The exported weights' path aside, the config the file came from.
        assert stored["MODEL"].pop("WEIGHTS").endswith("model.pth")
        written["MODEL"].pop("WEIGHTS")
        assert stored == written
    cfg = model_setup.load_cfg(config_file)
    resized = export_tool.export_metadata(cfg, config_file, model, "resized")
    assert resized["input_layout"] == "CHW_resized" and resized["category_ids"] == [1]
    assert resized["interpolation"].startswith("none")


def test_formats_and_resizes_the_graph_cannot_do_are_refused_by_name():
    with pytest.raises(ValueError, match="INPUT.FORMAT 'L'.*--input resized"):
        raw_input_spec("L", [])
    with pytest.raises(ValueError, match="ResizeShortestEdge.*--input resized"):
        raw_input_spec("RGB", [T.ResizeShortestEdge(160, 256), T.RandomFlip()])
    with pytest.raises(ValueError, match="single short side"):
        raw_input_spec("RGB", [T.ResizeShortestEdge((160, 200), 256, "choice")])
    assert raw_input_spec("BGR", [T.ResizeShortestEdge(160, 256, "choice")]) == ("BGR", 160, 256)


def test_onnx_loop_runs_the_demos_soft_nms_and_box_voting(setup, tmp_path):
    """The demo's suppression (Gaussian soft-NMS, box voting) inside the ONNX batch loop, whose
    body the exporter sees without ranks (its ``t()`` of the box columns was an Identity there
    until the raw export wrote it as a transpose): predict's detections on two sizes."""
    cfg, model, spec, images, _, _ = setup
    cfg = cfg.clone()
    cfg.merge_from_list(
        ["MODEL.RETINANET.NMS_TYPE", "soft_gaussian", "MODEL.RETINANET.BOX_VOTING", "True"]
    )
    demo = build_model(cfg).eval()
    demo.load_state_dict(model.state_dict())
    path = str(tmp_path / "demo.onnx")
    export_raw_model(demo, spec, torch.from_numpy(images[0][1][None]), path, "onnx")
    report = check_raw_parity(
        demo, spec, model_setup.test_augmentations(cfg), load_raw_exported(path, "onnx"),
        [images[0][1], images[2][1]],
    )  # fmt: skip
    # Counts checked image by image above; both images reach the limit.
    assert report.num_detections == 2 * MAX_DETECTIONS
