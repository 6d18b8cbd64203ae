"""predict --backend onnxruntime / torchscript: an exported raw-image file gives the eager
model's outputs (COCO results through the same writer, images.json, drawings, video)."""

import json
import logging
import os

import cv2
import numpy as np
import pytest
import torch
from test_export_raw import RAW, TILE, exported_files

from retinanet_plugin.export import match_detections, read_metadata
from retinanet_plugin.export.metadata import write_onnx_metadata
from retinanet_plugin.tools import predict as predict_tool


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """test_export_raw's tiny detector (its config naming DeepForest's validation set) and its
    raw-image exports; the inputs: a dataset tile, a whole image, a 3-frame video; the eager
    model's predict outputs on them."""
    tmp = tmp_path_factory.mktemp("backend")
    _, _, config_file, weights, exports = exported_files()
    files = {"onnxruntime": exports["onnx"], "torchscript": exports["torchscript"]}
    video = str(tmp / "clip.avi")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (240, 180))
    frame = cv2.imread(RAW)
    for i in range(3):
        writer.write(np.ascontiguousarray(frame[40 * i : 40 * i + 180, 60 : 60 + 240]))
    writer.release()
    inputs = [TILE, RAW, video]
    eager = _predict(config_file, weights, inputs, tmp / "eager")
    assert eager[0] == 0
    return config_file, weights, files, inputs, tmp, eager


def _predict(config_file, weights, inputs, out_dir, *extra):
    rc = predict_tool.main(
        ["--config-file", config_file, "--weights", weights, "--input", *inputs,
         "--output", str(out_dir), *extra]
    )  # fmt: skip
    with open(os.path.join(out_dir, "coco_instances_results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out_dir, "images.json")) as f:
        images = json.load(f)
    return rc, results, images


def _by_image(results):
    grouped = {}
    for r in results:
        grouped.setdefault(r["image_id"], []).append(r)
    return grouped


def _tensors(results):
    boxes = torch.tensor([r["bbox"] for r in results], dtype=torch.float64).reshape(-1, 4)
    scores = torch.tensor([r["score"] for r in results], dtype=torch.float64)
    classes = torch.tensor([r["category_id"] for r in results])
    return boxes, scores, classes


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_backend_writes_the_eager_results(exported, tmp_path, backend):
    """Same images.json (dataset image id for the tile, own ids for the whole image and each
    video frame, the dataset's categories), same detections per image and category; boxes
    within 1e-3 px and scores within 1e-5 (onnxruntime's float rounding; TorchScript is
    bit-exact), the same drawings and video."""
    config_file, _, files, inputs, tmp, (_, eager, eager_images) = exported
    rc, got, got_images = _predict(
        config_file, files[backend], inputs, tmp_path / backend, "--backend", backend,
        "--batch-size", "2",
    )  # fmt: skip
    assert rc == 0
    # images.json also says which file ran the images (the eager run: the PyTorch model).
    assert eager_images["backend"] == {"name": "eager"} and eager_images["tiles"] is None
    assert got_images["backend"] == {"name": backend, "file": files[backend]}
    assert got_images == {**eager_images, "images": got_images["images"],
                          "backend": got_images["backend"]}
    for a, b in zip(got_images["images"], eager_images["images"]):
        assert {**a, "file_name": 0} == {**b, "file_name": 0}
    assert got_images["categories"] == [{"id": 1, "name": "Tree"}]
    assert {r["category_id"] for r in eager} == {1}
    eager_by_image, got_by_image = _by_image(eager), _by_image(got)
    # the tile, the whole image, three frames: each with detections
    assert sorted(eager_by_image) == sorted(got_by_image) and len(eager_by_image) == 5
    for image_id, ref in eager_by_image.items():
        boxes, scores, classes = _tensors(got_by_image[image_id])
        ref_boxes, ref_scores, ref_classes = _tensors(ref)
        assert len(boxes) == len(ref_boxes)
        pair = match_detections(boxes, classes, ref_boxes, ref_classes, scores, ref_scores)
        assert sorted(pair.tolist()) == list(range(len(ref_boxes)))
        assert (boxes - ref_boxes[pair]).abs().max() <= 1e-3
        assert (scores - ref_scores[pair]).abs().max() <= 1e-5
    drawn = sorted(os.listdir(tmp_path / backend))
    assert drawn == sorted(os.listdir(tmp / "eager"))
    assert {"clip.mp4", os.path.basename(TILE), os.path.basename(RAW)} <= set(drawn)


def test_backend_refuses_a_file_of_another_resize_and_warns_of_other_keys(
    exported, tmp_path, caplog
):
    config_file, _, files, _, _, _ = exported
    with caplog.at_level(logging.ERROR, logger="retinanet_plugin"):
        rc, _, _ = _predict_or_none(
            config_file, files["onnxruntime"], [TILE], tmp_path / "a", "--backend",
            "onnxruntime", "INPUT.MIN_SIZE_TEST", "200",
        )  # fmt: skip
    assert rc == 2
    assert "was exported with min_size_test 160, the config 200" in caplog.text
    caplog.clear()
    # Inference in bf16 (TEST.AMP) is the eager model's; the float32 file cannot honour it.
    with caplog.at_level(logging.ERROR, logger="retinanet_plugin"):
        rc, _, _ = _predict_or_none(
            config_file, files["onnxruntime"], [TILE], tmp_path / "amp", "--backend",
            "onnxruntime", "TEST.AMP.ENABLED", "True",
        )  # fmt: skip
    assert rc == 2
    assert "TEST.AMP.ENABLED True" in caplog.text and "runs in float32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retinanet_plugin"):
        rc, _, _ = _predict_or_none(
            config_file, files["torchscript"], [TILE], tmp_path / "b", "--backend",
            "torchscript", "MODEL.RETINANET.FOCAL_LOSS_GAMMA", "3.0",
        )  # fmt: skip
    assert rc == 0
    assert "differs from --config-file in 1 keys: MODEL.RETINANET.FOCAL_LOSS_GAMMA" in caplog.text


def test_backend_refuses_a_checkpoint_and_a_resized_graph_by_name(exported, tmp_path, caplog):
    config_file, weights, _, _, _, _ = exported
    # A file whose metadata says --input resized (a stand-in graph: only the metadata is read).
    resized = str(tmp_path / "resized.onnx")
    torch.onnx.export(torch.nn.Identity(), (torch.zeros(1),), resized, dynamo=False)
    metadata = read_metadata(exported[2]["onnxruntime"])
    write_onnx_metadata(resized, {**metadata, "input_layout": "CHW_resized"})
    with caplog.at_level(logging.ERROR, logger="retinanet_plugin"):
        assert _predict_or_none(
            config_file, resized, [TILE], tmp_path / "a", "--backend", "onnxruntime"
        )[0] == 2  # fmt: skip
        assert "exported with --input resized" in caplog.text
        assert _predict_or_none(
            config_file, weights, [TILE], tmp_path / "b", "--backend", "torchscript"
        )[0] == 2  # fmt: skip
    assert "carries no retinanet_plugin.metadata" in caplog.text
    # Each runtime given the other's file: named, not left to fail on the bytes.
    files = exported[2]
    with caplog.at_level(logging.ERROR, logger="retinanet_plugin"):
        for backend, other in (("torchscript", "onnxruntime"), ("onnxruntime", "torchscript")):
            assert _predict_or_none(
                config_file, files[other], [TILE], tmp_path / backend, "--backend", backend
            )[0] == 2  # fmt: skip
            assert f"use --backend {other}" in caplog.text


def _predict_or_none(config_file, weights, inputs, out_dir, *extra):
    rc = predict_tool.main(
        ["--config-file", config_file, "--weights", weights, "--input", *inputs,
         "--output", str(out_dir), *extra]
    )  # fmt: skip
    return rc, None, None
