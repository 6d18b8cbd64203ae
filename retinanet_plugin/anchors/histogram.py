"""The best-anchor-IoU histogram, drawn as a PNG."""

from typing import Optional

import cv2
import numpy as np

from .coverage import Coverage
from .proposal import Proposal


def save_histogram(path: str, current: Coverage, proposal: Optional[Proposal],
                   bg_threshold: float) -> str:
    """PNG histogram of every box's best anchor IoU, in bins of 0.02, with the proposal's beside
    it when it differs; the matcher's thresholds are marked. Drawn with OpenCV (milliseconds,
    where importing matplotlib takes seconds)."""
    series = [(current.best_iou, (200, 120, 40), "config's anchors")]
    if proposal is not None and proposal.improved:
        series.append((proposal.coverage.best_iou, (40, 140, 240), "proposed anchors"))
    bins = 50
    counts = [np.histogram(np.clip(v, 0, 1), bins=bins, range=(0, 1))[0] for v, _, _ in series]
    top = max(1, max(int(c.max()) for c in counts))
    width, height, left, right, bottom, upper = 860, 420, 70, 20, 60, 50
    plot_w, plot_h = width - left - right, height - bottom - upper
    img = np.full((height, width, 3), 255, np.uint8)
    bar = plot_w / bins

    def x_of(iou: float) -> int:
        return int(round(left + iou * plot_w))

    def y_of(count: float) -> int:
        return int(round(upper + plot_h * (1 - count / top)))

    for k, (c, (_, color, _)) in enumerate(zip(counts, series)):
        share = bar / len(series)
        for i, n in enumerate(c.tolist()):
            if n:
                x0 = int(round(left + i * bar + k * share))
                cv2.rectangle(img, (x0, y_of(n)), (int(round(x0 + share)) - 1, y_of(0)), color,
                              -1)
    black, font = (0, 0, 0), cv2.FONT_HERSHEY_SIMPLEX
    cv2.line(img, (left, upper), (left, y_of(0)), black, 1)
    cv2.line(img, (left, y_of(0)), (left + plot_w, y_of(0)), black, 1)
    for t in np.linspace(0, 1, 11):
        cv2.line(img, (x_of(t), y_of(0)), (x_of(t), y_of(0) + 5), black, 1)
        cv2.putText(img, f"{t:.1f}", (x_of(t) - 10, y_of(0) + 20), font, 0.4, black, 1)
    for n in np.linspace(0, top, 5):
        cv2.putText(img, f"{n:.0f}", (8, y_of(n) + 4), font, 0.4, black, 1)
    for thr, color in ((current.fg_threshold, (0, 150, 0)), (bg_threshold, (0, 0, 200))):
        for y in range(upper, y_of(0), 8):  # dashed
            cv2.line(img, (x_of(thr), y), (x_of(thr), min(y + 4, y_of(0))), color, 1)
    cv2.putText(img, "best anchor IoU of each ground-truth box (training scale); boxes per bin",
                (left, height - 15), font, 0.45, black, 1)
    legend = [(color, f"{name} ({len(v)})") for v, color, name in series] + [
        ((0, 150, 0), f"foreground >= {current.fg_threshold:g}"),
        ((0, 0, 200), f"background < {bg_threshold:g}"),
    ]
    x = left
    for color, text in legend:
        cv2.rectangle(img, (x, 18), (x + 12, 30), color, -1)
        cv2.putText(img, text, (x + 16, 29), font, 0.42, black, 1)
        x += 24 + cv2.getTextSize(text, font, 0.42, 1)[0][0]
    if not cv2.imwrite(path, img):
        raise OSError(f"could not write {path}")
    return path
