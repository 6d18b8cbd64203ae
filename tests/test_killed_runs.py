"""A training run killed with SIGKILL at any moment resumes and ends as if never interrupted.

train_net.py runs as a subprocess (tests/killable_train.py) on four DeepForest tiles and is killed
(SIGKILL to its process group, loader worker included) mid-step, inside a checkpoint save (after
the temporary file is written, before its rename) or right after a checkpoint. ``--resume`` then
continues from the last complete checkpoint, reaches MAX_ITER, runs the final evaluation, and
ends with exactly (bit for bit) the parameters of an uninterrupted run: the checkpoint restores
model, optimizer, scheduler, iteration and the loss normaliser's moving average; the sampler
continues the data stream where the checkpoint was taken, and DATALOADER.PER_IMAGE_SEED makes the
random flips depend only on the image's position in that stream.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train_net import DEMO_CONFIG, FAST_OPTS, REPO, TINY, _load_train_net, datasets_dir

import detectron2
from detectron2.data import MetadataCatalog
from detectron2.engine import default_argument_parser

from retinanet_plugin import RetinaNetCheckpointer
from retinanet_plugin.checkpoint import TMP_PREFIX

__all__ = ["datasets_dir"]  # the fixture, shared with test_train_net.py

pytestmark = pytest.mark.slow

MAX_ITER = 5
# Checkpoints after iterations 1 and 3 (CHECKPOINT_PERIOD 2: iteration + 1 divisible by 2), and
# model_final after iteration 4 = MAX_ITER - 1.
OPTS = FAST_OPTS + [
    "SOLVER.MAX_ITER", str(MAX_ITER),
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "DATASETS.TRAIN", f"('{TINY}',)",
    "DATASETS.TEST", f"('{TINY}',)",
    # Near-prior scores after 5 steps: keep them so that the final evaluation has detections.
    "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
    "TEST.DETECTIONS_PER_IMAGE", "100",
    "DATALOADER.NUM_WORKERS", "1",  # a real worker process, killed with the trainer
    "DATALOADER.PER_IMAGE_SEED", "True",
    "INPUT.RANDOM_FLIP", "horizontal",  # random augmentation that the resume must replay
]  # fmt: skip


def _args(output_dir, resume=False):
    argv = ["--config-file", str(DEMO_CONFIG)] + ["--resume"] * resume
    return argv + OPTS + ["OUTPUT_DIR", str(output_dir)]


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _optimizer_state(checkpoint):
    # detectron2 0.6: saved by RetinaNetCheckpointer as "optimizer"; later detectron2 saves it
    # itself inside the trainer's state.
    if "optimizer" in checkpoint:
        return checkpoint["optimizer"]
    return checkpoint["trainer"]["_trainer"]["optimizer"]


def _run_until_killed(tmp_path, out, datasets_dir, kill_at, resume):
    marker = tmp_path / "reached"
    marker.unlink(missing_ok=True)
    meta = MetadataCatalog.get(TINY)
    # The test's own PYTHONPATH kept after the repository: a detectron2 checkout that shadows the
    # installed one (the suite run against upstream) must be the killed runs' detectron2 too.
    pythonpath = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(pythonpath),
        OMP_NUM_THREADS="1",
        DETECTRON2_DATASETS=str(datasets_dir),
        KILL_AT=kill_at,
        KILL_MARKER=str(marker),
        TINY_DATASET=f"{TINY}:{meta.json_file}:{meta.image_root}",
    )
    log = tmp_path / "killed_run.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "killable_train.py")] + _args(out, resume),
            env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"exited {proc.returncode} early:\n{log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its loader worker, like a preemption
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Checkpoints are resumed in this process too: both must have run the same detectron2.
    assert f"detectron2 from {os.path.dirname(detectron2.__file__)}\n" in log.read_text()
    return marker.read_text()


def _check_left(out, last_complete, unfinished=()):
    """What a kill left: last_checkpoint names a complete file, every .pth file loads."""
    assert (out / "last_checkpoint").read_text() == last_complete
    for path in out.glob("*.pth"):
        iteration = MAX_ITER - 1 if path.stem == "model_final" else int(path.stem.split("_")[1])
        assert _load(path)["iteration"] == iteration, path
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(TMP_PREFIX)) == list(
        unfinished
    )


def _starts(out):
    log = (out / "log.txt").read_text()  # appended to by every run in out
    return [int(n) for n in re.findall(r"Starting training from iteration (\d+)", log)]


@pytest.fixture
def one_thread():
    # The killed runs are subprocesses with OMP_NUM_THREADS=1; the in-process runs must sum in the
    # same order to compare bit for bit (2 threads split the convolutions' reductions otherwise).
    # Earlier tests in this process compiled the fused kernels for many dtypes and alphas; past
    # Dynamo's recompile limit a new variant runs eagerly, which rounds differently from the
    # subprocesses' compiled kernels. A reset gives this process the subprocesses' fresh state.
    torch._dynamo.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_killed_three_times_ends_as_uninterrupted(datasets_dir, tmp_path, one_thread):
    """One run killed mid-step, then (resumed) inside a checkpoint save, then (resumed) right
    after a checkpoint, then resumed to the end, against an uninterrupted run."""
    train_net = _load_train_net()
    reference = tmp_path / "uninterrupted"
    train_net.main(
        default_argument_parser().parse_args(_args(reference) + ["DATASETS.TEST", "()"])
    )
    out = tmp_path / "run"

    # Killed inside iteration 2's forward: the checkpoint of iteration 1 is the last one.
    _run_until_killed(tmp_path, out, datasets_dir, "step:2", resume=False)
    _check_left(out, "model_0000001.pth")

    # Resumed at 2, killed inside the save of iteration 3's checkpoint, after its temporary file
    # was written and fsync'ed, before the rename: it never becomes a checkpoint.
    unfinished = _run_until_killed(tmp_path, out, datasets_dir, "save:model_0000003.pth", True)
    assert os.path.isfile(unfinished)
    _check_left(out, "model_0000001.pth", unfinished=[os.path.basename(unfinished)])
    assert not (out / "model_0000003.pth").exists()

    # Resumed at 2 again (the unfinished save removed), killed right after that checkpoint.
    _run_until_killed(tmp_path, out, datasets_dir, "tagged:model_0000003.pth", True)
    _check_left(out, "model_0000003.pth")
    removed = f"Removing {unfinished}: a save that was interrupted before completion"
    assert removed in (out / "log.txt").read_text()

    # Resumed at 3 + 1, trains to MAX_ITER, evaluates.
    train_net.main(default_argument_parser().parse_args(_args(out, resume=True)))
    assert _starts(out) == [0, 2, 2, 4]
    _check_left(out, "model_final.pth")
    final = _load(out / "model_final.pth")
    assert final["iteration"] == MAX_ITER - 1
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert 0.0 <= records[-1]["bbox/AP50"] <= 100.0, records[-1]  # the final evaluation ran

    # Bit for bit the uninterrupted run's weights, optimizer state and loss normaliser.
    expected = _load(reference / "model_final.pth")
    assert final["model"].keys() == expected["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(final["model"][key], value), key
    momenta = _optimizer_state(final)["state"]
    for index, state in _optimizer_state(expected)["state"].items():
        assert torch.equal(momenta[index]["momentum_buffer"], state["momentum_buffer"]), index
    assert final["loss_normalizers"] == expected["loss_normalizers"]


def test_failed_save_keeps_last_complete_checkpoint(tmp_path, monkeypatch):
    """A save that dies while writing (here: torch.save raises after writing part of the file)
    leaves the previous checkpoint and last_checkpoint as they were, and no partial file."""
    model = torch.nn.Linear(3, 2)
    checkpointer = RetinaNetCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001", iteration=1)
    save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")  # the first bytes of a zip checkpoint
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save("model_0000002", iteration=2)
    monkeypatch.setattr(torch, "save", save)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000001.pth")
    assert _load(tmp_path / "model_0000001.pth")["iteration"] == 1


def test_resume_removes_only_dead_writers_temp_files(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process (until reused)
    left_by_kill = tmp_path / f"{TMP_PREFIX}model_0000005.pth-{dead.pid}-0a1b2c3d"
    # e.g. a training run still writing while another process evaluates the same OUTPUT_DIR
    being_written = tmp_path / f"{TMP_PREFIX}model_0000006.pth-{os.getppid()}-0a1b2c3d"
    left_by_kill.write_bytes(b"partial")
    being_written.write_bytes(b"partial")
    RetinaNetCheckpointer(torch.nn.Linear(3, 2), str(tmp_path)).resume_or_load("", resume=True)
    assert sorted(tmp_path.iterdir()) == [being_written]
