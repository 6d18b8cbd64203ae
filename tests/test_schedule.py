"""A SOLVER.MAX_ITER that the schedule's STEPS or WARMUP_ITERS do not fit is named before
training, with an override that fits; the config keeps its values."""

import logging
from pathlib import Path

import pytest
from test_own_data import DEMO_CONFIG, FAST_OPTS, _shapes
from test_train_net import _load_train_net

from detectron2.config import get_cfg

from retinanet_plugin import add_retinanet_plugin_config
from retinanet_plugin.config import load_config
from retinanet_plugin.engine import argument_parser, schedule_problems

REPO = Path(__file__).resolve().parents[1]


def _solver(max_iter, steps=(60000, 80000), warmup=1000, scheduler="WarmupMultiStepLR"):
    cfg = add_retinanet_plugin_config(get_cfg())
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS = max_iter, steps, warmup
    cfg.SOLVER.LR_SCHEDULER_NAME = scheduler
    return cfg


def test_steps_and_warmup_beyond_max_iter_are_named_with_a_fix():
    # The 1x schedule run for 1000 iterations, as `SOLVER.MAX_ITER 1000` alone makes it.
    steps, warmup = schedule_problems(_solver(1000))
    assert steps.startswith("SOLVER.STEPS (60000, 80000) with SOLVER.MAX_ITER 1000: the learning "
                            "rate never decays at 60000, 80000")  # fmt: skip
    # 60000 and 80000 x (1000 x 8/9) / 80000 = 666.7 and 888.9: the 1x shape at 1000 iterations.
    assert 'Scale them with it: e.g. SOLVER.STEPS "(667, 889)" (their proportions' in steps
    # 1000 x 1000 / 90000 = 11.1
    assert warmup.startswith("SOLVER.WARMUP_ITERS 1000 with SOLVER.MAX_ITER 1000: the run ends in")
    assert "e.g. SOLVER.WARMUP_ITERS 11 " in warmup

    # A step at MAX_ITER never comes either (the last iteration is MAX_ITER - 1).
    (problem,) = schedule_problems(_solver(160, steps=(100, 160), warmup=10))
    assert "never decays at 160 " in problem
    # 100 and 160 x (160 x 8/9) / 160 = 88.9 and 142.2
    assert 'SOLVER.STEPS "(89, 142)"' in problem
    # One step: a one-element tuple, as YAML and the command line read it.
    (problem,) = schedule_problems(_solver(90, steps=(160,), warmup=10))
    assert 'SOLVER.STEPS "(80,)"' in problem


def test_a_schedule_that_fits_is_not_named():
    assert schedule_problems(_solver(90000)) == []  # the 1x schedule
    assert schedule_problems(_solver(80001, warmup=0)) == []
    # No steps: only the warm-up is named (1000 x 1000 / 90000 = 11.1).
    (problem,) = schedule_problems(_solver(1000, steps=()))
    assert problem.startswith("SOLVER.WARMUP_ITERS 1000 with SOLVER.MAX_ITER 1000")
    assert "below SOLVER.BASE_LR 0.001. Scale it with MAX_ITER: e.g. SOLVER.WARMUP_ITERS 11 " in (
        problem
    )
    # The cosine schedule does not read STEPS.
    assert schedule_problems(_solver(1000, warmup=10, scheduler="WarmupCosineLR")) == []


def test_the_fix_scales_the_config_files_schedule():
    # The demo's schedule (MAX_ITER 200, STEPS (160,), WARMUP_ITERS 50) with `SOLVER.MAX_ITER
    # 40`: both scaled by 40 / 200 (160 -> 32, 50 -> 10), as own_data.md says to.
    planned = _solver(200, steps=(160,), warmup=50)
    steps, warmup = schedule_problems(_solver(40, steps=(160,), warmup=50), planned)
    assert 'Scale them with it: SOLVER.STEPS "(32,)" (x 40 / 200, as SOLVER.MAX_ITER' in steps
    assert "Scale it with MAX_ITER: SOLVER.WARMUP_ITERS 10 (x 40 / 200, as" in warmup
    # STEPS overridden too: the file's steps are not the run's, the 1x shape (40 x 8/9 = 35.6).
    (steps, _) = schedule_problems(_solver(40, steps=(100,), warmup=50), planned)
    assert 'e.g. SOLVER.STEPS "(36,)"' in steps
    # A file whose own schedule does not fit: scaled (320 x 100 / 200 = 160), still too late.
    (steps,) = schedule_problems(_solver(100, steps=(320,), warmup=5), _solver(200, (320,), 5))
    assert 'e.g. SOLVER.STEPS "(89,)"' in steps  # 100 x 8/9 = 88.9


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_fit_their_schedule(config):
    assert schedule_problems(load_config(str(config))) == []


@pytest.fixture
def plugin_log(caplog):
    # train_net.setup() gives "retinanet_plugin" its own handlers (no propagation to the root,
    # where caplog listens): listen on it directly.
    plugin_logger = logging.getLogger("retinanet_plugin")
    plugin_logger.addHandler(caplog.handler)
    yield caplog
    plugin_logger.removeHandler(caplog.handler)


def _schedule_warnings(caplog):
    return [
        r.getMessage() for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("SOLVER.")
    ]  # fmt: skip


def test_train_net_warns_before_training_and_keeps_the_values(tmp_path, plugin_log, monkeypatch):
    monkeypatch.setenv("RETINANET_PLUGIN_COMPILE", "0")
    train_net = _load_train_net()
    data = _shapes(tmp_path)
    entry = f"[['schedule_shapes', '{data}', '{tmp_path / 'images'}']]"
    opts = ["DATASETS.COCO_INSTANCES", entry, "DATASETS.TRAIN", "('schedule_shapes',)"]
    # The demo's own schedule (STEPS (160,), WARMUP_ITERS 50, MAX_ITER 200) fits.
    fast = dict(zip(FAST_OPTS[::2], FAST_OPTS[1::2]))
    del fast["SOLVER.STEPS"], fast["SOLVER.WARMUP_ITERS"]
    argv = ["--config-file", str(DEMO_CONFIG), *[w for kv in fast.items() for w in kv]]
    args = argument_parser().parse_args(argv + ["OUTPUT_DIR", str(tmp_path / "out"), *opts])
    cfg = train_net.setup(args)
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS) == (200, (160,), 50)
    assert not _schedule_warnings(plugin_log)

    # The same run shortened to 100 iterations: the step at 160 never comes.
    args.opts += ["SOLVER.MAX_ITER", "100"]
    cfg = train_net.setup(args)
    assert cfg.SOLVER.STEPS == (160,) and cfg.SOLVER.MAX_ITER == 100  # warned, not changed
    (warning,) = _schedule_warnings(plugin_log)
    assert warning.startswith(
        "SOLVER.STEPS (160,) with SOLVER.MAX_ITER 100: the learning rate never decays at 160"
    )
    # The demo config's own MAX_ITER is 200: 160 x 100 / 200 = 80.
    assert 'Scale them with it: SOLVER.STEPS "(80,)" (x 100 / 200, as SOLVER.MAX_ITER' in warning

    # --eval-only does not train: no schedule to check.
    plugin_log.clear()
    args.eval_only = True
    train_net.setup(args)
    assert not _schedule_warnings(plugin_log)
