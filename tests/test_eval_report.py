"""The evaluation report: the numbers behind each picture, on hand-made COCO sets.

PR curves against COCOeval run on one class at a time, confusion-matrix and worst-image counts
and the error breakdown on cases built so that the answer is known, and train_net.py writing the
report after its evaluation.
"""

import contextlib
import csv
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_train_net import (  # noqa: F401  (datasets_dir: the fixture)
    DEMO_CONFIG,
    TINY,
    _args,
    _load_train_net,
    datasets_dir,
)

from retinanet_plugin.evaluation.report import (
    ERROR_TYPES,
    ReportSettings,
    confusion_matrix,
    error_breakdown,
    evaluation_reports,
    load_results,
    per_class_table,
    pr_curves,
    report_settings,
    run_cocoeval,
    worst_images,
)


def _coco(annotations, categories=(1,), num_images=2):
    """A ground-truth COCO object: annotations as (image id, category id, XYWH box[, iscrowd])."""
    dataset = {
        "images": [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"}
                   for i in range(1, num_images + 1)],
        "categories": [{"id": c, "name": f"class{c}"} for c in categories],
        "annotations": [
            {"id": n, "image_id": a[0], "category_id": a[1], "bbox": list(a[2]),
             "area": a[2][2] * a[2][3], "iscrowd": a[3] if len(a) > 3 else 0}
            for n, a in enumerate(annotations, 1)
        ],
    }  # fmt: skip
    gt = COCO()
    gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _det(image_id, category_id, box, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(box), "score": score}


def _random_set(seed=0, num_images=12):
    """Three classes with non-contiguous ids, jittered copies of most boxes (some relabelled),
    random false detections."""
    rng = np.random.default_rng(seed)
    cats = (2, 5, 8)
    anns, dets = [], []
    for image_id in range(1, num_images + 1):
        for _ in range(rng.integers(1, 8)):
            x, y = rng.uniform(0, 500, 2)
            w, h = rng.uniform(10, 120, 2)
            cat = int(rng.choice(cats))
            anns.append((image_id, cat, (x, y, w, h)))
            if rng.random() < 0.8:
                j = rng.normal(0, 0.12, 4) * [w, h, w, h]
                label = cat if rng.random() < 0.85 else int(rng.choice(cats))
                dets.append(_det(image_id, label, (x + j[0], y + j[1], w + j[2], h + j[3]),
                                 float(rng.uniform(0.2, 1))))
        for _ in range(rng.integers(0, 6)):
            x, y = rng.uniform(0, 500, 2)
            dets.append(_det(image_id, int(rng.choice(cats)), (x, y, 50, 40),
                             float(rng.uniform(0, 0.7))))
    return _coco(anns, cats, num_images), dets


def test_pr_curve_area_is_cocoevals_ap_of_that_class():
    gt, dets = _random_set()
    E = run_cocoeval(gt, load_results(gt, dets))
    curves = {(c.category_id, c.iou): c for c in pr_curves(E)}
    table = {r.category_id: r for r in per_class_table(E)}
    assert len(curves) == 6 and len(table) == 3
    for cat in (2, 5, 8):
        # The reference: COCOeval on this class alone, its own summary (stats: AP, AP50, AP75;
        # AR@100 is stats[8]).
        with contextlib.redirect_stdout(io.StringIO()):
            alone = COCOeval(gt, gt.loadRes([dict(d) for d in dets]), "bbox")
            alone.params.catIds = [cat]
            alone.evaluate()
            alone.accumulate()
            alone.summarize()
        ap, ap50, ap75, ar100 = (100 * alone.stats[i] for i in (0, 1, 2, 8))
        for iou, reference in ((0.5, ap50), (0.75, ap75)):
            curve = curves[(cat, iou)]
            # COCO's 101-point rule: AP is the mean of the interpolated precision at recall
            # 0, 0.01, ..., 1, so the curve's area by that rule is the class's AP.
            assert curve.recall.shape == curve.precision.shape == (101,)
            assert 100 * curve.precision.mean() == pytest.approx(reference, abs=1e-9)
            assert curve.ap == pytest.approx(reference, abs=1e-9)
        row = table[cat]
        assert (row.ap, row.ap50, row.ap75, row.ar100) == pytest.approx(
            (ap, ap50, ap75, ar100), abs=1e-9)
        assert 0 < row.ap50 < 100  # a real value, not a degenerate 0 or 100


def test_confusion_matrix_counts_and_worst_images():
    a, b, c = (10, 10, 100, 100), (300, 10, 100, 100), (10, 300, 100, 100)
    gt = _coco([
        (1, 1, a), (1, 2, b), (1, 1, c),  # image 1: c is missed
        (2, 2, a),  # image 2: found
        (3, 1, a),  # image 3: found, plus a false detection
        (4, 2, b, 1),  # image 4: a crowd region, not counted
    ], categories=(1, 2), num_images=4)
    dets = [
        _det(1, 1, a, 0.9),  # class 1 on class 1: diagonal
        _det(1, 1, b, 0.8),  # class 1 on a class-2 box: confusion
        _det(1, 2, (500, 400, 50, 50), 0.7),  # class 2 on nothing: false
        _det(1, 1, c, 0.2),  # on c, but below the score threshold: c stays missed
        _det(2, 2, (12, 10, 100, 100), 0.6),  # IoU 98 * 100 / (102 * 100) = 0.96: matched
        _det(3, 1, a, 0.95),
        _det(3, 2, (14, 14, 50, 50), 0.5),  # IoU 2500 / 10000 = 0.25 < 0.5: false
        _det(4, 2, (310, 20, 50, 50), 0.9),  # inside the crowd region: ignored
    ]
    result = confusion_matrix(gt, dets, score_thresh=0.3, iou_thresh=0.5)
    assert result.names == ["class1", "class2"]
    # rows ground truth (class1, class2, background), columns detections (the same).
    np.testing.assert_array_equal(result.matrix, [
        [2, 0, 1],  # class 1: a (image 1) and a (image 3) found; c missed
        [1, 1, 0],  # class 2: b taken as class 1; image 2's box found
        [0, 2, 0],  # false: the class-2 detections of images 1 and 3
    ])  # fmt: skip
    per_image = {im.image_id: (im.missed, im.false) for im in result.images}
    # Image 1: c missed and b confused (missed as class 2, false as class 1) + the false one.
    assert per_image == {1: (2, 2), 2: (0, 0), 3: (0, 1), 4: (0, 0)}
    # The boxes the worst-image pictures mark: image 1's missed c and confused b, its false
    # detections (the class-1 one on b, the class-2 one on nothing).
    first = result.images[0]
    assert sorted(first.missed_boxes) == sorted([b, c])
    assert sorted(first.false_boxes) == sorted([b, (500, 400, 50, 50)])
    assert [im.image_id for im in worst_images(result, 5)] == [1, 3]
    # The IoU threshold is honoured: at 0.97 image 2's detection (IoU 0.96) no longer matches.
    strict = confusion_matrix(gt, dets, score_thresh=0.3, iou_thresh=0.97)
    assert {im.image_id: (im.missed, im.false) for im in strict.images}[2] == (1, 1)


def _gains(gt, dets, **kwargs):
    b = error_breakdown(gt, dets, **kwargs)
    return b, {t: (b.gain(t, "AP50"), b.gain(t, "AP75"), b.gain(t, "AP")) for t in ERROR_TYPES}


def _only(gains, kind):
    return {t: g for t, g in gains.items() if t != kind and any(abs(v) > 1e-9 for v in g)}


def test_error_breakdown_shifted_box_is_all_localisation():
    # Shifted right by 20 px: IoU 80 * 100 / (120 * 100) = 2/3, a correct detection at IoU
    # 0.50-0.65 (4 of the 10 thresholds) and a localisation error at 0.70-0.95.
    gt = _coco([(1, 1, (0, 0, 100, 100)), (2, 1, (50, 50, 100, 100))])
    dets = [_det(1, 1, (20, 0, 100, 100), 0.9), _det(2, 1, (70, 50, 100, 100), 0.8)]
    b, gains = _gains(gt, dets)
    assert b.base("AP50") == pytest.approx(100) and b.base("AP75") == pytest.approx(0)
    assert b.base("AP") == pytest.approx(40)  # 4 thresholds of 10 at AP 100
    # Fixed, both boxes are exact: AP 100 at every threshold.
    assert gains["localisation"] == pytest.approx((0, 100, 60))
    assert _only(gains, "localisation") == {}
    assert b.counts["localisation"][0.75] == 2 and b.counts["localisation"][0.5] == 0
    assert b.counts["missed"][0.75] == 0  # the boxes are aimed at, not missed


def test_error_breakdown_duplicate():
    gt = _coco([(1, 1, (0, 0, 100, 100)), (1, 1, (200, 200, 100, 100))])
    dets = [_det(1, 1, (0, 0, 100, 100), 0.9),
            _det(1, 1, (0, 0, 100, 100), 0.8),  # the same box again
            _det(1, 1, (200, 200, 100, 100), 0.7)]
    b, gains = _gains(gt, dets)
    # Ranked TP, FP, TP: precision 1 up to recall 0.5 (51 recall thresholds), then 2/3 (50):
    # AP = (51 + 50 * 2 / 3) / 101 = 0.834983...; removing the duplicate gives 1 at every IoU.
    gain = 100 * (1 - (51 + 50 * 2 / 3) / 101)
    assert gains["duplicate"] == pytest.approx((gain, gain, gain))
    assert _only(gains, "duplicate") == {}
    assert b.counts["duplicate"][0.5] == 1


def test_error_breakdown_missed_object_and_the_other_types():
    gt = _coco([(1, 1, (0, 0, 100, 100)), (1, 1, (200, 200, 100, 100))])
    _, gains = _gains(gt, [_det(1, 1, (0, 0, 100, 100), 0.9)])
    # Recall stops at 0.5: AP = 51 / 101; without the missed box AP is 1.
    assert gains["missed"] == pytest.approx((100 * 50 / 101,) * 3)
    assert _only(gains, "missed") == {}

    # One box found, then a wrong class on the second box, and a detection on nothing.
    gt = _coco([(1, 1, (0, 0, 100, 100)), (1, 2, (200, 200, 100, 100)),
                (2, 1, (0, 0, 100, 100))], categories=(1, 2))
    dets = [_det(1, 1, (0, 0, 100, 100), 0.9), _det(1, 1, (200, 200, 100, 100), 0.8),
            _det(2, 1, (400, 300, 50, 50), 0.85), _det(2, 1, (0, 0, 100, 100), 0.7)]
    b, gains = _gains(gt, dets, iou_thresholds=(0.5, 0.75))
    assert b.counts["classification"][0.5] == 1 and b.counts["background"][0.5] == 1
    # Class 1 ranked TP (0.9), FP background (0.85), FP class error (0.8), TP (0.7): recall 1/2
    # at precision 1, then 2/4: AP (51 + 50 / 2) / 101; class 2 (its box not found): AP 0.
    class1 = (51 + 50 / 2) / 101
    assert b.base("AP50") == pytest.approx(100 * class1 / 2)
    # Relabelled, the error finds class 2's box (class 2 AP 1) and leaves class 1 TP, FP, TP:
    # (51 + 50 * 2 / 3) / 101.
    assert gains["classification"][0] == pytest.approx(
        100 * ((51 + 50 * 2 / 3) / 101 + 1) / 2 - 100 * class1 / 2)
    # Without the background detection class 1 is TP, FP, TP as well; class 2 stays 0.
    assert gains["background"][0] == pytest.approx(100 * ((51 + 50 * 2 / 3) / 101 - class1) / 2)
    assert gains["localisation"][0] == gains["duplicate"][0] == gains["both"][0] == 0
    assert np.isnan(b.gain("missed", "AP"))  # AP@[.5:.95] needs the ten thresholds


def test_report_settings_of_both_kinds_of_config():
    from omegaconf import OmegaConf

    from detectron2.config import get_cfg

    from retinanet_plugin import add_retinanet_plugin_config

    cfg = add_retinanet_plugin_config(get_cfg())
    assert report_settings(cfg) == ReportSettings()  # the YAML defaults are the class's
    cfg.TEST.REPORT.SCORE_THRESH = 0.6
    assert report_settings(cfg).score_thresh == 0.6
    lazy = OmegaConf.create({"dataloader": {}})
    assert report_settings(lazy) == ReportSettings()
    lazy.dataloader.report = {"score_thresh": 0.6, "enabled": True}
    assert report_settings(lazy) == ReportSettings(enabled=True, score_thresh=0.6)
    lazy.dataloader.report = {"score_threshold": 0.6}
    with pytest.raises(ValueError, match="dataloader.report has unknown keys"):
        report_settings(lazy)


@pytest.mark.slow
def test_train_net_writes_the_report_after_evaluation(datasets_dir, tmp_path):  # noqa: F811
    """An --eval-only run (random weights, the four-tile set of test_train_net.py): the report
    beside COCOEvaluator's detections, with COCOEvaluator's own AP."""
    train_net = _load_train_net()
    out = tmp_path / "eval"
    opts = ["DATASETS.TEST", f"('{TINY}',)", "MODEL.WEIGHTS", ""]
    # Random weights score near the prior 0.01: a 0.0 threshold gives COCOEvaluator detections,
    # and the report's 0.3 leaves none for the confusion matrix and the pictures.
    opts += ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "100"]
    opts += ["MODEL.RETINANET.TOPK_CANDIDATES_TEST", "100"]  # a smaller NMS: a faster test
    opts += ["TEST.REPORT.ENABLED", "True", "TEST.REPORT.WORST_IMAGES", "2"]
    res = train_net.main(_args(out, *opts, eval_only=True))["bbox"]
    report = out / "inference" / TINY / "report"
    summary = json.loads((report / "report.json").read_text())
    # The same AP as COCOEvaluator's, from its own results file and ground truth.
    for key in ("AP", "AP50", "AP75"):
        assert summary["overall"][key] == pytest.approx(res[key], abs=1e-9), key
    with open(report / "per_class.csv") as f:
        (row,) = list(csv.DictReader(f))
    # One class: its AP is the AP (written to 2 decimals).
    assert float(row["AP"]) == pytest.approx(res["AP"], abs=0.005)
    num_gt = int(row["gt"])
    # No detection reaches 0.3: every box is missed, nothing is false.
    assert summary["confusion"]["matrix"] == [[0, num_gt], [0, 0]]
    worst = summary["worst_images"]
    assert len(worst) == 2 and all(w["false"] == 0 for w in worst)
    assert worst[0]["missed"] >= worst[1]["missed"] > 0
    for name in ("pr_curves.png", "confusion_matrix.png", "errors.png", "worst_1.jpg",
                 "worst_2.jpg", "report.md", "errors.csv", "confusion_matrix.csv"):
        assert (report / name).stat().st_size > 0, name
    # The model's size (the evaluated model's parameters) is in the report.
    assert summary["model_cost"]["params"]["total"] > 0
    # The summary reached the run's log.
    assert "AP gained if fixed" in (out / "log.txt").read_text()

    # The tool on the same results file writes the same report (it is the same function).
    from retinanet_plugin.tools import eval_report

    results = out / "inference" / TINY / "coco_instances_results.json"
    again = eval_report.main([
        "--config-file", str(DEMO_CONFIG), "--results", str(results), "--dataset", TINY,
        "--output", str(tmp_path / "tool"), "--worst-images", "2", "--no-model-cost",
        "MODEL.MOBILENET.PRETRAINED", "False",
    ])  # fmt: skip
    for key in ("overall", "per_class", "confusion", "errors", "worst_images"):
        mine = json.loads(json.dumps(again[key], default=float))
        if key == "worst_images":  # the same images, drawn in another folder
            mine = [{k: v for k, v in w.items() if k != "file"} for w in mine]
            theirs = [{k: v for k, v in w.items() if k != "file"} for w in summary[key]]
        else:
            theirs = summary[key]
        assert mine == theirs, key
    assert again["model_cost"] == "Skipped (--no-model-cost)."


def test_a_failing_report_is_a_warning(tmp_path, caplog):
    """evaluation_reports never raises into a run: a results file the report cannot read (here
    of an unregistered dataset) is logged, the evaluation's own results stand."""
    results = tmp_path / "coco_instances_results.json"
    settings = ReportSettings(enabled=True, model_cost=False)
    with evaluation_reports([("no_such_dataset_for_report", str(results))], settings):
        results.write_text("[]")  # written by "the evaluation"
    assert "Evaluation report of no_such_dataset_for_report not written" in caplog.text
    assert not (tmp_path / "report").exists() or not any((tmp_path / "report").iterdir())


@pytest.mark.slow
def test_lazy_train_net_writes_the_report_after_evaluation(tmp_path):
    """The same from a .py config (test_lazy_train_net.py's three-image set, random weights):
    ``dataloader.report`` as ``TEST.REPORT``."""
    from test_lazy_train_net import CONFIG, DEMO, _write_coco

    from retinanet_plugin.engine import argument_parser
    from retinanet_plugin.engine.lazy_train import lazy_main

    _write_coco(tmp_path / "data")
    config = tmp_path / "tiny_lazy.py"
    config.write_text(CONFIG.format(demo=str(DEMO)) + (
        "dataloader.report = dict(enabled=True, worst_images=1, model_cost=False)\n"))
    out = tmp_path / "eval"
    args = argument_parser().parse_args(
        ["--config-file", str(config), "--eval-only", f"train.output_dir={out}"])
    res = lazy_main(args)["bbox"]
    report = out / "inference" / "lazy_train_net_tiny" / "report"
    summary = json.loads((report / "report.json").read_text())
    assert summary["overall"]["AP50"] == pytest.approx(res["AP50"], abs=1e-9)
    assert len(summary["worst_images"]) == 1 and (report / "worst_1.jpg").is_file()
    assert summary["model_cost"] is None


def test_summary_writes_an_undefined_gain_as_na_and_last():
    """With every object missed, removing the missed objects leaves no ground truth: that gain
    is NaN, written "n/a" after the defined ones (before, "+nan" in an arbitrary place)."""
    from retinanet_plugin.evaluation.report.errors import ERROR_TYPES
    from retinanet_plugin.evaluation.report.writer import summary_text

    gain = {t: {"AP": 0.0, "AP50": 0.0, "AP75": 0.0} for t in ERROR_TYPES}
    gain["missed"] = {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
    gain["background"] = {"AP": 2.0, "AP50": 3.0, "AP75": 1.0}
    summary = {"overall": {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}, "errors": {"gain": gain},
               "worst_images": []}
    line = summary_text(summary).splitlines()[1]
    assert "background +2.0 / +3.0 / +1.0" in line and "nan" not in line
    assert line.endswith("missed n/a / n/a / n/a")
