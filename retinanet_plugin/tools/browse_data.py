"""Training images as the model receives them, with their boxes: to see a wrong box format or a
broken augmentation before training.

Usage::

    python -m retinanet_plugin.tools.browse_data --config-file configs/X.yaml \
        [--source mapper|dataset] [--num-images 8] [--seed 0] [--shuffle] [--dataset NAME] \
        [--grid] [--columns 4] [--min-side 600] [--output DIR] [KEY VALUE ... | key=value ...]

``--source mapper`` (default): the training sets through the training mapper
(``build_dataset_mapper(cfg, is_train=True)``, a ``.py`` config's ``dataloader.train.mapper``):
resize / scale jitter, flips, quarter turns, colour jitter, crowd regions kept by
``MODEL.RETINANET.CROWD_IGNORE`` (grey, "crowd: ignored"). ``--source dataset``: the dataset dicts
as registered, no mapper. Each image is written to ``--output`` (default
``<OUTPUT_DIR>/browse_data``) as ``<index>_<file>.jpg``, or with ``--grid`` all in one
``browse_<source>.jpg``; each has a header naming the file, image id, dataset, what the mapper
did to it and the colour of each class. See :mod:`retinanet_plugin.analysis.browse`.
"""

import argparse
import os
from typing import List, Optional, Sequence

from ..analysis.browse import browse_samples, save_browse
from ..engine.cli import ArgumentParser
from .model_setup import load_cfg

__all__ = ["main", "parse_args"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    # Flags may also follow the config overrides, as in train_net.py.
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    # Not required=True: the flags found among the overrides are parsed again on their own.
    parser.add_argument("--config-file", default=None, metavar="FILE",
                        help="YAML or Python (.py) config (required)")
    parser.add_argument("--source", choices=("mapper", "dataset"), default="mapper",
                        help="after the training mapper (default) or the dataset dicts as "
                             "registered")
    parser.add_argument("--num-images", type=int, default=8, metavar="N",
                        help="images drawn (default 8)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the augmentations (image i: [seed, i]) and of --shuffle")
    parser.add_argument("--shuffle", action="store_true",
                        help="a random choice of images instead of the first N")
    parser.add_argument("--dataset", default=None, metavar="NAME",
                        help="a registered dataset instead of the training sets")
    parser.add_argument("--grid", action="store_true", help="one picture of all the images")
    parser.add_argument("--columns", type=int, default=4, help="images per row of --grid")
    parser.add_argument("--min-side", type=int, default=600,
                        help="smaller images are enlarged by a whole factor to reach it")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="folder of the pictures (default: <OUTPUT_DIR>/browse_data)")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides: KEY VALUE pairs (YAML) or key=value (.py)")
    args = parser.parse_args(argv)
    if args.config_file is None:
        parser.error("--config-file is required")
    for flag, value in (("--num-images", args.num_images), ("--columns", args.columns)):
        if value <= 0:
            parser.error(f"{flag} must be > 0, got {value}")
    if args.min_side < 0:
        parser.error(f"--min-side must be >= 0, got {args.min_side}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Returns the paths of the pictures written."""
    args = parse_args(argv)
    cfg = load_cfg(args.config_file, args.opts, lazy=True, tool="browse_data")
    output = args.output or os.path.join(
        cfg.OUTPUT_DIR if hasattr(cfg, "OUTPUT_DIR") else cfg.train.output_dir, "browse_data")
    samples, about = browse_samples(cfg, args.num_images, source=args.source, seed=args.seed,
                                    shuffle=args.shuffle, dataset=args.dataset)
    paths = save_browse(samples, about, output, grid=args.grid, columns=args.columns,
                        min_side=args.min_side)
    print(f"Wrote {len(paths)} picture(s) of {len(samples)} image(s) of {about['dataset']} to "
          f"{output}")
    return paths


if __name__ == "__main__":
    main()
