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


def _four_val_tiles(tmp_path: Path, monkeypatch):
    """The run reads $DETECTRON2_DATASETS/deepforest: there, a val split of 4 tiles with trees."""
    # Inherited by the run: eager loss kernels (same numbers, tests/test_focal_loss.py) spare the
    # run a first compilation that costs more than its two steps.
    monkeypatch.setenv("RETINANET_PLUGIN_COMPILE", "0")
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


@pytest.mark.slow
def test_one_tiny_real_run(tmp_path, monkeypatch):
    """One setting, one seed, 2 steps, train_net.py in its own process, read back."""
    _four_val_tiles(tmp_path, monkeypatch)
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


# --------------------------------------------------------------------------------------------
# A Python (lazy) config: the same runs from key=value overrides
# --------------------------------------------------------------------------------------------
LAZY_DEMO = REPO / "configs" / "demo_deepforest_mobilenet_v2_fpn.py"


@pytest.fixture(scope="module")
def twin_models():
    """setting -> (model of the .py overrides, model of the YAML overrides), built once."""
    from detectron2.config import instantiate
    from detectron2.modeling import build_model

    from retinanet_plugin.config import load_config
    from retinanet_plugin.lazy import load_lazy_config

    models = {}
    for name in ablate.SETTINGS:
        ycfg = load_config(str(ablate.DEMO_CONFIG))
        ycfg.merge_from_list(ablate.yaml_opts(name) + ["MODEL.MOBILENET.PRETRAINED", "False"])
        cfg = load_lazy_config(LAZY_DEMO, ablate.lazy_opts(name)
                               + ["model.backbone.bottom_up.features.pretrained=False"])
        models[name] = instantiate(cfg.model), build_model(ycfg)
    return models


@pytest.mark.parametrize("name", list(ablate.SETTINGS))
def test_py_overrides_build_the_model_of_the_yaml_overrides(name, twin_models):
    ours, theirs = twin_models[name]
    assert type(ours.cls_loss) is type(theirs.cls_loss)
    assert type(ours.cls_loss).__name__ == ablate.SETTINGS[name].loss
    assert vars(ours.cls_loss) == vars(theirs.cls_loss)  # alpha, gamma, beta, OHEM's arguments
    for arg, value in ablate.SETTINGS[name].args.items():  # ... and they are the setting's
        assert getattr(ours.cls_loss, arg) == value, arg
    assert repr(ours.loss_normalizer) == repr(theirs.loss_normalizer)
    assert ours.postprocessing == theirs.postprocessing


DEMO_PY_CONFIGS = sorted((REPO / "configs").glob("demo_*.py"))


@pytest.mark.parametrize("steps", [2, 7, 200, 1000])
@pytest.mark.parametrize("lazy", DEMO_PY_CONFIGS, ids=lambda p: p.stem)
def test_py_schedule_is_the_yaml_schedule(lazy, steps):
    """Each demo .py with ablate's schedule has its YAML twin's LR at every iteration (the
    long demo's two drops become the one drop, by the base config's first gamma)."""
    import torch

    from detectron2.config import instantiate
    from detectron2.solver import build_lr_scheduler

    from retinanet_plugin.config import load_config
    from retinanet_plugin.lazy import load_lazy_config

    twin = lazy.with_suffix(".yaml")
    ycfg = load_config(str(twin))
    ycfg.merge_from_list(ablate.schedule_opts(steps, twin))
    cfg = load_lazy_config(str(lazy), ablate.schedule_opts(steps, lazy))
    theirs = build_lr_scheduler(ycfg, torch.optim.SGD([torch.zeros(1)], lr=1.0))._multiplier
    ours = instantiate(cfg.lr_multiplier)
    assert cfg.train.max_iter == ycfg.SOLVER.MAX_ITER == steps
    assert cfg.train.checkpointer.period == ycfg.SOLVER.CHECKPOINT_PERIOD
    assert [ours(i / steps) for i in range(steps)] == [theirs(i / steps) for i in range(steps)]
    assert list(cfg.lr_multiplier.scheduler["values"]) == [1.0, ycfg.SOLVER.GAMMA]


def _write_lazy_config(path: Path, steps: int):
    """What LazyConfig.save writes: keys nested under train, other sections around it."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(
        "lr_multiplier:\n  scheduler:\n    num_updates: 999\n  warmup_length: 0.25\n"
        f"train:\n  checkpointer: {{max_to_keep: 100, period: 20}}\n  max_iter: {steps}\n"
        "  seed: 0\n")


def test_a_py_config_runs_with_its_own_overrides(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        out = Path(next(a for a in cmd if a.startswith("train.output_dir="))
                   .split("=", 1)[1].strip("'"))
        _write_metrics(out, 10.0, 30.0, 1.0)
        _write_lazy_config(out, 20)  # replaces the YAML one
        return subprocess.CompletedProcess(cmd, returncode=0)

    monkeypatch.setattr(ablate.subprocess, "run", fake_run)
    argv = ["--config-file", str(LAZY_DEMO), "--settings", "OHEM", "--seeds", "4",
            "--steps", "20", "--output", str(tmp_path)]
    ablate.main(argv + ["--", "model.test_score_thresh=0.0"])
    (cmd,) = calls
    assert cmd[cmd.index("--config-file") + 1] == str(LAZY_DEMO)
    assert "train.seed=4" in cmd and "train.max_iter=20" in cmd
    assert cmd[-1] == "model.test_score_thresh=0.0" and "SEED" not in cmd
    assert ablate.read_steps(ablate.run_dir(tmp_path, "OHEM", 4)) == 20
    ablate.main(argv)  # finished, with the same steps: not run again
    assert len(calls) == 1
    with pytest.raises(SystemExit, match="finished run of 20 steps, not 30"):
        ablate.main([a if a != "20" else "30" for a in argv])
    with pytest.raises(SystemExit):  # YAML-style overrides for a .py config: refused
        ablate.main(argv + ["--", "SEED", "1"])


@pytest.mark.slow
def test_one_tiny_real_run_of_the_py_config(tmp_path, monkeypatch):
    """test_one_tiny_real_run with the .py twin: OHEM (its loss written as a lazy call)."""
    _four_val_tiles(tmp_path, monkeypatch)
    opts = [
        "--",
        "model.backbone.bottom_up.features.pretrained=False",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "dataloader.train.dataset.names=deepforest_tree_val",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[200]",
        "dataloader.train.mapper.augmentations.0.max_size=200",
        "dataloader.test.mapper.augmentations.0.short_edge_length=200",
        "dataloader.test.mapper.augmentations.0.max_size=200",
        "model.test_score_thresh=0.0",
    ]  # fmt: skip
    argv = ["--config-file", str(LAZY_DEMO), "--settings", "OHEM", "--seeds", "3",
            "--steps", "2", "--output", str(tmp_path / "out")]
    results = ablate.main(argv + opts)

    run = ablate.run_dir(tmp_path / "out", "OHEM", 3)
    ap = results["OHEM"][3]
    assert 0.0 <= ap["AP"] <= ap["AP50"] <= 100.0
    config = (run / "config.yaml").read_text()
    assert "OHEMLoss" in config and "batch_size_per_image: 128" in config
    assert "seed: 3" in config and ablate.read_steps(run) == 2
    assert "Loaded 4 images in COCO format" in (run / "log.txt").read_text()
    assert f"{ap['AP']:.2f}" in (tmp_path / "out" / "table.md").read_text()
    with pytest.raises(SystemExit, match="finished run of 2 steps, not 3"):
        ablate.main([a if a != "2" else "3" for a in argv] + opts)
