"""scripts/ablate.py: the table and plot from per-run metrics, and one real (tiny) run."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from retinanet_plugin.data.deepforest import prepare_deepforest

REPO = Path(__file__).resolve().parents[1]


def _load_ablate():
    spec = importlib.util.spec_from_file_location("ablate", REPO / "scripts" / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablate = _load_ablate()


def _write_metrics(path: Path, ap: float, ap50: float, ap75: float, steps: int = 20):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(f"SOLVER:\n  BASE_LR: 0.01\n  MAX_ITER: {steps}\n")
    records = [
        {"iteration": 9, "total_loss": 1.0},
        {"iteration": 9, "bbox/AP": 99.0, "bbox/AP50": 99.0, "bbox/AP75": 99.0},  # superseded
        {"iteration": 19, "bbox/AP": ap, "bbox/AP50": ap50, "bbox/AP75": ap75, "bbox/APs": 1.0},
        {"iteration": 19, "total_loss": 0.5},  # a later record without AP
    ]
    (path / "metrics.json").write_text("\n".join(json.dumps(r) for r in records))


def test_table_from_finished_runs(tmp_path):
    # CE over seeds 0, 1, 2: AP 10, 12, 14 -> mean 12, sample std sqrt((4 + 0 + 4) / 2) = 2.
    for seed, ap in zip((0, 1, 2), (10.0, 12.0, 14.0)):
        _write_metrics(ablate.run_dir(tmp_path, "CE", seed), ap, 2 * ap, ap / 2)
    # FL* with one seed: no spread.
    _write_metrics(ablate.run_dir(tmp_path, "FLstar", 0), 20.0, 40.0, 10.0)
    ablate.run_dir(tmp_path, "FLstar", 1).mkdir(parents=True)  # unfinished: no metrics.json

    # The step count comes from the runs' config.yaml (20), not from --steps' default (200).
    results = ablate.main(["--table-only", "--settings", "CE", "FLstar", "--seeds", "0", "1", "2",
                           "--output", str(tmp_path)])

    assert results["CE"][1] == {"AP": 12.0, "AP50": 24.0, "AP75": 6.0}
    assert set(results["FLstar"]) == {0}
    table = (tmp_path / "table.md").read_text().splitlines()
    # AP50 = 2 AP: mean 24, std 4; AP75 = AP / 2: mean 6, std 1.
    assert table[-2] == ("| CE | CE, gamma 0, no alpha | 0,1,2 | 12.00 ± 2.00 (10.00-14.00) | "
                         "24.00 ± 4.00 (20.00-28.00) | 6.00 ± 1.00 (5.00-7.00) |")
    assert table[-1] == "| FLstar | FL* gamma 2, beta 1 | 0 | 20.00 | 40.00 | 10.00 |"
    assert (tmp_path / "ablation.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"]["CE"]["2"]["AP"] == 14.0 and saved["steps"] == 20

    assert "deepforest_tree_val, 20 steps" in table[0]

    _write_metrics(ablate.run_dir(tmp_path, "OHEM", 0), 5.0, 9.0, 1.0, steps=50)
    with pytest.raises(SystemExit, match="different or unknown step counts"):
        ablate.main(["--table-only", "--output", str(tmp_path)])
    with pytest.raises(SystemExit):  # bad setting name: argparse error naming it
        ablate.main(["--settings", "FL-g3", "--table-only", "--output", str(tmp_path)])


def test_a_failed_run_does_not_stop_the_grid(tmp_path, monkeypatch):
    _write_metrics(ablate.run_dir(tmp_path, "FL-g2", 0), 8.0, 30.0, 1.0)
    calls = []

    def failing_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode=1)

    monkeypatch.setattr(ablate.subprocess, "run", failing_run)
    with pytest.raises(SystemExit, match=r"1 run\(s\) failed .*CE seed 0 failed \(exit 1\)"):
        ablate.main(["--settings", "CE", "FL-g2", "--seeds", "0", "--steps", "20",
                     "--output", str(tmp_path)])
    assert len(calls) == 1 and "SEED" in calls[0]  # CE was tried; FL-g2 was already done
    assert "| FL-g2 |" in (tmp_path / "table.md").read_text()


def test_jobs_run_cells_at_once_and_the_table_keeps_the_settings_order(tmp_path, monkeypatch):
    import threading
    import time

    running, peak, lock = [0], [0], threading.Lock()

    def fake_run(cmd, **kwargs):  # a "training" that writes its metrics after a pause
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        out = Path(cmd[cmd.index("OUTPUT_DIR") + 1])
        seed = int(cmd[cmd.index("SEED") + 1])
        _write_metrics(out, 10.0 + seed, 30.0, 1.0)
        with lock:
            running[0] -= 1
        return subprocess.CompletedProcess(cmd, returncode=0)

    monkeypatch.setattr(ablate.subprocess, "run", fake_run)
    results = ablate.main(["--settings", "FL-g2", "CE", "--seeds", "0", "1", "--steps", "20",
                           "--jobs", "2", "--output", str(tmp_path)])
    assert peak[0] == 2
    assert list(results) == ["FL-g2", "CE"] and list(results["CE"]) == [0, 1]
    assert results["CE"][1]["AP"] == 11.0


@pytest.mark.slow
def test_one_tiny_real_run(tmp_path, monkeypatch):
    """One setting, one seed, 2 steps, train_net.py in its own process, read back."""
    # Inherited by the run: eager loss kernels (same numbers, tests/test_focal_loss.py) spare the
    # run a first compilation that costs more than its two steps.
    monkeypatch.setenv("RETINANET_PLUGIN_COMPILE", "0")
    # The run reads $DETECTRON2_DATASETS/deepforest: there, a val split of 4 tiles with trees.
    source = REPO / "datasets" / "deepforest"
    prepare_deepforest(source)
    coco = json.loads((source / "val.json").read_text())
    keep = sorted({a["image_id"] for a in coco["annotations"]})[:4]
    coco["images"] = [img for img in coco["images"] if img["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    data = tmp_path / "data" / "deepforest"
    data.mkdir(parents=True)
    (data / "val.json").write_text(json.dumps(coco))
    (data / "images").symlink_to(source / "images")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "data"))
    opts = [
        "--",
        "MODEL.MOBILENET.PRETRAINED", "False",
        "SOLVER.IMS_PER_BATCH", "2",
        "DATALOADER.NUM_WORKERS", "0",
        "DATASETS.TRAIN", "('deepforest_tree_val',)",
        "INPUT.MIN_SIZE_TRAIN", "(200,)", "INPUT.MAX_SIZE_TRAIN", "200",
        "INPUT.MIN_SIZE_TEST", "200", "INPUT.MAX_SIZE_TEST", "200",
        # After 2 steps every score is near the prior (0.01): keep them so that AP is a number.
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
    ]  # fmt: skip
    argv = ["--settings", "OHEM", "--seeds", "3", "--steps", "2", "--output", str(tmp_path / "out")]
    results = ablate.main(argv + opts)

    run = ablate.run_dir(tmp_path / "out", "OHEM", 3)
    ap = results["OHEM"][3]
    assert 0.0 <= ap["AP"] <= ap["AP50"] <= 100.0
    config = (run / "config.yaml").read_text()
    assert "CLS_LOSS: OHEMLoss" in config and "BATCH_SIZE_PER_IMAGE: 128" in config
    assert "MAX_ITER: 2" in config and "SEED: 3" in config
    assert f"{ap['AP']:.2f}" in (tmp_path / "out" / "table.md").read_text()
    assert "Loaded 4 images in COCO format" in (run / "log.txt").read_text()

    # A finished run is not trained again.
    stamp = (run / "metrics.json").stat().st_mtime_ns
    assert ablate.main(argv + opts) == results
    assert (run / "metrics.json").stat().st_mtime_ns == stamp
    # ... nor silently reported under another step count.
    with pytest.raises(SystemExit, match="finished run of 2 steps, not 3"):
        ablate.main([a if a != "2" else "3" for a in argv] + opts)
