"""The predict tool: detectron2's test-time results, drawings, video, unreadable inputs."""

import importlib.util
import json
import logging
import os
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import Boxes, Instances

from retinanet_plugin.data import build_dataset_mapper
from retinanet_plugin.test_time_augmentation import FocalRetinaNetWithTTA
from retinanet_plugin.tools import predict as predict_tool
from retinanet_plugin.tools.model_setup import dataset_categories, load_cfg, to_model_input
from retinanet_plugin.visualize import draw_detections

from detector_fixture import save_detector, small_detector

REPO = Path(__file__).resolve().parents[1]
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


def _load_train_net():
    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_16bit_gray(path, h, w, seed=1):
    # Values in the thousands: detectron2's read_image would clip them to 255 (white), the
    # plugin's test loader keeps the high byte.
    rng = np.random.default_rng(seed)
    values = cv2.resize(rng.integers(0, 65536, (h // 8, w // 8), dtype=np.uint16), (w, h))
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")


SIZES = [(120, 180), (120, 180), (200, 150), (120, 180)]


def _register_dataset(tmp_path, name=DATASET, first_id=10):
    """A registered COCO set of four images (two sizes, the last a 16-bit grayscale PNG) with
    image ids from ``first_id`` and category ids 3, 7, 11; returns its image folder and JSON."""
    folder = tmp_path / "images"
    folder.mkdir()
    paths = _write_images(str(folder), SIZES[:3])
    paths.append(str(folder / "img3.png"))
    _write_16bit_gray(paths[-1], *SIZES[3])
    coco = {
        "images": [
            {"id": first_id + i, "file_name": os.path.basename(p), "height": h, "width": w}
            for i, (p, (h, w)) in enumerate(zip(paths, SIZES))
        ],
        "annotations": [
            {"id": i + 1, "image_id": first_id + i, "category_id": 7, "bbox": [10, 10, 40, 30],
             "area": 1200, "iscrowd": 0}
            for i in range(len(paths))
        ],
        "categories": CATEGORIES,
    }
    json_file = tmp_path / "coco.json"
    json_file.write_text(json.dumps(coco))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_file), str(folder))
    return folder, coco


def _evaluator_results(cfg, model, output_dir):
    """COCOEvaluator's results through train_net.py's own path (its test loader, mapper and
    evaluator builder), as ``train_net.py --eval-only`` writes them."""
    cfg = cfg.clone()
    cfg.OUTPUT_DIR = str(output_dir)
    _load_train_net().Trainer.test(cfg, model)
    results_file = output_dir / "inference" / cfg.DATASETS.TEST[0] / "coco_instances_results.json"
    with open(results_file) as f:
        return json.load(f)


def _sorted(results):
    return sorted(results, key=lambda r: (r["image_id"], -r["score"], r["category_id"], r["bbox"]))


def _dataset_cfg(cfg):
    cfg = cfg.clone()
    cfg.DATASETS.TEST = (DATASET,)
    cfg.DATASETS.TRAIN = ()
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def test_predict_equals_coco_evaluator(detector, tmp_path, caplog):
    """Issue 15 item 1: on a dataset's own images, predict's results file is COCOEvaluator's
    (same image ids, category ids, boxes and scores, bit for bit), so it can be scored against
    the dataset; an input that is not in the dataset gets an id of predict's own, said so."""
    cfg, model = detector
    folder, coco = _register_dataset(tmp_path)
    cfg = _dataset_cfg(cfg)
    expected = _evaluator_results(cfg, model, tmp_path / "eval")
    assert {r["image_id"] for r in expected} == {10, 11, 12, 13}

    other = tmp_path / "elsewhere"
    other.mkdir()
    outsider = str(other / "outsider.png")
    os.rename(_write_images(str(other), [(96, 128)], seed=5)[0], outsider)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="retinanet_plugin"):
        failed, summary = predict_tool.predict(cfg, model, [str(folder), outsider], str(out))
    assert failed == []
    with open(summary["results_file"]) as f:
        got = json.load(f)
    ours = [r for r in got if r["image_id"] != 14]
    assert len(ours) == len(expected) > 0
    assert _sorted(ours) == _sorted(expected)

    with open(summary["images_file"]) as f:
        images = json.load(f)
    assert images["categories"] == CATEGORIES
    assert images["categories_from"] == DATASET
    by_name = {os.path.basename(im["file_name"]): im for im in images["images"]}
    for record in coco["images"]:
        entry = by_name[record["file_name"]]
        assert (entry["id"], entry["id_from"]) == (record["id"], DATASET)
    # The outsider is numbered after the dataset's largest id (13), so no id means two images.
    assert by_name[os.path.basename(outsider)]["id"] == 14
    assert by_name[os.path.basename(outsider)]["id_from"] == "predict"
    assert any(r["image_id"] == 14 for r in got)
    assert f"4 of 5 images are images of dataset {DATASET}" in caplog.text
    assert f"1 of 5 images are not in dataset {DATASET}: their ids (14..14" in caplog.text
    # One drawing per image, at the original size.
    for record in coco["images"]:
        drawn = cv2.imread(str(out / record["file_name"]))
        assert drawn.shape == (record["height"], record["width"], 3)


def test_batched_predict_equals_evaluator_with_exact_convolutions(detector, tmp_path):
    """Batches of two give the evaluator's results bit for bit when the convolutions do not
    depend on the batch size. oneDNN's CPU convolutions do (another blocking for N=2 than for
    N=1: last-bit differences), which is why predict's default batch is the evaluator's, one;
    here the reference convolution shows that batching itself (grouping by padded size, mapping
    boxes back) changes nothing."""
    cfg, model = detector
    folder, _ = _register_dataset(tmp_path)
    cfg = _dataset_cfg(cfg)
    with torch.backends.mkldnn.flags(enabled=False):
        expected = _evaluator_results(cfg, model, tmp_path / "eval")
        _, summary = predict_tool.predict(cfg, model, [str(folder)], str(tmp_path / "out"),
                                          batch_size=2)
    with open(summary["results_file"]) as f:
        got = json.load(f)
    assert len(got) == len(expected) > 0
    assert _sorted(got) == _sorted(expected)


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


def test_expand_inputs_gives_a_file_named_through_symlinks_once(tmp_path):
    """A file and a symlink to it (or to its folder) are one input, under its first spelling."""
    real = tmp_path / "real"
    real.mkdir()
    for name in ("a.png", "b.png"):
        (real / name).write_bytes(b"")
    (tmp_path / "alias.png").symlink_to(real / "a.png")
    (tmp_path / "linked").symlink_to(real, target_is_directory=True)
    files, missing = predict_tool.expand_inputs(
        [str(tmp_path / "alias.png"), str(tmp_path / "linked"), str(real / "b.png")]
    )
    names = [os.path.relpath(f, tmp_path) for f in files]
    assert names == ["alias.png", os.path.join("linked", "b.png")]
    assert missing == []


def test_dataset_image_through_a_symlink_is_predicted_once(detector, tmp_path):
    """A dataset image given through a symlink and through its real path (here its folder) is
    one image: its image id once in the results, as COCOEvaluator's, so that COCO.loadRes counts
    its detections once; its drawing and images.json entry take the first spelling."""
    cfg, model = detector
    folder, coco = _register_dataset(tmp_path)
    cfg = _dataset_cfg(cfg)
    _, summary = predict_tool.predict(cfg, model, [str(folder)], str(tmp_path / "plain"))
    with open(summary["results_file"]) as f:
        expected = json.load(f)

    links = tmp_path / "links"
    links.mkdir()
    alias = links / "alias.png"
    alias.symlink_to(folder / "img0.png")
    out = tmp_path / "out"
    failed, summary = predict_tool.predict(cfg, model, [str(alias), str(folder)], str(out))
    assert failed == [] and summary["images"] == 4
    with open(summary["results_file"]) as f:
        assert _sorted(json.load(f)) == _sorted(expected)
    with open(summary["images_file"]) as f:
        images = json.load(f)["images"]
    assert [(im["id"], im["file_name"]) for im in images] == [
        (10, str(alias)), *((11 + i, str(folder / f"img{i + 1}.png")) for i in range(3))
    ]
    assert sorted(os.listdir(out)) == sorted(
        ["alias.png", "img1.png", "img2.png", "img3.png", "coco_instances_results.json",
         "images.json"]
    )


def test_coco_config_has_coco_category_ids_without_annotation_files(tmp_path, monkeypatch):
    """Issue 15 item 2: with the COCO config and no instances_val2017.json on disk, the category
    ids are COCO's own (1..90, from detectron2's builtin metadata), not 0..79."""
    monkeypatch.chdir(tmp_path)  # detectron2's builtin COCO paths are relative: nothing here
    cfg = load_cfg(str(REPO / "configs" / "retinanet_R_50_FPN_1x.yaml"))
    meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    assert not os.path.exists(meta.json_file)
    categories = dataset_categories(cfg)
    names, category_ids = categories.names, categories.ids
    assert categories.dataset == "coco_2017_val"
    assert (names[0], category_ids[0]) == ("person", 1)
    assert (names[-1], category_ids[-1]) == ("toothbrush", 90)
    # COCO's 80 ids leave gaps in 1..90 (12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused).
    assert category_ids == sorted(meta.thing_dataset_id_to_contiguous_id)
    assert len(category_ids) == 80 and 12 not in category_ids


def test_predict_with_coco_classes_writes_coco_category_ids(tmp_path, monkeypatch):
    """The same through predict: an 80-class model whose config names coco_2017_val writes each
    detection's class through the reverse of detectron2's thing_dataset_id_to_contiguous_id."""
    monkeypatch.chdir(tmp_path)
    cfg, model = small_detector(num_classes=80)
    assert cfg.DATASETS.TEST == ("coco_2017_val",)
    path = _write_images(str(tmp_path), [(128, 160)])[0]
    _, summary = predict_tool.predict(cfg, model, [path], str(tmp_path / "out"))
    with open(summary["results_file"]) as f:
        got = json.load(f)
    with torch.no_grad():
        image = cv2.imread(path)
        instances = model([{"image": to_model_input(cfg, image), "height": 128, "width": 160}])
    instances = instances[0]["instances"]
    to_coco = {v: k for k, v in MetadataCatalog.get("coco_2017_val")
               .thing_dataset_id_to_contiguous_id.items()}
    expected = sorted(zip(instances.scores.tolist(), instances.pred_classes.tolist()))
    assert len(got) == len(expected) > 0
    assert sorted((r["score"], r["category_id"]) for r in got) == [
        (s, to_coco[c]) for s, c in expected
    ]
    assert max(r["category_id"] for r in got) > 80  # not the contiguous 0..79


def _encode(image, ext):
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def test_inputs_whose_extension_opencv_cannot_write(detector, tmp_path, caplog):
    """Issue 15 item 8: PIL reads .jfif, .tga and files without extension; OpenCV cannot write
    them. Their drawings go to .png (logged), and every input's results are written."""
    cfg, model = detector
    rng = np.random.default_rng(3)
    image = cv2.resize(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (128, 96))
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(_encode(image, ".png"))
    (folder / "b.jfif").write_bytes(_encode(image, ".jpg"))
    Image.fromarray(image[:, :, ::-1]).save(folder / "c.tga")
    (folder / "d").write_bytes(_encode(image, ".png"))
    inputs = [str(folder / n) for n in ("a.png", "b.jfif", "c.tga", "d")]
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="retinanet_plugin"):
        failed, summary = predict_tool.predict(cfg, model, inputs, str(out))
    assert failed == []
    for name in ("a.png", "b.png", "c.png", "d.png"):
        assert cv2.imread(str(out / name)).shape == (96, 128, 3)
    assert "b.jfif" in caplog.text and "b.png" in caplog.text
    with open(summary["images_file"]) as f:
        images = json.load(f)["images"]
    assert [os.path.basename(im["file_name"]) for im in images] == ["a.png", "b.jfif", "c.tga", "d"]
    with open(summary["results_file"]) as f:
        results = json.load(f)
    assert {r["image_id"] for r in results} == {im["id"] for im in images}


def test_results_so_far_are_written_when_the_run_stops(detector, tmp_path, monkeypatch):
    """Nothing computed is lost: a run interrupted at its third image still writes the first
    two images' results and entries."""
    cfg, model = detector
    paths = _write_images(str(tmp_path), [(96, 128)] * 3)
    forward, calls = model.forward, []

    def interrupted_at_third(batched_inputs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return forward(batched_inputs)

    monkeypatch.setattr(model, "forward", interrupted_at_third)
    with pytest.raises(KeyboardInterrupt):
        predict_tool.predict(cfg, model, paths, str(tmp_path / "out"))
    with open(tmp_path / "out" / "images.json") as f:
        images = json.load(f)["images"]
    assert [os.path.basename(im["file_name"]) for im in images] == ["img0.png", "img1.png"]
    with open(tmp_path / "out" / "coco_instances_results.json") as f:
        results = json.load(f)
    assert {r["image_id"] for r in results} == {im["id"] for im in images}


def test_sigterm_writes_the_results_so_far(detector, tmp_path, monkeypatch):
    """The command line turns SIGTERM (kill, a scheduler's stop) into an exit that writes the
    results of the images done, here the first of three."""
    cfg, model = detector
    config_file, weights = save_detector(cfg, model, str(tmp_path))
    paths = _write_images(str(tmp_path), [(96, 128)] * 3)
    forward, calls = model.forward, []

    def terminated_at_second(batched_inputs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(batched_inputs)

    monkeypatch.setattr(model, "forward", terminated_at_second)
    monkeypatch.setattr(predict_tool, "load_model", lambda cfg: model)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        predict_tool.main(["--config-file", config_file, "--weights", weights,
                           "--output", str(out), "--input", *paths])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is removed again
    with open(out / "images.json") as f:
        images = json.load(f)["images"]
    assert [os.path.basename(im["file_name"]) for im in images] == ["img0.png"]
    with open(out / "coco_instances_results.json") as f:
        assert {r["image_id"] for r in json.load(f)} == {images[0]["id"]}


def test_instances_to_coco_results_maps_ids_as_coco_evaluator():
    """The one conversion of model outputs: detectron2's instances_to_coco_json with the class
    mapped back through the dataset's thing_dataset_id_to_contiguous_id, as COCOEvaluator does."""
    from retinanet_plugin.evaluation.results import coco_category_ids, instances_to_coco_results

    instances = Instances((100, 200))
    instances.pred_boxes = Boxes(torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 1.5, 2.5]]))
    instances.scores = torch.tensor([0.9, 0.25])
    instances.pred_classes = torch.tensor([1, 0])
    category_ids = coco_category_ids({"thing_dataset_id_to_contiguous_id": {3: 0, 7: 1}})
    assert category_ids == {0: 3, 1: 7}
    results = instances_to_coco_results(instances, 42, category_ids)
    # XYWH: (10, 20, 50 - 10, 80 - 20) and (0, 0, 1.5, 2.5); 0.9 and 0.25 as float32 values.
    assert results == [
        {"image_id": 42, "category_id": 7, "bbox": [10.0, 20.0, 40.0, 60.0],
         "score": float(np.float32(0.9))},
        {"image_id": 42, "category_id": 3, "bbox": [0.0, 0.0, 1.5, 2.5], "score": 0.25},
    ]
    # Without a mapping (a dataset that has none), the contiguous ids, as COCOEvaluator writes.
    assert [r["category_id"] for r in instances_to_coco_results(instances, 1)] == [1, 0]
    assert coco_category_ids({"thing_classes": ["a"]}) is None
    with pytest.raises(ValueError, match="class 1.*0..0"):
        instances_to_coco_results(instances, 1, {0: 3})


def test_test_time_augmentation_is_honoured_and_said(detector, tmp_path, caplog):
    """With TEST.AUG.ENABLED, predict runs FocalRetinaNetWithTTA as train_net.py's
    Trainer.test_with_TTA does (so its results are the evaluator's inference_TTA/ ones, see
    test_consistency.py), and says so in the log and in images.json; before, it ran the plain
    model without a word."""
    cfg, model = detector
    cfg = cfg.clone()
    cfg.merge_from_list(["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(96, 160)",
                         "TEST.AUG.MAX_SIZE", "256", "TEST.AUG.FLIP", "True"])
    path = _write_images(str(tmp_path), [(96, 128)])[0]
    with caplog.at_level(logging.INFO, logger="retinanet_plugin"):
        _, summary = predict_tool.predict(cfg, model, [path], str(tmp_path / "out"))
    assert "TEST.AUG.ENABLED: test-time augmentation (shortest edges [96, 160]" in caplog.text
    assert "inference_TTA" in caplog.text
    with open(summary["images_file"]) as f:
        augmentation = json.load(f)["test_augmentation"]
    assert augmentation == {"min_sizes": [96, 160], "max_size": 256, "flip": True}
    with open(summary["results_file"]) as f:
        got = json.load(f)
    inputs = build_dataset_mapper(cfg, is_train=False)({"file_name": path, "image_id": 1})
    with torch.no_grad():
        tta = FocalRetinaNetWithTTA(cfg, model)([inputs])[0]["instances"]
        plain = model([inputs])[0]["instances"]
    assert sorted(r["score"] for r in got) == sorted(tta.scores.tolist())
    assert len(got) > 0 and sorted(tta.scores.tolist()) != sorted(plain.scores.tolist())
