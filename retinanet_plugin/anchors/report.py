"""The analysis report as fixed-width text tables."""

import textwrap
from typing import Any, Dict, Sequence

from .advice import shell_lines


def format_table(rows: Sequence[Dict[str, Any]], title: str) -> str:
    """A fixed-width text table of :func:`~.coverage.coverage_tables` rows."""
    head = f"{title:<28} {'boxes':>7} {'fg %':>7} {'low-q %':>8} {'none %':>7} " \
           f"{'med IoU':>8} {'fg/box':>7} {'kept %':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if not r["boxes"]:
            lines.append(f"{r['bucket']:<28} {0:>7}")
            continue
        lines.append(
            f"{r['bucket']:<28} {r['boxes']:>7} {r['foreground_pct']:>7.2f} "
            f"{r['low_quality_only_pct']:>8.2f} {r['uncovered_pct']:>7.2f} "
            f"{r['median_best_iou']:>8.3f} {r['mean_fg_anchors']:>7.2f} "
            f"{r['kept_after_matching_pct']:>7.2f}"
        )
    return "\n".join(lines)


def format_report(report: Dict[str, Any], syntax: str = "yaml") -> str:
    """The printed report: the one-line verdict, the tables, and the changes tried.

    Args:
        syntax: how the advised keys are printed: "yaml" (KEY VALUE pairs for ``train_net.py``
            with a YAML config) or "lazy" (``key=value`` words for a ``.py`` config).
    """
    cov = report["coverage"]
    s = cov["summary"]
    out = [
        report["verdict"],
        "",
        f"{report['boxes']} boxes in {report['images']} images of {report['datasets']}, at "
        f"training sizes {report['training_short_edges']} (max {report['max_size_train']}): "
        f"{s['boxes']} box-size pairs",
        f"matcher ({report['matcher']}): foreground IoU >= {report['fg_iou_threshold']:g}, "
        f"background < "
        f"{report['bg_iou_threshold']:g}, ALLOW_LOW_QUALITY_MATCHES "
        f"{report['allow_low_quality_matches']}",
        "",
    ]
    for key, title in (("by_class", "class"),
                       ("by_area", "area (training scale)"),
                       ("by_side_quartile", "sqrt(area) quartile"),
                       ("by_aspect_ratio", "aspect ratio h/w"),
                       ("by_training_size", "training size"),):
        if key in cov:
            out += [format_table(cov[key], title), ""]
    out += [format_table([s], "all boxes"), ""]
    out.append("foreground anchors per box: " + ", ".join(
        f"{k}: {v}" for k, v in cov["fg_anchors_per_box"].items()))
    out.append("  kept after matching:      " + ", ".join(
        f"{k}: {v}" for k, v in cov["kept_fg_anchors_per_box"].items()))
    out.append("boxes whose best anchor is on each level: " + ", ".join(
        f"{k}: {n}" for k, n in cov["best_level"].items()))
    tiny = report.get("too_small_for_grid")
    if tiny and tiny["smaller"]:
        out += ["", textwrap.fill(
                f"{tiny['smaller']} of the {tiny['uncovered']} box-size pairs without a "
                f"foreground anchor are smaller than {tiny['side_px']:g} px "
                f"({tiny['side_px'] / tiny['finest_stride']:.1f} strides of the finest level, "
                f"stride {tiny['finest_stride']}): off-grid by half a stride, such a "
                "box stays below the threshold with any anchor of its size; a finer level "
                "(smaller stride) can help them more than other anchor sizes.", width=96)]
    if "proposal" in report:
        out += ["", *_format_advice(report, syntax)]
    return "\n".join(out)


def _format_advice(report: Dict[str, Any], syntax: str) -> list:
    """The changes tried, each with the coverage measured with it; keys for those that gain at
    least the margin, the advised one first."""
    before = report["coverage"]["summary"]["foreground_pct"]
    margin = report["min_gain"]
    entries = report["advice"]
    (h, w), count = report["anchors_per_image"]["image_hw"], report["anchors_per_image"]["count"]
    out = textwrap.wrap(
        "Changes tried, each measured by re-running the analysis on the changed config. A "
        f"change helps when it gives >= {margin:g} more percentage points of boxes a foreground "
        "anchor (--min-gain); the cheapest that helps (fewest anchors per image) is advised, "
        f"unless a costlier one gains >= {margin:g} points more:", width=96)
    order = sorted(range(len(entries)), key=lambda i: i != report.get("advised"))
    for i in order:
        e = entries[i]
        if "error" in e:
            out.append(f"- {e['title']}: could not be measured ({e['error']})")
            continue
        status = ("ADVISED" if i == report.get("advised") else
                  "also helps" if e["helps"] else f"not advised, under --min-gain {margin:g}")
        out.append(f"- {e['title']}: {before:.2f}% -> {e['foreground_pct']:.2f}% "
                   f"({e['gain_points']:+.2f} points), median best IoU "
                   f"{report['coverage']['summary']['median_best_iou']:.3f} -> "
                   f"{e['coverage']['summary']['median_best_iou']:.3f}, anchors per "
                   f"{h}x{w} image {count:,} -> {e['anchors_per_image']:,}: {status}")
        if e["helps"]:
            where = ("after train_net.py --config-file CONFIG (or set in the YAML file)"
                     if syntax == "yaml" else "after train_net.py --config-file CONFIG.py")
            out.append(f"  keys, {where}:")
            out += ["    " + line for line in shell_lines(e["arguments"], syntax)]
    for kind, reason in report.get("not_tried", {}).items():
        out.append(f"- {kind}: not tried, {reason}")
    advised = report.get("advised")
    if advised is not None:
        out += ["", format_table(entries[advised]["coverage"]["by_area"], "advised: area")]
        if "by_class" in entries[advised]["coverage"]:
            out += ["", format_table(entries[advised]["coverage"]["by_class"], "advised: class")]
    return out
