"""predict --tile: windows, the merge of their detections (cut objects, cross-window duplicates,
offsets, the limit) and its parity with untiled predict."""

import json
import logging
import os

import cv2
import numpy as np
import pytest
import torch

from detectron2.structures import Boxes, Instances

from retinanet_plugin.postprocess import PostProcessing
from retinanet_plugin.predict import TiledPredictor, predict
from retinanet_plugin.predict.tiles import tile_starts
from retinanet_plugin.tools import predict as predict_tool

from detector_fixture import save_detector, small_detector


# ------------------------------------------------------------------------------------------
# A fake detector that knows where its crop lies, for hand-made merge cases
# ------------------------------------------------------------------------------------------
def _coordinate_image(height, width):
    """Each pixel holds its own coordinates (x % 256, y % 256, high bytes), so a crop tells a
    fake detector where it was cut from."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x % 256, y % 256, x // 256 + 16 * (y // 256)], -1).astype(np.uint8)


class FakeDetector:
    """Sees ``objects`` (x0, y0, x1, y1, score, class[, class seen from x > 0, None: missed])
    in image pixels,
    as a detector sees what
    its input holds: the part inside the crop, clipped to it, in the crop's pixels, a cut object
    scoring in proportion to the part it sees; by decreasing score, as the model returns them.
    A crop at x0 > 0 scores 0.001 lower, so that two windows' readings of one object differ."""

    def __init__(self, objects):
        self.objects = objects
        self.origins = []

    def __call__(self, crop):
        b, g, high = (int(v) for v in crop[0, 0])
        ox, oy = b + 256 * (high % 16), g + 256 * (high // 16)
        h, w = crop.shape[:2]
        self.origins.append((ox, oy, ox + w, oy + h))
        found = []
        for x0, y0, x1, y1, score, cls, *other_cls in self.objects:
            cls = other_cls[0] if other_cls and ox > 0 else cls
            if cls is None:  # missed by this window
                continue
            cx0, cy0 = max(x0, ox) - ox, max(y0, oy) - oy
            cx1, cy1 = min(x1, ox + w) - ox, min(y1, oy + h) - oy
            if cx1 <= cx0 or cy1 <= cy0:
                continue
            seen = (cx1 - cx0) * (cy1 - cy0) / ((x1 - x0) * (y1 - y0))
            found.append(([cx0, cy0, cx1, cy1], score * seen - 0.001 * (ox > 0), cls))
        found.sort(key=lambda f: -f[1])
        out = Instances((h, w))
        out.pred_boxes = Boxes(torch.tensor([f[0] for f in found], dtype=torch.float32)
                               .reshape(-1, 4))
        out.scores = torch.tensor([f[1] for f in found], dtype=torch.float32)
        out.pred_classes = torch.tensor([f[2] for f in found], dtype=torch.int64)
        return out


def _boxes(instances):
    return [[round(v, 3) for v in box] for box in instances.pred_boxes.tensor.tolist()]


def test_windows_golden():
    # 1249 px, 400 px windows sharing >= floor(0.25 * 400) = 100 px: stride 300, n = ceil((1249 -
    # 400) / 300) + 1 = 4 windows, starts round(i * 849 / 3) = 0, 283, 566, 849.
    assert tile_starts(1249, 400, 100) == [0, 283, 566, 849]
    # 1035 px: n = ceil(635 / 300) + 1 = 4, starts round(i * 635 / 3) = 0, 212 (211.67), 423, 635
    assert tile_starts(1035, 400, 100) == [0, 212, 423, 635]
    # 700 px: (700 - 400) / 300 = 1 stride, 2 windows; no overlap: ceil(300 / 400) + 1 = 2
    assert tile_starts(700, 400, 100) == [0, 300]
    assert tile_starts(700, 400, 0) == [0, 300]
    assert tile_starts(400, 400, 100) == tile_starts(250, 400, 100) == [0]
    tiler = TiledPredictor(FakeDetector([]), 400, 0.25, postprocessing=PostProcessing())
    # A 250 px high image: one row of windows of its own height, no padding.
    assert tiler.windows(250, 700) == [(0, 0, 400, 250), (300, 0, 700, 250)]
    assert len(tiler.windows(1035, 1249)) == 16


def test_cut_object_gives_one_whole_box_in_image_pixels():
    """700 x 400 image, windows (0, 0, 400, 400) and (300, 0, 700, 400)."""
    objects = [
        (360, 100, 440, 160, 0.9, 0),  # cut by window 0's right edge (x 400), whole in window 1
        (320, 200, 380, 250, 0.8, 0),  # inside the shared strip 300..400: seen whole twice
        (50, 50, 100, 90, 0.7, 0),  # window 0 only
        (600, 300, 650, 380, 0.6, 1),  # window 1 only: crop (300..350, 300..380) + 300
        # Two crowns of one window overlapping at IoU 0.6 (soft-NMS keeps both): the window's
        # own selection stands, the merge compares only detections of different windows.
        (100, 250, 200, 350, 0.5, 0),
        (125, 250, 225, 350, 0.4, 0),  # IoU = 75*100 / (2*100*100 - 75*100) = 0.6
    ]
    detector = FakeDetector(objects)
    tiler = TiledPredictor(detector, 400, 0.25, postprocessing=PostProcessing())
    merged = tiler(_coordinate_image(400, 700))
    assert detector.origins == [(0, 0, 400, 400), (300, 0, 700, 400)]
    assert merged.image_size == (400, 700)
    # The cut object once, whole (window 1's reading, 60..140 + 300), not window 0's half
    # (360..400) or both; the strip object once, from window 0 (0.8 beats 0.8 - 0.001).
    assert _boxes(merged) == [
        [360, 100, 440, 160], [320, 200, 380, 250], [50, 50, 100, 90], [600, 300, 650, 380],
        [100, 250, 200, 350], [125, 250, 225, 350],
    ]
    assert merged.scores.tolist() == pytest.approx([0.899, 0.8, 0.7, 0.599, 0.5, 0.4])
    assert merged.pred_classes.tolist() == [0, 0, 0, 1, 0, 0]


def test_object_cut_by_both_axes_is_taken_from_the_window_that_sees_it_whole():
    """700 x 700: four windows meeting over 300..400 on both axes; a crown at 380..420 on both is
    cut in three windows (each piece touches an internal edge) and whole in (300, 300, 700, 700)."""
    detector = FakeDetector([(380, 380, 420, 420, 0.9, 0)])
    tiler = TiledPredictor(detector, 400, 0.25, postprocessing=PostProcessing())
    merged = tiler(_coordinate_image(700, 700))
    assert len(detector.origins) == 4
    assert _boxes(merged) == [[380, 380, 420, 420]]
    assert merged.scores.tolist() == pytest.approx([0.899])


def test_cut_object_that_the_other_window_misses_is_kept_cut():
    """Window 1 would see the crown at 360..440 whole but does not detect it: window 0's cut box
    (360..400) is the only detection of the crown and stays; the hand-over needs a detection."""
    detector = FakeDetector([(360, 100, 440, 160, 0.9, 0, None)])
    tiler = TiledPredictor(detector, 400, 0.25, postprocessing=PostProcessing())
    merged = tiler(_coordinate_image(400, 700))
    assert _boxes(merged) == [[360, 100, 400, 160]]
    assert merged.scores.tolist() == pytest.approx([0.45])  # 0.9 * half of it seen


def test_object_wider_than_the_overlap_is_kept_in_pieces_never_lost():
    """No window sees a 210 px object whole with 100 px of overlap: both pieces stay (IoU 50/210
    = 0.24, no duplicate), as the docs say, rather than the object vanishing."""
    detector = FakeDetector([(250, 100, 460, 160, 0.9, 0)])
    tiler = TiledPredictor(detector, 400, 0.25, postprocessing=PostProcessing())
    merged = tiler(_coordinate_image(400, 700))
    assert sorted(_boxes(merged)) == [[250, 100, 400, 160], [300, 100, 460, 160]]


def test_cross_window_duplicates_follow_the_models_class_rule_and_limit():
    # One object in the shared strip, read as class 0 by window 0 and class 1 by window 1.
    objects = [(320, 200, 380, 250, 0.8, 0, 1)]
    image = _coordinate_image(400, 700)
    # Per class (the default NMS): two classes, no duplicate of either; both stay.
    merged = TiledPredictor(FakeDetector(objects), 400, 0.25,
                            postprocessing=PostProcessing())(image)
    assert merged.pred_classes.tolist() == [0, 1]
    # MODEL.RETINANET.NMS_CLASS_AGNOSTIC: one box, the better reading.
    agnostic = PostProcessing(class_agnostic=True)
    merged = TiledPredictor(FakeDetector(objects), 400, 0.25, postprocessing=agnostic)(image)
    assert _boxes(merged) == [[320, 200, 380, 250]]
    assert merged.pred_classes.tolist() == [0]
    # Whole-image limit: max_detections per tile's worth of area, 1 * ceil(700*400 / 400^2) = 2
    # of the 4 separate objects, the two best.
    many = [(20 + 60 * i, 20, 60 + 60 * i, 60, 0.9 - 0.1 * i, 0) for i in range(4)]
    limited = TiledPredictor(FakeDetector(many), 400, 0.25,
                             postprocessing=PostProcessing(max_detections=1))(image)
    assert _boxes(limited) == [[20, 20, 60, 60], [80, 20, 120, 60]]


def _scripted(readings):
    """A predictor returning, call by call, one (box in the window's pixels, score) of class 0."""
    calls = iter(readings)

    def predictor(crop):
        box, score = next(calls)
        out = Instances(crop.shape[:2])
        out.pred_boxes = Boxes(torch.tensor([box]))
        out.scores = torch.tensor([score])
        out.pred_classes = torch.tensor([0])
        return out

    return predictor


def test_a_cut_piece_scoring_above_the_whole_reading_does_not_take_it_along():
    """Windows x 0-400 and 300-700 of a 700 x 400 image; one object at x 340-420. The left
    window sees 340-400 (cut at its edge) with 0.9, the right one the whole object with 0.8. The
    piece is handed over, and being dropped it must not suppress the whole box by NMS (IoU
    60/80 = 0.75 > 0.5): the object survives as the whole box."""
    tiler = TiledPredictor(_scripted([([340.0, 100, 400, 180], 0.9), ([40.0, 100, 120, 180], 0.8)]),
                           400, 0.25, postprocessing=PostProcessing())
    out = tiler(np.zeros((400, 700, 3), np.uint8))
    assert tiler.windows(400, 700) == [(0, 0, 400, 400), (300, 0, 700, 400)]
    assert _boxes(out) == [[340.0, 100.0, 420.0, 180.0]] and out.scores.tolist() == [
        pytest.approx(0.8)]


def test_two_cut_readings_that_cover_each_other_keep_the_higher_scoring_one():
    """An object inside the 100 px overlap strip, touching both windows' inner edges: the left
    window reads 305-397 (0.9), the right 303-395 (0.8); each is inside the other window and
    covered by the other's box. Handing each to the other would lose the object: the lower
    score is handed over first, so the 0.9 reading stays."""
    tiler = TiledPredictor(_scripted([([305.0, 100, 397, 180], 0.9), ([3.0, 100, 95, 180], 0.8)]),
                           400, 0.25, postprocessing=PostProcessing())
    out = tiler(np.zeros((400, 700, 3), np.uint8))
    assert _boxes(out) == [[305.0, 100.0, 397.0, 180.0]]


def test_arguments_refused_by_name():
    pp = PostProcessing()
    with pytest.raises(ValueError, match=r"--tile 16 is smaller than the model's size "
                                         r"divisibility \(32 px"):
        TiledPredictor(FakeDetector([]), 16, postprocessing=pp, size_divisibility=32)
    for overlap in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"--tile-overlap must be a fraction of the tile in "
                                             r"\[0, 1\)"):
            TiledPredictor(FakeDetector([]), 400, overlap, postprocessing=pp)
    for size in (400.0, "400", True, 0):
        with pytest.raises(ValueError, match="--tile"):
            TiledPredictor(FakeDetector([]), size, postprocessing=pp)


# ------------------------------------------------------------------------------------------
# Through predict, with the small detector
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector():
    return small_detector()


def _smooth_image(path, height, width, seed=0):
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8),
                       (width, height))
    cv2.imwrite(str(path), image)
    return image


def _results(summary):
    with open(summary["results_file"]) as f:
        return json.load(f)


def test_small_image_gives_exactly_the_untiled_result(detector, tmp_path):
    """An image no larger than a window (96 x 128 under --tile 160) is one window, the image
    itself: the results file equals untiled predict's, bit for bit."""
    cfg, model = detector
    path = tmp_path / "small.png"
    _smooth_image(path, 96, 128)
    _, plain = predict(cfg, model, [str(path)], str(tmp_path / "plain"))
    _, tiled = predict(cfg, model, [str(path)], str(tmp_path / "tiled"), tile=160,
                       tile_overlap=0.5)
    assert len(_results(plain)) > 0
    assert _results(tiled) == _results(plain)


def test_tiled_predict_is_the_merge_of_untiled_predict_on_each_window(detector, tmp_path, caplog):
    """Each window goes through untiled predict's path (mapper resize, model, post-processing):
    a 160 x 288 image under --tile 160 --tile-overlap 0.2 has windows at x = 0 and 128 (n =
    ceil((288 - 160) / 128) + 1 = 2); untiled predict on the two crops, saved as PNG files,
    merged by TiledPredictor.merge, gives predict --tile's results exactly."""
    cfg, model = detector
    image = _smooth_image(tmp_path / "wide.png", 160, 288, seed=2)
    with caplog.at_level(logging.INFO, logger="retinanet_plugin"):
        _, tiled = predict(cfg, model, [str(tmp_path / "wide.png")], str(tmp_path / "tiled"),
                           tile=160, tile_overlap=0.2)
    assert "--tile 160: windows of 160 px sharing at least 32 px" in caplog.text
    with open(tmp_path / "tiled" / "images.json") as f:
        assert json.load(f)["tiles"] == {"size": 160, "overlap": 0.2}  # said beside the results
    windows = [(0, 0, 160, 160), (128, 0, 288, 160)]
    crops = []
    for i, (x0, y0, x1, y1) in enumerate(windows):
        crops.append(str(tmp_path / f"crop{i}.png"))
        cv2.imwrite(crops[-1], image[y0:y1, x0:x1])
    _, untiled = predict(cfg, model, crops, str(tmp_path / "crops"))
    per_crop = []
    for image_id in (1, 2):  # predict's own ids, in input order
        found = [r for r in _results(untiled) if r["image_id"] == image_id]
        instances = Instances((160, 160))
        instances.pred_boxes = Boxes(torch.tensor(
            [[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in found)]))
        instances.scores = torch.tensor([r["score"] for r in found])
        instances.pred_classes = torch.tensor([r["category_id"] for r in found])
        per_crop.append(instances)
    tiler = TiledPredictor(lambda crop: None, 160, 0.2, postprocessing=model.postprocessing,
                           size_divisibility=32)
    assert tiler.windows(160, 288) == windows
    merged = tiler.merge(windows, per_crop, (160, 288))
    got = _results(tiled)
    assert len(got) == len(merged) > 0
    # Some detections of each window survive, and some are merged away.
    assert len(merged) < len(per_crop[0]) + len(per_crop[1])
    assert [r["score"] for r in got] == merged.scores.tolist()
    assert [r["category_id"] for r in got] == merged.pred_classes.tolist()
    # XYWH in the results file, XYXY in Instances: float32 rounding of x + w, y + h only.
    xyxy = [[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in got)]
    np.testing.assert_allclose(xyxy, merged.pred_boxes.tensor.numpy(), rtol=0, atol=1e-4)


def test_cli_refuses_bad_tile_arguments_by_name(detector, tmp_path, caplog):
    cfg, model = detector
    config_file, weights = save_detector(cfg, model, str(tmp_path))
    path = tmp_path / "a.png"
    _smooth_image(path, 96, 128)
    base = ["--config-file", config_file, "--weights", weights, "--input", str(path)]
    cases = [
        (["--tile", "16"], "--tile 16 is smaller than the model's size divisibility (32 px"),
        (["--tile-overlap", "0.5"], "--tile-overlap needs --tile SIZE"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert predict_tool.main(base + ["--output", str(out)] + extra) == 2
        assert message in caplog.text
        assert not os.path.exists(out / "coco_instances_results.json")
    # The library refuses before reading any input, hence before writing anything.
    for kwargs, message in (
        ({"tile": 400, "tile_overlap": 1.0}, "--tile-overlap must be a fraction"),
        ({"tile": 400, "batch_size": 2}, "--tile runs its windows one at a time"),
    ):
        with pytest.raises(ValueError, match=message):
            predict(cfg, model, [str(path)], str(tmp_path / "lib"), **kwargs)
    assert not os.path.exists(tmp_path / "lib")
