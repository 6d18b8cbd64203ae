"""Classification losses of the detector, built by name from ``MODEL.RETINANET.CLS_LOSS``.

Shape shorthand:
    N: number of images
    R: number of anchors per image, all levels concatenated
    K: number of foreground classes
"""

import logging
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import nms

from detectron2.config import configurable
from detectron2.utils.registry import Registry

from ..registry import get_registered
from .focal import (
    _check_levels,
    _focal_from_labels,
    _focal_per_level,
    _star_from_labels,
    _star_per_level,
    check_alpha_per_class,
    check_focal_params,
    softmax_focal_loss,
)

logger = logging.getLogger(__name__)

CLS_LOSS_REGISTRY = Registry("CLS_LOSS")
CLS_LOSS_REGISTRY.__doc__ = """
Registry of the detector's classification losses (``MODEL.RETINANET.CLS_LOSS``).

An entry is an ``nn.Module`` class constructed as ``cls(cfg)``; calling the module as
``loss(pred_logits, gt_labels, anchors=None)`` with

* pred_logits (Tensor): (N, R, K) logits, levels concatenated along R;
* gt_labels (Tensor): (N, R) int64: 0..K-1 foreground class, K background, -1 ignored;
* anchors (Tensor or None): (R, 4) anchor boxes XYXY in the order of R (losses that select
  anchors spatially, such as OHEM, need them; others ignore them)

returns a scalar: the loss summed over the batch, not normalised (the detector divides by its
normaliser, the number of foreground anchors, Sec. 3.3).

An entry may also define ``forward_levels(pred_logits, gt_labels, anchors=None)`` taking the
head's per-level logits (a list of (N, A*K, Hi, Wi)) instead of the (N, R, K) concatenation,
and returning the same value; the detector then calls it and skips that copy.

An entry may declare ``config_keys``, the loss-related ``MODEL.RETINANET`` keys (of
``LOSS_CONFIG_KEYS``) it reads; :func:`build_cls_loss` then refuses a non-default value of any
other of those keys, naming key and loss, instead of training silently without it. Entries
without the attribute are not checked.
"""

# The loss-related keys under MODEL.RETINANET that some registered loss reads.
LOSS_CONFIG_KEYS = (
    "FOCAL_LOSS_ALPHA",
    "FOCAL_LOSS_GAMMA",
    "FOCAL_LOSS_ALPHA_PER_CLASS",
    "FOCAL_LOSS_STAR_BETA",
    "OHEM.BATCH_SIZE_PER_IMAGE",
    "OHEM.NMS_THRESH",
    "OHEM.POSITIVE_FRACTION",
)


def build_cls_loss(cfg) -> nn.Module:
    """Build the classification loss named by ``cfg.MODEL.RETINANET.CLS_LOSS``.

    Raises:
        ValueError: a loss-related key the chosen loss does not read has a non-default value.
    """
    name = cfg.MODEL.RETINANET.CLS_LOSS
    loss_cls = get_registered(CLS_LOSS_REGISTRY, name, "MODEL.RETINANET.CLS_LOSS")
    used = getattr(loss_cls, "config_keys", None)
    if used is not None:
        _refuse_unused_keys(cfg, name, used)
    return loss_cls(cfg)


def _lookup(node, dotted: str):
    for part in dotted.split("."):
        if part not in node:
            return None
        node = node[part]
    return list(node) if isinstance(node, (list, tuple)) else node


def _refuse_unused_keys(cfg, name: str, used: Tuple[str, ...]) -> None:
    # Imported here: the config module imports the model's modules, which import this one.
    from detectron2.config import get_cfg

    from ..config import add_retinanet_plugin_config

    defaults = add_retinanet_plugin_config(get_cfg()).MODEL.RETINANET
    for key in LOSS_CONFIG_KEYS:
        if key in used:
            continue
        value, default = _lookup(cfg.MODEL.RETINANET, key), _lookup(defaults, key)
        if value is not None and value != default:
            raise ValueError(
                f"MODEL.RETINANET.{key} = {value!r} is not used by MODEL.RETINANET.CLS_LOSS = "
                f"{name!r} (it reads {', '.join(used)}); leave it at its default {default!r} or "
                "choose a loss that uses it"
            )


def _focal_args_from_cfg(cfg, *, star: bool = False) -> dict:
    rc = cfg.MODEL.RETINANET
    alpha, gamma = rc.FOCAL_LOSS_ALPHA, rc.FOCAL_LOSS_GAMMA
    check_focal_params(alpha, gamma, alpha_name="MODEL.RETINANET.FOCAL_LOSS_ALPHA",
                       gamma_name="MODEL.RETINANET.FOCAL_LOSS_GAMMA", star=star)
    per_class = list(rc.FOCAL_LOSS_ALPHA_PER_CLASS)
    if per_class:
        if len(per_class) != rc.NUM_CLASSES:
            raise ValueError(
                "MODEL.RETINANET.FOCAL_LOSS_ALPHA_PER_CLASS must have MODEL.RETINANET.NUM_CLASSES "
                f"= {rc.NUM_CLASSES} values, got {len(per_class)}"
            )
        check_alpha_per_class(per_class, name="MODEL.RETINANET.FOCAL_LOSS_ALPHA_PER_CLASS")
    return {"alpha": alpha, "gamma": gamma, "alpha_per_class": per_class or None}


class _ClassAlpha(nn.Module):
    """Holds an optional per-class alpha as a non-persistent buffer (moves with the model)."""

    def __init__(self, alpha: float, gamma: float, alpha_per_class: Optional[List[float]],
                 star: bool = False):
        super().__init__()
        check_focal_params(alpha, gamma, star=star)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        per_class = None
        if alpha_per_class is not None:
            check_alpha_per_class(alpha_per_class)
            per_class = torch.as_tensor(alpha_per_class, dtype=torch.float32)
        self.register_buffer("alpha_per_class", per_class, persistent=False)


@CLS_LOSS_REGISTRY.register()
class SigmoidFocalLoss(_ClassAlpha):
    """Sigmoid focal loss, Eq. 5 (the paper's default: alpha = 0.25, gamma = 2)."""

    config_keys = ("FOCAL_LOSS_ALPHA", "FOCAL_LOSS_GAMMA", "FOCAL_LOSS_ALPHA_PER_CLASS")

    @configurable
    def __init__(self, *, alpha: float = 0.25, gamma: float = 2.0,
                 alpha_per_class: Optional[List[float]] = None):
        super().__init__(alpha, gamma, alpha_per_class)

    @classmethod
    def from_config(cls, cfg):
        return _focal_args_from_cfg(cfg)

    def forward(self, pred_logits: Tensor, gt_labels: Tensor, anchors=None) -> Tensor:
        return _focal_from_labels(
            pred_logits, gt_labels, self.alpha, self.gamma, "sum", self.alpha_per_class
        )

    def forward_levels(self, pred_logits: List[Tensor], gt_labels: Tensor, anchors=None
                       ) -> Tensor:
        """The same loss from the head's per-level (N, A*K, Hi, Wi) logits (no (N, R, K) copy)."""
        k = _check_levels(pred_logits, gt_labels, self.alpha_per_class)[1]
        return _focal_per_level(pred_logits, gt_labels, self.alpha, self.gamma,
                                self.alpha_per_class, k)


@CLS_LOSS_REGISTRY.register()
class AlphaBalancedCE(SigmoidFocalLoss):
    """Alpha-balanced sigmoid cross-entropy, gamma = 0 (Table 1a); a FOCAL_LOSS_GAMMA other than
    the default is refused."""

    config_keys = ("FOCAL_LOSS_ALPHA", "FOCAL_LOSS_ALPHA_PER_CLASS")

    @configurable
    def __init__(self, *, alpha: float = 0.25, alpha_per_class: Optional[List[float]] = None):
        super().__init__(alpha=alpha, gamma=0.0, alpha_per_class=alpha_per_class)

    @classmethod
    def from_config(cls, cfg):
        args = _focal_args_from_cfg(cfg)
        del args["gamma"]
        return args


@CLS_LOSS_REGISTRY.register()
class SigmoidFocalLossStar(_ClassAlpha):
    """FL*, Appendix A: -log(sigmoid(gamma x_t + beta)) / gamma.

    Config: gamma = FOCAL_LOSS_GAMMA, beta = FOCAL_LOSS_STAR_BETA, alpha = FOCAL_LOSS_ALPHA (the
    paper's Table 3 runs use gamma=2, beta=1 and gamma=4, beta=0).
    """

    config_keys = ("FOCAL_LOSS_ALPHA", "FOCAL_LOSS_GAMMA", "FOCAL_LOSS_ALPHA_PER_CLASS",
                   "FOCAL_LOSS_STAR_BETA")

    @configurable
    def __init__(self, *, gamma: float = 2.0, beta: float = 1.0, alpha: float = -1.0,
                 alpha_per_class: Optional[List[float]] = None):
        super().__init__(alpha, gamma, alpha_per_class, star=True)
        self.beta = float(beta)

    @classmethod
    def from_config(cls, cfg):
        args = _focal_args_from_cfg(cfg, star=True)
        args["beta"] = cfg.MODEL.RETINANET.FOCAL_LOSS_STAR_BETA
        return args

    def forward(self, pred_logits: Tensor, gt_labels: Tensor, anchors=None) -> Tensor:
        return _star_from_labels(
            pred_logits, gt_labels, self.gamma, self.beta, self.alpha, "sum",
            self.alpha_per_class,
        )

    def forward_levels(self, pred_logits: List[Tensor], gt_labels: Tensor, anchors=None
                       ) -> Tensor:
        """The same loss from the head's per-level (N, A*K, Hi, Wi) logits (no (N, R, K) copy)."""
        k = _check_levels(pred_logits, gt_labels, self.alpha_per_class)[1]
        return _star_per_level(pred_logits, gt_labels, self.gamma, self.beta, self.alpha,
                               self.alpha_per_class, k)


@CLS_LOSS_REGISTRY.register()
class SoftmaxFocalLoss(nn.Module):
    """Focal loss over a softmax of K + 1 classes (the paper's footnote).

    The head keeps its K outputs per anchor; the background class gets a fixed logit of 0, so
    softmax([x_1..x_K, 0]) is the distribution and sigmoid(x_k) (what inference ranks by) is the
    two-way softmax between class k and background. alpha weighs foreground anchors, 1 - alpha
    background ones.
    """

    config_keys = ("FOCAL_LOSS_ALPHA", "FOCAL_LOSS_GAMMA")

    @configurable
    def __init__(self, *, alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        check_focal_params(alpha, gamma)
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    @classmethod
    def from_config(cls, cfg):
        args = _focal_args_from_cfg(cfg)
        del args["alpha_per_class"]  # refused by build_cls_loss (not in config_keys)
        return args

    def forward(self, pred_logits: Tensor, gt_labels: Tensor, anchors=None) -> Tensor:
        num_classes = pred_logits.shape[-1]
        logits = pred_logits.reshape(-1, num_classes)
        logits = torch.cat([logits, logits.new_zeros(logits.shape[0], 1)], dim=1)
        labels = gt_labels.reshape(-1).clamp(max=num_classes)
        return softmax_focal_loss(logits, labels, self.alpha, self.gamma,
                                  background_index=num_classes, reduction="sum")


@CLS_LOSS_REGISTRY.register()
class OHEMLoss(nn.Module):
    """Online hard example mining with cross-entropy, the baseline of Table 1d.

    Per image, every non-ignored anchor is scored by its alpha-balanced sigmoid cross-entropy
    (summed over the K classes), NMS over the anchor boxes with that score removes anchors
    overlapping a harder one, and the ``batch_size_per_image`` hardest survivors form the
    minibatch; only they contribute to the loss. With ``positive_fraction`` >= 0 at most that
    fraction of the minibatch is foreground (0.25 gives the 1:3 ratio), the rest background.

    NMS runs over the ``nms_pre_topk`` hardest anchors per pool rather than all ~100k, since only
    the first ``batch_size_per_image`` survivors are kept: the hardest anchors decide them.

    The loss is cross-entropy (gamma = 0) with a scalar alpha: FOCAL_LOSS_GAMMA and
    FOCAL_LOSS_ALPHA_PER_CLASS other than their defaults are refused by :func:`build_cls_loss`.
    """

    config_keys = ("FOCAL_LOSS_ALPHA", "OHEM.BATCH_SIZE_PER_IMAGE", "OHEM.NMS_THRESH",
                   "OHEM.POSITIVE_FRACTION")

    @configurable
    def __init__(self, *, alpha: float = -1.0, batch_size_per_image: int = 256,
                 nms_thresh: float = 0.7, positive_fraction: float = -1.0,
                 nms_pre_topk: int = 8192):
        super().__init__()
        check_focal_params(alpha, 0.0)
        if batch_size_per_image <= 0:
            raise ValueError(f"batch_size_per_image must be > 0, got {batch_size_per_image}")
        if not positive_fraction < 0 and not 0 <= positive_fraction <= 1:
            raise ValueError(f"positive_fraction must be in [0, 1] or < 0, got {positive_fraction}")
        self.alpha = float(alpha)
        self.batch_size_per_image = int(batch_size_per_image)
        self.nms_thresh = float(nms_thresh)
        self.positive_fraction = float(positive_fraction)
        self.nms_pre_topk = int(nms_pre_topk)

    @classmethod
    def from_config(cls, cfg):
        ohem = cfg.MODEL.RETINANET.OHEM
        if ohem.BATCH_SIZE_PER_IMAGE <= 0:
            raise ValueError(
                f"MODEL.RETINANET.OHEM.BATCH_SIZE_PER_IMAGE must be > 0, got "
                f"{ohem.BATCH_SIZE_PER_IMAGE}"
            )
        fraction = ohem.POSITIVE_FRACTION
        if not fraction < 0 and not 0 <= fraction <= 1:
            raise ValueError(f"MODEL.RETINANET.OHEM.POSITIVE_FRACTION must be in [0, 1] (or < 0 "
                             f"for no quota), got {fraction}")
        alpha = cfg.MODEL.RETINANET.FOCAL_LOSS_ALPHA
        check_focal_params(alpha, 0.0, alpha_name="MODEL.RETINANET.FOCAL_LOSS_ALPHA")
        return {
            "alpha": alpha,
            "batch_size_per_image": ohem.BATCH_SIZE_PER_IMAGE,
            "nms_thresh": ohem.NMS_THRESH,
            "positive_fraction": ohem.POSITIVE_FRACTION,
        }

    def forward(self, pred_logits: Tensor, gt_labels: Tensor, anchors: Optional[Tensor] = None
                ) -> Tensor:
        if anchors is None:
            raise ValueError("OHEMLoss needs the anchor boxes (anchors=(R, 4) XYXY) for its NMS")
        with torch.no_grad():
            per_anchor = _focal_from_labels(
                pred_logits.detach(), gt_labels, self.alpha, 0.0, "none", None
            ).sum(-1)
            selected = [
                self._select(per_anchor[i], gt_labels[i], anchors, pred_logits.shape[-1])
                for i in range(pred_logits.shape[0])
            ]
        # Unselected anchors are relabelled "ignore" so the fused loss skips them.
        mined = torch.full_like(gt_labels, -1)
        for i, keep in enumerate(selected):
            mined[i, keep] = gt_labels[i, keep]
        return _focal_from_labels(pred_logits, mined, self.alpha, 0.0, "sum", None)

    def _select(self, loss: Tensor, labels: Tensor, anchors: Tensor, num_classes: int) -> Tensor:
        """Indices (into R) of the mined anchors of one image."""
        valid = labels >= 0
        if self.positive_fraction < 0:
            return self._hardest(loss, valid, anchors, self.batch_size_per_image)
        foreground = valid & (labels < num_classes)
        fg = self._hardest(loss, foreground, anchors,
                           int(self.batch_size_per_image * self.positive_fraction))
        bg = self._hardest(loss, valid & ~foreground, anchors,
                           self.batch_size_per_image - fg.numel())
        return torch.cat([fg, bg])

    def _hardest(self, loss: Tensor, mask: Tensor, anchors: Tensor, k: int) -> Tensor:
        idx = torch.nonzero(mask).squeeze(1)
        if k <= 0 or idx.numel() == 0:
            return idx[:0]
        top = loss[idx].topk(min(self.nms_pre_topk, idx.numel())).indices
        idx = idx[top]
        keep = nms(anchors[idx].float(), loss[idx].float(), self.nms_thresh)
        return idx[keep[:k]]
