"""Model size and cost: parameters and FLOPs of a configured detector at its test size.

FLOPs are fvcore's ``FlopCountAnalysis`` (the counter behind detectron2's
``tools/analyze_model.py``), with fvcore's convention: **one fused multiply-add counts as one
flop**, so a convolution costs ``H_out * W_out * C_out * C_in * k_h * k_w / groups`` (its bias and
activation are free) and a linear layer ``in_features * out_features`` per row. Other libraries
count ``2 x`` that. Normalisation layers and nearest upsampling are counted with fvcore's own
formulas (eval-mode batch norm 2 flops per element with its affine weights, group norm 5,
nearest upsampling 1 per output element); element-wise activations, additions and pooling
are not counted.

What is counted is the network of the test path: the model's own ``preprocess_image``
(normalisation, padding to the backbone's size divisibility), the backbone (bottom-up trunk and
FPN) and the head, run on one image resized exactly as the test loader resizes it
(:func:`retinanet_plugin.tools.model_setup.to_model_input`). Box decoding, NMS and the anchor
generator have no multiply-adds fvcore counts; they are left out (their cost depends on the
number of detections, not on the model).

detectron2 0.6's ``detectron2.utils.analysis`` cannot be imported with torch 2 (it imports
``detectron2.export``, which needs caffe2), so the model is wrapped here in a small module taking
a tensor and fvcore's class is used directly, on either detectron2 version.
"""

import logging
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn

__all__ = ["FLOP_CONVENTION", "count_parameters", "format_model_cost", "model_cost"]

logger = logging.getLogger(__name__)

FLOP_CONVENTION = "fvcore's: one fused multiply-add = 1 flop"


class _NetworkOfTestPath(nn.Module):
    """Tensor in, tensors out: what fvcore's tracer needs.

    A dense detector (``backbone``, ``head``, ``head_in_features``, ``preprocess_image``: the
    plugin's FocalRetinaNet, detectron2's RetinaNet / FCOS) runs its preprocessing, backbone and
    head, as its inference does before decoding; any other detectron2 model runs its whole
    ``forward`` on ``[{"image": image}]`` and returns the tensors of its outputs.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        model = self.model
        if _is_dense_detector(model):
            images = model.preprocess_image([{"image": image}])
            features = model.backbone(images.tensor)
            logits, deltas = model.head([features[f] for f in model.head_in_features])[:2]
            return tuple(logits) + tuple(deltas)
        return tuple(_tensors(model([{"image": image}])))


def _is_dense_detector(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("backbone", "head", "head_in_features",
                                            "preprocess_image"))


def _tensors(obj: Any) -> List[torch.Tensor]:
    """Every tensor in a nest of lists, tuples, dicts and detectron2 structures."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    if hasattr(obj, "get_fields"):  # Instances
        return _tensors(obj.get_fields())
    if isinstance(getattr(obj, "tensor", None), torch.Tensor):  # Boxes
        return [obj.tensor]
    return []


def count_parameters(model: nn.Module) -> Dict[str, Any]:
    """Parameter counts: total, trainable (``requires_grad``; frozen stages and FrozenBN are
    not), and per part (trunk, FPN, then each other top-level child such as ``head``; ``other``
    for parameters of the model itself).

    Returns:
        dict: ``{"total": int, "trainable": int, "parts": {name: {"module": path,
        "params": int, "trainable": int}}}``. A part the model lacks is left out; the parts and
        ``other`` add up to ``total``.
    """
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    trainable = sum(p.numel() for p in named.values() if p.requires_grad)
    parts: Dict[str, Dict[str, Any]] = OrderedDict()
    owner = _part_of(model)
    for name, param in named.items():
        part = owner(name)
        row = parts.setdefault(part, {"module": _part_module(model, part), "params": 0,
                                      "trainable": 0})
        row["params"] += param.numel()
        row["trainable"] += param.numel() if param.requires_grad else 0
    order = [name for name, _ in _present_parts(model)] + ["other"]
    ordered = OrderedDict((k, parts[k]) for k in order if k in parts)
    return {"total": total, "trainable": trainable, "parts": ordered}


def _present_parts(model: nn.Module) -> List[Tuple[str, str]]:
    """(part, module path) of ``model``: the backbone split into its bottom-up trunk
    (``backbone.bottom_up``) and the FPN around it ("fpn": lateral and output convs, P6-P7; a
    backbone without ``bottom_up`` is all trunk), then every
    other top-level child under its own name (``head``; ``proposal_generator`` and ``roi_heads``
    of an R-CNN)."""
    modules = dict(model.named_modules())
    if "backbone.bottom_up" in modules:
        parts = [("trunk", "backbone.bottom_up"), ("fpn", "backbone")]
    elif "backbone" in modules:
        parts = [("trunk", "backbone")]
    else:
        parts = []
    return parts + [(name, name) for name, _ in model.named_children() if name != "backbone"]


def _part_module(model: nn.Module, part: str) -> str:
    return dict(_present_parts(model)).get(part, "")


def _part_of(model: nn.Module):
    """A function from a parameter (or module) name to its part: the longest module path of
    :func:`_present_parts` it lies under, else "other"."""
    paths = sorted(((path, name) for name, path in _present_parts(model)),
                   key=lambda pn: -len(pn[0]))

    def owner(param_name: str) -> str:
        for path, name in paths:
            if param_name == path or param_name.startswith(path + "."):
                return name
        return "other"

    return owner


def _is_config(obj: Any) -> bool:
    return not isinstance(obj, nn.Module)


def _build(cfg: Any) -> nn.Module:
    """The config's model as ``train_net.py`` builds it (weights are irrelevant to its size)."""
    from detectron2.config import CfgNode, instantiate
    from detectron2.modeling import build_model

    # Seeded, without touching the caller's generator: a two-stage model's ROI-head count
    # depends on how many proposals its random weights give, which must not vary by run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if isinstance(cfg, CfgNode):
            return build_model(cfg)
        return instantiate(cfg.model).to(cfg.train.device)


def _test_input(cfg: Any, image_size: Optional[Sequence[int]]) -> Tuple[torch.Tensor, List[int]]:
    """A black (H, W) image through the test loader's resize; (C, H', W') tensor and (H, W)."""
    from ..tools.model_setup import test_augmentations, test_min_size, to_model_input

    if image_size is None:
        side = test_min_size(cfg) or 800
        image_size = (side, side)
    h, w = (int(v) for v in image_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    image = np.zeros((h, w, 3), dtype=np.uint8)
    return to_model_input(cfg, image, test_augmentations(cfg)), [h, w]


def model_cost(
    cfg_or_model: Union[nn.Module, Any],
    image_size: Optional[Sequence[int]] = None,
    *,
    inputs: Optional[Any] = None,
) -> Dict[str, Any]:
    """Parameters and FLOPs of a model (see the module docstring for what is counted).

    Args:
        cfg_or_model: a YAML ``CfgNode`` or a ``.py`` (lazy) config, whose model is built as
            ``train_net.py`` builds it; or a built ``nn.Module`` (a detectron2 model, or any
            module when ``inputs`` is given).
            Its training mode is restored afterwards; FLOPs are counted in eval mode.
        image_size: (H, W) of the image before the test resize (a config: default a square of
            the test loader's shorter side, ``INPUT.MIN_SIZE_TEST``); a detectron2 model given
            without a config: the (H, W) of its input tensor as it is (required then).
        inputs: a tensor or tuple of tensors to call a plain module with (no detectron2
            wrapping), e.g. ``torch.zeros(1, 3, 10, 10)`` for a single conv layer.

    Returns:
        dict with
            ``params``: :func:`count_parameters`;
            ``flops``: ``{"total": int, "parts": {name: int}, "by_operator": {op: int},
            "uncounted_ops": {op: calls}}``: the parts as in ``params`` ("other": ops outside
            them, e.g. the model's own normalisation); ``uncounted_ops`` are the ops fvcore has
            no formula for, counted as 0;
            ``image_size``: [H, W] given; ``input_size``: [H', W'] after the test resize;
            ``padded_size``: [H'', W''] the backbone ran on (None for ``inputs``);
            ``convention``: :data:`FLOP_CONVENTION`.
    """
    cfg = cfg_or_model if _is_config(cfg_or_model) else None
    model = _build(cfg) if cfg is not None else cfg_or_model
    result: Dict[str, Any] = {"params": count_parameters(model), "convention": FLOP_CONVENTION}
    was_training = model.training
    model.eval()
    try:
        if inputs is not None:
            traced, args = model, inputs if isinstance(inputs, tuple) else (inputs,)
            result.update(image_size=None, input_size=None, padded_size=None)
        else:
            if cfg is not None:
                tensor, given = _test_input(cfg, image_size)
            elif image_size is not None:
                given = [int(v) for v in image_size]
                tensor = torch.zeros((3, *given), dtype=torch.uint8)
            else:
                raise ValueError("model_cost of a built model needs image_size (H, W) or inputs")
            traced, args = _NetworkOfTestPath(model), (tensor.to(_device(model)),)
            result.update(image_size=given, input_size=list(tensor.shape[-2:]),
                          padded_size=_padded_size(model, tensor))
        with torch.no_grad():
            flops = _count_flops(traced, args, model)
    finally:
        model.train(was_training)
    result["flops"] = flops
    return result


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _padded_size(model: nn.Module, tensor: torch.Tensor) -> Optional[List[int]]:
    if not hasattr(model, "preprocess_image"):
        return None
    with torch.no_grad():
        images = model.preprocess_image([{"image": tensor.to(_device(model))}])
    return list(images.tensor.shape[-2:])


def _count_flops(traced: nn.Module, args: tuple, model: nn.Module) -> Dict[str, Any]:
    analysis = FlopCountAnalysis(traced, args)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    total = int(analysis.total())
    prefix = "model." if traced is not model else ""
    by_module = analysis.by_module()
    parts: Dict[str, int] = OrderedDict()
    present = _present_parts(model)
    counted = 0
    # Innermost first: the FPN is the backbone minus its trunk.
    for name, path in sorted(present, key=lambda np_: -len(np_[1])):
        flops = int(by_module.get(prefix + path, 0)) - sum(
            parts[n] for n, p in present if n in parts and p.startswith(path + ".")
        )
        parts[name] = flops
        counted += flops
    ordered = OrderedDict((n, parts[n]) for n, _ in present)
    if present:
        ordered["other"] = total - counted
    return {
        "total": total,
        "parts": ordered,
        "by_operator": {k: int(v) for k, v in analysis.by_operator().items()},
        "uncounted_ops": dict(analysis.unsupported_ops()),
    }


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def format_model_cost(cost: Dict[str, Any], title: str = "") -> str:
    """:func:`model_cost`'s dict as a Markdown table (parameters and GFLOPs per part)."""
    params, flops = cost["params"], cost["flops"]
    lines = []
    if title:
        lines += [title, ""]
    if cost.get("image_size"):
        lines.append(
            f"Input: a {cost['image_size'][0]}x{cost['image_size'][1]} image, "
            f"{cost['input_size'][0]}x{cost['input_size'][1]} after the test resize, "
            f"{cost['padded_size'][0]}x{cost['padded_size'][1]} padded"
            if cost.get("padded_size") else
            f"Input: {cost['input_size'][0]}x{cost['input_size'][1]}"
        )
    lines.append(f"FLOPs: {cost['convention']}.")
    lines += ["", "| part | module | parameters | trainable | FLOPs |",
              "|---|---|---:|---:|---:|"]
    names = list(OrderedDict.fromkeys(list(params["parts"]) + list(flops["parts"])))
    for name in names:
        p = params["parts"].get(name, {"module": "", "params": 0, "trainable": 0})
        if not p["params"] and not flops["parts"].get(name):
            continue  # e.g. the anchor generator, the loss: nothing to count
        module = p["module"] or dict(_NAMES_OF_PARTS).get(name, "")
        if name == "fpn":
            module = "backbone without bottom_up"
        lines.append(f"| {name} | {module or '-'} | {p['params']:,} | {p['trainable']:,} | "
                     f"{_human(flops['parts'].get(name, 0))} |")
    lines.append(f"| **total** | | **{params['total']:,}** | **{params['trainable']:,}** | "
                 f"**{_human(flops['total'])}** |")
    idle = [n for n in names if params["parts"].get(n, {}).get("params") and
            not flops["parts"].get(n)]
    if idle:
        lines += ["", f"0 FLOPs for {', '.join(idle)}: not run on this input (a two-stage "
                  "model's box head runs only on proposals, which a black image and untrained "
                  "weights may not give)."]
    if flops["uncounted_ops"]:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(flops["uncounted_ops"].items()))
        lines += ["", f"Ops without a flop formula (counted 0): {ops}"]
    return "\n".join(lines) + "\n"


_NAMES_OF_PARTS = (("other", "outside the parts (input normalisation, padding)"),)
