"""Config keys added by retinanet_plugin.

Every ``MODEL.RETINANET.*`` key detectron2 already defines keeps detectron2's meaning, so
detectron2's own RetinaNet configs build ``FocalRetinaNet`` unchanged once ``META_ARCHITECTURE``
names it. The keys below are new; each comment gives its meaning and, where the paper has one, its
symbol.
"""

import yaml

from detectron2.config import CfgNode as CN

from .backbone import add_mobilenet_config


def add_retinanet_plugin_config(cfg: CN) -> CN:
    """Add retinanet_plugin's keys to ``cfg`` in place (and return it).

    Only the given cfg changes; detectron2's global defaults are never touched. Calling it twice
    is harmless: keys already present keep their (possibly user-set) values.
    """
    _set_default(cfg.MODEL.RETINANET, "HEAD_NAME", "FocalRetinaNetHead")
    # Name in retinanet_plugin's CLS_LOSS_REGISTRY of the classification loss:
    # SigmoidFocalLoss (Eq. 5), SigmoidFocalLossStar (Appendix A, FL*), SoftmaxFocalLoss,
    # AlphaBalancedCE (gamma = 0, Table 1a) or OHEMLoss (Table 1d).
    _set_default(cfg.MODEL.RETINANET, "CLS_LOSS", "SigmoidFocalLoss")
    # FL* offset beta (Appendix A): p*_t = sigmoid(gamma * x_t + beta). FL* takes its gamma from
    # FOCAL_LOSS_GAMMA.
    _set_default(cfg.MODEL.RETINANET, "FOCAL_LOSS_STAR_BETA", 0.0)
    # Optional per-class alpha (one value per class, K values); empty = use FOCAL_LOSS_ALPHA
    # for every class.
    _set_default(cfg.MODEL.RETINANET, "FOCAL_LOSS_ALPHA_PER_CLASS", [])
    # Whether an anchor whose best IoU with a ground-truth box is below the foreground threshold
    # still becomes foreground when it is that box's best anchor. detectron2 hard-codes True;
    # the paper's rule (Sec. 4) is strict thresholds, i.e. False.
    _set_default(cfg.MODEL.RETINANET, "ALLOW_LOW_QUALITY_MATCHES", True)
    # Loss normaliser: "ema" = detectron2's per-process EMA of the number of foreground anchors;
    # "global" = this step's foreground count summed over all processes, divided by the number
    # of processes (DDP averages gradients, so the step equals one over the whole batch
    # normalised by its foreground count, as Sec. 3.3 prescribes, whatever the number of GPUs);
    # "batch" = this step's foreground count in this process.
    _set_default(cfg.MODEL.RETINANET, "LOSS_NORMALIZER", "ema")
    # EMA momentum and initial value for LOSS_NORMALIZER = "ema" (detectron2: 0.9 and 100).
    _set_default(cfg.MODEL.RETINANET, "LOSS_NORMALIZER_MOMENTUM", 0.9)
    _set_default(cfg.MODEL.RETINANET, "LOSS_NORMALIZER_INIT", 100.0)

    # Online hard example mining, the baseline of Table 1d (CLS_LOSS = "OHEMLoss").
    if "OHEM" not in cfg.MODEL.RETINANET:
        cfg.MODEL.RETINANET.OHEM = CN()
    ohem = cfg.MODEL.RETINANET.OHEM
    # Anchors kept per image after NMS over anchor boxes, hardest (highest loss) first:
    # 128 / 256 / 512 in Table 1d.
    _set_default(ohem, "BATCH_SIZE_PER_IMAGE", 256)
    # IoU threshold of the NMS over anchor boxes, scored by loss (0.5 or 0.7 in Table 1d).
    _set_default(ohem, "NMS_THRESH", 0.7)
    # Fraction of the minibatch reserved for foreground anchors: 0.25 gives the 1:3
    # positive:negative ratio of Table 1d; a negative value keeps the hardest anchors whatever
    # their label.
    _set_default(ohem, "POSITIVE_FRACTION", -1.0)

    # ---- Killed runs resume exactly (issue 8) ----
    # Whether each training image's random augmentations (flips, scale choice) are drawn from a
    # seed made of the sampler's seed and the image's position in the data stream, so that a run
    # killed and resumed sees the same augmented batches as an uninterrupted one. False is
    # detectron2's: one random stream per loader worker, reseeded whenever workers start (on
    # resume too). Takes effect with DATALOADER.SAMPLER_TRAIN = "TrainingSampler".
    _set_default(cfg.DATALOADER, "PER_IMAGE_SEED", False)

    add_mobilenet_config(cfg)
    return cfg


def _set_default(node: CN, key: str, value) -> None:
    if key not in node:
        node[key] = value


# ---- Hostile files: configs are loaded without yaml.unsafe_load (issue 8) ----


def load_config_file(cfg: CN, path: str) -> CN:
    """Merge the YAML config ``path`` (and its ``_BASE_`` files) into ``cfg`` safely.

    detectron2's ``CfgNode.merge_from_file`` falls back to ``yaml.unsafe_load`` when a file holds
    a Python tag (``!!python/object/apply:os.system [...]`` runs a command while loading). Here
    such a file is refused: configs hold only plain values.

    Args:
        cfg (CfgNode): the config to merge into, in place (and returned).
        path (str): the YAML file.

    Raises:
        ValueError: naming the file when it holds a tag that builds Python objects.
    """
    try:
        cfg.merge_from_file(path, allow_unsafe=False)
    except yaml.constructor.ConstructorError as e:
        raise ValueError(
            f"Config file {path} (or one of its _BASE_ files) holds a YAML tag that builds Python "
            f"objects, which could run code while loading; refused. Configs hold only plain "
            f"values (numbers, strings, lists, mappings). YAML error: {e}"
        ) from e
    return cfg
