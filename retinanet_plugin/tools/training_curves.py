"""Training curves of one run or several: ``results.csv`` and ``training_curves.png``.

Usage::

    # the run of a config (its OUTPUT_DIR / train.output_dir), overrides as for train_net.py
    python -m retinanet_plugin.tools.training_curves --config-file configs/X.yaml \
        [KEY VALUE ... | key=value ...]
    # run folders (or folders holding runs, e.g. scripts/ablate.py's output/ablation), overlaid
    python -m retinanet_plugin.tools.training_curves --runs DIR [DIR ...] [--labels L ...] \
        [--output DIR] [--title TEXT]

Reads each run's ``metrics.json`` (:func:`retinanet_plugin.analysis.curves.read_metrics`: lines
of an iteration merged, a resumed run's rewritten iterations taken from its later lines) and
writes to ``--output`` (default: the run's folder; for several runs, their common folder):
``results.csv`` (one row per logged iteration; with several runs a first column ``run``) and
``training_curves.png`` (losses, learning rate and AP over iterations). ``train_net.py`` writes
the same two files into its output folder at the end of training.
"""

import argparse
import logging
import os
from typing import Optional, Sequence, Tuple

from ..analysis.curves import (
    CURVES_PICTURE,
    RESULTS_CSV,
    find_runs,
    plot_training_curves,
    read_metrics,
    run_labels,
    write_results_csv,
)
from ..engine.cli import ArgumentParser
from .model_setup import dataset_view, load_cfg

__all__ = ["main", "parse_args"]

logger = logging.getLogger("retinanet_plugin.tools.training_curves")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    # Flags may also follow the config overrides, as in train_net.py.
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=None, metavar="FILE",
                        help="YAML or Python (.py) config whose output folder holds the run")
    parser.add_argument("--runs", nargs="+", default=None, metavar="DIR",
                        help="run folders (holding metrics.json) or folders of runs")
    parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                        help="one label per run (default: the runs' paths below their common "
                             "folder)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="where results.csv and training_curves.png go (default: the run "
                             "folder, or the runs' common folder)")
    parser.add_argument("--title", default=None, help="the picture's title")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides: KEY VALUE pairs (YAML) or key=value (.py)")
    args = parser.parse_args(argv)
    if (args.config_file is None) == (args.runs is None):
        parser.error("give either --config-file (the config's output folder) or --runs DIR ...")
    if args.opts and args.config_file is None:
        parser.error(f"config overrides {args.opts} need --config-file")
    return args


def _config_run(config_file: str, opts: Sequence[str]) -> Tuple[str, Optional[str]]:
    """(output folder, first test set) of a YAML or .py config."""
    cfg = load_cfg(config_file, opts, lazy=True, tool="training_curves")
    output_dir = cfg.OUTPUT_DIR if hasattr(cfg, "OUTPUT_DIR") else cfg.train.output_dir
    tests = list(dataset_view(cfg).DATASETS.TEST)
    return output_dir, (tests[0] if tests else None)


def main(argv: Optional[Sequence[str]] = None) -> Tuple[str, str]:
    """Returns (results.csv path, training_curves.png path)."""
    args = parse_args(argv)
    test_set = None
    if args.config_file is not None:
        output_dir, test_set = _config_run(args.config_file, args.opts)
        runs = find_runs([output_dir])
    else:
        runs = find_runs(args.runs)
    labels = args.labels or run_labels(runs)
    if len(labels) != len(runs):
        raise SystemExit(f"--labels: {len(labels)} labels for {len(runs)} runs ({runs})")
    output = args.output or (runs[0] if len(runs) == 1 else
                             os.path.commonpath([os.path.abspath(r) for r in runs]))
    os.makedirs(output, exist_ok=True)
    data = [(label, read_metrics(run)) for label, run in zip(labels, runs)]
    for (_, records), run in zip(data, runs):
        if not records:
            logger.warning("%s: metrics.json holds no iteration yet", run)
    csv_path = write_results_csv(data, os.path.join(output, RESULTS_CSV),
                                 run_column=len(data) > 1)
    title = args.title or (os.path.abspath(runs[0]) if len(runs) == 1 else
                           f"{len(runs)} runs under {output}")
    picture = plot_training_curves(data, os.path.join(output, CURVES_PICTURE), title=title,
                                   test_set=test_set)
    print(f"Wrote {csv_path} and {picture}")
    return csv_path, picture


if __name__ == "__main__":
    main()
