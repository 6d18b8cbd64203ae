"""Fused focal-loss kernels: loss and gradient in one pass over the logits.

Shape shorthand:
    M: number of rows (anchors, or any leading dims flattened)
    K: number of classes (sigmoid outputs per row)

Each kernel reads the logits (and targets) once and writes the loss (or its sum) and d(loss)/dx
once; the autograd Function below keeps that gradient and only rescales it in backward. This
avoids the half-dozen (M, K) temporaries an op-by-op implementation allocates, which on CPU cost
as much as the arithmetic (page faults on every fresh buffer).

The kernels are plain tensor code compiled with ``torch.compile`` (Inductor: one C++/OpenMP loop
on CPU, one Triton kernel on GPU). Where compilation is unavailable (no C++ compiler, or
``RETINANET_PLUGIN_COMPILE=0``) the same code runs eagerly and still gives the same numbers.

Gradients below the smallest normal float32 are flushed to zero: subnormal values make the CPU
convolution backward that consumes them several times slower, and they carry no information a
float32 optimiser step can use.
"""

import functools
import logging
import os
import types
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Smallest positive normal float32 (2**-126); anything smaller in a gradient is flushed to 0.
_TINY = 1.1754943508222875e-38


def _flush(g: Tensor) -> Tensor:
    return torch.where(g.abs() < _TINY, torch.zeros_like(g), g)


def _sigmoids(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Return (sigmoid(x), sigmoid(-x), exp(-|x|)), each accurate for any |x| (no 1 - p)."""
    e = torch.exp(-x.abs())
    inv = 1.0 / (1.0 + e)
    pos = x >= 0
    return torch.where(pos, inv, e * inv), torch.where(pos, e * inv, inv), e


def gamma_mode(gamma: float) -> int:
    """Kernel variant for gamma: 0, 1 and 2 (the paper's default) get exact products instead of
    a general power (exp and log per element); -1 means any other value."""
    return int(gamma) if gamma in (0.0, 1.0, 2.0) else -1


def _power(q: Tensor, gamma: Tensor, mode: int) -> Tensor:
    """q ** gamma for q >= 0."""
    if mode == 1:
        return q
    if mode == 2:
        return q * q
    return q**gamma


def _dense_focal(x: Tensor, t: Tensor, alpha: Tensor, gamma: Tensor, use_alpha: bool,
                 mode: int, reduce: bool):
    """Eq. 5 with float targets t in [0, 1] (fvcore's convention), value and d/dx.

    Args:
        x (Tensor): logits, any shape, float32 or float64.
        t (Tensor): targets, x's shape and dtype.
        alpha, gamma (Tensor): 0-dim; tensors rather than Python floats so that one compiled
            kernel serves every value. use_alpha says whether alpha >= 0; mode is
            gamma_mode(gamma).
    """
    s_pos, s_neg, e = _sigmoids(x)
    # BCE with logits written so that t in {0, 1} never subtracts two large numbers.
    ce = torch.clamp(x, min=0) - x * t + torch.log1p(e)
    q = t * s_neg + (1 - t) * s_pos  # 1 - p_t
    dce = (1 - t) * s_pos - t * s_neg  # p - t
    if use_alpha:
        a_t = alpha * t + (1 - alpha) * (1 - t)
    else:
        a_t = torch.ones_like(x)
    if mode == 0:
        loss = a_t * ce
        grad = a_t * dce
    else:
        mod = _power(q, gamma, mode)
        dq = (1 - 2 * t) * s_pos * s_neg
        # gamma * q^(gamma-1) * dq, with the q = 0 limit (0 for any gamma > 0) taken explicitly.
        if mode == 1:
            dmod = dq
        elif mode == 2:
            dmod = 2 * q * dq
        else:
            dmod = torch.where(q > 0, gamma * q ** (gamma - 1) * dq, torch.zeros_like(q))
        loss = a_t * mod * ce
        grad = a_t * (dmod * ce + mod * dce)
    return (loss.sum() if reduce else loss), _flush(grad)


def _dense_focal_star(x: Tensor, t: Tensor, gamma: Tensor, beta: Tensor, alpha: Tensor,
                      use_alpha: bool, reduce: bool):
    """FL* (Appendix A) with float targets t in {0, 1}: y = 2t - 1, value and d/dx."""
    y = 2 * t - 1
    z = gamma * x * y + beta
    s_pos, s_neg, e = _sigmoids(z)
    loss = (torch.clamp(-z, min=0) + torch.log1p(e)) / gamma  # -log sigmoid(z) / gamma
    grad = -y * s_neg  # Appendix B: dFL*/dx = y (p*_t - 1)
    if use_alpha:
        a_t = alpha * t + (1 - alpha) * (1 - t)
        loss = a_t * loss
        grad = a_t * grad
    return (loss.sum() if reduce else loss), _flush(grad)


def _label_weights(labels: Tensor, num_classes: int, class_dim: int, alpha: Tensor,
                   use_alpha: bool, alpha_vec: Optional[Tensor], dtype: torch.dtype):
    """One-hot mask and alpha_t, both of x's shape, from class indices; ignored rows get weight
    0. ``labels`` has x's shape except for size 1 at ``class_dim`` (-1: (M, 1) for (M, K)
    logits; -2: (N, A, 1, HW) for the head's (N, A, K, HW) layout)."""
    class_shape = (num_classes,) + (1,) * (-class_dim - 1)
    # Compared in the labels' own width when int32 (the per-level path passes int32 labels).
    index_dtype = torch.int32 if labels.dtype == torch.int32 else torch.int64
    classes = torch.arange(num_classes, device=labels.device, dtype=index_dtype)
    classes = classes.view(class_shape)
    is_t = labels == classes
    valid = (labels >= 0).to(dtype)
    if alpha_vec is not None:
        a_pos = alpha_vec.to(dtype).view(class_shape)
        a_t = torch.where(is_t, a_pos, 1 - a_pos)
    elif use_alpha:
        a_t = torch.where(is_t, alpha, 1 - alpha).to(dtype)
    else:
        a_t = torch.ones_like(is_t, dtype=dtype)
    return is_t, a_t * valid


def _label_focal(x: Tensor, labels: Tensor, alpha: Tensor, gamma: Tensor, use_alpha: bool,
                 mode: int, alpha_vec: Optional[Tensor], class_dim: int, reduce: bool):
    """Eq. 5 with class-index targets, value and d/dx, without a dense one-hot input.

    Args:
        x (Tensor): logits, (M, K) with class_dim = -1, or the head's (N, A, K, HW) with
            class_dim = -2.
        labels (Tensor): int, x's shape with size 1 at class_dim ((M, 1) or (N, A, 1, HW));
            0..K-1 foreground class, K (or any other value >= K) background, -1 ignored (no
            loss, no gradient).
    """
    is_t, a_t = _label_weights(labels, x.shape[class_dim], class_dim, alpha, use_alpha,
                               alpha_vec, x.dtype)
    x_t = torch.where(is_t, x, -x)
    p_t, q, e = _sigmoids(x_t)
    nll = torch.clamp(-x_t, min=0) + torch.log1p(e)  # -log p_t
    w = a_t * _power(q, gamma, mode) if mode != 0 else a_t
    loss = w * nll
    # Appendix B: dFL/dx_t = (1 - p_t)^gamma (gamma p_t log p_t + p_t - 1).
    g_t = -w * (gamma * p_t * nll + q)
    grad = torch.where(is_t, g_t, -g_t)
    return (loss.sum() if reduce else loss), _flush(grad)


def _label_focal_star(x: Tensor, labels: Tensor, alpha: Tensor, gamma: Tensor, beta: Tensor,
                      use_alpha: bool, alpha_vec: Optional[Tensor], class_dim: int,
                      reduce: bool):
    """FL* (Appendix A) with class-index targets, value and d/dx; layouts as
    :func:`_label_focal`."""
    is_t, a_t = _label_weights(labels, x.shape[class_dim], class_dim, alpha, use_alpha,
                               alpha_vec, x.dtype)
    z = gamma * torch.where(is_t, x, -x) + beta
    _, s_neg, e = _sigmoids(z)
    loss = a_t * (torch.clamp(-z, min=0) + torch.log1p(e)) / gamma
    g_t = -a_t * s_neg
    grad = torch.where(is_t, g_t, -g_t)
    return (loss.sum() if reduce else loss), _flush(grad)


def _scale_grad_(grad: Tensor, scale: Tensor) -> Tensor:
    # In place: a fresh (M, K) buffer on CPU costs about as much as the arithmetic.
    return grad.copy_(_flush(grad * scale))


def _compile_enabled() -> bool:
    return os.environ.get("RETINANET_PLUGIN_COMPILE", "1") != "0"


def _compile_errors() -> Tuple[type, ...]:
    """Exception types that mean "this kernel could not be compiled" (no C++ compiler, no Triton,
    an Inductor or Dynamo limitation), as opposed to an error of the call itself (out of memory,
    a tensor on the wrong device) that the eager kernel would raise as well. Looked up by name:
    the set differs between torch versions."""
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc

    names = [(dynamo_exc, "BackendCompilerFailed"), (dynamo_exc, "Unsupported"),
             (dynamo_exc, "InternalTorchDynamoError"), (dynamo_exc, "InvalidBackend"),
             (inductor_exc, "InductorError"), (inductor_exc, "CppCompileError"),
             (inductor_exc, "InvalidCxxCompiler"), (inductor_exc, "TritonMissing"),
             (inductor_exc, "GPUTooOldForTriton"), (inductor_exc, "LoweringException")]
    return tuple(getattr(m, n) for m, n in names if isinstance(getattr(m, n, None), type))


def _variant_key(args) -> tuple:
    """What makes a kernel call a different compiled variant: its non-tensor arguments (flags,
    the gamma mode, the class dimension, reduce), whether each optional tensor is given, and the
    dtypes and device type of the tensors."""
    return tuple((a.dtype, a.device.type) if isinstance(a, Tensor) else a for a in args)


def _fresh_function(fn: Callable, tag: int) -> Callable:
    """A copy of ``fn`` with a code object of its own. Dynamo keeps its compiled graphs, and
    counts recompilations against ``torch._dynamo.config.recompile_limit`` (8), per code object:
    the variants of one kernel (alpha or not, gamma 0/1/2/other, flat or per-level layout, sum or
    not, float32 or float64) sharing one code object would exceed it in a long process, and from
    then on Dynamo runs every new variant eagerly, silently and several times slower."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_v{tag}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                              fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


class _Kernel:
    """A kernel run through ``torch.compile``, falling back to eager if compilation fails.

    Each variant (see :func:`_variant_key`) is compiled from its own copy of the kernel's code,
    so that no number of variants in one process reaches Dynamo's recompilation limit.

    Only a compilation failure switches this kernel to eager (once, with a warning); any other
    exception of a compiled call is the caller's error and is raised unchanged, so that a
    transient failure (say a CUDA out-of-memory) does not leave the rest of the run on the
    slower eager path.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self._variants: Dict[tuple, Callable] = {}
        self.backend = "eager"
        self._failed = False
        functools.update_wrapper(self, fn)

    def compiled(self, args: tuple) -> Callable:
        """The compiled variant for these arguments (compiled on its first call)."""
        key = _variant_key(args)
        variant = self._variants.get(key)
        if variant is None:
            variant = torch.compile(_fresh_function(self.fn, len(self._variants)), dynamic=True)
            self._variants[key] = variant
        return variant

    def __call__(self, *args):
        x = args[0]
        # Empty inputs would only cost a recompilation (size 0 is specialised).
        if self._failed or not _compile_enabled() or x.numel() == 0:
            return self.fn(*args)
        compiled = self.compiled(args)
        try:
            out = compiled(*args)
        except _compile_errors() as exc:  # results are the same eagerly, only slower
            logger.warning("torch.compile of %s failed (%s: %s); using eager kernels.",
                           self.fn.__name__, type(exc).__name__, exc)
            self._failed = True
            return self.fn(*args)
        self.backend = "inductor"
        return out


dense_focal = _Kernel(_dense_focal)
dense_focal_star = _Kernel(_dense_focal_star)
label_focal = _Kernel(_label_focal)
label_focal_star = _Kernel(_label_focal_star)
scale_grad_ = _Kernel(_scale_grad_)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float type is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_args(x: Tensor, args) -> list:
    """Floats become 0-dim tensors (a fill on the device, no host sync) so that changing alpha
    or gamma does not recompile the kernel; float tensors are cast to the compute dtype."""
    cdt = compute_dtype(x.dtype)
    return [
        torch.full((), a, dtype=cdt, device=x.device) if isinstance(a, float)
        else a.to(cdt) if isinstance(a, Tensor) and a.is_floating_point() else a
        for a in args
    ]


def _run_kernel(kernel: _Kernel, x: Tensor, args, reduce: bool) -> Tuple[Tensor, Tensor]:
    with torch.autocast(device_type=x.device.type, enabled=False):
        return kernel(x.detach().to(compute_dtype(x.dtype)), *_kernel_args(x, args), reduce)


def _is_one(grad_out: Tensor) -> bool:
    """Whether an upstream gradient is the scalar 1, read only where that costs no device sync
    (a CPU tensor); on an accelerator the gradient is always rescaled."""
    return grad_out.device.type == "cpu" and grad_out.numel() == 1 and grad_out.item() == 1.0


class _FusedLoss(torch.autograd.Function):
    """Runs a kernel that returns (loss, d loss / d x) and keeps the gradient for backward.

    The first backward scales the kept gradient in place and hands that buffer to autograd,
    keeping no reference to it (a fresh (M, K) buffer costs about as much as the arithmetic on
    CPU, and autograd may adopt the buffer as ``x.grad``). A further backward
    (``retain_graph=True``) recomputes the gradient from the saved inputs.
    """

    @staticmethod
    def forward(ctx, kernel, reduction: str, x: Tensor, *args):
        ctx.in_dtype = x.dtype
        ctx.kernel = kernel
        ctx.reduce = reduction != "none"
        ctx.num_args = len(args)
        # Tensors go through save_for_backward (an in-place change before a recomputing
        # backward is caught by autograd's version check); the rest is kept as is.
        ctx.tensor_at = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        ctx.other_args = [None if isinstance(a, Tensor) else a for a in args]
        ctx.save_for_backward(x, *[args[i] for i in ctx.tensor_at])
        # As torch's mean: the mean of an empty input is NaN (fvcore and torchvision agree).
        ctx.mean_over = x.numel() if reduction == "mean" else 1
        loss, grad = _run_kernel(kernel, x, args, ctx.reduce)
        if reduction == "mean":
            loss = loss / ctx.mean_over
        ctx.grad = grad
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # the first backward gave its buffer away
            x, *tensors = ctx.saved_tensors
            args = list(ctx.other_args)
            for i, t in zip(ctx.tensor_at, tensors):
                args[i] = t
            _, grad = _run_kernel(ctx.kernel, x, args, ctx.reduce)
        if _is_one(grad_out) and ctx.mean_over in (0, 1):
            # loss.backward() on a summed loss: the kept gradient is the answer (already
            # flushed); rescaling would be one more full pass over it.
            grad_x = grad
        else:
            scale = grad_out.to(grad.dtype)
            if ctx.mean_over not in (0, 1):
                scale = scale / ctx.mean_over
            grad_x = scale_grad_(grad, scale)
        return (None, None, grad_x.to(ctx.in_dtype)) + (None,) * ctx.num_args


def fused(kernel: _Kernel, reduction: str, x: Tensor, *args) -> Tensor:
    """Loss from ``kernel(x, *args, reduce)`` with its fused gradient.

    The loss is computed and returned in float32 (float64 for float64 input): float16 / bfloat16
    logits give a float32 loss, as autocast does for binary cross-entropy.
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return _FusedLoss.apply(kernel, reduction, x, *args)
