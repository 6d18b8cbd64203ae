"""RetinaNet from raw images to detections in their own pixels, as one exportable module.

The graph does what predict does between ``cv2.imread`` and the COCO results: channel order
(BGR to ``INPUT.FORMAT``), the test loader's resize (detectron2's ``ResizeShortestEdge`` with
PIL's bilinear filter, :mod:`.resize`), the detector (:class:`ExportableRetinaNet`: normalisation,
padding, backbone, head, decoding, the model's :class:`PostProcessing`, the detection limit), and
detectron2's ``detector_postprocess`` (boxes scaled to the input image, clipped, empty ones
dropped). Outputs follow TensorRT's EfficientNMS layout, padded with zeros to
D = ``TEST.DETECTIONS_PER_IMAGE`` per image.

Shape shorthand:
    N: images of the batch (one size H x W)
    H, W: input size; h, w: resized size
    D: ``TEST.DETECTIONS_PER_IMAGE``
"""

from typing import List, NamedTuple, Sequence, Tuple

import torch
from PIL import Image
from torch import Tensor, nn

from detectron2.data import transforms as T
from detectron2.layers.wrappers import shapes_to_tensor

from .graph import ExportableRetinaNet
from .resize import pil_bilinear_resize, shortest_edge_size

__all__ = [
    "RAW_FORMATS",
    "RawImageDetections",
    "RawImagePreprocess",
    "RawImageRetinaNet",
    "RawInputSpec",
    "raw_input_spec",
]

# INPUT.FORMAT values the graph converts BGR input to (a channel flip, or none).
RAW_FORMATS = ("BGR", "RGB")


class RawInputSpec(NamedTuple):
    """What the raw-image graph does before the detector: the test loader's format and resize."""

    input_format: str  # INPUT.FORMAT
    min_size: int  # INPUT.MIN_SIZE_TEST (0: no resize)
    max_size: int  # INPUT.MAX_SIZE_TEST


def raw_input_spec(image_format: str, augmentations: Sequence[T.Augmentation]) -> RawInputSpec:
    """The format and resize of a test loader's mapper (``test_mapper(cfg).image_format`` and
    ``test_augmentations(cfg).augs``, either kind of config), which the graph reproduces.

    Raises:
        ValueError: a format other than BGR / RGB, or a test augmentation other than one
            ``ResizeShortestEdge`` to a single size with PIL's bilinear filter, named.
    """
    if image_format not in RAW_FORMATS:
        raise ValueError(
            f"INPUT.FORMAT {image_format!r}: the raw-image graph converts BGR input to one of "
            f"{RAW_FORMATS}; export with --input resized and convert the images yourself"
        )
    augs = list(augmentations)
    if not augs:
        return RawInputSpec(image_format, 0, 0)
    resize = augs[0]
    sizes = set(getattr(resize, "short_edge_length", ()) or ())
    if (
        len(augs) != 1
        or type(resize) is not T.ResizeShortestEdge
        or resize.is_range and len(sizes) != 1
        or len(sizes) != 1
        or resize.interp != Image.BILINEAR
    ):
        raise ValueError(
            f"test augmentations {augs}: the raw-image graph reproduces one ResizeShortestEdge "
            "to a single short side (INPUT.MIN_SIZE_TEST) with bilinear interpolation; export "
            "with --input resized and resize the images yourself"
        )
    return RawInputSpec(image_format, int(sizes.pop()), int(resize.max_size))


class RawImagePreprocess(nn.Module):
    """(N, H, W, 3) uint8 BGR images to (N, 3, h, w) float32 images as the test loader gives
    them: ``INPUT.FORMAT`` channel order, resized by ``ResizeShortestEdge(MIN_SIZE_TEST,
    MAX_SIZE_TEST)`` with PIL's bilinear filter (no resize with ``MIN_SIZE_TEST`` 0).

    Args:
        spec (RawInputSpec): from :func:`raw_input_spec`.
    """

    def __init__(self, spec: RawInputSpec):
        super().__init__()
        raw_input_spec(spec.input_format, [])  # refuses a format it cannot convert to
        self.to_rgb = spec.input_format == "RGB"
        self.min_size, self.max_size = spec.min_size, spec.max_size

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """
        Args:
            images (Tensor): (N, H, W, 3) uint8, BGR.

        Returns:
            resized (Tensor): (N, 3, h, w) float32 of integers 0-255, ``INPUT.FORMAT`` order.
            size (Tensor): (2,) int64, H and W.
        """
        size = shapes_to_tensor([images.shape[1], images.shape[2]])
        x = images.permute(0, 3, 1, 2)
        if self.to_rgb:
            x = x.flip(1)
        if self.min_size == 0:
            return x.float(), size
        height, width = shortest_edge_size(size[0], size[1], self.min_size, self.max_size)
        return pil_bilinear_resize(x, height, width), size


class RawImageDetections(nn.Module):
    """One resized image's detections in the pixels of its original, padded to D.

    Args:
        detector (ExportableRetinaNet): the per-image graph.
    """

    def __init__(self, detector: ExportableRetinaNet):
        super().__init__()
        self.detector = detector
        self.max_detections = detector.model.max_detections_per_image

    def forward(self, image: Tensor, size: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """
        Args:
            image (Tensor): (3, h, w) float32, resized, ``INPUT.FORMAT``.
            size (Tensor): (2,) int64, the original H and W.

        Returns:
            count (Tensor): () int64 detections kept, M <= D.
            boxes (Tensor): (D, 4) float32 XYXY in original pixels, rows M.. zero.
            scores (Tensor): (D,) float32; classes (Tensor): (D,) int64.
        """
        boxes, scores, classes = self.detector.detect(image)
        # detector_postprocess: multiply by the Python float W / w (float32 arithmetic on the
        # boxes), clip to the original image, drop empty boxes.
        resized = shapes_to_tensor([image.shape[-1], image.shape[-2]])  # (w, h)
        original = size.flip(0)  # (W, H)
        scale = (original.double() / resized.double()).float().repeat(2)  # (4,)
        limit = original.float().repeat(2)
        boxes = torch.minimum((boxes * scale).clamp(min=0), limit)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        count = shapes_to_tensor([boxes.shape[0]])[0]
        # Rows M.. read an appended zero row: an index of constant length D, so no padding
        # amount is read as a Python number.
        rows = torch.arange(self.max_detections, device=boxes.device)
        rows = torch.where(rows < count, rows, count)
        return (
            count,
            torch.cat([boxes, boxes.new_zeros(1, 4)]).index_select(0, rows),
            torch.cat([scores, scores.new_zeros(1)]).index_select(0, rows),
            torch.cat([classes, classes.new_zeros(1)]).index_select(0, rows),
        )


class RawImageRetinaNet(nn.Module):
    """The loop over a batch: :class:`RawImagePreprocess` once, :class:`RawImageDetections` per
    image, outputs stacked. Built from the two traced modules and then scripted
    (:func:`~retinanet_plugin.export.exporter.export_raw_model`), so that N is a variable of
    the graph (an ONNX ``Loop``).

    Each image runs alone through the detector, as predict and the evaluator run it, so batched
    and single-image outputs are equal.
    """

    def __init__(self, preprocess: nn.Module, detections: nn.Module):
        super().__init__()
        self.preprocess = preprocess
        self.detections = detections

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """
        Args:
            images (Tensor): (N, H, W, 3) uint8, BGR (as ``cv2.imread`` gives), N >= 1.

        Returns:
            num_detections (Tensor): (N,) int64.
            boxes (Tensor): (N, D, 4) float32 XYXY in input pixels, zero-padded.
            scores (Tensor): (N, D) float32, decreasing, zero-padded.
            classes (Tensor): (N, D) int64, zero-padded.
        """
        resized, size = self.preprocess(images)
        counts: List[Tensor] = []
        boxes: List[Tensor] = []
        scores: List[Tensor] = []
        classes: List[Tensor] = []
        for i in range(resized.shape[0]):
            count, b, s, c = self.detections(resized[i], size)
            counts.append(count)
            boxes.append(b)
            scores.append(s)
            classes.append(c)
        return torch.stack(counts), torch.stack(boxes), torch.stack(scores), torch.stack(classes)
