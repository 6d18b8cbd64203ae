"""The test resize inside an exported graph, equal to detectron2's.

detectron2's test loader resizes with ``ResizeShortestEdge`` (output size by
``ResizeShortestEdge.get_output_shape``), and its ``ResizeTransform`` resizes a uint8 image with
PIL's bilinear filter. PIL's filter is not ONNX's or OpenCV's bilinear interpolation: when it
shrinks an image by a factor s it widens the triangle filter to s input pixels (antialiasing), it
rounds its weights to 22-bit fixed point, and it runs two passes (horizontal, then vertical) with
a uint8 image in between. :func:`pil_bilinear_resize` does the same arithmetic with tensor
operators (weights in float64, sums of integer products exact in float64), so the graph's
resized image is PIL's to the bit, and :func:`shortest_edge_size` computes detectron2's output
size in float64 as Python does.

Both take the sizes as tensors, so that ``torch.jit.trace`` and the ONNX exporter record them
as functions of the input's size (no Python number is read from a shape).

Shape shorthand:
    N: images; C: channels
    H, W: input size; h, w: resized size
    k: taps of the widened filter, 2 * ceil(max(H / h, 1)) + 1 (or with W / w)
"""

from typing import Tuple

import torch
from torch import Tensor

from detectron2.layers.wrappers import shapes_to_tensor

__all__ = ["INTERPOLATION", "pil_bilinear_resize", "shortest_edge_size"]

INTERPOLATION = (
    "PIL bilinear (Image.BILINEAR, as detectron2's ResizeTransform resizes uint8 images): "
    "antialiased triangle filter, 22-bit fixed-point weights, horizontal then vertical pass "
    "with uint8 rounding between; bit-exact"
)

# Pillow's Resample.c: weights are integers of PRECISION_BITS bits, and each pass rounds by
# adding half of the unit before the shift.
_PRECISION_BITS = 32 - 8 - 2
_ONE = float(1 << _PRECISION_BITS)
_HALF = float(1 << (_PRECISION_BITS - 1))


def shortest_edge_size(
    height: Tensor, width: Tensor, short_edge: int, max_size: int
) -> Tuple[Tensor, Tensor]:
    """detectron2's ``ResizeShortestEdge.get_output_shape``, in float64 as in Python.

    Args:
        height, width (Tensor): () int64, the input size.
        short_edge (int): ``INPUT.MIN_SIZE_TEST``; max_size (int): ``INPUT.MAX_SIZE_TEST``.

    Returns:
        (Tensor, Tensor): () int64 resized height and width.
    """
    # (1,) tensors, not 0-dim ones: the ONNX exporter computes arithmetic on 0-dim tensors
    # ("scalars") in float32.
    h, w = height.double().reshape(1), width.double().reshape(1)
    size = torch.full_like(h, float(short_edge))
    scale = size / torch.minimum(h, w)
    landscape = h < w
    new_h = torch.where(landscape, size, scale * h)
    new_w = torch.where(landscape, scale * w, size)
    longest = torch.maximum(new_h, new_w)
    # Multiplying by 1.0 where the long side fits keeps the value, as Python's skipped branch.
    shrink = torch.where(longest > max_size, float(max_size) / longest, torch.ones_like(longest))
    new_h, new_w = new_h * shrink, new_w * shrink
    # int(x + 0.5) of a positive x
    return torch.floor(new_h + 0.5).long()[0], torch.floor(new_w + 0.5).long()[0]


def _coefficients(in_size: Tensor, out_size: Tensor) -> Tuple[Tensor, Tensor]:
    """Pillow's ``precompute_coeffs`` for the bilinear filter and ``normalize_coeffs_8bpc``.

    Returns:
        index (Tensor): (out, k) int64 input positions (clamped into the image; their weight is 0
            where Pillow's window ends).
        weights (Tensor): (out, k) float64, integer-valued fixed-point weights.
    """
    # (1,) tensors, not 0-dim ones: the ONNX exporter computes arithmetic on 0-dim tensors
    # ("scalars") in float32.
    in_size, out_size = in_size.reshape(1), out_size.reshape(1)
    scale = in_size.double() / out_size.double()
    filterscale = scale.clamp(min=1.0)
    support = filterscale  # the triangle's support of 1, widened when shrinking
    taps = torch.ceil(support).long() * 2 + 1
    center = (torch.arange(out_size[0], dtype=torch.float64) + 0.5) * scale  # (out,)
    # Pillow's (int)(x + 0.5), then clamped into the image (truncation and floor differ only
    # below 0, clamped anyway).
    first = torch.floor(center - support + 0.5).clamp(min=0)
    end = torch.minimum(torch.floor(center + support + 0.5), in_size.double())
    positions = first[:, None] + torch.arange(taps[0], dtype=torch.float64)[None, :]  # (out, k)
    # Pillow's operations in its order (a multiplication by 1 / filterscale, a sum from the
    # first tap on: cumsum, whose order is fixed), so that float64 rounding is the same.
    inverse = torch.ones_like(filterscale) / filterscale
    weights = (1.0 - ((positions - center[:, None] + 0.5) * inverse).abs()).clamp(min=0)
    weights = torch.where(positions < end[:, None], weights, torch.zeros_like(weights))
    total = weights.cumsum(dim=1)[:, -1:]
    weights = weights / torch.where(total != 0, total, torch.ones_like(total))
    weights = torch.floor(weights * _ONE + 0.5)  # weights are >= 0
    index = positions.clamp(max=in_size.double() - 1).long()
    return index, weights


def _resample_width(x: Tensor, out_size: Tensor) -> Tensor:
    """Pillow's horizontal 8-bit pass.

    Args:
        x (Tensor): (N, C, H, W) float64 of integers 0-255.
        out_size (Tensor): () int64, w.

    Returns:
        Tensor: (N, C, H, w) float64 of integers 0-255.
    """
    index, weights = _coefficients(shapes_to_tensor([x.shape[3]])[0], out_size)
    taps = x.index_select(3, index.flatten())
    # Shapes spelled out (rank known to the ONNX exporter).
    taps = taps.reshape(x.shape[0], x.shape[1], x.shape[2], index.shape[0], index.shape[1])
    return _round((taps * weights).sum(dim=4))


def _resample_height(x: Tensor, out_size: Tensor) -> Tensor:
    """Pillow's vertical 8-bit pass: (N, C, H, w) to (N, C, h, w), as :func:`_resample_width`."""
    index, weights = _coefficients(shapes_to_tensor([x.shape[2]])[0], out_size)
    taps = x.index_select(2, index.flatten())
    taps = taps.reshape(x.shape[0], x.shape[1], index.shape[0], index.shape[1], x.shape[3])
    return _round((taps * weights[:, :, None]).sum(dim=3))


def _round(sums: Tensor) -> Tensor:
    # Pillow's clip8((sum + half) >> PRECISION_BITS); sums of integer products are exact in
    # float64 (below 2**53).
    return torch.floor((sums + _HALF) / _ONE).clamp(0, 255)


def pil_bilinear_resize(images: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """``PIL.Image.resize((width, height), Image.BILINEAR)`` of uint8 images, to the bit.

    Args:
        images (Tensor): (N, C, H, W), uint8 or float of integers 0-255.
        height, width (Tensor): () int64, the output size.

    Returns:
        Tensor: (N, C, h, w) float32 of integers 0-255.
    """
    x = _resample_width(images.double(), width)  # Pillow's horizontal pass comes first
    return _resample_height(x, height).float()
