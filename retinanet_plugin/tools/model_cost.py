"""Model size and cost: parameters (total, trainable, per part) and FLOPs at the test size.

Usage::

    python -m retinanet_plugin.tools.model_cost --config-file configs/X.yaml \
        [--image-size H W] [--device cpu] [--json cost.json] [KEY VALUE ... | key=value ...]

``--config-file`` is a YAML or a Python (lazy) ``.py`` config, read by
:func:`retinanet_plugin.tools.model_setup.load_cfg` like the other tools; the model is built as
``train_net.py`` builds it (no weights are needed: they do not change its size). FLOPs are
fvcore's count (one fused multiply-add = one flop) of preprocessing, backbone and head on one
black image of ``--image-size`` (default: a square of the test loader's shorter side) resized as
the test loader resizes it; see :mod:`retinanet_plugin.analysis.cost`.
"""

import argparse
import json
import logging
import sys
from typing import Any, Dict, Optional, Sequence

from ..analysis.cost import format_model_cost, model_cost
from ..engine.cli import ArgumentParser
from .model_setup import load_cfg

__all__ = ["main", "parse_args"]

logger = logging.getLogger("retinanet_plugin.tools.model_cost")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    # Flags may also follow the config overrides, as in train_net.py.
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    # Not required=True: the flags found among the overrides are parsed again on their own.
    parser.add_argument("--config-file", default=None, metavar="FILE",
                        help="YAML or Python (.py) config (required)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="image size before the test resize (default: a square of "
                             "INPUT.MIN_SIZE_TEST)")
    parser.add_argument("--device", default="cpu",
                        help="where the model is built (default cpu: the counts do not "
                             "depend on it)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the numbers to this JSON file")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides: KEY VALUE pairs (YAML) or key=value (.py)")
    args = parser.parse_args(argv)
    if args.config_file is None:
        parser.error("--config-file is required")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.image_size is not None and min(args.image_size) <= 0:
        raise SystemExit(f"--image-size must be positive, got {args.image_size}")
    cfg = load_cfg(args.config_file, args.opts, device=args.device, lazy=True,
                   tool="model_cost")
    cost = model_cost(cfg, args.image_size)
    sys.stdout.write(format_model_cost(cost, f"Model cost of {args.config_file}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cost, f, indent=2)
    return cost


if __name__ == "__main__":
    main()
