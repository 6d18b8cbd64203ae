"""FocalRPN: the RetinaNet head, with one class, as the proposal generator of a two-stage detector.

The paper asks whether a one-stage detector's classifier, trained with focal loss on every anchor,
can replace the sampled proposal stage of two-stage detectors (Sec. 1-2). FocalRPN is that RPN:
detectron2's :class:`RPN` (anchors, matching, box decoding, NMS, top-k) with the objectness head
taken from ``RETINANET_HEAD_REGISTRY`` (K = 1) and the objectness trained with the configured
focal loss over all anchors (no 256-anchor sampling, Sec. 3) and normalised by the number of
foreground anchors.

Shape shorthand:
    N: images in the minibatch
    L: feature levels the RPN runs on
    A: anchors per location
    R: anchors of one image over all levels
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator.build import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage
from detectron2.utils.memory import retry_if_cuda_oom

from .box_regression import check_box_reg_loss_type, dense_box_reg_loss
from .head import FocalRetinaNetHead, build_retinanet_head, head_input_shapes
from .loss_normalizer import LossNormalizer, build_loss_normalizer
from .losses import build_cls_loss
from .losses.resolve import FOCAL_LOSS_ALPHA, FOCAL_LOSS_GAMMA, resolve_cls_loss
from .matching import build_anchor_matcher

__all__ = ["FocalRPN"]


@PROPOSAL_GENERATOR_REGISTRY.register()
class FocalRPN(RPN):
    """Region proposals from a one-class RetinaNet head trained with focal loss.

    Everything but training is detectron2's RPN: ``forward`` returns ``(proposals, losses)``,
    proposals being N :class:`Instances` with ``proposal_boxes`` and ``objectness_logits``, and
    the losses ``loss_rpn_cls`` and ``loss_rpn_loc``.

    Config: anchors, matcher, NMS and top-k come from ``MODEL.RPN`` and
    ``MODEL.ANCHOR_GENERATOR``; the head (``HEAD_NAME``, ``NUM_CONVS``, ``NORM``, ``PRIOR_PROB``),
    the classification loss (``CLS_LOSS``, ``FOCAL_LOSS_*``) and the normaliser
    (``LOSS_NORMALIZER*``) from ``MODEL.RETINANET``, with NUM_CLASSES taken as 1.
    """

    @configurable
    def __init__(
        self,
        in_features: Sequence[str],
        head: nn.Module,
        anchor_generator: nn.Module,
        anchor_matcher: Matcher,
        box2box_transform: Box2BoxTransform,
        cls_loss: Union[nn.Module, str, None] = None,
        *,
        pre_nms_topk: Tuple[int, int],
        post_nms_topk: Tuple[int, int],
        nms_thresh: float = 0.7,
        min_box_size: float = 0.0,
        anchor_boundary_thresh: float = -1.0,
        loss_weight: Union[float, Dict[str, float]] = 1.0,
        box_reg_loss_type: str = "smooth_l1",
        smooth_l1_beta: float = 0.0,
        focal_loss_alpha: float = FOCAL_LOSS_ALPHA,
        focal_loss_gamma: float = FOCAL_LOSS_GAMMA,
        loss_normalizer: Optional[LossNormalizer] = None,
        batch_size_per_image: Optional[int] = None,
        positive_fraction: Optional[float] = None,
    ):
        """
        The keyword arguments of detectron2's :class:`RPN` keep their meaning, except the anchor
        sampler's, which FocalRPN has not (see ``batch_size_per_image``).

        Args:
            in_features (Sequence[str]): backbone outputs the RPN runs on.
            head (nn.Module): a ``RETINANET_HEAD_REGISTRY`` head built with one class (e.g.
                ``FocalRetinaNetHead(num_classes=1)``): per level (N, A, Hi, Wi) objectness
                logits and (N, A*4, Hi, Wi) deltas.
            anchor_generator, anchor_matcher, box2box_transform: as in :class:`RPN`.
            cls_loss (nn.Module or str, optional): a ``CLS_LOSS_REGISTRY`` loss (object or name),
                called with K = 1; None: the sigmoid focal loss with ``focal_loss_alpha`` /
                ``focal_loss_gamma`` (see :func:`resolve_cls_loss`).
            pre_nms_topk, post_nms_topk (tuple[int, int]): (train, test) proposals kept per level
                before NMS and per image after it.
            nms_thresh, min_box_size, anchor_boundary_thresh, loss_weight, smooth_l1_beta: as in
                :class:`RPN`.
            box_reg_loss_type (str): "smooth_l1", "l1", "giou", "diou" or "ciou".
            focal_loss_alpha, focal_loss_gamma (float): alpha and gamma of Eq. 5 for a loss built
                here (``cls_loss`` None or a name).
            loss_normalizer (LossNormalizer, optional): divisor of both losses; default
                detectron2's EMA of the foreground count.
            batch_size_per_image, positive_fraction: :class:`RPN`'s anchor sampling, which focal
                loss replaces (every anchor is trained, Sec. 3): accepted so that a detectron2
                RPN config names them in the error, and refused unless None.
        """
        sampler = {"batch_size_per_image": batch_size_per_image,
                   "positive_fraction": positive_fraction}
        given = sorted(k for k, v in sampler.items() if v is not None)
        if given:
            raise ValueError(
                f"FocalRPN trains on every anchor with focal loss (Sec. 3), without RPN's anchor "
                f"sampling: remove {' and '.join(given)} from its arguments"
            )
        if getattr(head, "num_classes", 1) != 1:
            raise ValueError(
                f"FocalRPN's head predicts one objectness score per anchor: build it with "
                f"num_classes=1, got {head.num_classes}"
            )
        if isinstance(head, FocalRetinaNetHead):
            head.num_classes_key = None  # K = 1 whatever the config says
        super().__init__(
            in_features=list(in_features),
            head=head,
            anchor_generator=anchor_generator,
            anchor_matcher=anchor_matcher,
            box2box_transform=box2box_transform,
            # RPN's anchor sampler; FocalRPN trains on every anchor, so neither is read.
            batch_size_per_image=0,
            positive_fraction=0.0,
            pre_nms_topk=pre_nms_topk,
            post_nms_topk=post_nms_topk,
            nms_thresh=nms_thresh,
            min_box_size=min_box_size,
            anchor_boundary_thresh=anchor_boundary_thresh,
            loss_weight=loss_weight,
            box_reg_loss_type=check_box_reg_loss_type(box_reg_loss_type),
            smooth_l1_beta=smooth_l1_beta,
        )
        self.cls_loss = resolve_cls_loss(
            cls_loss, focal_loss_alpha=focal_loss_alpha, focal_loss_gamma=focal_loss_gamma
        )
        self.loss_normalizer = loss_normalizer if loss_normalizer is not None else LossNormalizer()

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> Dict[str, Any]:
        rpn = cfg.MODEL.RPN
        # Every error names the key to change. MODEL.RETINANET.NUM_CLASSES is not one of them:
        # the head and the loss read MODEL.RETINANET with objectness as their K = 1 case.
        per_class_alpha = list(cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA_PER_CLASS)
        if len(per_class_alpha) > 1:
            raise ValueError(
                f"MODEL.RETINANET.FOCAL_LOSS_ALPHA_PER_CLASS has {len(per_class_alpha)} values, "
                "but FocalRPN's objectness is a single class: give one value, or [] to use "
                "MODEL.RETINANET.FOCAL_LOSS_ALPHA"
            )
        if not 0 <= rpn.NMS_THRESH <= 1:
            raise ValueError(f"MODEL.RPN.NMS_THRESH must be an IoU in [0, 1], got {rpn.NMS_THRESH}")
        loss_normalizer = build_loss_normalizer(cfg)
        shapes = head_input_shapes(input_shape, rpn.IN_FEATURES, "MODEL.RPN.IN_FEATURES")
        one_class = cfg.clone()
        one_class.defrost()
        one_class.MODEL.RETINANET.NUM_CLASSES = 1
        return {
            "in_features": rpn.IN_FEATURES,
            "head": build_retinanet_head(one_class, shapes),
            "cls_loss": build_cls_loss(one_class),
            "anchor_generator": build_anchor_generator(cfg, shapes),
            "anchor_matcher": build_anchor_matcher(
                rpn.IOU_THRESHOLDS, rpn.IOU_LABELS, allow_low_quality_matches=True, key="MODEL.RPN"
            ),
            "box2box_transform": Box2BoxTransform(weights=rpn.BBOX_REG_WEIGHTS),
            "pre_nms_topk": (rpn.PRE_NMS_TOPK_TRAIN, rpn.PRE_NMS_TOPK_TEST),
            "post_nms_topk": (rpn.POST_NMS_TOPK_TRAIN, rpn.POST_NMS_TOPK_TEST),
            "nms_thresh": rpn.NMS_THRESH,
            "min_box_size": cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE,
            "anchor_boundary_thresh": rpn.BOUNDARY_THRESH,
            "loss_weight": {
                "loss_rpn_cls": rpn.LOSS_WEIGHT,
                "loss_rpn_loc": rpn.BBOX_REG_LOSS_WEIGHT * rpn.LOSS_WEIGHT,
            },
            "box_reg_loss_type": check_box_reg_loss_type(
                rpn.BBOX_REG_LOSS_TYPE, "MODEL.RPN.BBOX_REG_LOSS_TYPE"
            ),
            "smooth_l1_beta": rpn.SMOOTH_L1_BETA,
            "loss_normalizer": loss_normalizer,
        }

    @torch.no_grad()
    def label_and_sample_anchors(
        self, anchors: List[Boxes], gt_instances: List[Instances]
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """Label every anchor; unlike :class:`RPN`, nothing is subsampled (focal loss, Sec. 3).

        Args:
            anchors (list[Boxes]): L levels of (Hi*Wi*A, 4) anchors.
            gt_instances (list[Instances]): N ground truths with ``gt_boxes``.

        Returns:
            list[Tensor]: N (R,) int64 labels: 1 object, 0 background, -1 ignored.
            list[Tensor]: N (R, 4) matched ground-truth boxes, meaningful where the label is 1.
        """
        anchors = Boxes.cat(anchors)
        labels, matched_boxes = [], []
        for gt in gt_instances:
            # The (G, R) IoU matrix of an image with many boxes can exhaust GPU memory; as
            # detectron2's RPN does, retry after emptying the cache, then on CPU.
            match_quality = retry_if_cuda_oom(pairwise_iou)(gt.gt_boxes, anchors)
            matched_idxs, labels_i = retry_if_cuda_oom(self.anchor_matcher)(match_quality)
            del match_quality
            matched_idxs = matched_idxs.to(device=gt.gt_boxes.device)
            labels_i = labels_i.to(dtype=torch.int64, device=gt.gt_boxes.device)
            if self.anchor_boundary_thresh >= 0:
                # Legacy Detectron option (off by default): ignore anchors crossing the image.
                inside = anchors.inside_box(gt.image_size, self.anchor_boundary_thresh)
                labels_i = labels_i.masked_fill(~inside, -1)
            labels.append(labels_i)
            if len(gt) == 0:
                matched_boxes.append(torch.zeros_like(anchors.tensor))
            else:
                matched_boxes.append(gt.gt_boxes.tensor[matched_idxs])
        return labels, matched_boxes

    def losses(
        self,
        anchors: List[Boxes],
        pred_objectness_logits: List[Tensor],
        gt_labels: List[Tensor],
        pred_anchor_deltas: List[Tensor],
        gt_boxes: List[Tensor],
    ) -> Dict[str, Tensor]:
        """Focal loss on objectness over all non-ignored anchors, box loss over the foreground.

        Args:
            anchors (list[Boxes]): L levels of (Hi*Wi*A, 4).
            pred_objectness_logits (list[Tensor]): L levels of (N, Hi*Wi*A).
            gt_labels (list[Tensor]): N (R,), from :meth:`label_and_sample_anchors`.
            pred_anchor_deltas (list[Tensor]): L levels of (N, Hi*Wi*A, 4).
            gt_boxes (list[Tensor]): N (R, 4), from :meth:`label_and_sample_anchors`.

        Returns:
            dict[str, Tensor]: "loss_rpn_cls" and "loss_rpn_loc", divided by the normaliser and
            weighted by ``loss_weight``.
        """
        num_images = len(gt_labels)
        labels = torch.stack(gt_labels)  # (N, R)
        fg_mask = labels == 1
        # One host sync for both diagnostics (the normaliser needs the count on the host anyway);
        # the box loss's foreground indices are the step's other one, as in detectron2's RPN.
        num_fg, num_bg = torch.stack([fg_mask.sum(), (labels == 0).sum()]).tolist()
        storage = get_event_storage()
        storage.put_scalar("rpn/num_pos_anchors", num_fg / num_images)
        storage.put_scalar("rpn/num_neg_anchors", num_bg / num_images)
        normalizer = self.loss_normalizer(num_fg, labels.device)

        all_anchors = Boxes.cat(anchors).tensor  # (R, 4)
        # The loss contract with K = 1: class 0 is "object", 1 (= K) background, -1 ignored.
        cls_labels = torch.where(labels >= 0, 1 - labels, labels)
        loss_cls = self.cls_loss(
            cat(pred_objectness_logits, dim=1).unsqueeze(-1), cls_labels, anchors=all_anchors
        )
        loss_loc = dense_box_reg_loss(
            all_anchors,
            self.box2box_transform,
            cat(pred_anchor_deltas, dim=1),
            torch.stack(gt_boxes),
            fg_mask,
            loss_type=self.box_reg_loss_type,
            smooth_l1_beta=self.smooth_l1_beta,
        )
        losses = {"loss_rpn_cls": loss_cls / normalizer, "loss_rpn_loc": loss_loc / normalizer}
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}
