"""Training curves: metrics.json -> results.csv / training_curves.png, the training hook, the
tool on several runs."""

import csv
import json
import logging
import math

import cv2
import pytest
import torch
from torch import nn

from detectron2.engine import SimpleTrainer, hooks
from detectron2.utils.events import JSONWriter

from retinanet_plugin.analysis import curves
from retinanet_plugin.engine import TrainingCurvesHook
from retinanet_plugin.tools import training_curves as tool


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


# A run logged every 2 iterations up to 5, killed, resumed from its checkpoint at iteration 2:
# iterations 3 and 5 are logged again with other values, and the evaluation of the final
# iteration (6 = max_iter) comes on a line of its own. The first run's iteration 5 and its
# bbox/AP at 5 must be gone; the same-iteration eval line merges with nothing (6 is new).
RESUMED_RUN = [
    '{"iteration": 1, "total_loss": 2.0, "loss_cls": 1.5, "lr": 0.001}',
    '{"iteration": 3, "total_loss": 1.8, "loss_cls": 1.2, "lr": 0.002}',
    '{"iteration": 5, "total_loss": 1.6, "loss_cls": 1.0, "lr": 0.003, "bbox/AP": 3.0}',
    '{"iteration": 3, "total_loss": 1.7, "loss_cls": 1.1, "lr": 0.002}',
    '{"iteration": 5, "total_loss": 1.5, "loss_cls": 0.9, "lr": 0.003}',
    '{"iteration": 6, "bbox/AP": 12.5, "bbox/AP50": 30.0, "bbox/APs": NaN}',
]


def test_read_metrics_merges_and_takes_a_resumed_runs_later_lines(tmp_path):
    _write(tmp_path / "metrics.json", RESUMED_RUN)
    records = curves.read_metrics(str(tmp_path))
    assert [r["iteration"] for r in records] == [1, 3, 5, 6]
    assert records[1] == {"iteration": 3, "total_loss": 1.7, "loss_cls": 1.1, "lr": 0.002}
    assert "bbox/AP" not in records[2]  # the killed run's evaluation at 5 was replaced
    assert records[3]["bbox/AP"] == 12.5 and math.isnan(records[3]["bbox/APs"])

    # An eval line at an iteration the losses' line already has: merged, not replaced.
    _write(tmp_path / "metrics.json", RESUMED_RUN[:2] + ['{"iteration": 3, "bbox/AP": 4.0}'])
    assert curves.read_metrics(str(tmp_path))[1] == {
        "iteration": 3, "total_loss": 1.8, "loss_cls": 1.2, "lr": 0.002, "bbox/AP": 4.0}


def test_results_csv_equals_metrics(tmp_path):
    _write(tmp_path / "metrics.json", RESUMED_RUN + ['{"iteration": 7, "total_lo'])  # cut short
    csv_path, picture = curves.write_training_curves(str(tmp_path))
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    # Columns: iteration, then the union of keys, sorted.
    assert list(rows[0]) == ["iteration", "bbox/AP", "bbox/AP50", "bbox/APs", "loss_cls", "lr",
                             "total_loss"]
    assert [r["iteration"] for r in rows] == ["1", "3", "5", "6"]
    assert rows[1]["total_loss"] == "1.7" and rows[2]["loss_cls"] == "0.9"
    assert rows[2]["bbox/AP"] == "" and rows[3]["bbox/AP"] == "12.5"
    assert rows[3]["total_loss"] == "" and rows[3]["bbox/APs"] == "nan"
    image = cv2.imread(picture)
    assert image.shape == (480, 1600, 3)


def test_picture_draws_the_records(tmp_path):
    _write(tmp_path / "metrics.json", RESUMED_RUN)
    records = curves.read_metrics(str(tmp_path))
    fig = curves.curves_figure([("run", records)], test_set="val")
    ax_loss, ax_lr, ax_ap = fig.axes
    lines = {ax: {line.get_label(): line for line in ax.get_lines()} for ax in fig.axes}
    assert list(lines[ax_loss]) == ["total_loss", "loss_cls"]
    assert list(lines[ax_loss]["total_loss"].get_xdata()) == [1, 3, 5]
    assert list(lines[ax_loss]["total_loss"].get_ydata()) == [2.0, 1.7, 1.5]
    assert list(lines[ax_lr].values())[0].get_ydata().tolist() == [0.001, 0.002, 0.003]
    # NaN APs (no box of that size) are not drawn; AP and AP50 at the final evaluation only.
    assert sorted(lines[ax_ap]) == ["bbox/AP", "bbox/AP50"]
    assert list(lines[ax_ap]["bbox/AP"].get_xydata()[0]) == [6, 12.5]
    assert "val" in ax_ap.get_title() and ax_ap.get_xlabel() == "iteration"
    assert ax_ap.get_ylabel() == "AP (%)"


def test_bad_line_is_named(tmp_path):
    _write(tmp_path / "metrics.json", ['{"iteration": 1}', "not json", '{"iteration": 2}'])
    with pytest.raises(ValueError, match=r"metrics.json:2: not a JSON line"):
        curves.read_metrics(str(tmp_path))
    _write(tmp_path / "metrics.json", ['{"total_loss": 1.0}'])
    with pytest.raises(ValueError, match=r"metrics.json:1: .*integer 'iteration'"):
        curves.read_metrics(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        curves.read_metrics(str(tmp_path / "nowhere"))


class _Quadratic(nn.Module):
    """Two 'losses' of one weight: enough for detectron2's SimpleTrainer."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(3.0))

    def forward(self, batch):
        return {"loss_cls": (self.w - 1) ** 2, "loss_box_reg": (self.w - 1).abs()}


def _train(out, max_iter=6, eval_period=4, extra=(), writer_period=2):
    model = _Quadratic()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SimpleTrainer(model, iter([None] * max_iter), optimizer)
    evals = []

    def evaluate():
        evals.append(trainer.iter)
        return {"bbox": {"AP": 10.0 * len(evals), "AP50": 20.0 * len(evals)}}

    # As DefaultTrainer orders them: evaluation, then the writer, then the curves.
    trainer.register_hooks([
        hooks.LRScheduler(optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.1)),
        hooks.EvalHook(eval_period, evaluate),
        hooks.PeriodicWriter([JSONWriter(str(out / "metrics.json"))], period=writer_period),
        TrainingCurvesHook(str(out), "val"),
        *extra,
    ])
    trainer.train(0, max_iter)
    return trainer


def test_hook_writes_after_each_evaluation_and_at_the_end(tmp_path, monkeypatch):
    seen = []

    def spy(output_dir, **kwargs):
        result = curves.write_training_curves(output_dir, **kwargs)
        with open(result[0]) as f:
            seen.append([row["bbox/AP"] for row in csv.DictReader(f) if row["bbox/AP"]])
        return result

    monkeypatch.setattr("retinanet_plugin.engine.hooks.write_training_curves", spy)
    _train(tmp_path)
    # Evaluations after iteration 3 (period 4) and at the end (iteration 6 = max_iter); the
    # curves were redrawn after the first with its AP, and after training with both.
    assert seen == [["10.0"], ["10.0", "20.0"]]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    records = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    merged = curves.read_metrics(str(tmp_path))
    assert len(records) >= len(merged) == len(rows)
    for row, record in zip(rows, merged):
        assert {k: v for k, v in row.items() if v != ""} == {k: str(v) for k, v in record.items()}
    assert (tmp_path / "training_curves.png").is_file()


def test_hook_waits_for_the_writer_when_the_periods_differ(tmp_path, monkeypatch):
    """Evaluations after iterations 3 and 7 (period 4), the writer after 2, 5 and 8 (period 3):
    each evaluation's AP reaches metrics.json at the writer's next flush (5, then 8), and the
    curves are redrawn then, not before with the AP still missing."""
    seen = []

    def spy(output_dir, **kwargs):
        result = curves.write_training_curves(output_dir, **kwargs)
        with open(result[0]) as f:
            seen.append([row["bbox/AP"] for row in csv.DictReader(f) if row.get("bbox/AP")])
        return result

    monkeypatch.setattr("retinanet_plugin.engine.hooks.write_training_curves", spy)
    _train(tmp_path, max_iter=10, writer_period=3)
    # The third evaluation is the last step's (iteration 9), drawn after training.
    assert seen == [["10.0"], ["10.0", "20.0"], ["10.0", "20.0", "30.0"]]


def test_a_failing_picture_does_not_stop_training(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(curves, "plot_training_curves", broken)
    checkpoints = []

    class Checkpoint(hooks.HookBase):  # stands for PeriodicCheckpointer's final save
        def after_train(self):
            checkpoints.append(self.trainer.iter)

    with caplog.at_level(logging.WARNING, logger="retinanet_plugin.engine.hooks"):
        trainer = _train(tmp_path, extra=[Checkpoint()])
    assert trainer.iter == 6 and checkpoints == [6]
    assert "Training curves not written (RuntimeError: no fonts)" in caplog.text
    assert (tmp_path / "metrics.json").is_file()


def test_tool_overlays_ablation_runs(tmp_path):
    # scripts/ablate.py's layout: <output>/<setting>/seed<N>/metrics.json
    for setting, ap in (("CE", 5.0), ("FL-g2", 9.0)):
        run = tmp_path / "ablation" / setting / "seed0"
        run.mkdir(parents=True)
        _write(run / "metrics.json", [f'{{"iteration": 19, "total_loss": {ap / 10}}}',
                                      f'{{"iteration": 200, "bbox/AP": {ap}}}'])
    csv_path, picture = tool.main(["--runs", str(tmp_path / "ablation")])
    assert csv_path == str(tmp_path / "ablation" / "results.csv")
    with open(csv_path) as f:
        rows = [(r["run"], r["iteration"], r["bbox/AP"], r["total_loss"])
                for r in csv.DictReader(f)]
    assert rows == [("CE/seed0", "19", "", "0.5"), ("CE/seed0", "200", "5.0", ""),
                    ("FL-g2/seed0", "19", "", "0.9"), ("FL-g2/seed0", "200", "9.0", "")]
    with pytest.raises(SystemExit, match="3 labels for 2 runs"):
        tool.main(["--runs", str(tmp_path / "ablation"), "--labels", "a", "b", "c"])
