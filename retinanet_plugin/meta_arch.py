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
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage

from .box_regression import check_box_reg_loss_type, dense_box_reg_loss
from .head import build_retinanet_head
from .loss_normalizer import LossNormalizer
from .losses import build_cls_loss

__all__ = ["FocalRetinaNet", "build_anchor_matcher"]


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

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        rcfg = cfg.MODEL.RETINANET
        # Everything that can be checked without building the backbone is checked first.
        if rcfg.LOSS_NORMALIZER not in LossNormalizer.MODES:
            raise ValueError(
                f"MODEL.RETINANET.LOSS_NORMALIZER = {rcfg.LOSS_NORMALIZER!r} is not one of "
                f"{list(LossNormalizer.MODES)}"
            )
        if not 0 <= rcfg.LOSS_NORMALIZER_MOMENTUM < 1:
            raise ValueError(
                "MODEL.RETINANET.LOSS_NORMALIZER_MOMENTUM must be in [0, 1), got "
                f"{rcfg.LOSS_NORMALIZER_MOMENTUM}"
            )
        if not rcfg.LOSS_NORMALIZER_INIT > 0:
            raise ValueError(
                f"MODEL.RETINANET.LOSS_NORMALIZER_INIT must be > 0, got {rcfg.LOSS_NORMALIZER_INIT}"
            )
        if not 0 <= rcfg.NMS_THRESH_TEST <= 1:
            raise ValueError(
                f"MODEL.RETINANET.NMS_THRESH_TEST must be an IoU in [0, 1], got "
                f"{rcfg.NMS_THRESH_TEST}"
            )
        anchor_matcher = build_anchor_matcher(
            rcfg.IOU_THRESHOLDS, rcfg.IOU_LABELS, rcfg.ALLOW_LOW_QUALITY_MATCHES
        )
        box_reg_loss_type = check_box_reg_loss_type(
            rcfg.BBOX_REG_LOSS_TYPE, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE"
        )
        cls_loss = build_cls_loss(cfg)

        backbone = build_backbone(cfg)
        backbone_shape = backbone.output_shape()
        missing = [f for f in rcfg.IN_FEATURES if f not in backbone_shape]
        if missing:
            raise ValueError(
                f"MODEL.RETINANET.IN_FEATURES names {missing}, which the backbone does not output "
                f"(it has {sorted(backbone_shape)})"
            )
        feature_shapes = [backbone_shape[f] for f in rcfg.IN_FEATURES]
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
            "loss_normalizer": LossNormalizer(
                rcfg.LOSS_NORMALIZER,
                momentum=rcfg.LOSS_NORMALIZER_MOMENTUM,
                initial_value=rcfg.LOSS_NORMALIZER_INIT,
            ),
            "box_reg_loss_type": box_reg_loss_type,
            "smooth_l1_beta": rcfg.SMOOTH_L1_LOSS_BETA,
            "test_score_thresh": rcfg.SCORE_THRESH_TEST,
            "test_topk_candidates": rcfg.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": rcfg.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "input_format": cfg.INPUT.FORMAT,
        }

    # ---------------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------------
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
        )

    @torch.no_grad()
    def label_anchors(
        self, anchors: Boxes, gt_instances: List[Instances]
    ) -> Tuple[Tensor, Tensor]:
        """Assign each anchor a class (or background / ignore) and a ground-truth box.

        Args:
            anchors (Boxes): (R, 4) anchors of all levels, shared by the images.
            gt_instances (list[Instances]): N ground truths with ``gt_boxes`` and ``gt_classes``.

        Returns:
            Tensor: (N, R) int64 labels: -1 ignore, K background, else the matched class.
            Tensor: (N, R, 4) matched ground-truth box per anchor; meaningful only where the
            label is a class.
        """
        labels, boxes = [], []
        for gt in gt_instances:
            if len(gt) == 0:
                background = torch.full_like(anchors.tensor[:, 0], self.num_classes)
                labels.append(background.to(torch.int64))
                boxes.append(torch.zeros_like(anchors.tensor))
                continue
            matched_idxs, match_labels = self.anchor_matcher(pairwise_iou(gt.gt_boxes, anchors))
            labels_i = gt.gt_classes[matched_idxs]
            labels_i = labels_i.masked_fill(match_labels == 0, self.num_classes)
            labels.append(labels_i.masked_fill(match_labels == -1, -1))
            boxes.append(gt.gt_boxes.tensor[matched_idxs])
        return torch.stack(labels), torch.stack(boxes)

    def losses(
        self,
        anchors: Tensor,
        pred_logits: Union[Tensor, List[Tensor]],
        gt_labels: Tensor,
        pred_deltas: Tensor,
        gt_boxes: Tensor,
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

        Returns:
            dict[str, Tensor]: scalar "loss_cls" and "loss_box_reg", both divided by the
            normaliser (Sec. 3.3).
        """
        num_images = gt_labels.shape[0]
        fg_mask = (gt_labels >= 0) & (gt_labels != self.num_classes)
        # The one host sync of a step, which detectron2's RetinaNet pays too: the count feeds a
        # Python-side EMA and the event storage.
        num_fg = fg_mask.sum().item()
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
        nor the (N, Hi*Wi*A, K) transpose of the full logits is ever computed; each level is
        handled for all images at once, and only the C candidates are gathered, decoded and
        passed through the sigmoid. The head's outputs are not modified.

        Args:
            anchors (list[Boxes]): L levels of (Hi*Wi*A, 4) anchors.
            pred_logits (list[Tensor]): L levels of (N, A*K, Hi, Wi).
            pred_deltas (list[Tensor]): L levels of (N, A*4, Hi, Wi).
            image_sizes (list[tuple[int, int]]): N (height, width) of the unpadded inputs.

        Returns:
            list[Instances]: N results with ``pred_boxes`` (float32), ``scores`` (float32) and
            ``pred_classes``, at most ``max_detections_per_image`` each, by decreasing score.
        """
        thresh = _logit(self.test_score_thresh)
        levels = [
            self._level_candidates(a, x, d, thresh)
            for a, x, d in zip(anchors, pred_logits, pred_deltas)
        ]
        image_idx, logits, classes, deltas, anchor_boxes = (cat(list(t)) for t in zip(*levels))
        # Decoding and sigmoid run once over the C candidates of every image and level.
        boxes = self.box2box_transform.apply_deltas(deltas, anchor_boxes)  # float32
        scores = logits.float().sigmoid()

        num_images = len(image_sizes)
        if num_images == 1:
            per_image = [(boxes, scores, classes)]
        else:
            order = torch.argsort(image_idx, stable=True)
            counts = torch.bincount(image_idx, minlength=num_images).tolist()
            per_image = zip(
                boxes[order].split(counts),
                scores[order].split(counts),
                classes[order].split(counts),
            )
        results = []
        for (boxes_i, scores_i, classes_i), image_size in zip(per_image, image_sizes):
            keep = batched_nms(boxes_i, scores_i, classes_i, self.test_nms_thresh)
            keep = keep[: self.max_detections_per_image]
            results.append(
                Instances(
                    image_size,
                    pred_boxes=Boxes(boxes_i[keep]),
                    scores=scores_i[keep],
                    pred_classes=classes_i[keep],
                )
            )
        return results

    def _level_candidates(
        self, anchors: Boxes, logits: Tensor, deltas: Tensor, thresh: float
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The top-k candidates above the threshold of one level, for all images.

        Args:
            anchors (Boxes): (Hi*Wi*A, 4), in (y, x, anchor) order.
            logits (Tensor): (N, A*K, Hi, Wi).
            deltas (Tensor): (N, A*4, Hi, Wi).
            thresh (float): logit threshold.

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
        if cells.shape[0] * _DENSE_FRACTION > located.numel():
            # Most locations have a candidate (an untrained head): one pass over everything.
            image_idx, channel, y, x = (logits > thresh).nonzero().unbind(1)
        else:
            cell_image, cell_y, cell_x = cells.unbind(1)
            # Advanced indices around a slice put the indexed dim first: (M, A*K).
            cell_scores = logits[cell_image, :, cell_y, cell_x]
            cell, channel = (cell_scores > thresh).nonzero().unbind(1)
            image_idx, y, x = cell_image[cell], cell_y[cell], cell_x[cell]
        values = logits[image_idx, channel, y, x]
        if values.numel() > self.test_topk_candidates:
            keep = self._topk_per_image(image_idx, values, num_images)
            image_idx, channel, y, x, values = (t[keep] for t in (image_idx, channel, y, x, values))
        anchor_in_cell = torch.div(channel, num_classes, rounding_mode="floor")
        classes = channel - anchor_in_cell * num_classes
        anchor_idx = (y * width + x) * num_anchors + anchor_in_cell
        # Advanced indices around a slice: the indexed dim comes first, giving (C, 4).
        cand_deltas = deltas.view(num_images, num_anchors, 4, height, width)[
            image_idx, anchor_in_cell, :, y, x
        ]
        return image_idx, values, classes, cand_deltas, anchors.tensor[anchor_idx]

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
