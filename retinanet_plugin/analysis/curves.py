"""Training curves from detectron2's ``metrics.json``: a table (``results.csv``) and a picture
(``training_curves.png``) of the losses, the learning rate and the AP over iterations, for one
run or several side by side.

``metrics.json`` is what detectron2's ``JSONWriter`` appends: one JSON object a line, each with
an ``iteration`` and the scalars logged since the previous line (losses as the median of the
last 20 iterations, ``lr``, timings; an evaluation's ``bbox/AP``, ``bbox/AP50``, ... on a line of
their own at the iteration it ran, ``max_iter`` for the final one). :func:`read_metrics` merges
the lines of one iteration and handles a resumed run, which appends to the same file from its
checkpoint on: when the iterations go back, or a line repeats a key an iteration already has,
the lines from there on replace the earlier run's (later lines win).
"""

import csv
import json
import logging
import math
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "CURVES_PICTURE",
    "METRICS_FILE",
    "RESULTS_CSV",
    "ap_keys",
    "curves_figure",
    "find_runs",
    "loss_keys",
    "plot_training_curves",
    "read_metrics",
    "run_labels",
    "write_results_csv",
    "write_training_curves",
]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
RESULTS_CSV = "results.csv"
CURVES_PICTURE = "training_curves.png"
# detectron2's JSONWriter default: losses are logged as the median over this many iterations.
LOSS_WINDOW = 20

Record = Dict[str, Any]


def read_metrics(path: str) -> List[Record]:
    """The records of a ``metrics.json``, one per logged iteration, in iteration order.

    Lines of the same iteration are merged (the losses' line and an evaluation's). A resumed run
    rewrites iterations: a line whose iteration is lower than the previous line's drops every
    record from that iteration on, and a line repeating a key its iteration already holds
    replaces that record. A last line cut short (a run killed while writing) is skipped with a
    warning.

    Args:
        path: a ``metrics.json`` file, or the run folder holding one.

    Returns:
        list[dict]: each with ``iteration`` (int) and the scalars logged at it.

    Raises:
        FileNotFoundError: no such file; ValueError: a line (other than a cut-short last one)
        that is not a JSON object with an integer ``iteration``, naming the file and line.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no such file (detectron2's JSONWriter writes it during training, every "
            "20 iterations by default)"
        )
    with open(path) as f:
        lines = f.read().splitlines()
    records: "OrderedDict[int, Record]" = OrderedDict()
    last = None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                logger.warning("%s:%d: skipping a cut-short last line (%s)", path, number, e)
                continue
            raise ValueError(f"{path}:{number}: not a JSON line ({e})") from e
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise ValueError(f"{path}:{number}: a metrics line needs an integer 'iteration', got "
                             f"{line[:80]!r}")
        iteration = record["iteration"]
        if last is not None and iteration < last:
            # A resumed run starts over from its checkpoint: what the earlier run logged from
            # here on is replaced.
            for stale in [it for it in records if it >= iteration]:
                del records[stale]
        held = records.get(iteration)
        if held is not None and set(held).intersection(record) - {"iteration"}:
            held = None  # the same keys again: a rewrite of this iteration
        if held is None:
            records[iteration] = dict(record)
        else:
            held.update(record)
        last = iteration
    return [records[it] for it in sorted(records)]


def _columns(records: Sequence[Record]) -> List[str]:
    keys = sorted({k for r in records for k in r} - {"iteration"})
    return ["iteration"] + keys


def write_results_csv(
    runs: "Sequence[Tuple[str, Sequence[Record]]]", path: str, *, run_column: bool = False
) -> str:
    """Writes ``results.csv``: one row per logged iteration, columns ``iteration`` and the union
    of the logged keys (sorted; a key not logged at an iteration is an empty cell).

    Args:
        runs: (label, records of :func:`read_metrics`) of each run.
        path: the CSV file.
        run_column: a first column ``run`` with each row's label (several runs in one table).
    """
    columns = _columns([r for _, records in runs for r in records])
    if run_column:
        columns = ["run"] + columns
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for label, records in runs:
            for record in records:
                writer.writerow(dict(record, run=label) if run_column else record)
    os.replace(tmp, path)  # a reader never sees half a table
    return path


def loss_keys(records: Sequence[Record]) -> List[str]:
    """``total_loss`` first, then the ``loss_*`` keys, as logged."""
    keys = {k for r in records for k in r}
    return [k for k in ["total_loss"] + sorted(k for k in keys if k.startswith("loss_"))
            if k in keys]


def ap_keys(records: Sequence[Record]) -> List[str]:
    """The evaluation keys ``<task>/AP``, ``/AP50``, ``/AP75`` (``bbox/AP``, ``bbox_TTA/AP``,
    ...) as logged."""
    keys = {k for r in records for k in r}
    return sorted(k for k in keys if k.rsplit("/", 1)[-1] in ("AP", "AP50", "AP75") and "/" in k)


def _series(records: Sequence[Record], key: str) -> Tuple[List[int], List[float]]:
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(r["iteration"])
            ys.append(float(value))
    return xs, ys


_STYLES = ("-", "--", ":", "-.")
# AP, AP50, AP75: one evaluation is one point, told apart by its marker.
_MARKERS = ("o", "s", "^", "D")


def plot_training_curves(
    runs: "Sequence[Tuple[str, Sequence[Record]]]",
    path: str,
    *,
    title: Optional[str] = None,
    test_set: Optional[str] = None,
) -> str:
    """Writes :func:`curves_figure` to ``path`` (PNG, 1600x480 px); returns ``path``."""
    fig = curves_figure(runs, title=title, test_set=test_set)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)  # a viewer never sees half a picture
    return path


def _marker(is_ap: bool, index: int, points: int) -> Optional[str]:
    if is_ap:
        return _MARKERS[index % len(_MARKERS)]
    return "o" if points <= 2 else None


def curves_figure(
    runs: "Sequence[Tuple[str, Sequence[Record]]]",
    *,
    title: Optional[str] = None,
    test_set: Optional[str] = None,
) -> Any:
    """Three panels over iterations: the losses, the learning rate and the AP.

    One run: a colour per key. Several runs: a colour per run, a line style per key (losses:
    total solid, then each ``loss_*``; AP: AP solid, AP50 dashed, AP75 dotted).

    Args:
        runs: (label, records of :func:`read_metrics`) of each run.
        title: the figure's title (default: the run's label, or the number of runs).
        test_set: the evaluated dataset, named in the AP panel's title.

    Returns:
        matplotlib Figure: axes 0, 1, 2 are the losses, the learning rate and the AP; each line
        is labelled with its key (one run) or "label: key" (several).
    """
    # A Figure without pyplot: no GUI backend is chosen or changed (training, notebooks).
    import matplotlib
    from matplotlib.figure import Figure

    several = len(runs) > 1
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    fig = Figure(figsize=(16, 4.8))
    # One iteration axis for the three: an AP point sits under the losses it followed.
    ax_loss, ax_lr, ax_ap = fig.subplots(1, 3, sharex=True)
    # Several runs: a colour per run, a line style per key, so the keys' style is shared.
    all_losses = loss_keys([r for _, records in runs for r in records])
    all_aps = ap_keys([r for _, records in runs for r in records])
    for i, (label, records) in enumerate(runs):
        run_color = colors[i % len(colors)]
        for keys, ax in ((all_losses, ax_loss), (all_aps, ax_ap)):
            for j, key in enumerate(keys):
                xs, ys = _series(records, key)
                if not xs:
                    continue
                color = run_color if several else colors[j % len(colors)]
                # A series of one or two points (an evaluation, a short run) shows as markers.
                ax.plot(xs, ys, _STYLES[j % len(_STYLES)] if several else "-", color=color,
                        label=f"{label}: {key}" if several else key, linewidth=1.3,
                        marker=_marker(ax is ax_ap, j, len(xs)), markersize=5)
                if ax is ax_ap and key.endswith("/AP"):  # the last AP beside its point
                    text = f"{ys[-1]:.1f}" if ys[-1] >= 10 else f"{ys[-1]:.2f}"
                    ax.annotate(text, (xs[-1], ys[-1]), textcoords="offset points",
                                xytext=(-6, 5), ha="right", fontsize=8, color=color)
        xs, ys = _series(records, "lr")
        ax_lr.plot(xs, ys, color=run_color, label=label, linewidth=1.3,
                   marker="o" if len(xs) <= 2 else None, markersize=4)
    ax_loss.set_title(f"Training losses (median of {LOSS_WINDOW} iterations)")
    ax_loss.set_ylabel("loss (unitless)")
    ax_loss.set_ylim(bottom=0)
    ax_lr.set_title("Learning rate")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_ylim(bottom=0)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_ap.set_title("COCO AP" + (f" on {test_set}" if test_set else "")
                    + " (AP: IoU 0.5:0.95)")
    ax_ap.set_ylabel("AP (%)")
    if not all_aps:
        ax_ap.text(0.5, 0.5, "no evaluation logged yet", ha="center", va="center",
                   transform=ax_ap.transAxes, color="gray")
    for ax in (ax_loss, ax_lr, ax_ap):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    if several:
        from matplotlib.lines import Line2D

        # Runs by colour (learning-rate panel), keys by line style (the other two).
        ax_lr.legend(fontsize=8, loc="best", title="run", title_fontsize=8)
        for keys, ax in ((all_losses, ax_loss), (all_aps, ax_ap)):
            if keys:
                ax.legend([Line2D([], [], linestyle=_STYLES[j % len(_STYLES)], color="black",
                                  marker=_marker(ax is ax_ap, j, 3))
                           for j in range(len(keys))], keys, fontsize=8, loc="best")
    else:
        for ax in (ax_loss, ax_ap):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="best")
    if title is None:
        title = runs[0][0] if not several else f"{len(runs)} runs"
    fig.suptitle(f"Training curves: {title}")
    fig.tight_layout()
    return fig


def find_runs(paths: Sequence[str]) -> List[str]:
    """Run folders: each path that holds a ``metrics.json`` (or is one), else the folders below
    it that do (sorted; e.g. ``scripts/ablate.py``'s ``output/ablation`` gives every
    ``<setting>/seed<N>``).

    Raises:
        FileNotFoundError: a path that does not exist, or holds no ``metrics.json`` at any depth.
    """
    runs: List[str] = []
    for path in paths:
        if os.path.isfile(path):
            runs.append(os.path.dirname(os.path.abspath(path)))
            continue
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such run folder")
        if os.path.isfile(os.path.join(path, METRICS_FILE)):
            runs.append(path)
            continue
        found = sorted(root for root, _, files in os.walk(path) if METRICS_FILE in files)
        if not found:
            raise FileNotFoundError(f"{path}: no {METRICS_FILE} in it or below it")
        runs.extend(found)
    return runs


def run_labels(runs: Sequence[str]) -> List[str]:
    """Short labels: each run's path relative to the runs' common folder (its own name for
    one run)."""
    if len(runs) == 1:
        return [os.path.basename(os.path.abspath(runs[0]))]
    absolute = [os.path.abspath(r) for r in runs]
    common = os.path.commonpath(absolute)
    return [os.path.relpath(r, common) for r in absolute]


def write_training_curves(
    output_dir: str, *, test_set: Optional[str] = None, title: Optional[str] = None
) -> Tuple[str, str]:
    """``results.csv`` and ``training_curves.png`` of the run in ``output_dir`` (beside its
    ``metrics.json``), as the training hook writes them.

    Returns:
        (csv path, picture path).
    """
    records = read_metrics(output_dir)
    label = title or os.path.basename(os.path.abspath(output_dir))
    csv_path = write_results_csv([(label, records)], os.path.join(output_dir, RESULTS_CSV))
    picture = plot_training_curves([(label, records)], os.path.join(output_dir, CURVES_PICTURE),
                                   title=title or os.path.abspath(output_dir), test_set=test_set)
    return csv_path, picture
