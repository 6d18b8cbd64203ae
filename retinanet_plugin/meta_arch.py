"""FocalRetinaNet: RetinaNet (Lin et al., ICCV 2017, Sec. 4), swappable head, loss and normaliser.

It computes what detectron2's ``RetinaNet`` computes (same weights give the same losses and
detections) but takes its classification loss from ``CLS_LOSS_REGISTRY``, its head from
``RETINANET_HEAD_REGISTRY``, and post-processes in logit space without a Python loop over images
and levels of full-size tensors.

Shape shorthand:
    N: images in the minibatch
    L: feature levels (P3-P7)
    Hi, Wi: height and width of level i
    A: anchors per location
    K: foreground classes
    R: anchors of one image over all levels, sum_i Hi * Wi * A
    C: (image, anchor, class) candidates that pass the score threshold
"""

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import batched_nms, cat
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.backbone import Backbone, build_backbone
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.build import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.dense_detector import DenseDetector, permute_to_N_HWA_K
from detectron2.structures import Boxes, ImageList, Instances, pairwise_ioa, pairwise_iou
from detectron2.utils.events import get_event_storage

from .box_regression import check_box_reg_loss_type, dense_box_reg_loss
from .head import build_retinanet_head, head_input_shapes
from .loss_normalizer import LossNormalizer, build_loss_normalizer
from .losses import build_cls_loss
from .nms import SOFT_NMS_METHODS, box_voting, soft_nms

__all__ = ["FocalRetinaNet", "build_anchor_matcher", "check_gt_classes"]


def build_anchor_matcher(
    thresholds: Sequence[float],
    labels: Sequence[int],
    allow_low_quality_matches: bool,
    key: str = "MODEL.RETINANET",
) -> Matcher:
    """A :class:`Matcher`, with ValueErrors naming ``{key}.IOU_THRESHOLDS`` / ``IOU_LABELS``.

    detectron2's Matcher checks the same things with bare asserts (and not at all under
    ``python -O``).

    Args:
        thresholds (Sequence[float]): increasing IoU thresholds in (0, 1] (the paper: 0.4, 0.5).
        labels (Sequence[int]): one more label than thresholds, each -1 (ignore), 0 (background)
            or 1 (foreground).
        allow_low_quality_matches (bool): see :class:`Matcher`.
        key (str): config node of the two keys, for messages.
    """
    thresholds, labels = list(thresholds), list(labels)
    if not thresholds or not all(0 < t <= 1 for t in thresholds):
        raise ValueError(f"{key}.IOU_THRESHOLDS must be IoUs in (0, 1], got {thresholds}")
    if any(lo > hi for lo, hi in zip(thresholds[:-1], thresholds[1:])):
        raise ValueError(
            f"{key}.IOU_THRESHOLDS must be in increasing order (background < ignore < "
            f"foreground), got {thresholds}"
        )
    if len(labels) != len(thresholds) + 1 or not all(v in (-1, 0, 1) for v in labels):
        raise ValueError(
            f"{key}.IOU_LABELS must hold len(IOU_THRESHOLDS) + 1 = {len(thresholds) + 1} values "
            f"from {{-1, 0, 1}}, got {labels}"
        )
    return Matcher(thresholds, labels, allow_low_quality_matches=allow_low_quality_matches)


# Above 1 / _DENSE_FRACTION of the locations holding a candidate, gathering them costs more than
# thresholding the whole level.
_DENSE_FRACTION = 8


def _logit(p: float) -> float:
    """log(p / (1 - p)), extended to -inf / +inf outside (0, 1)."""
    if p <= 0:
        return -math.inf
    if p >= 1:
        return math.inf
    return math.log(p) - math.log1p(-p)


def check_gt_classes(
    gt_classes: Sequence[Tensor], num_classes: int, names: Sequence[str]
) -> None:
    """Raise ValueError if a ground-truth class id is outside [0, K).

    detectron2's RetinaNet refuses such ids (through ``one_hot``); left alone, the classification
    loss would take id K as background while the box loss and the normaliser count it as
    foreground, and id -1 would mark the anchors "ignore". Reading the ids is a host sync when
    they live on an accelerator: call this on host tensors, or only once a sync showed an error.

    Args:
        gt_classes (Sequence[Tensor]): per image, its (G,) class ids.
        num_classes (int): K, ``MODEL.RETINANET.NUM_CLASSES``.
        names (Sequence[str]): per image, how the message names it (file, image id).
    """
    for classes, name in zip(gt_classes, names):
        bad = classes[(classes < 0) | (classes >= num_classes)]
        if bad.numel():
            raise ValueError(
                f"{name} has ground-truth class ids {sorted(set(bad.tolist()))} outside "
                f"[0, MODEL.RETINANET.NUM_CLASSES = {num_classes}): set NUM_CLASSES to the "
                "dataset's number of classes, or map the dataset's category ids to 0..K-1"
            )


def _describe_input(index: int, inputs: Dict[str, Any]) -> str:
    fields = [f"{k} {inputs[k]!r}" for k in ("file_name", "image_id") if k in inputs]
    return f"image {index} of the batch" + (f" ({', '.join(fields)})" if fields else "")


# Values of MODEL.RETINANET.NMS_TYPE: the paper's NMS, or soft-NMS with one of its decays.
NMS_TYPES = ("hard",) + tuple(f"soft_{method}" for method in SOFT_NMS_METHODS)


def _test_time_options(rcfg) -> Dict[str, Any]:
    """Constructor arguments of the NMS, threshold and crowd keys, checked, naming the key."""
    per_class = list(rcfg.SCORE_THRESH_TEST_PER_CLASS)
    if per_class and len(per_class) != rcfg.NUM_CLASSES:
        raise ValueError(
            f"MODEL.RETINANET.SCORE_THRESH_TEST_PER_CLASS needs NUM_CLASSES = {rcfg.NUM_CLASSES} "
            f"values (or none), got {len(per_class)}: {per_class}"
        )
    if rcfg.NMS_TYPE not in NMS_TYPES:
        raise ValueError(f"MODEL.RETINANET.NMS_TYPE = {rcfg.NMS_TYPE!r} is not one of {NMS_TYPES}")
    if not rcfg.SOFT_NMS_SIGMA > 0:
        raise ValueError(f"MODEL.RETINANET.SOFT_NMS_SIGMA must be > 0, got {rcfg.SOFT_NMS_SIGMA}")
    for key in ("BOX_VOTING_IOU_THRESH", "CROWD_IOA_THRESH"):
        if not 0 <= rcfg[key] <= 1:
            raise ValueError(f"MODEL.RETINANET.{key} must be in [0, 1], got {rcfg[key]}")
    return {
        "test_score_thresh_per_class": per_class or None,
        "nms_type": rcfg.NMS_TYPE,
        "soft_nms_sigma": rcfg.SOFT_NMS_SIGMA,
        "soft_nms_score_thresh": rcfg.SOFT_NMS_SCORE_THRESH,
        "nms_class_agnostic": rcfg.NMS_CLASS_AGNOSTIC,
        "box_voting_iou_thresh": rcfg.BOX_VOTING_IOU_THRESH if rcfg.BOX_VOTING else None,
        "crowd_ioa_thresh": rcfg.CROWD_IOA_THRESH if rcfg.CROWD_IGNORE else None,
    }


@META_ARCH_REGISTRY.register()
class FocalRetinaNet(DenseDetector):
    """RetinaNet (Sec. 4): FPN backbone, a dense head, focal loss plus box regression.

    Training labels every anchor by IoU with the ground truth (foreground >= 0.5, background
    < 0.4, ignored in between, Sec. 4), sums the classification loss over all non-ignored anchors
    and the box loss over the foreground ones, and divides both by a foreground count
    (:class:`LossNormalizer`). Inference keeps, per image and level, the top-k candidates whose
    score passes the threshold, decodes them, and runs per-class NMS (Sec. 4, "Inference").
    """

    @configurable
    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        cls_loss: nn.Module,
        anchor_generator: nn.Module,
        box2box_transform: Box2BoxTransform,
        anchor_matcher: Matcher,
        *,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        head_in_features: Optional[Sequence[str]] = None,
        loss_normalizer: Optional[LossNormalizer] = None,
        box_reg_loss_type: str = "smooth_l1",
        smooth_l1_beta: float = 0.1,
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.5,
        max_detections_per_image: int = 100,
        input_format: str = "BGR",
        test_score_thresh_per_class: Optional[Sequence[float]] = None,
        nms_type: str = "hard",
        soft_nms_sigma: float = 0.5,
        soft_nms_score_thresh: float = 0.001,
        nms_class_agnostic: bool = False,
        box_voting_iou_thresh: Optional[float] = None,
        crowd_ioa_thresh: Optional[float] = None,
    ):
        """
        Args:
            backbone (Backbone): feature extractor, detectron2's backbone interface.
            head (nn.Module): maps the L feature maps to per-level (N, A*K, Hi, Wi) logits and
                (N, A*4, Hi, Wi) deltas (see ``RETINANET_HEAD_REGISTRY``).
            cls_loss (nn.Module): ``cls_loss(logits (N, R, K), labels (N, R), anchors=(R, 4))``
                returning the summed, unnormalised classification loss; labels are -1 (ignore),
                K (background) or a class index (see ``CLS_LOSS_REGISTRY``).
            anchor_generator (nn.Module): makes the A anchors per location of each level.
            box2box_transform (Box2BoxTransform): the box delta parameterisation.
            anchor_matcher (Matcher): labels anchors by IoU with the ground truth.
            num_classes (int): K.
            pixel_mean, pixel_std: see :class:`DenseDetector`.
            head_in_features (Sequence[str], optional): backbone outputs the head runs on;
                default all, from high to low resolution.
            loss_normalizer (LossNormalizer, optional): divisor of both losses; default
                detectron2's EMA (momentum 0.9, starting at 100).
            box_reg_loss_type (str): "smooth_l1" (the paper), "l1", "giou", "diou" or "ciou".
            smooth_l1_beta (float): beta of smooth L1.
            test_score_thresh (float): only candidates with score > this are kept (0.05 in the
                paper).
            test_topk_candidates (int): at most this many candidates per level and image go to
                NMS (1000 in the paper).
            test_nms_thresh (float): IoU threshold of the per-class NMS (0.5).
            max_detections_per_image (int): detections kept per image after NMS (100).
            input_format (str): channel order of input images, for visualisation.
            test_score_thresh_per_class (Sequence[float], optional): K score thresholds, one per
                class, replacing ``test_score_thresh``.
            nms_type (str): "hard" (the paper's NMS), "soft_linear" or "soft_gaussian"
                (soft-NMS, Bodla et al. 2017, see :func:`soft_nms`).
            soft_nms_sigma (float): sigma of the Gaussian soft-NMS decay exp(-IoU^2 / sigma).
            soft_nms_score_thresh (float): soft-NMS drops boxes whose decayed score is <= this.
            nms_class_agnostic (bool): one NMS over all classes instead of one per class.
            box_voting_iou_thresh (float, optional): if set, each kept box becomes the
                score-weighted mean of the candidates of its class with IoU >= this
                (:func:`box_voting`).
            crowd_ioa_thresh (float, optional): if set, background anchors whose intersection
                with a crowd box (``gt_is_crowd`` instances) exceeds this fraction of the anchor's
                area are ignored in training. Crowd instances never become foreground.
        """
        super().__init__(
            backbone,
            head,
            list(head_in_features) if head_in_features is not None else None,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
        )
        self.num_classes = num_classes
        self.cls_loss = cls_loss
        self.anchor_generator = anchor_generator
        self.box2box_transform = box2box_transform
        self.anchor_matcher = anchor_matcher
        self.loss_normalizer = loss_normalizer if loss_normalizer is not None else LossNormalizer()
        self.box_reg_loss_type = check_box_reg_loss_type(box_reg_loss_type)
        self.smooth_l1_beta = smooth_l1_beta
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.input_format = input_format
        if nms_type not in NMS_TYPES:
            raise ValueError(f"nms_type must be one of {NMS_TYPES}, got {nms_type!r}")
        per_class = list(test_score_thresh_per_class or [])
        if per_class and len(per_class) != num_classes:
            raise ValueError(
                f"test_score_thresh_per_class needs one threshold per class ({num_classes}), got "
                f"{len(per_class)}"
            )
        self.test_score_thresh_per_class = per_class or None
        self.nms_type = nms_type
        self.soft_nms_sigma = soft_nms_sigma
        self.soft_nms_score_thresh = soft_nms_score_thresh
        self.nms_class_agnostic = nms_class_agnostic
        self.box_voting_iou_thresh = box_voting_iou_thresh
        self.crowd_ioa_thresh = crowd_ioa_thresh

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        rcfg = cfg.MODEL.RETINANET
        # Everything that can be checked without building the backbone is checked first.
        loss_normalizer = build_loss_normalizer(cfg)
        if not 0 <= rcfg.NMS_THRESH_TEST <= 1:
            raise ValueError(
                f"MODEL.RETINANET.NMS_THRESH_TEST must be an IoU in [0, 1], got "
                f"{rcfg.NMS_THRESH_TEST}"
            )
        anchor_matcher = build_anchor_matcher(
            rcfg.IOU_THRESHOLDS, rcfg.IOU_LABELS, rcfg.ALLOW_LOW_QUALITY_MATCHES
        )
        test_options = _test_time_options(rcfg)
        box_reg_loss_type = check_box_reg_loss_type(
            rcfg.BBOX_REG_LOSS_TYPE, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE"
        )
        cls_loss = build_cls_loss(cfg)

        backbone = build_backbone(cfg)
        feature_shapes = head_input_shapes(
            backbone.output_shape(), rcfg.IN_FEATURES, "MODEL.RETINANET.IN_FEATURES"
        )
        return {
            "backbone": backbone,
            "head": build_retinanet_head(cfg, feature_shapes),
            "cls_loss": cls_loss,
            "anchor_generator": build_anchor_generator(cfg, feature_shapes),
            "box2box_transform": Box2BoxTransform(weights=rcfg.BBOX_REG_WEIGHTS),
            "anchor_matcher": anchor_matcher,
            "num_classes": rcfg.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "head_in_features": rcfg.IN_FEATURES,
            "loss_normalizer": loss_normalizer,
            "box_reg_loss_type": box_reg_loss_type,
            "smooth_l1_beta": rcfg.SMOOTH_L1_LOSS_BETA,
            "test_score_thresh": rcfg.SCORE_THRESH_TEST,
            "test_topk_candidates": rcfg.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": rcfg.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "input_format": cfg.INPUT.FORMAT,
            **test_options,
        }

    # ---------------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------------
    def forward(self, batched_inputs: List[Dict[str, Any]]):
        """:meth:`DenseDetector.forward`; in training, class ids on the host are checked first.

        The mapper's ``instances`` are normally on the host, where the check costs no sync and
        the error can name the image's ``file_name`` / ``image_id``; ids already on an
        accelerator are checked in :meth:`losses`, within its existing host sync.
        """
        if self.training:
            on_host = [
                (i, x) for i, x in enumerate(batched_inputs)
                if "instances" in x and x["instances"].gt_classes.device.type == "cpu"
            ]  # fmt: skip
            check_gt_classes(
                [x["instances"].gt_classes for _, x in on_host],
                self.num_classes,
                [_describe_input(i, x) for i, x in on_host],
            )
        return super().forward(batched_inputs)

    def forward_training(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: Tuple[List[Tensor], List[Tensor]],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        pred_logits, pred_deltas = predictions
        anchors = Boxes.cat(self.anchor_generator(features))  # (R, 4)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        return self.losses(
            anchors.tensor,
            pred_logits,  # per level: losses concatenates them only if the loss needs it
            gt_labels,
            cat([permute_to_N_HWA_K(x, 4) for x in pred_deltas], dim=1),
            gt_boxes,
            gt_classes=[gt.gt_classes for gt in gt_instances],
        )

    @torch.no_grad()
    def label_anchors(
        self, anchors: Boxes, gt_instances: List[Instances]
    ) -> Tuple[Tensor, Tensor]:
        """Assign each anchor a class (or background / ignore) and a ground-truth box.

        Args:
            anchors (Boxes): (R, 4) anchors of all levels, shared by the images.
            gt_instances (list[Instances]): N ground truths with ``gt_boxes`` and ``gt_classes``;
                an optional bool ``gt_is_crowd`` marks crowd regions (kept by
                :class:`CrowdDatasetMapper`), which are never matched, and whose background
                anchors become ignored when ``crowd_ioa_thresh`` is set.

        Returns:
            Tensor: (N, R) int64 labels: -1 ignore, K background, else the matched class.
            Tensor: (N, R, 4) matched ground-truth box per anchor; meaningful only where the
            label is a class.
        """
        labels, boxes = [], []
        for gt in gt_instances:
            crowd_boxes = None
            if gt.has("gt_is_crowd"):
                crowd_boxes = gt.gt_boxes[gt.gt_is_crowd]
                gt = gt[~gt.gt_is_crowd]
            labels_i, boxes_i = self._label_one_image(anchors, gt)
            if self.crowd_ioa_thresh is not None and crowd_boxes is not None and len(crowd_boxes):
                # Intersection over the anchor's area (as Detectron's CROWD_FILTER_THRESH): an
                # anchor mostly inside a crowd region may cover an unlabelled object.
                in_crowd = pairwise_ioa(crowd_boxes, anchors).amax(dim=0) > self.crowd_ioa_thresh
                labels_i = labels_i.masked_fill(in_crowd & (labels_i == self.num_classes), -1)
            labels.append(labels_i)
            boxes.append(boxes_i)
        return torch.stack(labels), torch.stack(boxes)

    def _label_one_image(self, anchors: Boxes, gt: Instances) -> Tuple[Tensor, Tensor]:
        """(R,) labels and (R, 4) matched boxes of one image's non-crowd ground truth."""
        if len(gt) == 0:
            background = torch.full_like(anchors.tensor[:, 0], self.num_classes)
            return background.to(torch.int64), torch.zeros_like(anchors.tensor)
        matched_idxs, match_labels = self.anchor_matcher(pairwise_iou(gt.gt_boxes, anchors))
        labels = gt.gt_classes[matched_idxs]
        labels = labels.masked_fill(match_labels == 0, self.num_classes)
        return labels.masked_fill(match_labels == -1, -1), gt.gt_boxes.tensor[matched_idxs]

    def losses(
        self,
        anchors: Tensor,
        pred_logits: Union[Tensor, List[Tensor]],
        gt_labels: Tensor,
        pred_deltas: Tensor,
        gt_boxes: Tensor,
        *,
        gt_classes: Optional[Sequence[Tensor]] = None,
    ) -> Dict[str, Tensor]:
        """Focal loss over all non-ignored anchors and box loss over the foreground ones.

        Args:
            anchors (Tensor): (R, 4) XYXY.
            pred_logits (Tensor or list[Tensor]): (N, R, K), or the head's L levels of
                (N, A*K, Hi, Wi). Per level, a loss with ``forward_levels`` computes the loss and
                its gradient in the head's layout, without the (N, R, K) copy of the logits (and
                the split of its gradient back into levels); other losses get that copy.
            gt_labels (Tensor): (N, R), from :meth:`label_anchors`.
            pred_deltas (Tensor): (N, R, 4).
            gt_boxes (Tensor): (N, R, 4), from :meth:`label_anchors`.
            gt_classes (Sequence[Tensor], optional): N (G,) ground-truth class ids the labels
                came from; when given, an id outside [0, K) raises ValueError. The check rides on
                the foreground count's host sync, so it costs no sync of its own.

        Returns:
            dict[str, Tensor]: scalar "loss_cls" and "loss_box_reg", both divided by the
            normaliser (Sec. 3.3).
        """
        num_images = gt_labels.shape[0]
        fg_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        # Host syncs of a step: this count (it feeds the Python-side normaliser and the event
        # storage; detectron2's RetinaNet reads it too), the foreground indices of the box loss
        # (detectron2 pays one for its boolean-mask indexing), and with LOSS_NORMALIZER "global"
        # the all-reduced count. The class-id check is read with the count.
        counts = [fg_mask.sum()]
        if gt_classes is not None and len(gt_classes):
            all_classes = cat(list(gt_classes))
            counts.append(((all_classes < 0) | (all_classes >= self.num_classes)).sum())
        counts = torch.stack(counts).tolist()
        num_fg = counts[0]
        if len(counts) > 1 and counts[1]:
            names = [f"image {i} of the batch" for i in range(len(gt_classes))]
            check_gt_classes(gt_classes, self.num_classes, names)
        get_event_storage().put_scalar("num_pos_anchors", num_fg / num_images)
        normalizer = self.loss_normalizer(num_fg, self.device)

        if isinstance(pred_logits, Tensor):
            loss_cls = self.cls_loss(pred_logits, gt_labels, anchors=anchors)
        elif hasattr(self.cls_loss, "forward_levels"):
            loss_cls = self.cls_loss.forward_levels(pred_logits, gt_labels, anchors=anchors)
        else:
            logits = cat([permute_to_N_HWA_K(x, self.num_classes) for x in pred_logits], dim=1)
            loss_cls = self.cls_loss(logits, gt_labels, anchors=anchors)
        loss_box_reg = dense_box_reg_loss(
            anchors,
            self.box2box_transform,
            pred_deltas,
            gt_boxes,
            fg_mask,
            loss_type=self.box_reg_loss_type,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        return {"loss_cls": loss_cls / normalizer, "loss_box_reg": loss_box_reg / normalizer}

    # ---------------------------------------------------------------------------------------
    # Inference
    # ---------------------------------------------------------------------------------------
    def forward_inference(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: Tuple[List[Tensor], List[Tensor]],
    ) -> List[Instances]:
        pred_logits, pred_deltas = predictions
        anchors = self.anchor_generator(features)
        return self.inference(anchors, pred_logits, pred_deltas, images.image_sizes)

    def inference(
        self,
        anchors: List[Boxes],
        pred_logits: List[Tensor],
        pred_deltas: List[Tensor],
        image_sizes: List[Tuple[int, int]],
    ) -> List[Instances]:
        """Detections of each image: threshold, per-level top-k, decode, per-class NMS.

        The result equals detectron2's ``RetinaNet`` inference (up to the order of equal scores)
        but is computed differently: scores are thresholded in logit space, x > logit(t) being
        sigmoid(x) > t, directly in the head's (N, A*K, Hi, Wi) layout, so neither the sigmoid
        nor the (N, Hi*Wi*A, K) transpose of the full logits is ever computed; a level with
        few candidates (a trained head) is searched for all images at once, one with many (an
        untrained head) image by image to bound the peak memory; only the C candidates are
        gathered, decoded and passed through the sigmoid. The head's outputs are not modified.

        Args:
            anchors (list[Boxes]): L levels of (Hi*Wi*A, 4) anchors.
            pred_logits (list[Tensor]): L levels of (N, A*K, Hi, Wi).
            pred_deltas (list[Tensor]): L levels of (N, A*4, Hi, Wi).
            image_sizes (list[tuple[int, int]]): N (height, width) of the unpadded inputs.

        Returns:
            list[Instances]: N results with ``pred_boxes`` (float32), ``scores`` (float32) and
            ``pred_classes``, at most ``max_detections_per_image`` each, by decreasing score.
        """
        per_image = self.candidates(anchors, pred_logits, pred_deltas, len(image_sizes))
        return [
            self.select_detections(boxes, scores, classes, image_size)
            for (boxes, scores, classes), image_size in zip(per_image, image_sizes)
        ]

    def candidates(
        self,
        anchors: List[Boxes],
        pred_logits: List[Tensor],
        pred_deltas: List[Tensor],
        num_images: int,
    ) -> List[Tuple[Tensor, Tensor, Tensor]]:
        """Each image's decoded candidates before NMS: above the score threshold(s), at most
        ``test_topk_candidates`` per level. :class:`FocalRetinaNetWithTTA` pools them over the
        augmentations of an image before one :meth:`select_detections`.

        Args:
            anchors, pred_logits, pred_deltas: as in :meth:`inference`.
            num_images (int): N.

        Returns:
            list[tuple[Tensor, Tensor, Tensor]]: N (boxes (C_i, 4) float32 XYXY, unclipped, in
            the input image's coordinates; scores (C_i,) float32; classes (C_i,) int64).
        """
        thresh = _logit(self.test_score_thresh)
        class_thresh = None
        if self.test_score_thresh_per_class is not None:
            class_thresh = torch.tensor(
                [_logit(t) for t in self.test_score_thresh_per_class], device=self.device
            )
            thresh = class_thresh.min().item()
        levels = [
            self._level_candidates(a, x, d, thresh, class_thresh)
            for a, x, d in zip(anchors, pred_logits, pred_deltas)
        ]
        image_idx, logits, classes, deltas, anchor_boxes = (cat(list(t)) for t in zip(*levels))
        # Decoding and sigmoid run once over the C candidates of every image and level.
        boxes = self.box2box_transform.apply_deltas(deltas, anchor_boxes)  # float32
        scores = logits.float().sigmoid()

        if num_images == 1:
            return [(boxes, scores, classes)]
        order = torch.argsort(image_idx, stable=True)
        counts = torch.bincount(image_idx, minlength=num_images).tolist()
        per_image = (t[order].split(counts) for t in (boxes, scores, classes))
        return list(zip(*per_image))

    def select_detections(
        self, boxes: Tensor, scores: Tensor, classes: Tensor, image_size: Tuple[int, int]
    ) -> Instances:
        """NMS (per class, or class-agnostic; hard or soft), the top ``max_detections_per_image``,
        and optionally box voting, over one image's candidates.

        Args:
            boxes (Tensor): (C, 4) XYXY.
            scores (Tensor): (C,).
            classes (Tensor): (C,) int64.
            image_size (tuple[int, int]): (height, width) of the result.

        Returns:
            Instances: ``pred_boxes``, ``scores`` (soft-NMS: the decayed scores) and
            ``pred_classes``, by decreasing score.
        """
        idxs = torch.zeros_like(classes) if self.nms_class_agnostic else classes
        if self.nms_type == "hard":
            keep = batched_nms(boxes, scores, idxs, self.test_nms_thresh)
            keep = keep[: self.max_detections_per_image]
            kept_scores = scores[keep]
        else:
            keep, kept_scores = soft_nms(
                boxes,
                scores,
                idxs,
                method=self.nms_type[len("soft_") :],
                iou_threshold=self.test_nms_thresh,
                sigma=self.soft_nms_sigma,
                score_threshold=self.soft_nms_score_thresh,
                max_detections=self.max_detections_per_image,
            )
        kept_boxes = boxes[keep]
        if self.box_voting_iou_thresh is not None:
            kept_boxes = box_voting(
                kept_boxes, idxs[keep], boxes, scores, idxs, self.box_voting_iou_thresh
            )
        return Instances(
            image_size,
            pred_boxes=Boxes(kept_boxes),
            scores=kept_scores,
            pred_classes=classes[keep],
        )

    def _level_candidates(
        self,
        anchors: Boxes,
        logits: Tensor,
        deltas: Tensor,
        thresh: float,
        class_thresh: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The top-k candidates above the threshold of one level, for all images.

        Args:
            anchors (Boxes): (Hi*Wi*A, 4), in (y, x, anchor) order.
            logits (Tensor): (N, A*K, Hi, Wi).
            deltas (Tensor): (N, A*4, Hi, Wi).
            thresh (float): logit threshold; with ``class_thresh``, the smallest of them.
            class_thresh (Tensor, optional): (K,) per-class logit thresholds.

        Returns:
            Tensors of the C kept candidates: image index (C,), logit (C,), class (C,),
            deltas (C, 4), anchor box (C, 4).
        """
        num_images, _, height, width = logits.shape
        num_classes = self.num_classes
        num_anchors = logits.shape[1] // num_classes
        # A trained detector scores few locations above the threshold. Finding them from the
        # per-location maximum (N, Hi, Wi) reads the logits once and leaves a small mask to
        # search, where ``(logits > thresh).nonzero()`` would write and scan a mask as large as
        # the logits. "not <=" keeps locations whose maximum is NaN, so that their other scores
        # are tested one by one, as detectron2 does.
        located = ~(logits.amax(dim=1) <= thresh)
        cells = located.nonzero()  # (M, 3)
        # Channel a*K + k holds class k: per-class thresholds repeat over the A anchors.
        channel_thresh = thresh if class_thresh is None else class_thresh.repeat(num_anchors)
        if cells.shape[0] * _DENSE_FRACTION > located.numel():
            # Most locations have a candidate (an untrained head).
            if class_thresh is not None:
                channel_thresh = channel_thresh[:, None, None]
            image_idx, channel, y, x, values = self._dense_candidates(logits, channel_thresh)
        else:
            cell_image, cell_y, cell_x = cells.unbind(1)
            # Advanced indices around a slice put the indexed dim first: (M, A*K).
            cell_scores = logits[cell_image, :, cell_y, cell_x]
            cell, channel = (cell_scores > channel_thresh).nonzero().unbind(1)
            image_idx, y, x = cell_image[cell], cell_y[cell], cell_x[cell]
            values = logits[image_idx, channel, y, x]
            if values.numel() > self.test_topk_candidates:
                keep = self._topk_per_image(image_idx, values, num_images)
                image_idx, channel, y, x, values = (
                    t[keep] for t in (image_idx, channel, y, x, values)
                )
        anchor_in_cell = torch.div(channel, num_classes, rounding_mode="floor")
        classes = channel - anchor_in_cell * num_classes
        anchor_idx = (y * width + x) * num_anchors + anchor_in_cell
        # Advanced indices around a slice: the indexed dim comes first, giving (C, 4).
        cand_deltas = deltas.view(num_images, num_anchors, 4, height, width)[
            image_idx, anchor_in_cell, :, y, x
        ]
        return image_idx, values, classes, cand_deltas, anchors.tensor[anchor_idx]

    def _dense_candidates(
        self, logits: Tensor, thresh: Union[float, Tensor]
    ) -> Tuple[Tensor, ...]:
        """The top-k candidates above the threshold of one level, image by image.

        Each image's candidates are cut to its top-k before the next image is searched, so the
        peak memory (its mask and the ``nonzero`` indices, 24 bytes per candidate) is that of one
        image rather than growing with the batch.

        Args:
            logits (Tensor): (N, A*K, Hi, Wi).
            thresh (float or Tensor): logit threshold, or (A*K, 1, 1) per channel.

        Returns:
            Tensors of the C kept candidates: image index, channel, y, x and logit, all (C,).
        """
        k = self.test_topk_candidates
        per_image = []
        for i, logits_i in enumerate(logits):
            channel, y, x = (logits_i > thresh).nonzero().unbind(1)
            values = logits_i[channel, y, x]
            if values.numel() > k:
                keep = values.topk(k, sorted=False).indices
                channel, y, x, values = channel[keep], y[keep], x[keep], values[keep]
            per_image.append((torch.full_like(channel, i), channel, y, x, values))
        return tuple(cat(list(t)) for t in zip(*per_image))

    def _topk_per_image(self, image_idx: Tensor, values: Tensor, num_images: int) -> Tensor:
        """Indices of the ``test_topk_candidates`` largest ``values`` of each image.

        Args:
            image_idx (Tensor): (C,) sorted image index of each candidate (``nonzero`` order).
            values (Tensor): (C,) logits.
            num_images (int): N.
        """
        k = self.test_topk_candidates
        if num_images == 1:
            return values.topk(k, sorted=False).indices
        counts = torch.bincount(image_idx, minlength=num_images).tolist()
        keep, start = [], 0
        for count in counts:
            if count > k:
                keep.append(values[start : start + count].topk(k, sorted=False).indices + start)
            else:
                keep.append(torch.arange(start, start + count, device=values.device))
            start += count
        return cat(keep)
