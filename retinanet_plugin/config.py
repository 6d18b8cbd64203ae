"""Config keys added by retinanet_plugin.

Every ``MODEL.RETINANET.*`` key detectron2 already defines keeps detectron2's meaning, so
detectron2's own RetinaNet configs build ``FocalRetinaNet`` unchanged once ``META_ARCHITECTURE``
names it. The keys below are new; each comment gives its meaning and, where the paper has one, its
symbol. :func:`load_config` builds the config every entry point uses; YAML files are read by
:mod:`retinanet_plugin.config_file`.
"""

from typing import Sequence

from detectron2.config import CfgNode as CN

from .backbone import add_mobilenet_config
from .config_file import load_config_file

__all__ = ["add_retinanet_plugin_config", "load_config", "load_config_file"]


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

    _add_test_time_and_crowd_config(cfg.MODEL.RETINANET)

    # ---- Killed runs resume exactly (issue 8) ----
    # Whether each training image's random augmentations (flips, scale choice) are drawn from a
    # seed made of the sampler's seed and the image's position in the data stream, so that a run
    # killed and resumed sees the same augmented batches as an uninterrupted one. False is
    # detectron2's: one random stream per loader worker, reseeded whenever workers start (on
    # resume too). Takes effect with DATALOADER.SAMPLER_TRAIN = "TrainingSampler".
    _set_default(cfg.DATALOADER, "PER_IMAGE_SEED", False)

    add_mobilenet_config(cfg)

    # ---- Own data (retinanet_plugin.data.registration, train_net.py setup()) ----------------
    # COCO instances datasets to register, as [[name, json_file, image_root], ...]; DATASETS.TRAIN
    # and DATASETS.TEST can then name them. Relative paths resolve against the folder of the
    # YAML file that sets this key (the --config-file or the _BASE_ it inherits the key from);
    # given on the command line, against the working directory.
    _set_default(cfg.DATASETS, "COCO_INSTANCES", [])
    # How every COCO dataset the run uses is checked before training (and before --eval-only):
    # "header" (image files exist, are not truncated, and their header size, after EXIF
    # rotation, equals the JSON's; no decoding), "decode" (also decode every image) or "off".
    # JSON-level checks (boxes, ids, categories vs NUM_CLASSES) run unless "off".
    _set_default(cfg.DATASETS, "CHECK", "header")
    # True: an image that fails to decode during training is logged by name, counted in the
    # metrics (data/skipped_images) and replaced by another; False (detectron2's behaviour):
    # the run stops with the file name.
    _set_default(cfg.DATALOADER, "SKIP_UNREADABLE_IMAGES", False)

    # ---- Augmentations for orientation-free imagery (retinanet_plugin.data.augmentations) ----
    # Applied in training after detectron2's resize and RANDOM_FLIP, by the dataset mapper.
    # A top-bottom flip with probability 0.5, on top of RANDOM_FLIP's.
    _set_default(cfg.INPUT, "VERTICAL_FLIP", False)
    # A rotation by 0 / 90 / 180 / 270 degrees (exact: pixels moved, boxes unchanged in shape).
    _set_default(cfg.INPUT, "ROTATE_90", False)
    # Brightness, contrast and saturation each scaled by a factor in [1 - s, 1 + s]; 0 = off.
    _set_default(cfg.INPUT, "COLOR_JITTER", 0.0)

    # ---- Evaluation report (retinanet_plugin.evaluation.report; a .py config:
    # dataloader.report = dict(enabled=..., score_thresh=..., ...), the same keys in lower case) --
    if "REPORT" not in cfg.TEST:
        cfg.TEST.REPORT = CN()
    # After each evaluation, write <OUTPUT_DIR>/inference/<dataset>/report/: per-class AP, PR
    # curves, confusion matrix, the AP each error type costs, the worst images. Off by default:
    # it re-runs COCOeval about 60 times (seconds on the demo's 16 tiles).
    _set_default(cfg.TEST.REPORT, "ENABLED", False)
    # The confusion matrix and the worst images count detections scoring at least SCORE_THRESH,
    # matched to ground truth at IoU at least IOU_THRESH.
    _set_default(cfg.TEST.REPORT, "SCORE_THRESH", 0.3)
    _set_default(cfg.TEST.REPORT, "IOU_THRESH", 0.5)
    # How many of the images with the most missed + false detections are drawn.
    _set_default(cfg.TEST.REPORT, "WORST_IMAGES", 4)
    # Include the model's parameters and FLOPs (retinanet_plugin.analysis.model_cost).
    _set_default(cfg.TEST.REPORT, "MODEL_COST", True)

    _add_precision_config(cfg)
    return cfg


def _add_precision_config(cfg: CN) -> None:
    """Mixed precision and memory format (retinanet_plugin.precision); defaults: float32 in
    inference, detectron2's float16 AMP on CUDA, contiguous (NCHW) tensors."""
    # The autocast dtype of SOLVER.AMP.ENABLED: "float16" (detectron2's AMPTrainer, float16 with
    # a GradScaler; CUDA only), "bfloat16" (no GradScaler: CPUs with AVX-512 BF16 / AMX, or
    # CUDA Ampere and later) or "auto" (float16 on CUDA, bfloat16 on CPU). Weights, optimizer
    # state and the losses stay float32.
    _set_default(cfg.SOLVER.AMP, "PRECISION", "auto")
    if "AMP" not in cfg.TEST:
        cfg.TEST.AMP = CN()
    # Inference (evaluation, predict, TTA) with the backbone and head under autocast in
    # TEST.AMP.PRECISION (same values as SOLVER.AMP.PRECISION); boxes and scores are computed
    # in float32 from the head's outputs.
    _set_default(cfg.TEST.AMP, "ENABLED", False)
    _set_default(cfg.TEST.AMP, "PRECISION", "auto")
    # Channels-last (NHWC) memory format for the model's 4-d weights and its input batch, in
    # training and inference; same results, faster convolutions with oneDNN (CPU) and cuDNN.
    _set_default(cfg.MODEL, "CHANNELS_LAST", False)


def _add_test_time_and_crowd_config(rcfg: CN) -> None:
    """NMS, score-threshold and crowd-region keys (issue 9, "Test-time accuracy").

    Test-time augmentation itself uses detectron2's own TEST.AUG.{ENABLED, MIN_SIZES, MAX_SIZE,
    FLIP} keys. The defaults give detectron2's RetinaNet behaviour.
    """
    # Per-class score thresholds: K values replacing SCORE_THRESH_TEST class by class; empty =
    # SCORE_THRESH_TEST (0.05 in Sec. 4, "Inference") for every class.
    _set_default(rcfg, "SCORE_THRESH_TEST_PER_CLASS", [])
    # Final suppression: "hard" (the paper's NMS at NMS_THRESH_TEST), "soft_linear" (soft-NMS,
    # Bodla et al. 2017: a score times 1 - IoU where IoU > NMS_THRESH_TEST) or "soft_gaussian"
    # (a score times exp(-IoU^2 / SOFT_NMS_SIGMA)).
    _set_default(rcfg, "NMS_TYPE", "hard")
    # sigma of the Gaussian soft-NMS decay (0.5 in Bodla et al.).
    _set_default(rcfg, "SOFT_NMS_SIGMA", 0.5)
    # Soft-NMS drops a detection once its decayed score is <= this (0.001 in Bodla et al.).
    _set_default(rcfg, "SOFT_NMS_SCORE_THRESH", 0.001)
    # One suppression over all classes instead of one per class.
    _set_default(rcfg, "NMS_CLASS_AGNOSTIC", False)
    # Box voting after NMS (Detectron's TEST.BBOX_VOTE): each kept box becomes the score-weighted
    # mean of the candidates of its class whose IoU with it is >= BOX_VOTING_IOU_THRESH.
    _set_default(rcfg, "BOX_VOTING", False)
    _set_default(rcfg, "BOX_VOTING_IOU_THRESH", 0.8)
    # Crowd regions (COCO iscrowd=1), which detectron2's DatasetMapper drops. With CROWD_IGNORE
    # the training loader keeps them (marked instances.gt_is_crowd) and anchors labelled
    # background whose intersection with a crowd box exceeds CROWD_IOA_THRESH of the anchor's
    # area are ignored instead (Detectron's CROWD_FILTER_THRESH, 0.7). Crowd boxes never become
    # foreground either way.
    _set_default(rcfg, "CROWD_IGNORE", False)
    _set_default(rcfg, "CROWD_IOA_THRESH", 0.7)


def _set_default(node: CN, key: str, value) -> None:
    if key not in node:
        node[key] = value


def load_config(config_file: str, opts: Sequence[str] = ()) -> CN:
    """The config every entry point builds: detectron2's defaults, this plugin's keys, the YAML
    file merged safely (:func:`load_config_file`), the KEY VALUE ``opts`` on top, and the paths
    of ``DATASETS.COCO_INSTANCES`` resolved (see that key). Not frozen.
    """
    from detectron2.config import get_cfg

    from .data.registration import resolve_dataset_paths

    cfg = get_cfg()
    add_retinanet_plugin_config(cfg)
    load_config_file(cfg, config_file)  # refuses YAML tags that would run code
    cfg.merge_from_list(list(opts))
    resolve_dataset_paths(cfg, config_file, opts)
    check_precision_keys(cfg)
    return cfg


def check_precision_keys(cfg: CN) -> None:
    """Refuses, by key, precision and memory-format settings that would be silently ignored: an
    unknown ``SOLVER.AMP.PRECISION`` / ``TEST.AMP.PRECISION`` (also while AMP is off), and
    ``MODEL.CHANNELS_LAST`` / ``TEST.AMP.ENABLED`` with a meta-architecture that does not read
    them (only :class:`FocalRetinaNet` and its subclasses do; ``SOLVER.AMP`` is the trainer's
    and serves any model)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from .meta_arch import FocalRetinaNet
    from .precision import PRECISIONS

    for key in ("SOLVER.AMP.PRECISION", "TEST.AMP.PRECISION"):
        section, _, name = key.partition(".")
        value = cfg[section].AMP.PRECISION
        if value not in PRECISIONS:
            raise ValueError(f"{key} must be one of {PRECISIONS}, got {value!r}")
    arch = cfg.MODEL.META_ARCHITECTURE
    try:
        reads_them = issubclass(META_ARCH_REGISTRY.get(arch), FocalRetinaNet)
    except KeyError:
        return  # detectron2 names an unknown architecture when the model is built
    for key, on in (("MODEL.CHANNELS_LAST", cfg.MODEL.CHANNELS_LAST),
                    ("TEST.AMP.ENABLED", cfg.TEST.AMP.ENABLED)):
        if on and not reads_them:
            raise ValueError(
                f"{key} True is read only by FocalRetinaNet (and its subclasses); "
                f"MODEL.META_ARCHITECTURE {arch} would ignore it: set {key} False "
                "(SOLVER.AMP trains any model in mixed precision)"
            )
