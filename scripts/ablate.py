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

    python scripts/ablate.py [--config-file FILE] [--settings CE FL-g2 ...] [--seeds 0 1 2]
        [--steps 200] [--output output/ablation] [--threads 1] [--jobs 1] [--table-only]
        [-- KEY VALUE ... | -- key=value ...]

``--config-file`` takes the YAML demo (the default) or a Python (lazy) config such as its twin
``configs/demo_deepforest_mobilenet_v2_fpn.py``; each setting, the schedule, ``SEED`` /
``train.seed`` and the output folder are then written as that config's overrides (one table,
two renderings: :func:`yaml_opts`, :func:`lazy_opts`). Anything after ``--`` is passed to every
run as config overrides: ``KEY VALUE`` pairs for a YAML config, ``key=value`` for a .py one.
"""

import argparse
import functools
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
from typing import Dict, List, NamedTuple, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo_deepforest_mobilenet_v2_fpn.yaml"
METRICS = ("AP", "AP50", "AP75")

logger = logging.getLogger("ablate")


class Setting(NamedTuple):
    """One row of the table: the loss (a ``CLS_LOSS_REGISTRY`` name) and its constructor
    arguments. An argument left out keeps a YAML config's value; on a .py config alpha / gamma
    are the paper's 0.25 / 2 (Base-FocalRetinaNet.yaml's) and others the loss's defaults."""

    description: str
    loss: str
    args: Dict[str, float]


# Each setting once, as what it means; yaml_opts / lazy_opts write it as either config's keys.
SETTINGS: Dict[str, Setting] = {
    "CE": Setting("CE, gamma 0, no alpha", "SigmoidFocalLoss", {"gamma": 0.0, "alpha": -1.0}),
    "alpha-CE": Setting("alpha-balanced CE, alpha 0.75", "AlphaBalancedCE", {"alpha": 0.75}),
    "FL-g0.5": Setting("FL gamma 0.5, alpha 0.5", "SigmoidFocalLoss",
                       {"gamma": 0.5, "alpha": 0.5}),
    "FL-g1": Setting("FL gamma 1, alpha 0.25", "SigmoidFocalLoss", {"gamma": 1.0, "alpha": 0.25}),
    "FL-g2": Setting("FL gamma 2, alpha 0.25", "SigmoidFocalLoss", {"gamma": 2.0, "alpha": 0.25}),
    "FL-g5": Setting("FL gamma 5, alpha 0.25", "SigmoidFocalLoss", {"gamma": 5.0, "alpha": 0.25}),
    "FLstar": Setting("FL* gamma 2, beta 1", "SigmoidFocalLossStar",
                      {"gamma": 2.0, "beta": 1.0, "alpha": -1.0}),
    "OHEM": Setting("OHEM, CE, 128 per image, NMS 0.5", "OHEMLoss",
                    {"alpha": -1.0, "batch_size_per_image": 128, "nms_thresh": 0.5}),
}

# The YAML key of each loss argument (the loss's from_config reads it).
YAML_KEYS = {
    "alpha": "MODEL.RETINANET.FOCAL_LOSS_ALPHA",
    "gamma": "MODEL.RETINANET.FOCAL_LOSS_GAMMA",
    "beta": "MODEL.RETINANET.FOCAL_LOSS_STAR_BETA",
    "batch_size_per_image": "MODEL.RETINANET.OHEM.BATCH_SIZE_PER_IMAGE",
    "nms_thresh": "MODEL.RETINANET.OHEM.NMS_THRESH",
}
# The loss arguments FocalRetinaNet itself takes (detectron2's RetinaNet keywords), passed to a
# loss it builds from a registry name (retinanet_plugin/losses/resolve.py).
LAZY_MODEL_KEYS = {"alpha": "focal_loss_alpha", "gamma": "focal_loss_gamma"}


def is_lazy(config_file: Path) -> bool:
    return Path(config_file).suffix == ".py"


def yaml_opts(name: str) -> List[str]:
    """``KEY VALUE`` overrides of a YAML config giving setting ``name``."""
    setting = SETTINGS[name]
    opts = ["MODEL.RETINANET.CLS_LOSS", setting.loss]
    for arg, value in setting.args.items():
        opts += [YAML_KEYS[arg], str(value)]
    return opts


def lazy_opts(name: str) -> List[str]:
    """``key=value`` overrides of a Python (lazy) config giving setting ``name``.

    A loss whose arguments are only alpha / gamma, or others at its constructor's defaults (FL*
    with beta 1), is the registry name with the model's ``focal_loss_alpha`` /
    ``focal_loss_gamma``, as :func:`resolve_cls_loss` builds it. Any other (OHEM: 128 anchors, NMS
    0.5) is the loss written out as a lazy call, ``model.cls_loss={_target_: ..., arg: value}``,
    which ``instantiate`` builds; the model's ``focal_loss_*`` are then set to their defaults, as
    a loss object requires. Arguments left out take the paper's alpha / gamma either way.
    """
    import inspect

    from retinanet_plugin.losses import CLS_LOSS_REGISTRY
    from retinanet_plugin.losses.resolve import FOCAL_LOSS_ALPHA, FOCAL_LOSS_GAMMA

    setting = SETTINGS[name]
    loss_class = CLS_LOSS_REGISTRY.get(setting.loss)
    takes = inspect.signature(loss_class.__init__).parameters
    paper = {"alpha": FOCAL_LOSS_ALPHA, "gamma": FOCAL_LOSS_GAMMA}
    unknown = sorted(set(setting.args) - set(takes))
    if unknown:
        raise ValueError(f"setting {name}: {setting.loss} takes no {unknown}")
    others = {arg: value for arg, value in setting.args.items()
              if arg not in LAZY_MODEL_KEYS and value != takes[arg].default}
    if not others:
        return [f"model.cls_loss={setting.loss}"] + [
            f"model.{key}={setting.args.get(arg, paper[arg])!r}"
            for arg, key in LAZY_MODEL_KEYS.items()
        ]
    args = {arg: value for arg, value in paper.items() if arg in takes}
    args.update(setting.args)
    call = ",".join([f"_target_:{loss_class.__module__}.{loss_class.__qualname__}"]
                    + [f"{arg}:{value!r}" for arg, value in args.items()])
    return [f"model.cls_loss={{{call}}}"] + [
        f"model.{key}={paper[arg]!r}" for arg, key in LAZY_MODEL_KEYS.items()
    ]


def setting_opts(name: str, config_file: Path) -> List[str]:
    return lazy_opts(name) if is_lazy(config_file) else yaml_opts(name)


def schedule(steps: int) -> Dict[str, int]:
    """The demo's schedule scaled to ``steps``: LR drop at 80%, warm-up a quarter (at most 50),
    a checkpoint only at the end (model_final)."""
    return {"max_iter": steps, "drop": max(1, int(steps * 0.8)),
            "warmup": max(1, min(50, steps // 4)), "checkpoint_period": 10 * steps}


# Prints the LR multipliers of the .py config argv[1] as JSON. Loading a .py config runs it (the
# demo registers its datasets), so it is loaded in a process of its own.
_PRINT_SCHEDULER_VALUES = """\
import json, sys
from retinanet_plugin.lazy import load_lazy_config
print(json.dumps(list(load_lazy_config(sys.argv[1]).lr_multiplier.scheduler["values"])))
"""


@functools.lru_cache(maxsize=None)
def _first_drop(config_file: Path) -> List[float]:
    """The multipliers before and after the first LR drop of the .py ``config_file``."""
    proc = subprocess.run([sys.executable, "-c", _PRINT_SCHEDULER_VALUES, str(config_file)],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"--config-file {config_file}: reading its lr_multiplier.scheduler."
                         f"values failed:\n{proc.stderr[-2000:]}")
    values = json.loads(proc.stdout.strip().splitlines()[-1])
    if len(values) < 2:
        raise SystemExit(f"--config-file {config_file}: lr_multiplier.scheduler.values "
                         f"{values!r} has no LR drop to move to the run's schedule")
    return [float(v) for v in values[:2]]


def schedule_opts(steps: int, config_file: Path = DEMO_CONFIG) -> List[str]:
    """:func:`schedule` as overrides of ``config_file``'s kind. A lazy schedule is in fractions
    of its ``num_updates``: it is set to ``steps`` with the drop and warm-up at the iterations
    the YAML solver has (the demo .py's 160 / 200 and 50 / 200 differ from them when scaled, e.g.
    the warm-up of a 1000-step run). Its one drop is the config's first (``values`` cut to two:
    the long demo's ``[1.0, 0.1, 0.01]`` takes ``[1.0, 0.1]``, the YAML's ``SOLVER.GAMMA``)."""
    s = schedule(steps)
    if is_lazy(config_file):
        return [
            f"train.max_iter={s['max_iter']}",
            f"lr_multiplier.scheduler.milestones=[{s['drop']}]",
            f"lr_multiplier.scheduler.values={_first_drop(Path(config_file).resolve())!r}",
            f"lr_multiplier.scheduler.num_updates={s['max_iter']}",
            f"lr_multiplier.warmup_length={min(s['warmup'] / s['max_iter'], 1.0)!r}",
            f"train.checkpointer.period={s['checkpoint_period']}",
        ]
    return [
        "SOLVER.MAX_ITER", str(s["max_iter"]),
        "SOLVER.STEPS", f"({s['drop']},)",
        "SOLVER.WARMUP_ITERS", str(s["warmup"]),
        "SOLVER.CHECKPOINT_PERIOD", str(s["checkpoint_period"]),
    ]  # fmt: skip


def run_opts(seed: int, out: Path, config_file: Path) -> List[str]:
    """The run's seed and output folder as overrides of ``config_file``'s kind."""
    if is_lazy(config_file):
        if "'" in str(out) or "\\" in str(out):
            raise SystemExit(f"--output {out}: a quote or backslash in the path is not passed "
                             "to a .py config's train.output_dir")
        return [f"train.seed={seed}", f"train.output_dir='{out}'"]
    return ["SEED", str(seed), "OUTPUT_DIR", str(out)]


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
    """The steps of a finished run, from the config.yaml detectron2 saved beside it:
    ``SOLVER: MAX_ITER:`` (a YAML config) or ``train: max_iter:`` (a .py one, LazyConfig.save)."""
    config = run / "config.yaml"
    if not config.is_file():
        return None
    text = config.read_text()
    for section, key in (("SOLVER", "MAX_ITER"), ("train", "max_iter")):
        # The section's block: its top-level line, then the indented lines up to the next one.
        block = re.search(rf"^{section}:\n((?:[ #].*\n?|\n)*)", text, flags=re.MULTILINE)
        found = block and re.search(rf"^  {key}: (\d+)$", block.group(1), flags=re.MULTILINE)
        if found:
            return int(found.group(1))
    return None


def run_one(setting: str, seed: int, steps: int, output: Path, threads: int,
            extra_opts: Sequence[str], config_file: Path = DEMO_CONFIG) -> Dict[str, float]:
    """Trains and evaluates one run (skipped if already finished); returns its metrics."""
    out = run_dir(output, setting, seed)
    done = read_final_metrics(out / "metrics.json")
    if done is not None:
        if read_steps(out) != steps:
            raise SystemExit(f"{out} holds a finished run of {read_steps(out)} steps, not "
                             f"{steps}: choose another --output")
        logger.info("%s seed %d: already done, AP %.2f", setting, seed, done["AP"])
        return done
    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(config_file),
           *setting_opts(setting, config_file), *schedule_opts(steps, config_file),
           *run_opts(seed, out, config_file), *extra_opts]
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
        lines.append(f"| {setting} | {SETTINGS[setting].description} | {seeds} | {cells} |")
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
    parser.add_argument("--config-file", default=str(DEMO_CONFIG), metavar="FILE",
                        help="the recipe: a YAML config or a Python (lazy) .py one (default: "
                             "the YAML demo; its .py twin trains the same runs)")
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
    args.config_file = Path(args.config_file)
    if not args.config_file.is_file():
        parser.error(f"--config-file {args.config_file}: no such file")
    if is_lazy(args.config_file):
        if any("=" not in opt for opt in extra):
            parser.error(f"config overrides after -- of a .py config are key=value, got {extra}")
    elif len(extra) % 2:
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
            return run_one(cell[0], cell[1], args.steps, args.output, args.threads, args.opts,
                           args.config_file)

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
