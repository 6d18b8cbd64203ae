"""examples/deploy_onnxruntime.py: the exported raw-image graph run with numpy, onnxruntime and
OpenCV only gives predict's COCO results."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from retinanet_plugin.export import match_detections
from retinanet_plugin.tools import export as export_tool
from retinanet_plugin.tools import predict as predict_tool

from detector_fixture import save_detector, small_detector

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "deploy_onnxruntime.py"
# Odd sizes, one wider than MAX_SIZE_TEST allows (the graph resizes it as the mapper does).
SIZES = [(128, 160), (200, 249), (96, 300)]
BLOCKED = ("torch", "torchvision", "detectron2", "retinanet_plugin", "fvcore")
# Run in the child before the example: any import of BLOCKED raises ImportError, and the
# example's own modules are checked afterwards.
GUARD = f"""
import importlib.abc, runpy, sys
BLOCKED = {BLOCKED!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked in this test: {{name}}")
        return None

sys.meta_path.insert(0, Block())
if sys.argv[1] == "--probe":
    import torch
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
"""


def _guarded(*args, cwd):
    return subprocess.run(
        [sys.executable, "-c", GUARD, *args], cwd=cwd, capture_output=True, text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """The fixture detector exported (raw images in), predict's and the example's outputs on
    three random images."""
    folder = tmp_path_factory.mktemp("deploy")
    cfg, model = small_detector()
    config_file, weights = save_detector(cfg, model, str(folder))
    rng = np.random.default_rng(2)
    images = []
    for i, (h, w) in enumerate(SIZES):
        path = folder / f"image{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        images.append(str(path))
    onnx_file = str(folder / "model.onnx")
    # One check image (the tool's own parity test, not this file's subject) keeps it fast.
    assert export_tool.main(
        ["--config-file", config_file, "--weights", weights, "--format", "onnx",
         "--output", onnx_file, "--check-images", images[0]]
    ) == 0
    assert predict_tool.main(
        ["--config-file", config_file, "--weights", weights, "--input", *images,
         "--output", str(folder / "predict")]
    ) == 0
    ids = {Path(e["file_name"]).name: e["id"]
           for e in json.loads((folder / "predict" / "images.json").read_text())["images"]}
    run = _guarded(
        str(EXAMPLE), "--model", onnx_file, "--input", *images, "--output",
        str(folder / "deploy"), "--image-ids", *(str(ids[Path(p).name]) for p in images),
        cwd=folder,
    )
    assert run.returncode == 0, run.stderr
    return folder, images, run


def test_the_guard_blocks_torch(tmp_path):
    script = tmp_path / "noop.py"
    script.write_text("")
    probe = _guarded("--probe", str(script), cwd=tmp_path)
    assert probe.returncode != 0
    assert "ImportError: blocked in this test: torch" in probe.stderr


def _assert_same_results(predicted, deployed, num_images):
    """Per image id, the same number of COCO results, paired one to one by category, box and
    score, within the export tool's parity tolerances."""
    by_image = {}
    for source, results in (("predict", predicted), ("deploy", deployed)):
        for r in results:
            by_image.setdefault(r["image_id"], {"predict": [], "deploy": []})[source].append(r)
    assert len(by_image) == num_images
    for image_id, pair in by_image.items():
        ref, got = pair["predict"], pair["deploy"]
        assert len(ref) > 0 and len(got) == len(ref), image_id

        def arrays(results):
            boxes = torch.tensor([r["bbox"] for r in results], dtype=torch.float64)
            return (boxes, torch.tensor([r["score"] for r in results], dtype=torch.float64),
                    torch.tensor([r["category_id"] for r in results]))

        boxes, scores, classes = arrays(got)
        ref_boxes, ref_scores, ref_classes = arrays(ref)
        # Equal scores up to float rounding can swap ranks: pair by category, box and score.
        index = match_detections(boxes, classes, ref_boxes, ref_classes, scores, ref_scores)
        assert sorted(index.tolist()) == list(range(len(ref)))  # one to one, same category
        # The export tool's parity tolerances (1e-3 px, 1e-5), on XYWH boxes in image pixels.
        torch.testing.assert_close(boxes, ref_boxes[index], rtol=0, atol=1e-3)
        torch.testing.assert_close(scores, ref_scores[index], rtol=0, atol=1e-5)


def test_example_gives_predicts_results(outputs):
    folder, images, _ = outputs
    predicted = json.loads((folder / "predict" / "coco_instances_results.json").read_text())
    deployed = json.loads((folder / "deploy" / "coco_instances_results.json").read_text())
    _assert_same_results(predicted, deployed, len(images))


def _write_video(path, fourcc, frames, seed):
    """``frames`` random 160x120 frames at 5 fps."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 5.0, (160, 120))
    rng = np.random.default_rng(seed)
    for _ in range(frames):
        writer.write(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    writer.release()


def test_example_on_a_video_gives_predicts_results(outputs):
    folder, _, _ = outputs
    video = folder / "clip.avi"
    # MJPG in AVI: written by every OpenCV build; both tools decode the same frames.
    _write_video(video, "MJPG", frames=3, seed=3)
    assert predict_tool.main(
        ["--config-file", str(folder / "config.yaml"), "--weights", str(folder / "model.pth"),
         "--input", str(video), "--output", str(folder / "predict_video")]
    ) == 0
    # predict numbers a video's frames from 1, as the example does by default.
    run = _guarded(
        str(EXAMPLE), "--model", str(folder / "model.onnx"), "--input", str(video),
        "--output", str(folder / "deploy_video"), cwd=folder,
    )
    assert run.returncode == 0, run.stderr
    predicted = json.loads((folder / "predict_video" / "coco_instances_results.json").read_text())
    deployed = json.loads((folder / "deploy_video" / "coco_instances_results.json").read_text())
    assert {r["image_id"] for r in deployed} == {1, 2, 3}
    _assert_same_results(predicted, deployed, 3)
    drawn = cv2.VideoCapture(str(folder / "deploy_video" / "clip.mp4"))
    assert int(drawn.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    drawn.release()


def test_example_draws_every_image_at_its_size(outputs):
    folder, images, run = outputs
    for path in images:
        drawn = cv2.imread(str(folder / "deploy" / Path(path).name))
        assert drawn is not None and drawn.shape == cv2.imread(path).shape
    assert "detections ->" in run.stdout


def test_labels_at_the_edges_stay_inside_the_image():
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import deploy_onnxruntime as example
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    width, height, label_w, label_h = 200, 120, 90, 14
    # Boxes (x0, y0) in the middle, at each corner and partly outside the image.
    cases = {
        (80, 60): (80, 46),  # room above: 60 - 14
        (0, 0): (0, 0),  # top-left: inside the box's top
        (190, 0): (110, 0),  # top-right: moved left to 200 - 90
        (190, 115): (110, 101),  # bottom-right: above the box
        (-20, -30): (0, 0),  # box starting outside the image
        (150, 119): (110, 105),  # 119 - 14
    }
    for (x0, y0), expected in cases.items():
        left, top = example.label_position(x0, y0, label_w, label_h, width, height)
        assert (left, top) == expected, (x0, y0)
        assert 0 <= left and left + label_w <= width and 0 <= top and top + label_h <= height
    # And drawn: a label in the top-right corner keeps its full width of its colour.
    image = np.zeros((height, width, 3), dtype=np.uint8)
    detections = (np.array([[170, 0, 199, 30]], dtype=np.float32), np.array([0.9]), np.array([0]))
    drawn = example.draw(image, detections, ["a long class name"], 0.5)
    colored = (drawn == np.array(example._color(0))).all(axis=2)
    (tw, _), _ = cv2.getTextSize("a long class name 0.90", cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    assert colored[0].sum() >= tw + 2  # the label's top row, whole, in the first image row


def test_example_refuses_to_draw_over_its_input(outputs, tmp_path):
    folder, images, _ = outputs
    # An image, and a video whose drawing would be <stem>.mp4: both in the --output folder.
    image = tmp_path / "photo.png"
    image.write_bytes(Path(images[0]).read_bytes())
    video = tmp_path / "clip.mp4"
    _write_video(video, "mp4v", frames=2, seed=4)
    for path in (image, video):
        before = path.read_bytes()
        run = _guarded(str(EXAMPLE), "--model", str(folder / "model.onnx"), "--input",
                       str(path), "--output", str(tmp_path), cwd=folder)
        assert run.returncode != 0
        assert f"--output would overwrite the input {path}" in run.stderr
        assert path.read_bytes() == before
