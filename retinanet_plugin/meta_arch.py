"""FocalRetinaNet: RetinaNet (Lin et al., ICCV 2017, Sec. 4), swappable head, loss and normaliser.

It computes what detectron2's ``RetinaNet`` computes (same weights give the same losses and
detections) but takes its classification loss from ``CLS_LOSS_REGISTRY``, its head from
``RETINANET_HEAD_REGISTRY``, its training targets (anchor labels, foreground count) from
``anchor_labels.py``, and its post-processing from ``postprocess.py`` (one description of the
test-time keys, shared with TTA and export; candidates found in logit space without a Python loop
over images and levels of full-size tensors).

Shape shorthand:
    N: images in the minibatch
    L: feature levels (P3-P7)
    Hi, Wi: height and width of level i
    A: anchors per location
    K: foreground classes
    R: anchors of one image over all levels, sum_i Hi * Wi * A
    C: (image, anchor, class) candidates that pass the score threshold
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.backbone import Backbone, build_backbone
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.build import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.dense_detector import DenseDetector, permute_to_N_HWA_K
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage

from .anchor_labels import (
    check_input_classes,
    count_foreground,
    crowd_ioa_thresh_from_config,
    label_anchors,
)
from .box_regression import check_box_reg_loss_type, dense_box_reg_loss
from .head import build_retinanet_head, head_input_shapes
from .loss_normalizer import LossNormalizer, build_loss_normalizer
from .losses import build_cls_loss
from .losses.resolve import FOCAL_LOSS_ALPHA, FOCAL_LOSS_GAMMA, resolve_cls_loss
from .matching import build_anchor_matcher, check_gt_classes
from .postprocess import (
    NMS_TYPES,
    PostProcessing,
    check_score_thresh_per_class,
    find_candidates,
    select_detections,
)
from .precision import PRECISIONS, autocast_dtype, inference_autocast

# The key an error about the inference precision names (both config systems).
_TEST_AMP_KEY = "TEST.AMP.PRECISION (model.test_amp_precision)"

__all__ = ["FocalRetinaNet", "build_anchor_matcher", "check_gt_classes", "resolve_cls_loss"]

# The model's constructor arguments / attributes that hold a PostProcessing field, one pair each:
# read both ways (config -> arguments, attributes -> description), so a key is added once.
_POSTPROCESSING_ATTRIBUTES = (
    ("test_score_thresh", "score_thresh"),
    ("test_score_thresh_per_class", "score_thresh_per_class"),  # None <-> ()
    ("test_topk_candidates", "topk_candidates"),
    ("test_nms_thresh", "nms_thresh"),
    ("max_detections_per_image", "max_detections"),
    ("nms_type", "nms_type"),
    ("soft_nms_sigma", "soft_nms_sigma"),
    ("soft_nms_score_thresh", "soft_nms_score_thresh"),
    ("nms_class_agnostic", "class_agnostic"),
    ("box_voting_iou_thresh", "box_voting_iou_thresh"),  # None: no box voting
)


def _postprocessing_arguments(pp: PostProcessing) -> Dict[str, Any]:
    """The constructor arguments of a :class:`PostProcessing` (the reverse of
    :attr:`FocalRetinaNet.postprocessing`)."""
    args = {attribute: getattr(pp, field) for attribute, field in _POSTPROCESSING_ATTRIBUTES}
    args["test_score_thresh_per_class"] = list(pp.score_thresh_per_class) or None
    if not pp.box_voting:
        args["box_voting_iou_thresh"] = None
    return args


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
        anchor_generator: nn.Module,
        box2box_transform: Box2BoxTransform,
        anchor_matcher: Matcher,
        cls_loss: Union[nn.Module, str, None] = None,
        *,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        head_in_features: Optional[Sequence[str]] = None,
        focal_loss_alpha: float = FOCAL_LOSS_ALPHA,
        focal_loss_gamma: float = FOCAL_LOSS_GAMMA,
        loss_normalizer: Optional[LossNormalizer] = None,
        box_reg_loss_type: str = "smooth_l1",
        smooth_l1_beta: float = 0.0,
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.5,
        max_detections_per_image: int = 100,
        vis_period: int = 0,
        input_format: str = "BGR",
        test_score_thresh_per_class: Optional[Sequence[float]] = None,
        nms_type: str = "hard",
        soft_nms_sigma: float = 0.5,
        soft_nms_score_thresh: float = 0.001,
        nms_class_agnostic: bool = False,
        box_voting_iou_thresh: Optional[float] = None,
        crowd_ioa_thresh: Optional[float] = None,
        test_amp_precision: Optional[str] = None,
        channels_last: bool = False,
    ):
        """
        Every keyword argument of detectron2's ``RetinaNet`` is accepted with its meaning and
        default, so ``_target_`` of detectron2's lazy RetinaNet can name this class (see
        configs/*.py); the others are this plugin's.

        Args:
            backbone (Backbone): feature extractor, detectron2's backbone interface.
            head (nn.Module): maps the L feature maps to per-level (N, A*K, Hi, Wi) logits and
                (N, A*4, Hi, Wi) deltas (see ``RETINANET_HEAD_REGISTRY``; detectron2's
                ``RetinaNetHead`` fits too).
            anchor_generator (nn.Module): makes the A anchors per location of each level.
            box2box_transform (Box2BoxTransform): the box delta parameterisation.
            anchor_matcher (Matcher): labels anchors by IoU with the ground truth.
            cls_loss (nn.Module or str, optional): the classification loss,
                ``cls_loss(logits (N, R, K), labels (N, R), anchors=(R, 4))`` returning the
                summed, unnormalised loss; labels are -1 (ignore), K (background) or a class
                index (see ``CLS_LOSS_REGISTRY``). A string names a ``CLS_LOSS_REGISTRY`` entry,
                built with ``focal_loss_alpha`` / ``focal_loss_gamma`` as its alpha / gamma where
                it takes them; None is detectron2's loss, the sigmoid focal loss (Eq. 5) with
                those two. See :func:`resolve_cls_loss`.
            num_classes (int): K.
            pixel_mean, pixel_std: see :class:`DenseDetector`.
            head_in_features (Sequence[str], optional): backbone outputs the head runs on;
                default all, from high to low resolution.
            focal_loss_alpha (float): alpha of Eq. 5 (0.25), for a loss built here (``cls_loss``
                None or a name); with a loss object it must stay at its default.
            focal_loss_gamma (float): gamma of Eq. 5 (2.0), likewise.
            loss_normalizer (LossNormalizer, optional): divisor of both losses; default
                detectron2's EMA (momentum 0.9, starting at 100).
            box_reg_loss_type (str): "smooth_l1" (the paper), "l1", "giou", "diou" or "ciou".
            smooth_l1_beta (float): beta of smooth L1; 0 (detectron2's default) is L1.
            test_score_thresh (float): only candidates with score > this are kept (0.05 in the
                paper).
            test_topk_candidates (int): at most this many candidates per level and image go to
                NMS (1000 in the paper).
            test_nms_thresh (float): IoU threshold of the per-class NMS (0.5).
            max_detections_per_image (int): detections kept per image after NMS (100).
            vis_period (int): kept as detectron2's ``RetinaNet`` keeps it; neither model reads
                it (the plugin's trainer draws detections with a hook).
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
            test_amp_precision (str, optional): if set, inference runs the backbone and head
                under autocast in this precision ("auto", "float16" or "bfloat16", see
                :func:`~retinanet_plugin.precision.autocast_dtype`); boxes and scores are
                computed in float32. None: float32 inference. Training precision is the
                trainer's (``SOLVER.AMP``).
            channels_last (bool): keep the 4-d weights and the input batch in channels-last
                (NHWC) memory format, in training and inference.
        """
        super().__init__(
            backbone,
            head,
            list(head_in_features) if head_in_features is not None else None,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
        )
        self.num_classes = num_classes
        self.cls_loss = resolve_cls_loss(
            cls_loss, focal_loss_alpha=focal_loss_alpha, focal_loss_gamma=focal_loss_gamma
        )
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
        self.vis_period = vis_period
        self.input_format = input_format
        if nms_type not in NMS_TYPES:
            raise ValueError(f"nms_type must be one of {NMS_TYPES}, got {nms_type!r}")
        per_class = list(test_score_thresh_per_class or [])
        check_score_thresh_per_class(per_class, num_classes)
        self.test_score_thresh_per_class = per_class or None
        self.nms_type = nms_type
        self.soft_nms_sigma = soft_nms_sigma
        self.soft_nms_score_thresh = soft_nms_score_thresh
        self.nms_class_agnostic = nms_class_agnostic
        self.box_voting_iou_thresh = box_voting_iou_thresh
        self.crowd_ioa_thresh = crowd_ioa_thresh
        if test_amp_precision is not None and test_amp_precision not in PRECISIONS:
            raise ValueError(
                f"{_TEST_AMP_KEY} must be one of {PRECISIONS} or None, got {test_amp_precision!r}"
            )
        self.test_amp_precision = test_amp_precision
        self.channels_last = channels_last
        if channels_last:
            # Loading a checkpoint copies into these tensors and .to(device) keeps their format.
            self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        rcfg = cfg.MODEL.RETINANET
        # Everything that can be checked without building the backbone is checked first.
        loss_normalizer = build_loss_normalizer(cfg)
        postprocessing = PostProcessing.from_config(cfg)
        anchor_matcher = build_anchor_matcher(
            rcfg.IOU_THRESHOLDS, rcfg.IOU_LABELS, rcfg.ALLOW_LOW_QUALITY_MATCHES
        )
        crowd_ioa_thresh = crowd_ioa_thresh_from_config(rcfg)
        box_reg_loss_type = check_box_reg_loss_type(
            rcfg.BBOX_REG_LOSS_TYPE, "MODEL.RETINANET.BBOX_REG_LOSS_TYPE"
        )
        cls_loss = build_cls_loss(cfg)
        test_amp_precision = cfg.TEST.AMP.PRECISION if cfg.TEST.AMP.ENABLED else None
        if test_amp_precision is not None:
            autocast_dtype(test_amp_precision, cfg.MODEL.DEVICE, _TEST_AMP_KEY)

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
            "input_format": cfg.INPUT.FORMAT,
            "crowd_ioa_thresh": crowd_ioa_thresh,
            "test_amp_precision": test_amp_precision,
            "channels_last": cfg.MODEL.CHANNELS_LAST,
            **_postprocessing_arguments(postprocessing),
        }

    @property
    def postprocessing(self) -> PostProcessing:
        """The test-time keys as the model holds them now (attributes set after construction
        included), for :func:`select_detections`, TTA and export."""
        pairs = _POSTPROCESSING_ATTRIBUTES
        values = {field: getattr(self, attribute) for attribute, field in pairs}
        values["score_thresh_per_class"] = tuple(values["score_thresh_per_class"] or ())
        voting = values["box_voting_iou_thresh"]
        values["box_voting"] = voting is not None
        if voting is None:
            values["box_voting_iou_thresh"] = PostProcessing.box_voting_iou_thresh
        return PostProcessing(**values)

    # ---------------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------------
    def forward(self, batched_inputs: List[Dict[str, Any]]):
        """:meth:`DenseDetector.forward`; in training, class ids on the host are checked first
        (:func:`check_input_classes`).

        The mapper's ``instances`` are normally on the host, where the check costs no sync and
        the error can name the image's ``file_name`` / ``image_id``; ids already on an
        accelerator are checked in :meth:`losses`, within its existing host sync.
        """
        if self.training:
            check_input_classes(batched_inputs, self.num_classes)
            return super().forward(batched_inputs)
        with self.inference_autocast():
            return super().forward(batched_inputs)

    def inference_autocast(self):
        """Context of the backbone and head in inference: autocast in
        ``test_amp_precision`` (does nothing when it is None). Yields the autocast dtype or
        None. Whatever runs the two itself (TTA) enters it too."""
        return inference_autocast(self.test_amp_precision, self.device, _TEST_AMP_KEY)

    def preprocess_image(self, batched_inputs: List[Dict[str, Any]]) -> ImageList:
        """:meth:`DenseDetector.preprocess_image` (normalise, pad, batch); the batch in
        channels-last format when the model is."""
        images = super().preprocess_image(batched_inputs)
        if self.channels_last:
            images.tensor = images.tensor.contiguous(memory_format=torch.channels_last)
        return images

    def forward_training(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: Tuple[List[Tensor], List[Tensor]],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        # Under autocast (SOLVER.AMP) the head's outputs are float16 / bfloat16: the losses, the
        # labels and the normaliser are computed in float32, outside autocast. A loss with
        # forward_levels (the fused focal loss) reads low-precision logits and computes in
        # float32 itself, without a float32 copy of the logits; other losses get that copy.
        pred_logits, pred_deltas = predictions
        if not hasattr(self.cls_loss, "forward_levels"):
            pred_logits = _float32((pred_logits, []))[0]
        pred_deltas = _float32(([], pred_deltas))[1]
        with torch.autocast(self.device.type, enabled=False):
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

    def label_anchors(
        self, anchors: Boxes, gt_instances: List[Instances]
    ) -> Tuple[Tensor, Tensor]:
        """Each anchor's class (or background / ignore) and ground-truth box, with this model's
        matcher, K and ``crowd_ioa_thresh`` (:func:`label_anchors`).

        Returns:
            Tensor: (N, R) int64 labels: -1 ignore, K background, else the matched class.
            Tensor: (N, R, 4) matched ground-truth box per anchor; meaningful only where the
            label is a class.
        """
        return label_anchors(
            anchors, gt_instances, self.anchor_matcher, self.num_classes, self.crowd_ioa_thresh
        )

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
        # The step's host sync (see count_foreground), with the class-id check riding on it.
        fg_mask, num_fg = count_foreground(gt_labels, self.num_classes, gt_classes)
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
        """Detections of each image: threshold, per-level top-k, decode (:meth:`candidates`),
        then NMS and the detection limit (:meth:`select_detections`).

        The result equals detectron2's ``RetinaNet`` inference (up to the order of equal scores)
        but is computed differently, without the sigmoid or transpose of the full logits (see
        :func:`find_candidates`).

        Args:
            anchors (list[Boxes]): L levels of (Hi*Wi*A, 4) anchors.
            pred_logits (list[Tensor]): L levels of (N, A*K, Hi, Wi).
            pred_deltas (list[Tensor]): L levels of (N, A*4, Hi, Wi).
            image_sizes (list[tuple[int, int]]): N (height, width) of the unpadded inputs.

        Returns:
            list[Instances]: N results with ``pred_boxes`` (float32), ``scores`` (float32) and
            ``pred_classes``, at most ``max_detections_per_image`` each, by decreasing score.
        """
        pp = self.postprocessing
        pred_logits, pred_deltas = _float32((pred_logits, pred_deltas))
        with torch.autocast(self.device.type, enabled=False):
            per_image = find_candidates(
                pp, anchors, pred_logits, pred_deltas, self.box2box_transform, len(image_sizes)
            )
        return [
            self._detections(pp, boxes, scores, classes, image_size)
            for (boxes, scores, classes), image_size in zip(per_image, image_sizes)
        ]

    def candidates(
        self,
        anchors: List[Boxes],
        pred_logits: List[Tensor],
        pred_deltas: List[Tensor],
        num_images: int,
    ) -> List[Tuple[Tensor, Tensor, Tensor]]:
        """Each image's decoded candidates before NMS (:func:`find_candidates`).
        :class:`FocalRetinaNetWithTTA` pools them over the augmentations of an image before one
        :meth:`select_detections`.

        Args:
            anchors, pred_logits, pred_deltas: as in :meth:`inference`.
            num_images (int): N.

        Returns:
            list[tuple[Tensor, Tensor, Tensor]]: N (boxes (C_i, 4) float32 XYXY, unclipped, in
            the input image's coordinates; scores (C_i,) float32; classes (C_i,) int64).
        """
        pred_logits, pred_deltas = _float32((pred_logits, pred_deltas))
        with torch.autocast(self.device.type, enabled=False):
            return find_candidates(
                self.postprocessing, anchors, pred_logits, pred_deltas, self.box2box_transform,
                num_images,
            )  # fmt: skip

    def select_detections(
        self, boxes: Tensor, scores: Tensor, classes: Tensor, image_size: Tuple[int, int]
    ) -> Instances:
        """NMS (per class, or class-agnostic; hard or soft), the top ``max_detections_per_image``,
        and optionally box voting, over one image's candidates (:func:`select_detections`).

        Args:
            boxes (Tensor): (C, 4) XYXY.
            scores (Tensor): (C,).
            classes (Tensor): (C,) int64.
            image_size (tuple[int, int]): (height, width) of the result.

        Returns:
            Instances: ``pred_boxes``, ``scores`` (soft-NMS: the decayed scores) and
            ``pred_classes``, by decreasing score.
        """
        return self._detections(self.postprocessing, boxes, scores, classes, image_size)

    @staticmethod
    def _detections(
        pp: PostProcessing,
        boxes: Tensor,
        scores: Tensor,
        classes: Tensor,
        image_size: Tuple[int, int],
    ) -> Instances:
        kept_boxes, kept_scores, kept_classes = select_detections(pp, boxes, scores, classes)
        return Instances(
            image_size, pred_boxes=Boxes(kept_boxes), scores=kept_scores, pred_classes=kept_classes
        )


def _float32(
    predictions: Tuple[List[Tensor], List[Tensor]]
) -> Tuple[List[Tensor], List[Tensor]]:
    """The head's per-level (logits, deltas) in float32 (float32 tensors are returned as they
    are, float64 kept): what autocast made float16 / bfloat16 is decoded and scored in float32."""
    return tuple(
        [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in level_list]
        for level_list in predictions
    )
