"""Figure 4 of the paper: cumulative distribution of the focal loss of a trained model.

For a trained detector on a dataset, every anchor is labelled as the model labels it in training
(:meth:`FocalRetinaNet.label_anchors`: foreground IoU >= 0.5, background < 0.4, ignored in
between). The samples are the (anchor, class) elements of the sigmoid classifier, as in Sec. 3.3:
the positive samples are the ground-truth class of each foreground anchor, the negative samples
every other element of a non-ignored anchor (all K of a background anchor). For each gamma, the
focal loss FL(p_t) = -(1 - p_t)^gamma log(p_t) (Eq. 4; alpha is left out: within one set it is a
constant factor, which the normalisation removes) of each set is normalised to sum 1, sorted
ascending and accumulated, and plotted against the fraction of samples, positives and negatives
separately (Fig. 4: with gamma = 2 nearly all of the negatives' loss comes from a small fraction
of hard samples, while the positives' curve changes little with gamma).

Usage::

    python -m retinanet_plugin.tools.loss_cdf --config-file configs/X.yaml --weights model.pth \
        [--dataset NAME] [--gammas 0 0.5 1 2] [--output DIR] [--max-images 500] \
        [--negatives-per-image M] [KEY VALUE ...]

``--config-file`` is a YAML or a Python (lazy) ``.py`` config (with ``key=value`` overrides):
a ``.py`` config's model is ``model`` instantiated, its mapper ``dataloader.train.mapper`` with the
test resize of ``dataloader.test.mapper``, and the few YAML keys read here (``DATASETS.TEST``,
``OUTPUT_DIR``, the meta-architecture) are converted by :func:`retinanet_plugin.lazy.yacs_keys`.

Writes ``loss_cdf.png``, ``loss_cdf.csv`` (the curves on a grid of fractions) and
``loss_cdf.json`` (sample counts and, per gamma, the share of the loss carried by the hardest
1% / 10% / 20% of samples) to the output directory.

Shape shorthand:
    N: images in the minibatch
    R: anchors of one image over all levels
    K: foreground classes
"""

import argparse
import csv
import json
import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from detectron2.config import CfgNode, instantiate
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes
from detectron2.utils.logger import setup_logger

from ..checkpoint import RetinaNetCheckpointer
from ..config import load_config
from ..data.deepforest import DATASET_NAMES, register_deepforest
from ..data.mapper import RobustDatasetMapper, build_dataset_mapper
from ..data.registration import register_config_datasets
from ..lazy import is_lazy_config, load_lazy_config, yacs_keys
from ..losses import sigmoid_focal_loss_from_labels
from ..meta_arch import FocalRetinaNet

__all__ = ["anchor_logits_and_labels", "normalized_cdf", "split_focal_losses", "main"]

# Named explicitly: run with `python -m`, this module is "__main__".
logger = logging.getLogger("retinanet_plugin.tools.loss_cdf")

DEFAULT_GAMMAS = (0.0, 0.5, 1.0, 2.0)
# The share of a set's loss carried by its hardest `f` of samples, reported in the JSON.
HARDEST_FRACTIONS = (0.01, 0.1, 0.2)
# Negative samples kept per image: all of the demo's (~32k per 400x400 tile); on COCO
# (~120k anchors x 80 classes per image) a uniform subset, about 0.8 GB for 500 images x 4 gammas.
DEFAULT_NEGATIVES_PER_IMAGE = 100_000
# Points of each curve written to the CSV (fractions 1/G, 2/G, ..., 1).
CSV_GRID = 1000


@torch.no_grad()
def anchor_logits_and_labels(
    model: FocalRetinaNet, batched_inputs: List[Dict]
) -> Tuple[Tensor, Tensor]:
    """The classifier's logits and the training labels of every anchor of a batch.

    Args:
        model (FocalRetinaNet): the detector (its mode is not changed; call ``eval()`` first
            for inference-mode normalisation layers).
        batched_inputs (list[dict]): detectron2 inputs with ``image`` and ``instances``
            (``gt_boxes``, ``gt_classes``), as the model receives in training.

    Returns:
        Tensor: (N, R, K) float logits.
        Tensor: (N, R) int64 labels from :meth:`FocalRetinaNet.label_anchors`: -1 ignore,
        K background, else the class.
    """
    missing = [i for i, x in enumerate(batched_inputs) if "instances" not in x]
    if missing:
        raise ValueError(f"inputs {missing} have no 'instances' (ground truth); the loss "
                         "distribution needs annotated images")
    images = model.preprocess_image(batched_inputs)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    pred_logits, _ = model.head(features)
    anchors = Boxes.cat(model.anchor_generator(features))
    gt_instances = [x["instances"].to(model.device) for x in batched_inputs]
    labels, _ = model.label_anchors(anchors, gt_instances)
    logits = torch.cat([permute_to_N_HWA_K(x, model.num_classes) for x in pred_logits], dim=1)
    return logits, labels


def split_focal_losses(logits: Tensor, labels: Tensor, gamma: float) -> Tuple[Tensor, Tensor]:
    """Per-sample focal loss (Eq. 4, alpha = 1) of the positive and the negative samples.

    Computed by :func:`sigmoid_focal_loss_from_labels` itself (``reduction="none"``), so that
    the two sets together hold exactly the elements the detector's loss sums.

    Args:
        logits (Tensor): (N, R, K).
        labels (Tensor): (N, R): -1 ignore, K background, else the class.
        gamma (float): focusing parameter.

    Returns:
        Tensor: (P,) losses of the positive samples (foreground anchor, its class).
        Tensor: (Q,) losses of the negative samples (every other element of a non-ignored
        anchor).
    """
    num_classes = logits.shape[-1]
    losses = sigmoid_focal_loss_from_labels(logits, labels, -1.0, gamma, "none").float()
    valid = labels >= 0
    fg = valid & (labels < num_classes)
    positive = torch.zeros_like(losses, dtype=torch.bool)
    positive[fg] = torch.nn.functional.one_hot(labels[fg], num_classes).bool()
    negative = valid.unsqueeze(-1) & ~positive
    return losses[positive], losses[negative]


def normalized_cdf(losses: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Fig. 4's curve: losses sorted ascending, normalised to sum 1, accumulated.

    Args:
        losses (np.ndarray): (S,) non-negative losses.

    Returns:
        np.ndarray: (S,) fraction of samples, i / S for i = 1..S.
        np.ndarray: (S,) cumulative normalised loss, non-decreasing, ending at 1 (all zeros if
        every loss is 0).
    """
    losses = np.sort(np.asarray(losses, dtype=np.float64).ravel())
    if losses.size and losses[0] < 0:
        raise ValueError(f"losses must be non-negative, got minimum {losses[0]}")
    fraction = np.arange(1, losses.size + 1, dtype=np.float64) / max(losses.size, 1)
    total = losses.sum()
    cumulative = np.cumsum(losses) / total if total > 0 else np.zeros_like(losses)
    return fraction, cumulative


def _on_grid(fraction: np.ndarray, cumulative: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The curve at the given fractions of samples (the sample at rank ceil(f * S))."""
    idx = np.clip(np.ceil(grid * fraction.size).astype(np.int64) - 1, 0, fraction.size - 1)
    return cumulative[idx]


def _hardest_share(cumulative: np.ndarray, fraction: float) -> float:
    """Share of the loss carried by the hardest ``fraction`` of samples."""
    keep = cumulative.size - int(round(fraction * cumulative.size))
    return float(1.0 - cumulative[keep - 1]) if keep > 0 else 1.0


def collect_losses(
    model: FocalRetinaNet,
    inputs: Iterable[Dict],
    gammas: Sequence[float],
    negatives_per_image: Optional[int] = None,
    seed: int = 0,
) -> Dict[str, Dict[float, np.ndarray]]:
    """Per-sample losses of positives and negatives for each gamma, over images one by one.

    With ``negatives_per_image``, each image contributes a uniform random subset of that many
    negative samples (the same subset for every gamma), bounding memory on COCO-sized inputs;
    the curve of a uniform subset estimates the full one.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {"positive": {g: [] for g in gammas}, "negative": {g: [] for g in gammas}}
    for x in inputs:
        logits, labels = anchor_logits_and_labels(model, [x])
        subset = None
        for gamma in gammas:
            pos, neg = split_focal_losses(logits, labels, gamma)
            if negatives_per_image is not None and neg.numel() > negatives_per_image:
                if subset is None:
                    subset = torch.randperm(neg.numel(), generator=generator)
                    subset = subset[:negatives_per_image].to(neg.device)
                neg = neg[subset]
            out["positive"][gamma].append(pos.cpu().numpy())
            out["negative"][gamma].append(neg.cpu().numpy())
    return {
        kind: {g: np.concatenate(v) if v else np.zeros(0) for g, v in per_gamma.items()}
        for kind, per_gamma in out.items()
    }


def write_outputs(losses: Dict[str, Dict[float, np.ndarray]], output_dir: str,
                  title: str = "") -> Dict:
    """Writes loss_cdf.png / .csv / .json under ``output_dir``; returns the JSON summary."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    grid = np.arange(1, CSV_GRID + 1) / CSV_GRID
    summary = {"title": title, "samples": {}, "hardest_share": {}}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    rows = []
    for ax, kind in zip(axes, ("positive", "negative")):
        summary["hardest_share"][kind] = {}
        for gamma, values in losses[kind].items():
            summary["samples"][kind] = int(values.size)
            if values.size == 0:
                continue
            fraction, cumulative = normalized_cdf(values)
            ax.plot(fraction, cumulative, label=f"gamma = {gamma:g}")
            on_grid = _on_grid(fraction, cumulative, grid)
            rows += [(kind, gamma, f, c) for f, c in zip(grid, on_grid)]
            summary["hardest_share"][kind][f"{gamma:g}"] = {
                f"{f:g}": _hardest_share(cumulative, f) for f in HARDEST_FRACTIONS
            }
        ax.set_title(f"{kind} samples ({summary['samples'].get(kind, 0):,})")
        ax.set_xlabel("fraction of samples")
        ax.set_ylabel("cumulative normalized loss")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "loss_cdf.png"), dpi=120)
    plt.close(fig)
    with open(os.path.join(output_dir, "loss_cdf.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["samples", "gamma", "fraction", "cumulative_loss"])
        writer.writerows((k, f"{g:g}", f"{fr:.4f}", f"{c:.6g}") for k, g, fr, c in rows)
    with open(os.path.join(output_dir, "loss_cdf.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _mapper(cfg, lazy=None) -> RobustDatasetMapper:
    """The trainer's mapper (ground truth kept, crowd regions with CROWD_IGNORE) at the test
    resolution, with no random augmentation and no image skipped; of a ``.py`` config
    (``lazy``), its ``dataloader.train.mapper`` so changed (``cfg``: its :func:`yacs_keys`)."""
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    if lazy is None:
        return build_dataset_mapper(
            cfg, is_train=True, augmentations=[resize], skip_unreadable=False
        )
    node = lazy.dataloader.train.mapper
    overrides = {"augmentations": []}
    if "skip_unreadable" in node:
        overrides["skip_unreadable"] = False
    saved = {key: node[key] for key in overrides if key in node}
    try:  # set in place: the node's ${..} interpolations need its parent
        node.update(overrides)
        mapper = instantiate(node)
    finally:
        node.update(saved)
    mapper.augmentations = T.AugmentationList([resize])
    return mapper


def _load(config_file: str, opts: Sequence[str]) -> Tuple[CfgNode, Optional[object]]:
    """The YAML keys of ``config_file`` (a ``.py`` config's converted) with its datasets
    registered, and the ``.py`` config itself (None for YAML)."""
    if not is_lazy_config(config_file):
        cfg = load_config(config_file, opts)
        cfg.freeze()
        register_config_datasets(cfg)
        return cfg, None
    lazy = load_lazy_config(config_file, opts)  # registers its datasets
    return yacs_keys(lazy), lazy


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Figure 4 of the focal loss paper: the "
                                     "cumulative distribution of the loss of a trained model.")
    parser.add_argument("--config-file", required=True, help="YAML or Python (lazy) .py config")
    parser.add_argument("--weights", required=True, help="checkpoint of the trained model")
    parser.add_argument("--dataset", default=None,
                        help="registered dataset name (default: the config's first TEST set)")
    parser.add_argument("--gammas", type=float, nargs="+", default=list(DEFAULT_GAMMAS))
    parser.add_argument("--output", default=None,
                        help="output directory (default: <OUTPUT_DIR>/loss_cdf)")
    parser.add_argument("--max-images", type=int, default=500,
                        help="first images of the dataset to use (Fig. 4: 'a large number')")
    parser.add_argument("--negatives-per-image", type=int, default=DEFAULT_NEGATIVES_PER_IMAGE,
                        help="at most this many negative samples per image, a uniform random "
                        "subset (0: all). COCO gives ~10M per image, 4 bytes each per gamma")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides: KEY VALUE pairs (YAML), key=value words (.py)")
    args = parser.parse_args(argv)
    if any(g < 0 for g in args.gammas):
        parser.error(f"--gammas must be >= 0, got {args.gammas}")
    if args.max_images <= 0:
        parser.error(f"--max-images must be > 0, got {args.max_images}")
    if args.negatives_per_image < 0:
        parser.error(f"--negatives-per-image must be >= 0, got {args.negatives_per_image}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    setup_logger()  # detectron2's own messages
    setup_logger(name="fvcore")  # checkpoint loading, missing or unexpected keys
    setup_logger(name="retinanet_plugin")
    cfg, lazy = _load(args.config_file, args.opts)
    if cfg.MODEL.META_ARCHITECTURE != "FocalRetinaNet":
        raise ValueError(f"MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}; the loss "
                         "distribution needs FocalRetinaNet (its anchor labelling)")
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    if dataset is None:
        raise ValueError("no --dataset given and DATASETS.TEST is empty")
    if dataset in DATASET_NAMES.values() and dataset not in DatasetCatalog.list():
        register_deepforest()
    if not os.path.isfile(args.weights):
        raise FileNotFoundError(f"--weights {args.weights}: no such file")

    model = build_model(cfg) if lazy is None else instantiate(lazy.model).to(cfg.MODEL.DEVICE)
    RetinaNetCheckpointer(model).load(args.weights)
    model.eval()
    dicts = DatasetCatalog.get(dataset)[: args.max_images]
    mapper = _mapper(cfg, lazy)
    logger.info("Loss distribution of %s on %d images of %s, gammas %s", args.weights,
                len(dicts), dataset, args.gammas)
    losses = collect_losses(model, (mapper(d) for d in dicts), args.gammas,
                            args.negatives_per_image or None)
    output = args.output or os.path.join(cfg.OUTPUT_DIR, "loss_cdf")
    title = f"{os.path.basename(args.config_file)} on {dataset} ({len(dicts)} images)"
    summary = write_outputs(losses, output, title)
    logger.info("Wrote loss_cdf.png / .csv / .json in %s; hardest-sample shares: %s", output,
                json.dumps(summary["hardest_share"]))
    return summary


if __name__ == "__main__":
    main()
