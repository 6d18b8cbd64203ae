"""Resident memory over a long training run of the demo config: does it stay flat?

Trains ``configs/demo_deepforest_mobilenet_v2_fpn.yaml`` (data: ``make demo`` or
``python -m retinanet_plugin.data.deepforest``) through train_net.py's Trainer, with its
periodic checkpoints, records the resident set size (RSS, from /proc: Linux only) of the trainer
process and of its data-loader workers after every step, and fits a least-squares line to the
readings after ``--skip`` warm-up steps (allocator pools, the compiled loss kernel and the first
checkpoint settle there)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_slope.py --iters 300

Prints RSS every ``--every`` steps (lines starting with "RSS", as training goes), then the
slope in MiB per 100 iterations; a leak of one image's tensors per step (400 x 400 x 3 float32 =
1.8 MiB) would show as ~180 MiB / 100 its.
"""

import argparse
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

from detectron2.engine import HookBase, default_argument_parser

REPO = Path(__file__).resolve().parents[1]
PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_MIB


def _children(pid: int) -> List[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return kids


class RSSRecorder(HookBase):
    """After each step: (iteration, trainer RSS, workers' summed RSS) in MiB."""

    def __init__(self, every: int):
        self.readings: List[Tuple[int, float, float]] = []
        self.every = every

    def after_step(self):
        pid = os.getpid()
        workers = 0.0
        for child in _children(pid):
            try:
                workers += _rss_mib(child)
            except FileNotFoundError:  # a worker that just exited
                pass
        self.readings.append((self.trainer.iter, _rss_mib(pid), workers))
        if self.trainer.iter % self.every == 0 or self.trainer.iter == self.trainer.max_iter - 1:
            # Printed as it goes, so that a run stopped early still shows its readings.
            print(f"RSS {self.readings[-1][0]:>9} {self.readings[-1][1]:>12.1f} "
                  f"{self.readings[-1][2]:>12.1f}", flush=True)


def slope_per_100(points: List[Tuple[int, float]]) -> float:
    """Least-squares slope of (iteration, MiB), in MiB per 100 iterations."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return 100.0 * sxy / sxx


def main() -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--skip", type=int, default=50, help="warm-up steps left out of the fit")
    parser.add_argument("--every", type=int, default=25, help="print RSS every N steps")
    parser.add_argument(
        "--config-file", default=str(REPO / "configs" / "demo_deepforest_mobilenet_v2_fpn.yaml")
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config pairs")
    args = parser.parse_args()
    if args.iters <= args.skip + 1:
        parser.error("--iters must exceed --skip + 1")

    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    with tempfile.TemporaryDirectory() as out:
        opts = ["SOLVER.MAX_ITER", str(args.iters), "DATASETS.TEST", "()", "OUTPUT_DIR", out]
        cfg = train_net.setup(
            default_argument_parser().parse_args(
                ["--config-file", args.config_file] + opts + args.opts
            )
        )
        trainer = train_net.Trainer(cfg)
        recorder = RSSRecorder(args.every)
        print(f"RSS {'iteration':>9} {'trainer MiB':>12} {'workers MiB':>12}", flush=True)
        trainer.register_hooks([recorder])
        trainer.resume_or_load(resume=False)
        trainer.train()

    fitted = [r for r in recorder.readings if r[0] >= args.skip]
    result = {
        "iterations": args.iters,
        "fitted_from": args.skip,
        "trainer_slope_mib_per_100_its": slope_per_100([(r[0], r[1]) for r in fitted]),
        "workers_slope_mib_per_100_its": slope_per_100([(r[0], r[2]) for r in fitted]),
        "trainer_rss_mib_first_last": [fitted[0][1], fitted[-1][1]],
        "trainer_rss_mib_max": max(r[1] for r in recorder.readings),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
