"""The analysis report as fixed-width text tables."""

import textwrap
from typing import Any, Dict, Sequence


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


def format_report(report: Dict[str, Any]) -> str:
    """The printed tables."""
    cov = report["coverage"]
    s = cov["summary"]
    out = [
        f"{report['boxes']} boxes in {report['images']} images of {report['datasets']}, at "
        f"training sizes {report['training_short_edges']} (max {report['max_size_train']}): "
        f"{s['boxes']} box-size pairs",
        f"matcher ({report['matcher']}): foreground IoU >= {report['fg_iou_threshold']:g}, "
        f"background < "
        f"{report['bg_iou_threshold']:g}, ALLOW_LOW_QUALITY_MATCHES "
        f"{report['allow_low_quality_matches']}",
        "",
    ]
    for key, title in (("by_area", "area (training scale)"),
                       ("by_side_quartile", "sqrt(area) quartile"),
                       ("by_aspect_ratio", "aspect ratio h/w"),
                       ("by_training_size", "training size"),):
        out += [format_table(cov[key], title), ""]
    out += [format_table([s], "all boxes"), ""]
    out.append("foreground anchors per box: " + ", ".join(
        f"{k}: {v}" for k, v in cov["fg_anchors_per_box"].items()))
    out.append("  kept after matching:      " + ", ".join(
        f"{k}: {v}" for k, v in cov["kept_fg_anchors_per_box"].items()))
    out.append("boxes whose best anchor is on each level: " + ", ".join(
        f"{k}: {n}" for k, n in cov["best_level"].items()))
    prop = report.get("proposal")
    if prop:
        ps = prop["coverage"]["summary"]
        out.append("")
        if prop["improved"]:
            out.append(
                f"Proposed anchors ({prop['candidates_scored']} candidates scored): boxes with a "
                f"foreground anchor {s['foreground_pct']:.2f}% -> {ps['foreground_pct']:.2f}%, "
                f"median best IoU {s['median_best_iou']:.3f} -> {ps['median_best_iou']:.3f}"
            )
        else:
            out.append(
                f"No candidate of {prop['candidates_scored']} covers more boxes than the config's "
                f"anchors ({s['foreground_pct']:.2f}% with a foreground anchor); keep them:"
            )
        out += ["  " + line for line in prop["config_lines"]]
        if prop["improved"]:
            out += ["", format_table(prop["coverage"]["by_area"], "proposed: area")]
    tiny = report.get("too_small_for_grid")
    if tiny and tiny["smaller"]:
        out += ["", textwrap.fill(
                f"{tiny['smaller']} of the {tiny['uncovered']} box-size pairs still without a "
                f"foreground anchor are smaller than {tiny['side_px']:g} px "
                f"({tiny['side_px'] / tiny['finest_stride']:.1f} strides of the finest level, "
                f"stride {tiny['finest_stride']}): off-grid by half a stride, such a "
                "box stays below the threshold with any anchor of its size; a finer level "
                "(smaller stride) would help them more than other anchor sizes.", width=96)]
    return "\n".join(out)
