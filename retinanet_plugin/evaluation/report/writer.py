"""The evaluation report: why the AP is what it is, from COCOEvaluator's results file.

:func:`write_report` reads ``coco_instances_results.json`` and the ground truth as
``COCOEvaluator`` reads it, and writes into one folder (``<OUTPUT_DIR>/inference/<dataset>/
report`` after an evaluation by ``train_net.py``):

- ``report.md``: every table below with the pictures, the model's size and cost when known;
- ``per_class.csv``: AP, AP50, AP75, AR@100 per class (:mod:`.per_class`);
- ``pr_curves.png`` / ``.csv``: precision-recall per class at IoU 0.5 and 0.75;
- ``confusion_matrix.png`` / ``.csv``: counts with a background row and column
  (:mod:`.confusion`);
- ``errors.png`` / ``.csv``: AP gained if each error type were fixed (:mod:`.errors`);
- ``worst_<rank>.jpg`` (JPEG: photos) and ``worst_images.csv``: the images with the most
  missed + false detections, drawn with ground truth and detections;
- ``report.json``: the numbers of all of them.

:func:`evaluation_reports` is what ``train_net.py`` (both kinds of config) wraps an evaluation
in: it writes each test set's report on the main process when the evaluation wrote a new results
file, and a failure there is logged as a warning, never raised into a training run.
"""

import contextlib
import csv
import io
import json
import logging
import os
import time
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from pycocotools.cocoeval import COCOeval

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm

from ..coco import faster_cocoeval_class
from .confusion import ConfusionResult, confusion_matrix, worst_images
from .data import evaluator_ground_truth, load_results, read_results_file, run_cocoeval
from .errors import ERROR_TYPES, ErrorBreakdown, error_breakdown
from .figures import draw_worst_image, plot_confusion, plot_errors, plot_pr_curves, save_image
from .per_class import ClassRow, per_class_table, pr_curves

__all__ = [
    "ReportSettings",
    "evaluation_reports",
    "model_cost_of",
    "report_settings",
    "write_report",
]

logger = logging.getLogger(__name__)

REPORT_FOLDER = "report"


class ReportSettings(NamedTuple):
    """``TEST.REPORT.*`` (a ``.py`` config: ``dataloader.report``, the same keys in lower case).

    Attributes:
        enabled: write a report after each evaluation of ``train_net.py`` (off by default: it
            costs seconds on the demo's 16 tiles, minutes on COCO).
        score_thresh: the confusion matrix and the worst images count detections scoring at
            least this.
        iou_thresh: ... matched to ground truth at IoU at least this.
        worst_images: how many of the worst images to draw.
        model_cost: add the model's parameters and FLOPs (``retinanet_plugin.analysis``).
    """

    enabled: bool = False
    score_thresh: float = 0.3
    iou_thresh: float = 0.5
    worst_images: int = 4
    model_cost: bool = True


def report_settings(cfg: Any) -> ReportSettings:
    """The settings of a YAML config (``TEST.REPORT``) or a ``.py`` config (``dataloader.report``,
    a dict; absent keys take the YAML defaults)."""
    if isinstance(cfg, CfgNode):
        node = cfg.TEST.get("REPORT")
        if node is None:
            return ReportSettings()
        values = {k.lower(): v for k, v in node.items()}
    else:
        values = dict(cfg.dataloader.get("report") or {})
    unknown = sorted(set(values) - set(ReportSettings._fields))
    if unknown:
        where = "TEST.REPORT" if isinstance(cfg, CfgNode) else "dataloader.report"
        raise ValueError(
            f"{where} has unknown keys {unknown}; known: {list(ReportSettings._fields)}"
        )
    return ReportSettings(**values)


def _gain(value: float) -> str:
    return "n/a" if value != value else f"+{value:.1f}"


def _fmt(value: float) -> str:
    return "nan" if value != value else f"{value:.2f}"


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return lines


def _overall(E) -> Dict[str, float]:
    """COCOeval's headline box AP (percent), as COCOEvaluator reports them."""
    with contextlib.redirect_stdout(io.StringIO()):
        E.summarize()
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    return {n: float(100 * v) if v >= 0 else float("nan") for n, v in zip(names, E.stats[:6])}


def _model_cost_section(cost: Any) -> List[str]:
    if cost is None:
        return ["Not computed (TEST.REPORT.MODEL_COST, a .py config's "
                "dataloader.report.model_cost, is off)."]
    if isinstance(cost, str):
        return [cost]
    from ...analysis import format_model_cost

    return [format_model_cost(cost)]


def write_report(
    dataset_name: str,
    results_file: str,
    output_dir: str,
    settings: Optional[ReportSettings] = None,
    *,
    model_cost: Any = None,
    title: str = "",
) -> Dict[str, Any]:
    """Writes the report of ``results_file`` (COCO results on ``dataset_name``) into
    ``output_dir``; returns its numbers (also in ``report.json``).

    Args:
        dataset_name: a registered dataset with ground truth.
        results_file: ``coco_instances_results.json`` as ``COCOEvaluator`` writes it.
        output_dir: the report's folder (created).
        settings: thresholds of the confusion matrix and worst images (default: the YAML
            defaults, :class:`ReportSettings`).
        model_cost: :func:`retinanet_plugin.analysis.model_cost`'s dict, a line of text saying
            why there is none, or None.
        title: first line of report.md (default: the dataset and the results file).
    """
    start = time.perf_counter()
    settings = settings or ReportSettings()
    results = read_results_file(results_file)
    os.makedirs(output_dir, exist_ok=True)
    # COCOEvaluator keeps a converted copy of a dataset without COCO file beside its results.
    gt = evaluator_ground_truth(dataset_name, os.path.dirname(os.path.abspath(results_file)))
    dt = load_results(gt, results, source=f"results file {results_file}")
    E = run_cocoeval(gt, dt)  # COCOEvaluator's run: default params
    overall = _overall(E)
    table = per_class_table(E)
    curves = pr_curves(E)
    confusion = confusion_matrix(gt, results, score_thresh=settings.score_thresh,
                                 iou_thresh=settings.iou_thresh)
    worst = worst_images(confusion, settings.worst_images)
    # The ~60 AP re-runs with faster-coco-eval when installed (the same AP, C++ speed).
    breakdown = error_breakdown(gt, results, cocoeval_class=faster_cocoeval_class() or COCOeval)

    files = {
        "pr_curves": plot_pr_curves(curves, table, os.path.join(output_dir, "pr_curves.png")),
        "confusion_matrix": plot_confusion(confusion,
                                           os.path.join(output_dir, "confusion_matrix.png")),
        "errors": plot_errors(breakdown, os.path.join(output_dir, "errors.png")),
    }
    worst_files = _draw_worst(dataset_name, results, worst, settings, output_dir)
    _write_tables(output_dir, table, curves, confusion, breakdown, worst)
    summary = {
        "dataset": dataset_name,
        "results_file": os.path.abspath(results_file),
        "num_images": len(gt.getImgIds()),
        "num_detections": len(results),
        "overall": overall,
        "per_class": [r._asdict() for r in table],
        "confusion": {"score_thresh": confusion.score_thresh, "iou_thresh": confusion.iou_thresh,
                      "labels": confusion.names + ["background"],
                      "matrix": confusion.matrix.tolist()},
        "errors": {
            "iou_thresholds": list(breakdown.iou_thresholds),
            "background_iou": breakdown.background_iou,
            "base": {m: breakdown.base(m) for m in ("AP50", "AP75", "AP")},
            "gain": {t: {m: breakdown.gain(t, m) for m in ("AP50", "AP75", "AP")}
                     for t in ERROR_TYPES},
            "counts": {t: {f"{k:.2f}": v for k, v in breakdown.counts[t].items()}
                       for t in ERROR_TYPES},
        },
        "worst_images": [
            {"image_id": w.image_id, "missed": w.missed, "false": w.false, "gt": w.num_gt,
             "detections": w.num_dets, "file": f} for w, f in zip(worst, worst_files)
        ],
        "model_cost": model_cost if isinstance(model_cost, (dict, str)) else None,
        "files": files,
    }
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    title = title or f"Evaluation report: {dataset_name}"
    _write_markdown(os.path.join(output_dir, "report.md"), title, summary, table, confusion,
                    breakdown, worst, worst_files, model_cost)
    logger.info("Evaluation report of %s in %s (%.1f s)\n%s", dataset_name, output_dir,
                time.perf_counter() - start, summary_text(summary))
    return summary


def summary_text(summary: Dict[str, Any]) -> str:
    """A few lines for the log: the AP, what costs it most, the worst image."""
    o, e = summary["overall"], summary["errors"]
    # Largest gain first; an undefined gain (NaN: e.g. "missed" when every object is missed,
    # which leaves no ground truth to score) last, written "n/a".
    gains = sorted(ERROR_TYPES, key=lambda t: -e["gain"][t]["AP"] if e["gain"][t]["AP"] ==
                   e["gain"][t]["AP"] else float("inf"))
    lines = [
        f"AP {_fmt(o['AP'])}  AP50 {_fmt(o['AP50'])}  AP75 {_fmt(o['AP75'])}",
        "AP gained if fixed (AP@[.5:.95] / AP50 / AP75): " + ", ".join(
            f"{t} " + " / ".join(_gain(e["gain"][t][m]) for m in ("AP", "AP50", "AP75"))
            for t in gains),
    ]
    if summary["worst_images"]:
        w = summary["worst_images"][0]
        c = summary["confusion"]
        lines.append(f"worst image: id {w['image_id']}, {w['missed']} missed and {w['false']} "
                     f"false at score >= {c['score_thresh']:.2f}, IoU >= {c['iou_thresh']:.2f}")
    return "\n".join(lines)


def _draw_worst(dataset_name, results, worst, settings, output_dir) -> List[str]:
    if not worst:
        return []
    records = {r["image_id"]: r for r in DatasetCatalog.get(dataset_name)}
    meta = MetadataCatalog.get(dataset_name)
    files = []
    for rank, errors in enumerate(worst, 1):
        record = records.get(errors.image_id)
        if record is None:
            raise ValueError(f"image id {errors.image_id} of the ground truth is not a record "
                             f"of dataset {dataset_name}")
        image = draw_worst_image(
            record, results, errors, rank, score_thresh=settings.score_thresh,
            iou_thresh=settings.iou_thresh, class_names=meta.get("thing_classes", []),
            dataset_id_to_contiguous_id=meta.get("thing_dataset_id_to_contiguous_id", {}),
        )
        files.append(save_image(image, os.path.join(output_dir, f"worst_{rank}.jpg")))
    return files


def _write_tables(output_dir, table, curves, confusion, breakdown, worst) -> None:
    _write_csv(os.path.join(output_dir, "per_class.csv"),
               ["category_id", "class", "gt", "detections", "AP", "AP50", "AP75", "AR100"],
               [(r.category_id, r.name, r.num_gt, r.num_dets, _fmt(r.ap), _fmt(r.ap50),
                 _fmt(r.ap75), _fmt(r.ar100)) for r in table])
    _write_csv(os.path.join(output_dir, "pr_curves.csv"),
               ["category_id", "class", "iou", "recall", "precision"],
               [(c.category_id, c.name, f"{c.iou:.2f}", f"{r:.2f}", f"{p:.6f}")
                for c in curves for r, p in zip(c.recall, c.precision)])
    labels = confusion.names + ["background"]
    _write_csv(os.path.join(output_dir, "confusion_matrix.csv"),
               [f"ground truth \\ detection (score >= {confusion.score_thresh:.2f}, "
                f"IoU >= {confusion.iou_thresh:.2f})"] + labels,
               [[labels[i]] + row for i, row in enumerate(confusion.matrix.tolist())])
    _write_csv(os.path.join(output_dir, "errors.csv"),
               ["error", "count at IoU 0.50", "count at IoU 0.75", "AP50 gained", "AP75 gained",
                "AP gained"],
               [(t, breakdown.counts[t].get(0.5, ""), breakdown.counts[t].get(0.75, ""),
                 _fmt(breakdown.gain(t, "AP50")), _fmt(breakdown.gain(t, "AP75")),
                 _fmt(breakdown.gain(t, "AP"))) for t in ERROR_TYPES])
    _write_csv(os.path.join(output_dir, "worst_images.csv"),
               ["rank", "image_id", "missed", "false", "gt", "detections"],
               [(i, w.image_id, w.missed, w.false, w.num_gt, w.num_dets)
                for i, w in enumerate(worst, 1)])


def _write_markdown(path, title, summary, table: Sequence[ClassRow], confusion: ConfusionResult,
                    breakdown: ErrorBreakdown, worst, worst_files, model_cost) -> None:
    o = summary["overall"]
    lines = [f"# {title}", "",
             f"{summary['num_images']} images, {summary['num_detections']} detections from "
             f"`{summary['results_file']}`, scored by pycocotools' COCOeval as COCOEvaluator "
             "scores them (box AP, area all, 100 detections per image).", "",
             f"AP {_fmt(o['AP'])} / AP50 {_fmt(o['AP50'])} / AP75 {_fmt(o['AP75'])} / "
             f"APs {_fmt(o['APs'])} / APm {_fmt(o['APm'])} / APl {_fmt(o['APl'])}", "",
             "## Per class", ""]
    lines += _markdown_table(
        ["class", "gt", "detections", "AP", "AP50", "AP75", "AR@100"],
        [(r.name, r.num_gt, r.num_dets, _fmt(r.ap), _fmt(r.ap50), _fmt(r.ap75), _fmt(r.ar100))
         for r in table])
    lines += ["", "![precision-recall](pr_curves.png)", "", "## What costs AP", "",
              "Each error type fixed alone, AP re-computed by COCOeval; foreground IoU = the AP's "
              f"threshold, background IoU {breakdown.background_iou:.1f} (definitions: "
              "`retinanet_plugin/evaluation/report/errors.py`). Gains do not add up.", ""]
    lines += _markdown_table(
        ["error", "count at IoU 0.50", "count at IoU 0.75", "AP50 gained", "AP75 gained",
         "AP@[.5:.95] gained"],
        [(t, breakdown.counts[t].get(0.5, "-"), breakdown.counts[t].get(0.75, "-"),
          f"+{_fmt(breakdown.gain(t, 'AP50'))}", f"+{_fmt(breakdown.gain(t, 'AP75'))}",
          f"+{_fmt(breakdown.gain(t, 'AP'))}") for t in ERROR_TYPES])
    lines += ["", "![errors](errors.png)", "",
              f"## Confusion matrix (score >= {confusion.score_thresh:.2f}, IoU >= "
              f"{confusion.iou_thresh:.2f})", "",
              "Rows: ground truth; columns: detections; matched by COCOeval without classes.", ""]
    labels = confusion.names + ["background"]
    lines += _markdown_table(["gt \\ det"] + labels,
                             [[labels[i]] + row for i, row in
                              enumerate(confusion.matrix.tolist())])
    lines += ["", "![confusion matrix](confusion_matrix.png)", "",
              f"## The {len(worst)} worst images (most missed + false detections)", ""]
    if not worst:
        lines.append("No image has a missed or false detection at these thresholds.")
    lines += _markdown_table(["rank", "image id", "missed", "false", "gt", "detections"],
                             [(i, w.image_id, w.missed, w.false, w.num_gt, w.num_dets)
                              for i, w in enumerate(worst, 1)]) if worst else []
    for f in worst_files:
        lines += ["", f"![worst]({os.path.basename(f)})"]
    lines += ["", "## Model size and cost", ""] + _model_cost_section(model_cost) + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _results_version(path: str) -> Optional[Tuple[int, int]]:
    from ...engine.predictions_picture import results_version

    return results_version(path)


@contextlib.contextmanager
def evaluation_reports(
    targets: Sequence[Tuple[str, str]],
    settings: ReportSettings,
    model_cost: Optional[Callable[[], Any]] = None,
) -> Iterator[None]:
    """Around an evaluation: afterwards, the report of each (dataset, results file) whose file
    the evaluation wrote, in ``<results folder>/report`` (main process only; errors logged as
    warnings, never raised).

    Args:
        targets: (dataset name, the results file its COCOEvaluator writes).
        model_cost: called once for the model's cost (see :func:`write_report`).
    """
    if not settings.enabled or not comm.is_main_process():
        yield
        return
    before = {path: _results_version(path) for _, path in targets}
    yield
    cost = None
    for dataset_name, path in targets:
        version = _results_version(path)
        if version is None or version == before[path]:
            continue  # no new detections (none at all, or an evaluation that did not write)
        try:
            if cost is None and settings.model_cost and model_cost is not None:
                cost = _safe_cost(model_cost)
            write_report(dataset_name, path, os.path.join(os.path.dirname(path), REPORT_FOLDER),
                         settings, model_cost=cost)
        except Exception as e:  # a report must never end a training run
            logger.warning("Evaluation report of %s not written: %s: %s", dataset_name,
                           type(e).__name__, e, exc_info=True)


def model_cost_of(cfg: Any, model: Any) -> Callable[[], Any]:
    """The cost of the evaluated ``model`` (a DDP wrapper unwrapped) on a square image of the
    test loader's shorter side resized as the test loader resizes it, as
    ``retinanet_plugin.analysis.model_cost(cfg)`` counts it, without building a second model
    (which would draw from the random state of a run in progress)."""

    def cost() -> Any:
        import numpy as np

        from ...analysis import model_cost
        from ...tools.model_setup import test_min_size, to_model_input

        side = test_min_size(cfg) or 800
        resized = to_model_input(cfg, np.zeros((side, side, 3), dtype=np.uint8)).shape[-2:]
        return model_cost(getattr(model, "module", model), image_size=tuple(resized))

    return cost


def _safe_cost(model_cost: Callable[[], Any]) -> Any:
    try:
        return model_cost()
    except Exception as e:
        logger.warning("model cost not computed: %s: %s", type(e).__name__, e)
        return f"Not computed: {type(e).__name__}: {e}"
