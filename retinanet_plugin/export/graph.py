"""RetinaNet inference as one traceable graph: image tensor in, boxes / scores / classes out.

Shape shorthand:
    C: channels of the input image (3, in ``INPUT.FORMAT`` order)
    H, W: height and width of the input image (dynamic in the exported graph)
    K: foreground classes
    Ri: anchors of level i, Hi * Wi * A
    D: detections kept, at most ``max_detections_per_image``
"""

import math
from typing import Tuple

import torch
from torch import Tensor, nn

from detectron2.layers.wrappers import shapes_to_tensor
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K

from ..meta_arch import FocalRetinaNet
from ..postprocess import PostProcessing, UnsupportedKeyError, select_detections

__all__ = ["ExportableRetinaNet"]


class ExportableRetinaNet(nn.Module):
    """A :class:`FocalRetinaNet` in inference mode as a function of one image tensor.

    Everything that the eager model does between an input image and its detections runs inside
    ``forward``, written only with operators that ``torch.jit.trace`` and the ONNX exporter
    record with the image size as a variable: normalisation by ``PIXEL_MEAN`` / ``PIXEL_STD``,
    zero padding to the backbone's ``size_divisibility`` (the model's own ``preprocess_image``),
    backbone, head, anchors of the actual feature-map sizes, per level the top
    ``TOPK_CANDIDATES_TEST`` scores above the score threshold of their class, box decoding, then
    the eager model's own :func:`select_detections` with the model's :class:`PostProcessing`
    (hard NMS through torchvision's ``batched_nms``, which offsets each class's boxes so that one
    ``NonMaxSuppression`` serves all classes, inside a scripted test that skips it when there is
    no candidate; soft-NMS unrolled ``DETECTIONS_PER_IMAGE`` times; class-agnostic NMS; box
    voting), and finally clipping to the image and dropping empty boxes (what
    ``detector_postprocess`` does at scale 1). A test-time key the graph cannot express is
    refused at construction, naming the key (:meth:`PostProcessing.check`).

    Resizing to the test resolution (``ResizeShortestEdge``) is the caller's job, as for the eager
    model: the graph's boxes are in the coordinates of the image it is given.

    The wrapped model's weights are shared, not copied.
    """

    def __init__(self, model: FocalRetinaNet):
        """
        Args:
            model (FocalRetinaNet): the detector; it is put in eval mode.

        Raises:
            UnsupportedKeyError: a test-time key of the model cannot be expressed in the graph.
        """
        super().__init__()
        if not isinstance(model, FocalRetinaNet):
            raise TypeError(
                f"ExportableRetinaNet wraps a FocalRetinaNet, got {type(model).__name__} "
                "(MODEL.META_ARCHITECTURE must be FocalRetinaNet)"
            )
        model.postprocessing.check("export")
        if getattr(model, "test_amp_precision", None) is not None:
            # The graph is traced in float32; a bf16 / fp16 eager model would not be its reference.
            raise UnsupportedKeyError(
                f"TEST.AMP.ENABLED True (model.test_amp_precision={model.test_amp_precision!r}) "
                "cannot be expressed in an exported graph, which runs in float32; export with "
                "TEST.AMP.ENABLED False (a .py config: model.test_amp_precision=None)"
            )
        self.model = model
        # Exporters restore the wrapper's mode afterwards; the detector must stay in inference.
        self.eval()

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            image (Tensor): (C, H, W) uint8 or float, pixel values 0-255 in ``INPUT.FORMAT``.

        Returns:
            boxes (Tensor): (D, 4) float32 XYXY in pixels of ``image``.
            scores (Tensor): (D,) float32, decreasing.
            classes (Tensor): (D,) int64 class indices.
        """
        boxes, scores, classes = self.detect(image)
        return self._clip_and_drop_empty(boxes, scores, classes, image)

    def detect(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The detections of ``image`` before ``detector_postprocess``: the eager model's
        ``inference`` output, boxes not clipped (the raw-image graph scales them to the original
        image first, as ``detector_postprocess`` does, then clips).

        Args:
            image (Tensor): (C, H, W) uint8 or float, pixel values 0-255 in ``INPUT.FORMAT``.

        Returns:
            boxes (Tensor): (D, 4) float32 XYXY in pixels of ``image``, unclipped.
            scores (Tensor): (D,) float32, decreasing.
            classes (Tensor): (D,) int64 class indices.
        """
        model = self.model
        images = model.preprocess_image([{"image": image.float()}])
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        pred_logits, pred_deltas = model.head(features)
        anchors = model.anchor_generator(features)

        pp = model.postprocessing
        # (K,) logit thresholds, a constant of the graph.
        thresholds = pp.logit_thresholds(model.num_classes, images.tensor.device)
        boxes, scores, classes = [], [], []
        for anchors_i, logits_i, deltas_i in zip(anchors, pred_logits, pred_deltas):
            b, s, c = self._level_candidates(pp, anchors_i.tensor, logits_i, deltas_i, thresholds)
            boxes.append(b)
            scores.append(s)
            classes.append(c)
        boxes, scores, classes = torch.cat(boxes), torch.cat(scores), torch.cat(classes)
        return select_detections(pp, boxes, scores, classes)

    def _level_candidates(
        self,
        pp: PostProcessing,
        anchors: Tensor,
        logits: Tensor,
        deltas: Tensor,
        thresholds: Tensor,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Decoded top-k candidates above their class's threshold of one level.

        Scores at or below their threshold become -inf before the top k, which then keeps the
        candidates that the eager order (threshold, then top k) keeps, and k = min(k, Ri * K)
        depends only on the image size, not on how many scores pass.

        Args:
            pp (PostProcessing): the model's keys.
            anchors (Tensor): (Ri, 4).
            logits (Tensor): (1, A*K, Hi, Wi).
            deltas (Tensor): (1, A*4, Hi, Wi).
            thresholds (Tensor): (K,) logit thresholds.
        """
        num_classes = self.model.num_classes
        logits = permute_to_N_HWA_K(logits, num_classes)[0]  # (Ri, K)
        # "x > t" is false for NaN, which thus never becomes a candidate, as in eager inference.
        passing = logits > thresholds
        logits = torch.where(passing, logits, torch.full_like(logits, -math.inf)).flatten()
        deltas = permute_to_N_HWA_K(deltas, 4)[0]  # (Ri, 4)
        # A tensor k, so that the traced graph takes min(k, Ri * K) of the actual input.
        num_topk = shapes_to_tensor([logits.shape[0]]).clamp(max=pp.topk_candidates)
        values, idxs = logits.topk(num_topk[0])
        keep = values > -math.inf
        values, idxs = values[keep], idxs[keep]
        anchor_idxs = torch.div(idxs, num_classes, rounding_mode="floor")
        classes = idxs - anchor_idxs * num_classes
        boxes = self.model.box2box_transform.apply_deltas(deltas[anchor_idxs], anchors[anchor_idxs])
        return boxes, values.float().sigmoid(), classes

    @staticmethod
    def _clip_and_drop_empty(
        boxes: Tensor, scores: Tensor, classes: Tensor, image: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """``detector_postprocess`` at scale 1: clip boxes to the image, drop empty ones."""
        size = shapes_to_tensor([image.shape[-1], image.shape[-2]]).to(boxes.dtype)  # (W, H)
        limit = size.repeat(2)  # (4,) W, H, W, H
        boxes = torch.minimum(boxes.clamp(min=0), limit)
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return boxes[nonempty], scores[nonempty], classes[nonempty]

