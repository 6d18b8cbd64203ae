"""FocalRetinaNet's post-processing: one description of the test-time keys, and the functions that
turn the head's outputs into detections.

:class:`PostProcessing` holds every test-time key. Eager inference
(:meth:`FocalRetinaNet.inference`), test-time augmentation (:class:`FocalRetinaNetWithTTA`) and
the exported graph (:class:`ExportableRetinaNet`) all read it, and all select detections with
:func:`select_detections`. :data:`TEST_TIME_KEYS` says which of those paths honours each key; a
path refuses a key it does not honour (:meth:`PostProcessing.check`), naming the key and the
override that runs without it, so that a new key is honoured everywhere or refused by name.

Shape shorthand:
    N: images in the minibatch
    Hi, Wi: height and width of level i
    A: anchors per location
    K: foreground classes
    C: (image, anchor, class) candidates that pass the score threshold
    M: detections kept
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from detectron2.layers import batched_nms, cat
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes

from .nms import SOFT_NMS_METHODS, box_voting, soft_nms

__all__ = [
    "NMS_TYPES",
    "PATHS",
    "TEST_TIME_KEYS",
    "PostProcessing",
    "TestTimeKey",
    "UnsupportedKeyError",
    "check_score_thresh_per_class",
    "find_candidates",
    "logit",
    "select_detections",
]

# Values of MODEL.RETINANET.NMS_TYPE: the paper's NMS, or soft-NMS with one of its decays.
NMS_TYPES = ("hard",) + tuple(f"soft_{method}" for method in SOFT_NMS_METHODS)

# The inference paths: the model's own forward, FocalRetinaNetWithTTA, ExportableRetinaNet.
PATHS = ("eager", "tta", "export")
_PATH_NAMES = {"eager": "eager inference", "tta": "test-time augmentation",
               "export": "an exported graph"}  # fmt: skip
_PATH_ACTIONS = {"eager": "run", "tta": "run test-time augmentation", "export": "export"}

# Above 1 / _DENSE_FRACTION of the locations holding a candidate, gathering them costs more than
# thresholding the whole level.
_DENSE_FRACTION = 8


class UnsupportedKeyError(ValueError):
    """A test-time key has a value that an inference path cannot honour."""


@dataclass(frozen=True)
class TestTimeKey:
    """A config key of :class:`PostProcessing` and the inference paths that honour it.

    Attributes:
        key (str): the config key.
        field (str): the :class:`PostProcessing` attribute it sets.
        paths (tuple[str]): the paths of :data:`PATHS` that honour every value of the key; the
            others refuse any value but the field's default (detectron2's behaviour).
        why (str): why the other paths cannot, for the refusal.
        applies (callable, optional): PostProcessing -> bool, whether the key has an effect
            (SOFT_NMS_SIGMA only with Gaussian soft-NMS, ...); default always.
    """

    key: str
    field: str
    paths: Tuple[str, ...] = PATHS
    why: str = ""
    applies: Optional[Callable[["PostProcessing"], bool]] = None


def _soft(pp: "PostProcessing") -> bool:
    return pp.nms_type != "hard"


# Every test-time key, and where it is honoured. The exported graph expresses per-class thresholds
# as a threshold tensor, class-agnostic NMS as NMS over one class, soft-NMS as its loop unrolled
# TEST.DETECTIONS_PER_IMAGE times, and box voting as an IoU matrix and a weighted mean.
TEST_TIME_KEYS: Tuple[TestTimeKey, ...] = (
    TestTimeKey("MODEL.RETINANET.SCORE_THRESH_TEST", "score_thresh"),
    TestTimeKey("MODEL.RETINANET.SCORE_THRESH_TEST_PER_CLASS", "score_thresh_per_class"),
    TestTimeKey("MODEL.RETINANET.TOPK_CANDIDATES_TEST", "topk_candidates"),
    TestTimeKey("MODEL.RETINANET.NMS_THRESH_TEST", "nms_thresh"),
    TestTimeKey("MODEL.RETINANET.NMS_TYPE", "nms_type"),
    TestTimeKey(
        "MODEL.RETINANET.SOFT_NMS_SIGMA", "soft_nms_sigma",
        applies=lambda pp: pp.nms_type == "soft_gaussian",
    ),
    TestTimeKey("MODEL.RETINANET.SOFT_NMS_SCORE_THRESH", "soft_nms_score_thresh", applies=_soft),
    TestTimeKey("MODEL.RETINANET.NMS_CLASS_AGNOSTIC", "class_agnostic"),
    TestTimeKey("MODEL.RETINANET.BOX_VOTING", "box_voting"),
    TestTimeKey(
        "MODEL.RETINANET.BOX_VOTING_IOU_THRESH", "box_voting_iou_thresh",
        applies=lambda pp: pp.box_voting,
    ),
    TestTimeKey("TEST.DETECTIONS_PER_IMAGE", "max_detections"),
    TestTimeKey(
        "TEST.AUG.ENABLED", "test_augmentation", paths=("tta",),
        why="which runs one image at one size",
    ),
)  # fmt: skip


def logit(p: float) -> float:
    """log(p / (1 - p)), extended to -inf / +inf outside (0, 1)."""
    if p <= 0:
        return -math.inf
    if p >= 1:
        return math.inf
    return math.log(p) - math.log1p(-p)


def _cli_value(value: Any) -> str:
    """A value as it is written on the command line after its key."""
    return str(list(value)) if isinstance(value, tuple) else str(value)


@dataclass(frozen=True)
class PostProcessing:
    """The test-time keys, as every inference path reads them; defaults give detectron2's
    RetinaNet (Sec. 4, "Inference"). Build it with :meth:`from_config`, or read a model's
    (``FocalRetinaNet.postprocessing``, ``FocalRetinaNetWithTTA.postprocessing``).

    Attributes:
        score_thresh (float): SCORE_THRESH_TEST, keep scores > this (0.05).
        score_thresh_per_class (tuple[float]): SCORE_THRESH_TEST_PER_CLASS, K thresholds
            replacing ``score_thresh`` class by class; empty: none.
        topk_candidates (int): TOPK_CANDIDATES_TEST, candidates per level and image (1000).
        nms_thresh (float): NMS_THRESH_TEST, IoU of the NMS (0.5).
        nms_type (str): NMS_TYPE, "hard", "soft_linear" or "soft_gaussian" (:func:`soft_nms`).
        soft_nms_sigma (float): SOFT_NMS_SIGMA of the Gaussian decay exp(-IoU^2 / sigma).
        soft_nms_score_thresh (float): SOFT_NMS_SCORE_THRESH, soft-NMS drops scores <= this.
        class_agnostic (bool): NMS_CLASS_AGNOSTIC, one NMS over all classes.
        box_voting (bool): BOX_VOTING (:func:`box_voting`).
        box_voting_iou_thresh (float): BOX_VOTING_IOU_THRESH, IoU at or above which a candidate
            votes.
        max_detections (int): TEST.DETECTIONS_PER_IMAGE (100).
        test_augmentation (bool): TEST.AUG.ENABLED: candidates are pooled over resized and
            flipped versions of the image before the selection.
    """

    score_thresh: float = 0.05
    score_thresh_per_class: Tuple[float, ...] = ()
    topk_candidates: int = 1000
    nms_thresh: float = 0.5
    nms_type: str = "hard"
    soft_nms_sigma: float = 0.5
    soft_nms_score_thresh: float = 0.001
    class_agnostic: bool = False
    box_voting: bool = False
    box_voting_iou_thresh: float = 0.8
    max_detections: int = 100
    test_augmentation: bool = False

    def __post_init__(self):
        # Frozen: normalise through object.__setattr__, as dataclasses document.
        object.__setattr__(self, "score_thresh_per_class", tuple(self.score_thresh_per_class))
        if self.nms_type not in NMS_TYPES:
            raise ValueError(
                f"MODEL.RETINANET.NMS_TYPE = {self.nms_type!r} is not one of {NMS_TYPES}"
            )

    @classmethod
    def from_config(cls, cfg) -> "PostProcessing":
        """The keys of ``cfg``, checked; a ValueError names the key at fault."""
        rcfg = cfg.MODEL.RETINANET
        per_class = tuple(rcfg.SCORE_THRESH_TEST_PER_CLASS)
        if per_class and len(per_class) != rcfg.NUM_CLASSES:
            raise ValueError(
                "MODEL.RETINANET.SCORE_THRESH_TEST_PER_CLASS needs NUM_CLASSES = "
                f"{rcfg.NUM_CLASSES} values (or none), got {len(per_class)}: {list(per_class)}"
            )
        if not 0 <= rcfg.NMS_THRESH_TEST <= 1:
            raise ValueError(
                f"MODEL.RETINANET.NMS_THRESH_TEST must be an IoU in [0, 1], got "
                f"{rcfg.NMS_THRESH_TEST}"
            )
        if not rcfg.SOFT_NMS_SIGMA > 0:
            raise ValueError(
                f"MODEL.RETINANET.SOFT_NMS_SIGMA must be > 0, got {rcfg.SOFT_NMS_SIGMA}"
            )
        if not 0 <= rcfg.BOX_VOTING_IOU_THRESH <= 1:
            raise ValueError(
                "MODEL.RETINANET.BOX_VOTING_IOU_THRESH must be in [0, 1], got "
                f"{rcfg.BOX_VOTING_IOU_THRESH}"
            )
        return cls(
            score_thresh=rcfg.SCORE_THRESH_TEST,
            score_thresh_per_class=per_class,
            topk_candidates=rcfg.TOPK_CANDIDATES_TEST,
            nms_thresh=rcfg.NMS_THRESH_TEST,
            nms_type=rcfg.NMS_TYPE,
            soft_nms_sigma=rcfg.SOFT_NMS_SIGMA,
            soft_nms_score_thresh=rcfg.SOFT_NMS_SCORE_THRESH,
            class_agnostic=rcfg.NMS_CLASS_AGNOSTIC,
            box_voting=rcfg.BOX_VOTING,
            box_voting_iou_thresh=rcfg.BOX_VOTING_IOU_THRESH,
            max_detections=cfg.TEST.DETECTIONS_PER_IMAGE,
            test_augmentation=cfg.TEST.AUG.ENABLED,
        )

    def unsupported(self, path: str) -> List[str]:
        """Why ``path`` (one of :data:`PATHS`) cannot run this post-processing: one sentence per
        key it does not honour, naming the key and the override that runs without it."""
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        problems = []
        for spec in TEST_TIME_KEYS:
            value, default = getattr(self, spec.field), defaults[spec.field]
            if path in spec.paths or value == default:
                continue
            if spec.applies is not None and not spec.applies(self):
                continue
            why = f" ({spec.why})" if spec.why else ""
            problems.append(
                f"{spec.key} {_cli_value(value)} cannot be expressed in {_PATH_NAMES[path]}{why}; "
                f"{_PATH_ACTIONS[path]} with {spec.key} {_cli_value(default)}"
            )
        return problems

    def check(self, path: str) -> None:
        """Raise :class:`UnsupportedKeyError` if ``path`` does not honour a key's value."""
        problems = self.unsupported(path)
        if problems:
            raise UnsupportedKeyError("; ".join(problems))

    def logit_thresholds(self, num_classes: int, device: torch.device) -> Tensor:
        """(K,) score thresholds in logit space, one per class."""
        values = self.score_thresh_per_class or (self.score_thresh,) * num_classes
        return torch.tensor([logit(t) for t in values], device=device)


def check_score_thresh_per_class(thresholds: Sequence[float], num_classes: int) -> None:
    """ValueError unless ``thresholds`` is empty or holds one threshold per class."""
    if thresholds and len(thresholds) != num_classes:
        raise ValueError(
            f"test_score_thresh_per_class needs one threshold per class ({num_classes}), got "
            f"{len(thresholds)}"
        )


# ------------------------------------------------------------------------------------------
# Selection: shared by eager inference, TTA and the exported graph (traceable)
# ------------------------------------------------------------------------------------------
def select_detections(
    pp: PostProcessing, boxes: Tensor, scores: Tensor, classes: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """NMS (per class or class-agnostic; hard or soft), the top ``max_detections`` and optionally
    box voting, over one image's candidates. Written with traceable operators only, so that the
    exported graph runs this very function.

    Args:
        pp (PostProcessing): the keys.
        boxes (Tensor): (C, 4) XYXY.
        scores (Tensor): (C,).
        classes (Tensor): (C,) int64.

    Returns:
        boxes (M, 4), scores (M,) (soft-NMS: the decayed scores) and classes (M,), by decreasing
        score.
    """
    idxs = torch.zeros_like(classes) if pp.class_agnostic else classes
    if pp.nms_type == "hard":
        keep = batched_nms(boxes, scores, idxs, pp.nms_thresh)[: pp.max_detections]
        kept_scores = scores[keep]
    else:
        keep, kept_scores = soft_nms(
            boxes,
            scores,
            idxs,
            method=pp.nms_type[len("soft_") :],
            iou_threshold=pp.nms_thresh,
            sigma=pp.soft_nms_sigma,
            score_threshold=pp.soft_nms_score_thresh,
            max_detections=pp.max_detections,
        )
    kept_boxes = boxes[keep]
    if pp.box_voting:
        kept_boxes = box_voting(
            kept_boxes, idxs[keep], boxes, scores, idxs, pp.box_voting_iou_thresh
        )
    return kept_boxes, kept_scores, classes[keep]


# ------------------------------------------------------------------------------------------
# Candidates of eager inference (the exported graph has its own, see ExportableRetinaNet)
# ------------------------------------------------------------------------------------------
def find_candidates(
    pp: PostProcessing,
    anchors: List[Boxes],
    pred_logits: List[Tensor],
    pred_deltas: List[Tensor],
    box2box_transform: Box2BoxTransform,
    num_images: int,
) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """Each image's decoded candidates before NMS: above the score threshold(s), at most
    ``topk_candidates`` per level.

    Scores are thresholded in logit space, x > logit(t) being sigmoid(x) > t, directly in the
    head's (N, A*K, Hi, Wi) layout, so neither the sigmoid nor the (N, Hi*Wi*A, K) transpose of
    the full logits is ever computed; a level with few candidates (a trained head) is searched
    for all images at once, one with many (an untrained head) image by image to bound the peak
    memory; only the C candidates are gathered, decoded and passed through the sigmoid. The
    head's outputs are not modified.

    Args:
        pp (PostProcessing): the keys.
        anchors (list[Boxes]): L levels of (Hi*Wi*A, 4) anchors.
        pred_logits (list[Tensor]): L levels of (N, A*K, Hi, Wi).
        pred_deltas (list[Tensor]): L levels of (N, A*4, Hi, Wi).
        box2box_transform (Box2BoxTransform): decodes the deltas.
        num_images (int): N.

    Returns:
        list[tuple[Tensor, Tensor, Tensor]]: N (boxes (C_i, 4) float32 XYXY, unclipped, in the
        input image's coordinates; scores (C_i,) float32; classes (C_i,) int64).
    """
    num_classes = pred_logits[0].shape[1] // (pred_deltas[0].shape[1] // 4)
    thresh = logit(pp.score_thresh)
    class_thresh = None
    if pp.score_thresh_per_class:
        class_thresh = pp.logit_thresholds(num_classes, pred_logits[0].device)
        thresh = class_thresh.min().item()
    levels = [
        _level_candidates(a, x, d, thresh, class_thresh, pp.topk_candidates)
        for a, x, d in zip(anchors, pred_logits, pred_deltas)
    ]
    image_idx, logits, classes, deltas, anchor_boxes = (cat(list(t)) for t in zip(*levels))
    # Decoding and sigmoid run once over the C candidates of every image and level.
    boxes = box2box_transform.apply_deltas(deltas, anchor_boxes)  # float32
    scores = logits.float().sigmoid()

    if num_images == 1:
        return [(boxes, scores, classes)]
    order = torch.argsort(image_idx, stable=True)
    counts = torch.bincount(image_idx, minlength=num_images).tolist()
    per_image = (t[order].split(counts) for t in (boxes, scores, classes))
    return list(zip(*per_image))


def _level_candidates(
    anchors: Boxes,
    logits: Tensor,
    deltas: Tensor,
    thresh: float,
    class_thresh: Optional[Tensor],
    topk: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The top-k candidates above the threshold of one level, for all images.

    Args:
        anchors (Boxes): (Hi*Wi*A, 4), in (y, x, anchor) order.
        logits (Tensor): (N, A*K, Hi, Wi).
        deltas (Tensor): (N, A*4, Hi, Wi).
        thresh (float): logit threshold; with ``class_thresh``, the smallest of them.
        class_thresh (Tensor, optional): (K,) per-class logit thresholds.
        topk (int): candidates kept per image.

    Returns:
        Tensors of the C kept candidates: image index (C,), logit (C,), class (C,),
        deltas (C, 4), anchor box (C, 4).
    """
    num_images, _, height, width = logits.shape
    num_anchors = deltas.shape[1] // 4
    num_classes = logits.shape[1] // num_anchors
    # A trained detector scores few locations above the threshold. Finding them from the
    # per-location maximum (N, Hi, Wi) reads the logits once and leaves a small mask to search,
    # where ``(logits > thresh).nonzero()`` would write and scan a mask as large as the logits.
    # "not <=" keeps locations whose maximum is NaN, so that their other scores are tested one
    # by one, as detectron2 does.
    located = ~(logits.amax(dim=1) <= thresh)
    cells = located.nonzero()  # (M, 3)
    # Channel a*K + k holds class k: per-class thresholds repeat over the A anchors.
    channel_thresh = thresh if class_thresh is None else class_thresh.repeat(num_anchors)
    if cells.shape[0] * _DENSE_FRACTION > located.numel():
        # Most locations have a candidate (an untrained head).
        if class_thresh is not None:
            channel_thresh = channel_thresh[:, None, None]
        image_idx, channel, y, x, values = _dense_candidates(logits, channel_thresh, topk)
    else:
        cell_image, cell_y, cell_x = cells.unbind(1)
        # Advanced indices around a slice put the indexed dim first: (M, A*K).
        cell_scores = logits[cell_image, :, cell_y, cell_x]
        cell, channel = (cell_scores > channel_thresh).nonzero().unbind(1)
        image_idx, y, x = cell_image[cell], cell_y[cell], cell_x[cell]
        values = logits[image_idx, channel, y, x]
        if values.numel() > topk:
            keep = _topk_per_image(image_idx, values, num_images, topk)
            image_idx, channel, y, x, values = (t[keep] for t in (image_idx, channel, y, x, values))
    anchor_in_cell = torch.div(channel, num_classes, rounding_mode="floor")
    classes = channel - anchor_in_cell * num_classes
    anchor_idx = (y * width + x) * num_anchors + anchor_in_cell
    # Advanced indices around a slice: the indexed dim comes first, giving (C, 4).
    cand_deltas = deltas.view(num_images, num_anchors, 4, height, width)[
        image_idx, anchor_in_cell, :, y, x
    ]
    return image_idx, values, classes, cand_deltas, anchors.tensor[anchor_idx]


def _dense_candidates(
    logits: Tensor, thresh: Union[float, Tensor], topk: int
) -> Tuple[Tensor, ...]:
    """The top-k candidates above the threshold of one level, image by image.

    Each image's candidates are cut to its top-k before the next image is searched, so the peak
    memory (its mask and the ``nonzero`` indices, 24 bytes per candidate) is that of one image
    rather than growing with the batch.

    Args:
        logits (Tensor): (N, A*K, Hi, Wi).
        thresh (float or Tensor): logit threshold, or (A*K, 1, 1) per channel.
        topk (int): candidates kept per image.

    Returns:
        Tensors of the C kept candidates: image index, channel, y, x and logit, all (C,).
    """
    per_image = []
    for i, logits_i in enumerate(logits):
        channel, y, x = (logits_i > thresh).nonzero().unbind(1)
        values = logits_i[channel, y, x]
        if values.numel() > topk:
            keep = values.topk(topk, sorted=False).indices
            channel, y, x, values = channel[keep], y[keep], x[keep], values[keep]
        per_image.append((torch.full_like(channel, i), channel, y, x, values))
    return tuple(cat(list(t)) for t in zip(*per_image))


def _topk_per_image(image_idx: Tensor, values: Tensor, num_images: int, topk: int) -> Tensor:
    """Indices of the ``topk`` largest ``values`` of each image.

    Args:
        image_idx (Tensor): (C,) sorted image index of each candidate (``nonzero`` order).
        values (Tensor): (C,) logits.
        num_images (int): N.
        topk (int): candidates kept per image.
    """
    if num_images == 1:
        return values.topk(topk, sorted=False).indices
    counts = torch.bincount(image_idx, minlength=num_images).tolist()
    keep, start = [], 0
    for count in counts:
        if count > topk:
            keep.append(values[start : start + count].topk(topk, sorted=False).indices + start)
        else:
            keep.append(torch.arange(start, start + count, device=values.device))
        start += count
    return cat(keep)
