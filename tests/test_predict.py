"""The predict tool: detectron2's test-time results, drawings, video, unreadable inputs."""

import json
import logging
import os

import cv2
import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator, inference_on_dataset

from retinanet_plugin.tools import predict as predict_tool
from retinanet_plugin.tools.model_setup import load_cfg, to_model_input
from retinanet_plugin.visualize import draw_detections

from detector_fixture import save_detector, small_detector

DATASET = "predict_test_images"
# Category ids as a COCO file may have them: not 0..K-1.
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}]


@pytest.fixture(scope="module")
def detector():
    return small_detector(num_classes=len(CATEGORIES))


def _write_images(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        # Smooth noise: JPEG-like content on which the random detector fires unevenly.
        image = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h))
        path = os.path.join(folder, f"img{i}.png")
        cv2.imwrite(path, image)
        paths.append(path)
    return paths


def test_predict_equals_coco_evaluator(detector, tmp_path):
    cfg, model = detector
    folder = tmp_path / "images"
    folder.mkdir()
    # Two images of one size (batched together), one of another (its own batch); MIN_SIZE_TEST
    # 160 resizes all three, so the boxes must be mapped back to the original size.
    paths = _write_images(str(folder), [(120, 180), (120, 180), (200, 150)])
    coco = {
        "images": [
            {"id": 10 + i, "file_name": os.path.basename(p), "height": h, "width": w}
            for i, (p, (h, w)) in enumerate(zip(paths, [(120, 180), (120, 180), (200, 150)]))
        ],
        "annotations": [
            {"id": i + 1, "image_id": 10 + i, "category_id": 7, "bbox": [10, 10, 40, 30],
             "area": 1200, "iscrowd": 0}
            for i in range(3)
        ],
        "categories": CATEGORIES,
    }
    json_file = tmp_path / "coco.json"
    json_file.write_text(json.dumps(coco))
    if DATASET in DatasetCatalog.list():
        DatasetCatalog.remove(DATASET)
    register_coco_instances(DATASET, {}, str(json_file), str(folder))
    cfg = cfg.clone()
    cfg.DATASETS.TEST = (DATASET,)
    cfg.DATALOADER.NUM_WORKERS = 0

    evaluator = COCOEvaluator(DATASET, output_dir=str(tmp_path / "eval"), use_fast_impl=False)
    inference_on_dataset(model, build_detection_test_loader(cfg, DATASET), evaluator)
    with open(tmp_path / "eval" / "coco_instances_results.json") as f:
        expected = json.load(f)

    out = tmp_path / "out"
    failed, summary = predict_tool.predict(cfg, model, [str(folder)], str(out), batch_size=2)
    assert failed == []
    with open(summary["results_file"]) as f:
        got = json.load(f)
    with open(summary["images_file"]) as f:
        images = json.load(f)
    assert images["categories"] == CATEGORIES
    dataset_id = {os.path.basename(im["file_name"]): im["id"] for im in coco["images"]}
    our_id = {im["id"]: dataset_id[os.path.basename(im["file_name"])] for im in images["images"]}
    assert len(our_id) == 3

    def by_image(results, id_map):
        grouped = {}
        for r in results:
            grouped.setdefault(id_map(r["image_id"]), []).append(r)
        return {k: sorted(v, key=lambda r: -r["score"]) for k, v in grouped.items()}

    exp, ours = by_image(expected, lambda i: i), by_image(got, our_id.get)
    assert sorted(exp) == sorted(ours) == [10, 11, 12]
    for image_id in exp:
        e, o = exp[image_id], ours[image_id]
        assert len(o) == len(e) > 0
        assert [r["category_id"] for r in o] == [r["category_id"] for r in e]
        # Batched (images 10, 11) and single-image convolutions may round differently.
        np.testing.assert_allclose([r["bbox"] for r in o], [r["bbox"] for r in e], atol=1e-3)
        np.testing.assert_allclose([r["score"] for r in o], [r["score"] for r in e], atol=1e-5)
    # One drawing per image, at the original size.
    for path, (h, w) in zip(paths, [(120, 180), (120, 180), (200, 150)]):
        drawn = cv2.imread(str(out / os.path.basename(path)))
        assert drawn.shape == (h, w, 3)


def test_cli_video_and_unreadable_inputs(detector, tmp_path, caplog):
    cfg, model = detector
    config_file, weights = save_detector(cfg, model, str(tmp_path))
    image_path = _write_images(str(tmp_path), [(96, 128)])[0]
    image = cv2.imread(image_path)
    frames = [image[:, ::-1] if i % 2 else image for i in range(3)]  # flipped: other detections
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (128, 96))
    for frame in frames:
        writer.write(np.ascontiguousarray(frame))
    writer.release()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        rc = predict_tool.main(
            ["--config-file", config_file, "--weights", weights, "--output", str(out),
             "--input", image_path, str(broken), video, str(tmp_path / "missing_*.png"),
             "--draw-thresh", "0.05", "--score-thresh", "0.055"]
        )
    assert rc == 1
    assert "broken.jpg" in caplog.text and "missing_*.png" in caplog.text
    with open(out / "images.json") as f:
        written = json.load(f)
    images = written["images"]
    assert [im.get("frame") for im in images] == [None, 0, 1, 2]
    # The model-zoo config's datasets are COCO's 80 classes, not this model's 3: generic names.
    assert written["categories"] == [{"id": i, "name": f"class {i}"} for i in range(3)]
    assert os.path.isfile(out / os.path.basename(image_path))

    # The annotated video has every frame, and frame k's detections are the model's on the
    # decoded frame k (read back with the same OpenCV).
    capture = cv2.VideoCapture(str(out / "clip.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    capture.release()
    with open(out / "coco_instances_results.json") as f:
        results = json.load(f)
    # --score-thresh 0.055 keeps about half of the 0.05 detections (median score 0.055)
    assert min(r["score"] for r in results) > 0.055
    capture = cv2.VideoCapture(video)
    model.test_score_thresh = 0.055
    try:
        for im in images[1:]:
            ok, frame = capture.read()
            assert ok
            assert cfg.INPUT.FORMAT == "BGR"  # OpenCV's order: the decoded frame is the input
            with torch.no_grad():
                inputs = [{"image": to_model_input(cfg, frame), "height": 96, "width": 128}]
                instances = model(inputs)[0]["instances"]
            mine = [r for r in results if r["image_id"] == im["id"]]
            assert len(mine) == len(instances) > 0
            np.testing.assert_allclose(
                sorted(r["score"] for r in mine), sorted(instances.scores.tolist()), atol=1e-6
            )
    finally:
        model.test_score_thresh = 0.05  # the module-scoped detector is shared
        capture.release()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(detector, tmp_path):
    config_file, _ = save_detector(*detector, str(tmp_path))
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        load_cfg(config_file, device="cuda")
    with pytest.raises(ValueError, match="score threshold"):
        load_cfg(config_file, score_thresh=1.5)


def test_draw_detections_scales_lines_and_labels():
    box = np.array([[100.0, 200.0, 300.0, 350.0]])
    args = (box, np.array([0.9]), np.array([1]), ["cat", "dog"])
    # 400x400: side sqrt(400*400) = 400 -> line max(1, round(400/500)) = 1 px
    small = draw_detections(np.zeros((400, 400, 3), np.uint8), *args)
    # 1280x1280: line round(1280/500) = round(2.56) = 3 px, centred on y = 350: rows 349-351
    large = draw_detections(np.zeros((1280, 1280, 3), np.uint8), *args)
    dog = (255, 128, 0)  # class 1's BGR colour
    assert tuple(small[350, 200]) == dog and tuple(small[351, 200]) == (0, 0, 0)
    assert tuple(large[351, 200]) == dog and tuple(large[353, 200]) == (0, 0, 0)
    # The label sits on a filled box above the top edge, taller for the larger image.
    label_rows_small = np.nonzero((small[:200, 101] != 0).any(axis=1))[0]
    label_rows_large = np.nonzero((large[:199, 101] != 0).any(axis=1))[0]
    assert 0 < len(label_rows_small) < len(label_rows_large)
    # Below the draw threshold nothing is drawn.
    blank = draw_detections(np.zeros((400, 400, 3), np.uint8), *args, score_thresh=0.95)
    assert not blank.any()


def test_expand_inputs_folders_globs_repeats_and_misses(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    for name in ("b.png", "a.JPG", "notes.txt", "clip.mp4"):
        (tmp_path / name).write_bytes(b"")
    (sub / "c.png").write_bytes(b"")
    files, missing = predict_tool.expand_inputs(
        [str(tmp_path), str(tmp_path / "**" / "*.png"), str(tmp_path / "b.png"), "nope/*.jpg"]
    )
    names = [os.path.relpath(f, tmp_path) for f in files]
    # The folder (sorted, not recursive, no .txt), then what ** adds, each file once.
    assert names == ["a.JPG", "b.png", "clip.mp4", os.path.join("sub", "c.png")]
    assert missing == ["nope/*.jpg"]
    assert predict_tool.is_video(files[2]) and not predict_tool.is_video(files[0])
