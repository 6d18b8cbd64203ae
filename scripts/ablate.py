#!/usr/bin/env python
"""Table 1 of the paper on the CPU demo: the classification loss ablated over seeds.

Trains the 200-step demo recipe (``configs/demo_deepforest_mobilenet_v2_fpn.yaml``: DeepForest
tree crowns, MobileNetV2-FPN) once per (setting, seed), each run a ``train_net.py`` process of its
own with ``SEED`` and the setting's config keys, reads the final COCO box AP / AP50 / AP75 from the
run's ``metrics.json``, and writes

* ``table.md``: a Table 1-style markdown table, mean and sample standard deviation over seeds
  (with min-max), one row per setting;
* ``ablation.png``: AP / AP50 / AP75 per setting, mean with min-max bars and each seed's dot;
* ``results.json``: every run's numbers.

Finished runs (a ``metrics.json`` holding ``bbox/AP``) are not rerun, so an interrupted grid
resumes where it stopped. Settings (the paper's pairs of Tables 1a, 1b, 1d and Appendix A):

    CE          gamma 0, no alpha (plain cross-entropy, prior init kept)
    alpha-CE    alpha-balanced CE, alpha 0.75 (Table 1a's best)
    FL-g0.5     focal loss gamma 0.5, alpha 0.5 (Table 1b)
    FL-g1       gamma 1, alpha 0.25
    FL-g2       gamma 2, alpha 0.25 (the paper's default)
    FL-g5       gamma 5, alpha 0.25
    FLstar      FL* gamma 2, beta 1 (Appendix A)
    OHEM        OHEM with CE, 128 anchors per image, NMS 0.5 (Table 1d)

Usage::

    python scripts/ablate.py [--settings CE FL-g2 ...] [--seeds 0 1 2] [--steps 200]
        [--output output/ablation] [--threads 1] [--jobs 1] [--table-only] [-- KEY VALUE ...]

Anything after ``--`` is passed to every run as config overrides.
"""

import argparse
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo_deepforest_mobilenet_v2_fpn.yaml"
METRICS = ("AP", "AP50", "AP75")

logger = logging.getLogger("ablate")

# name -> (what it is, config overrides on the demo recipe)
SETTINGS: Dict[str, tuple] = {
    "CE": ("CE, gamma 0, no alpha", [
        "MODEL.RETINANET.CLS_LOSS", "SigmoidFocalLoss",
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA", "0.0", "MODEL.RETINANET.FOCAL_LOSS_ALPHA", "-1.0"]),
    "alpha-CE": ("alpha-balanced CE, alpha 0.75", [
        "MODEL.RETINANET.CLS_LOSS", "AlphaBalancedCE", "MODEL.RETINANET.FOCAL_LOSS_ALPHA", "0.75"]),
    "FL-g0.5": ("FL gamma 0.5, alpha 0.5", [
        "MODEL.RETINANET.CLS_LOSS", "SigmoidFocalLoss",
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA", "0.5", "MODEL.RETINANET.FOCAL_LOSS_ALPHA", "0.5"]),
    "FL-g1": ("FL gamma 1, alpha 0.25", [
        "MODEL.RETINANET.CLS_LOSS", "SigmoidFocalLoss",
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA", "1.0", "MODEL.RETINANET.FOCAL_LOSS_ALPHA", "0.25"]),
    "FL-g2": ("FL gamma 2, alpha 0.25", [
        "MODEL.RETINANET.CLS_LOSS", "SigmoidFocalLoss",
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA", "2.0", "MODEL.RETINANET.FOCAL_LOSS_ALPHA", "0.25"]),
    "FL-g5": ("FL gamma 5, alpha 0.25", [
        "MODEL.RETINANET.CLS_LOSS", "SigmoidFocalLoss",
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA", "5.0", "MODEL.RETINANET.FOCAL_LOSS_ALPHA", "0.25"]),
    "FLstar": ("FL* gamma 2, beta 1", [
        "MODEL.RETINANET.CLS_LOSS", "SigmoidFocalLossStar",
        "MODEL.RETINANET.FOCAL_LOSS_GAMMA", "2.0", "MODEL.RETINANET.FOCAL_LOSS_STAR_BETA", "1.0",
        "MODEL.RETINANET.FOCAL_LOSS_ALPHA", "-1.0"]),
    "OHEM": ("OHEM, CE, 128 per image, NMS 0.5", [
        "MODEL.RETINANET.CLS_LOSS", "OHEMLoss", "MODEL.RETINANET.FOCAL_LOSS_ALPHA", "-1.0",
        "MODEL.RETINANET.OHEM.BATCH_SIZE_PER_IMAGE", "128",
        "MODEL.RETINANET.OHEM.NMS_THRESH", "0.5"]),
}  # fmt: skip


def schedule_opts(steps: int) -> List[str]:
    """The demo's schedule scaled to ``steps``: LR drop at 80%, warm-up a quarter (at most 50)."""
    return [
        "SOLVER.MAX_ITER", str(steps),
        "SOLVER.STEPS", f"({max(1, int(steps * 0.8))},)",
        "SOLVER.WARMUP_ITERS", str(max(1, min(50, steps // 4))),
        "SOLVER.CHECKPOINT_PERIOD", str(10 * steps),  # only model_final
    ]  # fmt: skip


def run_dir(output: Path, setting: str, seed: int) -> Path:
    return output / setting / f"seed{seed}"


def read_final_metrics(metrics_json: Path) -> Optional[Dict[str, float]]:
    """AP / AP50 / AP75 of the last record holding ``bbox/AP``, or None if there is none."""
    if not metrics_json.is_file():
        return None
    found = None
    for line in metrics_json.read_text().splitlines():
        record = json.loads(line)
        if "bbox/AP" in record:
            found = {m: float(record[f"bbox/{m}"]) for m in METRICS}
    return found


def read_steps(run: Path) -> Optional[int]:
    """SOLVER.MAX_ITER of a finished run, from the config.yaml detectron2 saved beside it."""
    config = run / "config.yaml"
    if not config.is_file():
        return None
    found = re.search(r"^  MAX_ITER: (\d+)$", config.read_text(), flags=re.MULTILINE)
    return int(found.group(1)) if found else None


def run_one(setting: str, seed: int, steps: int, output: Path, threads: int,
            extra_opts: Sequence[str]) -> Dict[str, float]:
    """Trains and evaluates one run (skipped if already finished); returns its metrics."""
    out = run_dir(output, setting, seed)
    done = read_final_metrics(out / "metrics.json")
    if done is not None:
        if read_steps(out) != steps:
            raise SystemExit(f"{out} holds a finished run of {read_steps(out)} steps, not "
                             f"{steps}: choose another --output")
        logger.info("%s seed %d: already done, AP %.2f", setting, seed, done["AP"])
        return done
    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(DEMO_CONFIG),
           *SETTINGS[setting][1], *schedule_opts(steps), "SEED", str(seed),
           "OUTPUT_DIR", str(out), *extra_opts]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    logger.info("%s seed %d: %s", setting, seed, " ".join(cmd))
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stdout.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{setting} seed {seed} failed (exit {proc.returncode}); see "
                           f"{out / 'stdout.txt'}")
    metrics = read_final_metrics(out / "metrics.json")
    if metrics is None:
        raise RuntimeError(f"{setting} seed {seed}: no bbox/AP in {out / 'metrics.json'}")
    logger.info("%s seed %d: AP %.2f AP50 %.2f AP75 %.2f (%.0f s)", setting, seed,
                metrics["AP"], metrics["AP50"], metrics["AP75"], time.time() - start)
    return metrics


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """Mean, sample standard deviation (NaN for one value), min and max."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else math.nan,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _cell(s: Dict[str, float]) -> str:
    if s["n"] == 0:
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:.2f}"
    return f"{s['mean']:.2f} ± {s['std']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def markdown_table(results: Dict[str, Dict[int, Dict[str, float]]], steps: int) -> str:
    """Table 1-style rows: setting, what it is, seeds, then mean ± std (min-max) per metric."""
    lines = [
        f"COCO box AP on deepforest_tree_val, {steps} steps; mean ± sample std (min-max) "
        "over seeds; '-': no AP (no detection passed the score threshold).",
        "",
        "| setting | loss | seeds | AP | AP50 | AP75 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for setting, runs in results.items():
        stats = {m: summarize([r[m] for r in runs.values()]) for m in METRICS}
        seeds = ",".join(str(s) for s in sorted(runs))
        cells = " | ".join(_cell(stats[m]) for m in METRICS)
        lines.append(f"| {setting} | {SETTINGS[setting][0]} | {seeds} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(results: Dict[str, Dict[int, Dict[str, float]]], path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    width = 0.8 / len(METRICS)
    for j, metric in enumerate(METRICS):
        xs = [i + (j - 1) * width for i in range(len(names))]
        stats = [summarize([r[metric] for r in results[n].values()]) for n in names]
        means = [s["mean"] for s in stats]
        err = [[s["mean"] - s["min"] for s in stats], [s["max"] - s["mean"] for s in stats]]
        ax.bar(xs, means, width, yerr=err, capsize=3, label=metric, alpha=0.8)
        for x, n in zip(xs, names):
            values = [r[metric] for r in results[n].values()]
            ax.plot([x] * len(values), values, "k.", markersize=4)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel("COCO box AP (%)")
    ax.set_title(f"Classification loss ablation, demo recipe, {steps} steps")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: Dict[str, Dict[int, Dict[str, float]]], output: Path,
                 steps: int) -> str:
    """Writes table.md, ablation.png and results.json under ``output``; returns the table."""
    output.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, steps)
    (output / "table.md").write_text(table)
    (output / "results.json").write_text(json.dumps(
        {"steps": steps, "runs": {s: {str(k): v for k, v in r.items()}
                                  for s, r in results.items()}}, indent=2))
    plot(results, output / "ablation.png", steps)
    return table


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), metavar="NAME",
                        help=f"subset of {list(SETTINGS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200,
                        help="training steps per run (--table-only reads them from the runs)")
    parser.add_argument("--output", type=Path, default=REPO / "output" / "ablation")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once (each with --threads threads); 2 jobs of 1 "
                             "thread use a 2-core machine fully")
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing; tabulate the finished runs found under --output")
    args = parser.parse_args(argv)
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown --settings {unknown}; choose from {list(SETTINGS)}")
    if args.steps <= 0:
        parser.error(f"--steps must be > 0, got {args.steps}")
    if args.jobs <= 0:
        parser.error(f"--jobs must be > 0, got {args.jobs}")
    if len(extra) % 2:
        parser.error(f"config overrides after -- must be KEY VALUE pairs, got {extra}")
    args.opts = extra
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[int, Dict[str, float]]]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results: Dict[str, Dict[int, Dict[str, float]]] = {}
    steps_found = set()
    failures: List[str] = []
    # Seed-major: a grid stopped part-way has every setting at the same number of seeds.
    grid = [(setting, seed) for seed in args.seeds for setting in args.settings]
    if args.table_only:
        for setting, seed in grid:
            run = run_dir(args.output, setting, seed)
            found = read_final_metrics(run / "metrics.json")
            if found is not None:
                results.setdefault(setting, {})[seed] = found
                steps_found.add(read_steps(run))
    else:
        def train(cell):
            return run_one(cell[0], cell[1], args.steps, args.output, args.threads, args.opts)

        # Each run is a process of its own; the threads here only wait for them.
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(train, cell) for cell in grid]
        for (setting, seed), future in zip(grid, futures):
            try:
                metrics = future.result()
            except RuntimeError as exc:  # one broken run should not cost the rest of the grid
                logger.error("%s", exc)
                failures.append(str(exc))
                continue
            results.setdefault(setting, {})[seed] = metrics
    results = {setting: dict(sorted(results[setting].items()))
               for setting in args.settings if setting in results}
    if not results:
        raise SystemExit("; ".join(failures) or f"no finished runs under {args.output}")
    steps = args.steps
    if args.table_only:
        if len(steps_found) != 1 or None in steps_found:
            raise SystemExit(f"the runs under {args.output} have different or unknown step "
                             f"counts {sorted(steps_found, key=str)}; tabulate them separately")
        steps = steps_found.pop()
    table = write_report(results, args.output, steps)
    logger.info("Wrote %s, ablation.png and results.json:\n%s", args.output / "table.md", table)
    if failures:
        raise SystemExit(f"{len(failures)} run(s) failed (the table holds the others): "
                         + "; ".join(failures))
    return results


if __name__ == "__main__":
    main()
