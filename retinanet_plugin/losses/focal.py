"""The focal-loss family of Lin et al. (ICCV 2017), as functions.

Shape shorthand:
    M: number of rows (anchors)
    K: number of foreground classes (one sigmoid each)
    C: number of softmax classes (K + 1 with background)

The dense-target functions follow fvcore's call convention
(``sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2, reduction="none")``, targets a float
tensor of the logits' shape, ``alpha < 0`` disables alpha-balancing), so they are drop-in
replacements. The ``*_from_labels`` variants take class indices instead (background = K,
ignore = -1) and never build the dense one-hot target the model would otherwise allocate.

The default implementations are fused (see :mod:`retinanet_plugin.losses.fused`); the
``*_reference`` functions compute Eq. 5 and Appendix A term by term with autograd and are what the
fused ones are tested against.
"""

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from . import fused

__all__ = [
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_star",
    "sigmoid_focal_loss_from_labels",
    "sigmoid_focal_loss_star_from_labels",
    "sigmoid_focal_loss_per_level",
    "sigmoid_focal_loss_star_per_level",
    "softmax_focal_loss",
    "alpha_balanced_ce",
    "sigmoid_focal_loss_reference",
    "sigmoid_focal_loss_star_reference",
    "check_focal_params",
    "check_alpha_per_class",
]

# Integer dtypes accepted for class-index labels (bool is refused: True / False are not classes).
_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_focal_params(alpha: float, gamma: float, *, alpha_name: str = "alpha",
                       gamma_name: str = "gamma", star: bool = False) -> None:
    """Raise ValueError naming the argument (or config key) when alpha or gamma is invalid.

    alpha must lie in [0, 1], or be negative to disable alpha-balancing; gamma must be >= 0
    (> 0 for FL*, which divides by it).
    """
    if not alpha < 0 and not 0 <= alpha <= 1:
        raise ValueError(
            f"{alpha_name} must be in [0, 1], or negative to disable alpha-balancing; got {alpha}"
        )
    if star and not gamma > 0:
        raise ValueError(f"{gamma_name} must be > 0 for FL* (it divides by gamma); got {gamma}")
    if not gamma >= 0:
        raise ValueError(f"{gamma_name} must be >= 0; got {gamma}")


def check_alpha_per_class(values: Sequence[float], *, name: str = "alpha_per_class") -> None:
    """Raise ValueError naming ``name`` unless every per-class alpha lies in [0, 1].

    Unlike the scalar alpha, a negative entry has no "disabled" meaning here (a per-class vector
    is alpha-balancing by definition), and taken literally it would make the loss negative.
    """
    for k, a in enumerate(values):
        if not 0 <= a <= 1:
            raise ValueError(f"{name}[{k}] = {a} must be in [0, 1] (one alpha per class)")


def _check_dense(inputs: Tensor, targets: Tensor) -> None:
    if inputs.shape != targets.shape:
        raise ValueError(
            f"targets must have the logits' shape {tuple(inputs.shape)}, got {tuple(targets.shape)}"
        )
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor, got {inputs.dtype}")
    # Checked here rather than left to the kernel, so that the compiled and the eager kernel
    # (RETINANET_PLUGIN_COMPILE=0) accept exactly the same inputs.
    if not targets.is_floating_point():
        raise TypeError(
            f"targets must be a floating-point tensor of values in [0, 1], got {targets.dtype} "
            "(convert with targets.to(inputs.dtype))"
        )


def _check_labels(logits: Tensor, labels: Tensor, alpha_per_class: Optional[Tensor]) -> None:
    if logits.dim() < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
    if alpha_per_class is None:
        return
    if alpha_per_class.shape != (logits.shape[-1],) or not alpha_per_class.is_floating_point():
        raise ValueError(
            f"alpha_per_class must be a float tensor with one value per class "
            f"({logits.shape[-1]}), got shape {tuple(alpha_per_class.shape)} and "
            f"{alpha_per_class.dtype}"
        )
    # K values read back once per call (the modules validate theirs once, at construction).
    check_alpha_per_class(alpha_per_class.tolist())


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """Focal loss FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) (Eq. 5), fused.

    Args:
        inputs (Tensor): logits, any shape.
        targets (Tensor): inputs' shape, float in [0, 1] (1 = positive).
        alpha (float): weight of positives (1 - alpha for negatives); < 0 disables it.
        gamma (float): focusing parameter, >= 0 (0 gives alpha-balanced CE).
        reduction (str): "none", "mean" or "sum".

    Returns:
        Tensor: the loss, inputs' shape for "none", else a scalar; float64 for float64 inputs,
        float32 otherwise.
    """
    _check_dense(inputs, targets)
    check_focal_params(alpha, gamma)
    return fused.fused(fused.dense_focal, reduction, inputs, targets, float(alpha), float(gamma),
                       alpha >= 0, fused.gamma_mode(gamma))


def sigmoid_focal_loss_star(inputs: Tensor, targets: Tensor, gamma: float = 1.0, beta: float = 0.0,
                            alpha: float = -1, reduction: str = "none") -> Tensor:
    """FL* (Appendix A): -log(sigmoid(gamma x_t + beta)) / gamma, with x_t = (2t - 1) x, fused.

    With beta = 0 this equals fvcore's ``sigmoid_focal_loss_star``. Table 3 of the paper: gamma=2,
    beta=1 gives 33.8 AP and gamma=4, beta=0 gives 33.9 AP against FL's 34.0.

    Args:
        inputs (Tensor): logits, any shape.
        targets (Tensor): inputs' shape, float in {0, 1}.
        gamma (float): > 0.
        beta (float): offset.
        alpha (float): as in :func:`sigmoid_focal_loss`; disabled (-1) by default as in fvcore.
        reduction (str): "none", "mean" or "sum".
    """
    _check_dense(inputs, targets)
    check_focal_params(alpha, gamma, star=True)
    return fused.fused(fused.dense_focal_star, reduction, inputs, targets, float(gamma),
                       float(beta), float(alpha), alpha >= 0)


def sigmoid_focal_loss_from_labels(logits: Tensor, labels: Tensor, alpha: float = 0.25,
                                   gamma: float = 2.0, reduction: str = "sum",
                                   alpha_per_class: Optional[Tensor] = None) -> Tensor:
    """Eq. 5 with class-index targets, without building a one-hot tensor.

    Equal to ``sigmoid_focal_loss(logits, one_hot(labels)[..., :K])`` over the non-ignored rows.

    Args:
        logits (Tensor): (..., K).
        labels (Tensor): (...) int; 0..K-1 foreground, K (any value >= K) background, -1 ignored
            (no loss and no gradient for that row).
        alpha (float): weight of the positive class; < 0 disables alpha-balancing.
        gamma (float): >= 0.
        reduction (str): "sum" (default, the detector's), "mean" (over all elements, ignored rows
            included) or "none" (logits' shape; ignored rows are 0).
        alpha_per_class (Tensor, optional): (K,) per-class alpha, replacing ``alpha``.
    """
    _check_labels(logits, labels, alpha_per_class)
    return _focal_from_labels(logits, labels, alpha, gamma, reduction, alpha_per_class)


def _focal_from_labels(logits: Tensor, labels: Tensor, alpha: float, gamma: float,
                       reduction: str, alpha_per_class: Optional[Tensor]) -> Tensor:
    """:func:`sigmoid_focal_loss_from_labels` without the checks of ``alpha_per_class``'s
    values (a host sync), for callers that validated it once (the registered losses)."""
    check_focal_params(alpha, gamma)
    return fused.fused(fused.label_focal, reduction, logits, labels.unsqueeze(-1), float(alpha),
                       float(gamma), alpha >= 0, fused.gamma_mode(gamma), alpha_per_class, -1)


def sigmoid_focal_loss_star_from_labels(logits: Tensor, labels: Tensor, gamma: float = 1.0,
                                        beta: float = 0.0, alpha: float = -1,
                                        reduction: str = "sum",
                                        alpha_per_class: Optional[Tensor] = None) -> Tensor:
    """FL* (Appendix A) with class-index targets; labels as in
    :func:`sigmoid_focal_loss_from_labels`."""
    _check_labels(logits, labels, alpha_per_class)
    return _star_from_labels(logits, labels, gamma, beta, alpha, reduction, alpha_per_class)


def _star_from_labels(logits: Tensor, labels: Tensor, gamma: float, beta: float, alpha: float,
                      reduction: str, alpha_per_class: Optional[Tensor]) -> Tensor:
    """:func:`sigmoid_focal_loss_star_from_labels` without the value checks of
    ``alpha_per_class`` (see :func:`_focal_from_labels`)."""
    check_focal_params(alpha, gamma, star=True)
    return fused.fused(fused.label_focal_star, reduction, logits, labels.unsqueeze(-1),
                       float(alpha), float(gamma), float(beta), alpha >= 0, alpha_per_class, -1)


def sigmoid_focal_loss_per_level(pred_logits: Sequence[Tensor], gt_labels: Tensor,
                                 alpha: float = 0.25, gamma: float = 2.0,
                                 alpha_per_class: Optional[Tensor] = None) -> Tensor:
    """Eq. 5 summed over anchors, computed in the head's per-level layout.

    Equal to ``sigmoid_focal_loss_from_labels(cat([permute_to_N_HWA_K(x, K) for x in
    pred_logits], 1), gt_labels, reduction="sum")`` without that (N, R, K) copy of the logits,
    nor the split of its gradient back into levels: each level's loss and gradient are computed
    on a view of the head's output, and the gradient is written in its layout.

    Args:
        pred_logits (list[Tensor]): L levels of (N, A*K, Hi, Wi), the head's output.
        gt_labels (Tensor): (N, R) int, R = sum of Hi*Wi*A, anchors ordered by level, then
            (Hi, Wi, A) as detectron2's ``permute_to_N_HWA_K``; 0..K-1 foreground, K
            background, -1 ignored.
        alpha, gamma, alpha_per_class: as in :func:`sigmoid_focal_loss_from_labels`.

    Returns:
        Tensor: scalar, float32 (float64 for float64 logits).
    """
    k = _check_levels(pred_logits, gt_labels, alpha_per_class)[1]
    if alpha_per_class is not None:
        check_alpha_per_class(alpha_per_class.tolist())
    return _focal_per_level(pred_logits, gt_labels, alpha, gamma, alpha_per_class, k)


def sigmoid_focal_loss_star_per_level(pred_logits: Sequence[Tensor], gt_labels: Tensor,
                                      gamma: float = 1.0, beta: float = 0.0, alpha: float = -1,
                                      alpha_per_class: Optional[Tensor] = None) -> Tensor:
    """FL* (Appendix A) in the head's per-level layout; arguments as
    :func:`sigmoid_focal_loss_per_level` and :func:`sigmoid_focal_loss_star_from_labels`."""
    k = _check_levels(pred_logits, gt_labels, alpha_per_class)[1]
    if alpha_per_class is not None:
        check_alpha_per_class(alpha_per_class.tolist())
    return _star_per_level(pred_logits, gt_labels, gamma, beta, alpha, alpha_per_class, k)


def _check_levels(pred_logits: Sequence[Tensor], gt_labels: Tensor,
                  alpha_per_class: Optional[Tensor]) -> tuple:
    """(A, K) of the head's layout, or ValueError / TypeError naming what does not fit."""
    if len(pred_logits) == 0:
        raise ValueError("pred_logits must hold at least one level")
    if gt_labels.dim() != 2:
        raise ValueError(f"gt_labels must be (N, R), got shape {tuple(gt_labels.shape)}")
    if gt_labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"labels must be an integer tensor of class indices, got "
                        f"{gt_labels.dtype}")
    num_images, num_anchors = gt_labels.shape
    for i, x in enumerate(pred_logits):
        if x.dim() != 4 or x.shape[0] != num_images:
            raise ValueError(f"pred_logits[{i}] must be (N={num_images}, A*K, Hi, Wi), got "
                             f"shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"logits must be a floating-point tensor, got {x.dtype}")
    locations = sum(x.shape[2] * x.shape[3] for x in pred_logits)
    a = num_anchors // max(locations, 1)
    channels = {x.shape[1] for x in pred_logits}
    if a * locations != num_anchors or len(channels) != 1 or a == 0 or channels.pop() % a:
        raise ValueError(
            f"gt_labels' {num_anchors} anchors do not fit the levels' shapes "
            f"{[tuple(x.shape) for x in pred_logits]} (R must be sum(Hi*Wi) * A and every level "
            "must have A*K channels)"
        )
    k = pred_logits[0].shape[1] // a
    if alpha_per_class is not None and alpha_per_class.shape != (k,):
        raise ValueError(f"alpha_per_class must have one value per class ({k}), got shape "
                         f"{tuple(alpha_per_class.shape)}")
    return a, k


def _over_levels(pred_logits: Sequence[Tensor], gt_labels: Tensor, num_classes: int,
                 level_loss: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Sum of ``level_loss(x, labels)`` over levels, x a (N, A, K, Hi*Wi) view of the level's
    logits and labels its (N, A, 1, Hi*Wi) (strided) view of gt_labels."""
    num_images = gt_labels.shape[0]
    total, start = None, 0
    for x in pred_logits:
        h, w = x.shape[2], x.shape[3]
        a = x.shape[1] // num_classes
        x4 = x.reshape(num_images, a, num_classes, h * w)  # a view of a contiguous head output
        labels = gt_labels[:, start:start + h * w * a].reshape(num_images, h * w, a)
        start += h * w * a
        # A contiguous (N, A, 1, HW) int32 copy of the level's labels (1/K of the logits'
        # elements): through the strided (Hi*Wi, A) -> (A, Hi*Wi) view the kernel would gather
        # each vector of labels element by element, which made it 2-3x slower.
        # Clamped first: any id >= K is background and any id < 0 ignored, so none overflows.
        labels = labels.transpose(1, 2).clamp(-1, num_classes)
        labels = labels.to(torch.int32, memory_format=torch.contiguous_format)
        loss = level_loss(x4, labels.unsqueeze(2))
        total = loss if total is None else total + loss
    return total


def _focal_per_level(pred_logits: Sequence[Tensor], gt_labels: Tensor, alpha: float,
                     gamma: float, alpha_per_class: Optional[Tensor], num_classes: int) -> Tensor:
    """:func:`sigmoid_focal_loss_per_level` with shapes checked and without the value checks
    of ``alpha_per_class`` (see :func:`_focal_from_labels`)."""
    check_focal_params(alpha, gamma)
    return _over_levels(pred_logits, gt_labels, num_classes, lambda x, labels: fused.fused(
        fused.label_focal, "sum", x, labels, float(alpha), float(gamma), alpha >= 0,
        fused.gamma_mode(gamma), alpha_per_class, -2))


def _star_per_level(pred_logits: Sequence[Tensor], gt_labels: Tensor, gamma: float, beta: float,
                    alpha: float, alpha_per_class: Optional[Tensor], num_classes: int) -> Tensor:
    """:func:`sigmoid_focal_loss_star_per_level` without its checks (see
    :func:`_focal_per_level`)."""
    check_focal_params(alpha, gamma, star=True)
    return _over_levels(pred_logits, gt_labels, num_classes, lambda x, labels: fused.fused(
        fused.label_focal_star, "sum", x, labels, float(alpha), float(gamma), float(beta),
        alpha >= 0, alpha_per_class, -2))


def alpha_balanced_ce(inputs: Tensor, targets: Tensor, alpha: float = 0.25,
                      reduction: str = "none") -> Tensor:
    """Alpha-balanced cross-entropy -alpha_t log(p_t), the baseline of Table 1a (gamma = 0)."""
    return sigmoid_focal_loss(inputs, targets, alpha=alpha, gamma=0.0, reduction=reduction)


def softmax_focal_loss(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       background_index: Optional[int] = None,
                       reduction: str = "none") -> Tensor:
    """Focal loss over a softmax of C classes (the paper's footnote), -alpha_t (1-p_t)^g log p_t.

    Args:
        logits (Tensor): (M, C).
        labels (Tensor): (M,) int in [0, C), or -1 to ignore the row.
        alpha (float): weight of foreground rows, 1 - alpha for rows labelled
            ``background_index``; < 0 (or no background_index) weighs every row 1.
        gamma (float): >= 0.
        background_index (int, optional): the background class, usually C - 1.
        reduction (str): "none" ((M,), 0 for ignored rows), "mean" (over non-ignored rows) or
            "sum".
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"softmax_focal_loss expects logits (M, C) and labels (M,), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
    check_focal_params(alpha, gamma)
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    valid = labels >= 0
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    weight = valid.to(fused.compute_dtype(logits.dtype))
    if alpha >= 0 and background_index is not None:
        weight = weight * torch.where(safe == background_index, 1 - alpha, alpha)
    loss = _SoftmaxFocal.apply(logits, safe, weight, float(gamma))
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    return loss


def _softmax_focal_terms(logits: Tensor, labels: Tensor, gamma: float):
    """log p_t, q = 1 - p_t (accurate near p_t = 1) and the softmax, in the compute dtype."""
    log_p = F.log_softmax(logits.to(fused.compute_dtype(logits.dtype)), dim=-1)
    log_p_t = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return log_p_t, -torch.expm1(log_p_t), log_p


class _SoftmaxFocal(torch.autograd.Function):
    """Per-row -w (1 - p_t)^gamma log p_t with its analytic gradient.

    Autograd through ``(1 - p_t) ** gamma`` multiplies the infinite derivative of q^gamma at
    q = 0 (gamma < 1, p_t rounding to 1) by 0 and returns NaN, for ignored rows too. Written in
    log p_t (lp) with r = lp / q, which tends to -1 as q -> 0:

        dL/dlp = -w q^gamma (1 - gamma p_t r),   dlp/dx_j = [j = t] - p_j,

    finite everywhere, and 0 at q = 0 for gamma > 0 (the limit).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, weight: Tensor, gamma: float) -> Tensor:
        log_p_t, q, _ = _softmax_focal_terms(logits.detach(), labels, gamma)
        ctx.save_for_backward(logits, labels, weight)
        ctx.gamma = gamma
        return -weight * q**gamma * log_p_t

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, labels, weight = ctx.saved_tensors
        gamma = ctx.gamma
        log_p_t, q, log_p = _softmax_focal_terms(logits, labels, gamma)
        r = torch.where(q > 0, log_p_t / q, torch.full_like(q, -1.0))
        d_lp = -weight * q**gamma * (1 - gamma * log_p_t.exp() * r) * grad_out
        grad = -log_p.exp() * d_lp.unsqueeze(-1)
        grad.scatter_add_(-1, labels.unsqueeze(-1), d_lp.unsqueeze(-1))
        return grad.to(logits.dtype), None, None, None


def sigmoid_focal_loss_reference(inputs: Tensor, targets: Tensor, alpha: float = 0.25,
                                 gamma: float = 2.0, reduction: str = "none") -> Tensor:
    """Eq. 5 term by term, differentiated by autograd; the oracle for the fused version.

    With soft targets the cross-entropy term is -(t log p + (1-t) log(1-p)), as in fvcore.
    """
    p = torch.sigmoid(inputs)
    p_t = p * targets + (1 - p) * (1 - targets)
    ce = -(targets * F.logsigmoid(inputs) + (1 - targets) * F.logsigmoid(-inputs))
    loss = (1 - p_t) ** gamma * ce
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _reduce(loss, reduction)


def sigmoid_focal_loss_star_reference(inputs: Tensor, targets: Tensor, gamma: float = 1.0,
                                      beta: float = 0.0, alpha: float = -1,
                                      reduction: str = "none") -> Tensor:
    """Appendix A term by term: p*_t = sigmoid(gamma x_t + beta), FL* = -log(p*_t) / gamma."""
    x_t = inputs * (2 * targets - 1)
    loss = -F.logsigmoid(gamma * x_t + beta) / gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _reduce(loss, reduction)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss
