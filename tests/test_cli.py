"""train_net.py's command line as a new user types it: flags after the KEY VALUE pairs, and a run
whose data fails its check ending with the list of problems (exit status 1, no traceback).

The data are test_own_data's small synthetic "shapes" COCO files, broken on purpose; runs stop
in ``setup()``, before a model is built, so even the subprocess runs take seconds.
"""

import os
import runpy
import subprocess
import sys
from unittest import mock

import pytest
from test_own_data import DEMO_CONFIG, FAST_OPTS, REPO, _shapes
from test_train_net import _load_train_net

from retinanet_plugin.engine import argument_parser, run_main

HEADING = "Stopped before building the model; the data has these problems:"


@pytest.fixture(scope="module")
def train_net():
    return _load_train_net()


@pytest.fixture(autouse=True)
def eager_focal_loss(monkeypatch):
    monkeypatch.setenv("RETINANET_PLUGIN_COMPILE", "0")


def _bad_data(folder):
    """Two shapes images: annotation 101 has category 7 (only 1 exists) and img0.png lost its
    second half. Returns (the dataset's opts, the two problem lines check_coco_json gives)."""
    data = _shapes(folder, n=2)
    coco = data.read_text().replace('"id": 101, "image_id": 11, "category_id": 1', (
        '"id": 101, "image_id": 11, "category_id": 7'))
    assert coco != data.read_text()
    data.write_text(coco)
    png = folder / "images" / "img0.png"
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    entry = f"[['bad_shapes', '{data}', '{folder / 'images'}']]"
    problems = [
        f"{data}: annotation id 101 (image id 11, img1.png): category_id 7 not in categories [1]",
        f"{data}: image id 10 (img0.png): image file {png} is truncated: a PNG file must end "
        "with b'IEND' and this one does not",
    ]
    return ["DATASETS.COCO_INSTANCES", entry, "DATASETS.TRAIN", "('bad_shapes',)"], problems


def _train_net_command(*argv):
    # The test's PYTHONPATH after the repository, as tests/test_killed_runs.py does: a detectron2
    # checkout that shadows the installed one is the subprocess's detectron2 too.
    pythonpath = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(REPO / "train_net.py"), *argv],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=300,
    )  # fmt: skip


def _assert_ends_with_problems(proc, problems, out):
    tail = proc.stdout[-3000:]
    assert proc.returncode == 1, tail
    assert "Traceback" not in proc.stdout, tail
    last_lines = proc.stdout.rstrip("\n").splitlines()[-len(problems) - 1 :]
    assert last_lines == [HEADING, *problems], tail
    assert not list(out.glob("model_*.pth")) and not (out / "metrics.json").exists()


def test_bad_data_ends_the_run_with_its_problems(tmp_path):
    opts, problems = _bad_data(tmp_path / "data")
    out = tmp_path / "out"
    proc = _train_net_command(
        "--config-file", str(DEMO_CONFIG), *FAST_OPTS, "OUTPUT_DIR", str(out), *opts,
        "SOLVER.MAX_ITER", "1",
    )  # fmt: skip
    _assert_ends_with_problems(proc, problems, out)
    # The log before them is the usual one: the config was read and the check ran.
    assert "Command Line Args:" in proc.stdout and "Full config saved to" in proc.stdout


@pytest.mark.slow
def test_bad_data_in_two_processes_ends_the_run_with_its_problems(tmp_path):
    # Each GLOO worker checks the data in its setup(); the parent gets the error as text.
    opts, problems = _bad_data(tmp_path / "data")
    out = tmp_path / "out"
    proc = _train_net_command(
        "--config-file", str(DEMO_CONFIG), "--num-gpus", "2", "--dist-url", "auto", *FAST_OPTS,
        "OUTPUT_DIR", str(out), *opts, "SOLVER.MAX_ITER", "1",
    )  # fmt: skip
    _assert_ends_with_problems(proc, problems, out)


def test_unregistered_dataset_and_bad_check_mode_end_plainly(train_net, tmp_path, capsys):
    base = ["--config-file", str(DEMO_CONFIG), *FAST_OPTS, "OUTPUT_DIR", str(tmp_path / "out")]
    cases = [
        (["DATASETS.TRAIN", "('no_such_dataset',)"],
         "dataset 'no_such_dataset' (DATASETS.TRAIN / DATASETS.TEST) is not registered"),
        (["DATASETS.CHECK", "quick"],
         "DATASETS.CHECK must be one of ('off', 'header', 'decode'), got 'quick'"),
    ]  # fmt: skip
    for opts, problem in cases:
        args = argument_parser().parse_args(base + opts)
        with pytest.raises(SystemExit) as exit_:
            run_main(train_net.main, args, device="cpu")
        assert exit_.value.code == 1
        lines = capsys.readouterr().err.rstrip("\n").splitlines()
        assert lines[-2] == HEADING
        assert lines[-1].startswith(problem), lines[-1]


def _raises_value_error(args):
    raise ValueError("a bug, not the user's data")


def test_other_errors_keep_their_traceback():
    args = argument_parser().parse_args([])
    with pytest.raises(ValueError, match="a bug, not the user's data"):
        run_main(_raises_value_error, args, device="cpu")


# -- flags after the KEY VALUE pairs ---------------------------------------------------------


def _train_net_args(*argv):
    """The args train_net.py's ``__main__`` hands to the launcher (which does not run)."""
    with mock.patch("retinanet_plugin.engine.cli.launch") as launch, \
            mock.patch.object(sys, "argv", ["train_net.py", *argv]):  # fmt: skip
        runpy.run_path(str(REPO / "train_net.py"), run_name="__main__")
    return launch.call_args.kwargs["args"][0]


def test_flags_after_the_overrides():
    opts = ["SOLVER.MAX_ITER", "10", "OUTPUT_DIR", "out"]
    args = _train_net_args("--config-file", str(DEMO_CONFIG), *opts, "--resume")
    assert args.resume and not args.eval_only
    assert args.opts == opts and args.config_file == str(DEMO_CONFIG)

    # Anywhere among them, with values too (--num-gpus 2, --dist-url=auto).
    args = argument_parser().parse_args(
        ["SOLVER.MAX_ITER", "10", "--eval-only", "MODEL.WEIGHTS", "w.pth", "--num-gpus", "2",
         "--dist-url=auto", "--config-file", "c.yaml"]
    )  # fmt: skip
    assert args.eval_only and not args.resume
    assert (args.num_gpus, args.dist_url, args.config_file) == (2, "auto", "c.yaml")
    assert args.opts == ["SOLVER.MAX_ITER", "10", "MODEL.WEIGHTS", "w.pth"]

    # Before them, as detectron2 documents it, nothing changes.
    args = argument_parser().parse_args(["--resume", "--config-file", "c.yaml", *opts])
    assert args.resume and args.opts == opts


def test_a_misspelled_flag_is_named(capsys):
    with pytest.raises(SystemExit) as exit_:
        argument_parser().parse_args(
            ["--config-file", "c.yaml", "SOLVER.MAX_ITER", "10", "--resum"]
        )
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "come in KEY VALUE pairs; got 3 words: SOLVER.MAX_ITER 10 --resum" in error
    assert "--resum: not among the flags" in error and "--resume" in error


def test_help_says_where_flags_go(capsys):
    with pytest.raises(SystemExit):
        argument_parser().parse_args(["--help"])
    assert "Flags may come before or after the KEY VALUE pairs" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Overrides after a list option's files: predict --input, export --check-images
# --------------------------------------------------------------------------------------------
def test_looks_like_override(tmp_path):
    from retinanet_plugin.engine.cli import looks_like_override

    for word in ("MODEL.RETINANET.SCORE_THRESH_TEST", "SEED", "OUTPUT_DIR", "TEST.AMP.ENABLED",
                 "model.test_score_thresh=0.3", "train.max_iter=10"):
        assert looks_like_override(word), word
    # File names, globs (also ones that start like a key), folders, values, and a lazy-looking
    # word without "=".
    for word in ("a.png", "IMG_001.JPG", "frames/*.png", "datasets/MODEL.png", "0.3",
                 "model.pth", "weights=x.pth", "INPUT.*", "TEST.v2/*.png", "TEST.v2/**/*.png",
                 "MODEL.[ab].png", "./MODEL.png"):
        assert not looks_like_override(word), word
    # A lazy value may hold glob characters: only the key is looked at.
    assert looks_like_override("model.anchor_generator.sizes=[[16]]")
    # An existing file is a file, whatever its name.
    (tmp_path / "MODEL.X").write_text("")
    assert not looks_like_override(str(tmp_path / "MODEL.X"))


@pytest.mark.parametrize("tool", ["predict", "export"])
def test_overrides_after_the_files_are_overrides(tool, tmp_path):
    from retinanet_plugin.tools import export, predict

    image = str(tmp_path / "a.png")
    if tool == "predict":
        parse, option, dest = predict.parse_args, "--input", "input"
        base = ["--config-file", "c.yaml", "--weights", "w.pth", "--output", "out"]
    else:
        parse, option, dest = export.parse_args, "--check-images", "check_images"
        base = ["--config-file", "c.yaml", "--weights", "w.pth", "--format", "onnx",
                "--output", "m.onnx"]
    args = parse(base + [option, image, "b/*.png", "MODEL.DEVICE", "cpu", "SEED", "3"])
    assert getattr(args, dest) == [image, "b/*.png"]
    assert args.opts == ["MODEL.DEVICE", "cpu", "SEED", "3"]
    # Overrides before and after another flag keep their order; lazy key=value words too.
    args = parse(base[:-2] + [option, image, "model.test_score_thresh=0.3", base[-2], base[-1],
                              "train.device=cpu"])
    assert getattr(args, dest) == [image]
    assert args.opts == ["model.test_score_thresh=0.3", "train.device=cpu"]
    # Without overrides, nothing moves; a "--" before the overrides is dropped.
    assert getattr(parse(base + [option, image]), dest) == [image]
    args = parse(base + [option, image, "--", "MODEL.DEVICE", "cpu"])
    assert (getattr(args, dest), args.opts) == ([image], ["MODEL.DEVICE", "cpu"])
    # The option given twice: the files of both, the overrides after the first kept.
    args = parse(base + [option, image, "MODEL.DEVICE", "cpu", option, "frames", "SEED", "3"])
    assert getattr(args, dest) == [image, "frames"]
    assert args.opts == ["MODEL.DEVICE", "cpu", "SEED", "3"]


def test_predict_refuses_overrides_in_place_of_its_input(capsys):
    from retinanet_plugin.tools import predict

    with pytest.raises(SystemExit):
        predict.parse_args(["--config-file", "c.yaml", "--weights", "w.pth", "--output", "o",
                            "--input", "MODEL.DEVICE", "cpu"])
    err = capsys.readouterr().err
    assert "--input names no image" in err and "./MODEL.DEVICE" in err
