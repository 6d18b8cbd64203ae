"""The report's pictures: precision-recall curves, the confusion matrix, the error breakdown
(matplotlib, Agg) and the worst images (detectron2 records drawn by
:func:`retinanet_plugin.visualize.draw_prediction_grid`)."""

import os
from typing import Any, Dict, List, Sequence, Tuple

import cv2
import numpy as np

from ...visualize import GROUND_TRUTH_COLOR, draw_prediction_grid
from .confusion import ConfusionResult, ImageErrors
from .errors import ERROR_TYPES, ErrorBreakdown
from .per_class import ClassRow, PRCurve

__all__ = ["plot_confusion", "plot_errors", "plot_pr_curves", "draw_worst_image"]

# Curves drawn per panel; the CSV holds every class.
MAX_CURVES = 10


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def plot_pr_curves(curves: Sequence[PRCurve], table: Sequence[ClassRow], path: str) -> str:
    """One panel per IoU: each class's interpolated precision against recall (area "all", 100
    detections per image), its AP at that IoU in the legend. More than :data:`MAX_CURVES`
    classes: those with the most ground truth."""
    plt = _pyplot()
    ious = sorted({c.iou for c in curves}) or [0.5, 0.75]
    by_gt = [r.category_id for r in sorted(table, key=lambda r: (-r.num_gt, r.category_id))]
    shown = set(by_gt[:MAX_CURVES])
    fig, axes = plt.subplots(1, len(ious), figsize=(5.2 * len(ious), 4.6), squeeze=False)
    for ax, iou in zip(axes[0], ious):
        for c in (c for c in curves if c.iou == iou and c.category_id in shown):
            ax.plot(c.recall, c.precision, label=f"{c.name} (AP{round(iou * 100)} {c.ap:.1f})")
        subset = "" if len(table) <= MAX_CURVES else (
            f"\n{MAX_CURVES} of {len(table)} classes (most ground truth)")
        ax.set_title(f"IoU {iou:.2f}, area all, 100 detections/image{subset}", fontsize=10)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision (interpolated)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="upper right", fontsize=9)
        else:
            ax.text(0.5, 0.5, "no class with ground truth", ha="center", transform=ax.transAxes)
    fig.suptitle("Precision-recall per class (COCOeval, 101-point interpolation)")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_confusion(confusion: ConfusionResult, path: str) -> str:
    """Counts with the background last; colour = share of the row (ground truth of a class, or
    all false detections for the background row), so rare classes stay visible."""
    plt = _pyplot()
    labels = list(confusion.names) + ["background"]
    n = len(labels)
    counts = confusion.matrix.astype(np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    share[-1, -1] = np.nan  # background vs background: not a count
    side = min(24.0, max(4.8, 0.55 * n + 2.6))
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    cmap = plt.get_cmap("Blues").with_extremes(bad="#dddddd")
    image = ax.imshow(share, cmap=cmap, vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticklabels(labels)
    ax.set_xlabel("detection")
    ax.set_ylabel("ground truth")
    if n <= 30:
        fontsize = 14 if n <= 3 else (9 if n <= 12 else 6)
        for i in range(n):
            for j in range(n):
                if i == n - 1 and j == n - 1:
                    ax.text(j, i, "-", ha="center", va="center", fontsize=fontsize)
                    continue
                value = int(confusion.matrix[i, j])
                dark = share[i, j] > 0.55
                ax.text(j, i, f"{value:,}", ha="center", va="center", fontsize=fontsize,
                        color="white" if dark else "black")
    ax.set_title(
        f"Confusion matrix: detections scoring >= {confusion.score_thresh:.2f},\n"
        f"matched at IoU >= {confusion.iou_thresh:.2f} (COCOeval, class-agnostic)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


_METRICS = (("AP50", "#4c72b0"), ("AP75", "#dd8452"), ("AP", "#55a868"))


def plot_errors(breakdown: ErrorBreakdown, path: str) -> str:
    """Horizontal bars: AP gained if each error type alone were fixed, for AP50, AP75 and
    AP@[.5:.95] (those analysed), the errors counted at IoU 0.5 beside each type."""
    plt = _pyplot()
    metrics = [(m, c) for m, c in _METRICS if not np.isnan(breakdown.base(m))]
    fig, ax = plt.subplots(figsize=(8.4, 4.8))
    y = np.arange(len(ERROR_TYPES))
    height = 0.8 / max(1, len(metrics))
    top = 0.0
    for i, (metric, color) in enumerate(metrics):
        gains = [breakdown.gain(t, metric) for t in ERROR_TYPES]
        label = f"{metric if metric != 'AP' else 'AP@[.5:.95]'} (now {breakdown.base(metric):.1f})"
        bars = ax.barh(y + (i - (len(metrics) - 1) / 2) * height, gains, height, color=color,
                       label=label)
        for bar, gain in zip(bars, gains):
            ax.text(bar.get_width() + 0.3, bar.get_y() + bar.get_height() / 2, f"+{gain:.1f}",
                    va="center", fontsize=8)
        top = max([top] + gains)
    counts = breakdown.counts
    t0 = breakdown.iou_thresholds[0]
    ax.set_yticks(y)
    ax.set_yticklabels([f"{t}\n({counts[t][t0]:,} at IoU {t0:.2f})" for t in ERROR_TYPES],
                       fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(5.0, top * 1.18))
    ax.set_xlabel("AP gained if fixed (AP points)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    ax.set_title(
        "What costs AP: each error type fixed alone, AP re-computed by COCOeval\n"
        f"(foreground IoU = the AP's threshold, background IoU {breakdown.background_iou:.1f})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_worst_image(
    record: Dict[str, Any],
    results: Sequence[Dict[str, Any]],
    errors: ImageErrors,
    rank: int,
    *,
    score_thresh: float,
    iou_thresh: float,
    class_names: Sequence[str],
    dataset_id_to_contiguous_id: Dict[int, int],
) -> np.ndarray:
    """One image drawn as the detections picture draws it (ground truth thin green, detections
    in class colours with "class score" labels), its errors marked (missed ground truth yellow,
    a white line inside false detections), with a band below stating its errors, the
    thresholds and the colours.

    Returns:
        ndarray: (H, W, 3) uint8 BGR.
    """
    own = [r for r in results if r["image_id"] == record["image_id"]]
    tile = draw_prediction_grid(
        [record], own, score_thresh=score_thresh, max_images=1, columns=1,
        class_names=class_names, dataset_id_to_contiguous_id=dataset_id_to_contiguous_id,
    )
    height = record.get("height") or cv2.imread(record["file_name"]).shape[0]
    _mark_errors(tile, tile.shape[0] / height, errors)
    kept = sum(r["score"] >= score_thresh for r in own)
    lines = [
        f"#{rank}  image id {record['image_id']}: {errors.missed} missed, {errors.false} false "
        f"(score >= {score_thresh:.2f}, IoU >= {iou_thresh:.2f})",
        f"{errors.num_gt} ground-truth boxes, {kept} detections drawn",
    ]
    if kept == 0:
        lines.append(f"no detection scored >= {score_thresh:.2f} on this image")
    return _with_legend(tile, lines)


# BGR: missed ground truth over the thin green of all ground truth; false detections get a
# white line inside their class-coloured box.
MISSED_COLOR = (0, 255, 255)
FALSE_MARK_COLOR = (255, 255, 255)


def _xyxy(box: Sequence[float], scale: float) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    x, y, w, h = (float(v) * scale for v in box)
    return (int(round(x)), int(round(y))), (int(round(x + w)), int(round(y + h)))


def _mark_errors(tile: np.ndarray, scale: float, errors: ImageErrors) -> None:
    """Missed ground truth in yellow, a white inner line in false detections (in place)."""
    for box in errors.missed_boxes:
        cv2.rectangle(tile, *_xyxy(box, scale), MISSED_COLOR, 2)
    for box in errors.false_boxes:
        (x0, y0), (x1, y1) = _xyxy(box, scale)
        if x1 - x0 > 8 and y1 - y0 > 8:
            cv2.rectangle(tile, (x0 + 3, y0 + 3), (x1 - 3, y1 - 3), FALSE_MARK_COLOR, 1)


def _with_legend(tile: np.ndarray, lines: List[str]) -> np.ndarray:
    """``tile`` above a white band holding ``lines`` and the colour legend."""
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.55, 1
    line_h = 24
    legend = (
        (GROUND_TRUTH_COLOR, None, "ground truth (thin)"),
        (MISSED_COLOR, None, "missed ground truth"),
        ((0, 0, 255), None, "detection 'class score' (colour per class)"),
        ((0, 0, 255), FALSE_MARK_COLOR, "false detection (white inner line)"),
    )
    rows = len(lines) + (len(legend) + 1) // 2
    band = np.full((line_h * rows + 12, tile.shape[1], 3), 255, dtype=np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(band, text, (8, line_h * (i + 1)), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    half = tile.shape[1] // 2
    for i, (color, inner, text) in enumerate(legend):
        x, y = 8 + (i % 2) * half, line_h * (len(lines) + 1 + i // 2)
        cv2.rectangle(band, (x, y - 14), (x + 32, y + 2), color, 2)
        if inner is not None:
            cv2.rectangle(band, (x + 4, y - 10), (x + 28, y - 2), inner, 1)
            cv2.rectangle(band, (x + 3, y - 11), (x + 29, y - 1), (128, 128, 128), 1)
        cv2.putText(band, text, (x + 40, y), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    return np.concatenate([tile, band], axis=0)


def save_image(image: np.ndarray, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # JPEG at quality 90: a drawn photo in a few hundred KB instead of MBs of PNG.
    if not cv2.imwrite(path, image, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise OSError(f"cannot write {path}")
    return path
