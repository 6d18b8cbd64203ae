"""Mixed precision (autocast) and the channels-last memory format, in training and inference.

Training, ``SOLVER.AMP.ENABLED`` (lazy: ``train.amp.enabled``) with ``SOLVER.AMP.PRECISION``
(lazy: ``train.amp.precision``, default "auto"):

- float16 on CUDA: detectron2's own ``AMPTrainer`` (float16 autocast and a GradScaler);
- bfloat16 (CPU, or CUDA): :class:`AutocastTrainer`, bfloat16 autocast and no GradScaler
  (bfloat16 has float32's exponent range, so small gradients do not flush to zero);
- "auto": float16 on CUDA (detectron2's behaviour), bfloat16 on CPU. float16 on CPU is refused
  by name (:func:`autocast_dtype`).

detectron2's ``AMPTrainer`` cannot run on CPU (both 0.6 and later assert CUDA in ``run_step``
and use ``torch.cuda.amp.autocast``; later versions take a ``precision`` but still only on
CUDA). Weights, gradients and optimizer state stay float32 either way: autocast only casts the
inputs of the ops it lists (convolutions, matmuls) for the forward pass.

Inference, ``TEST.AMP.ENABLED`` / ``TEST.AMP.PRECISION`` (lazy: ``model.test_amp_precision``):
the model itself runs its backbone and head under autocast (:class:`FocalRetinaNet`), so
every tool that calls it (evaluation, predict, TTA, the lazy path) honours the key; boxes and
scores are computed from float32 predictions.

Channels-last, ``MODEL.CHANNELS_LAST`` (lazy: ``model.channels_last``): the model converts its
4-d weights at construction and its normalised, padded input batch in ``preprocess_image``.
"""

import contextlib
import functools
import logging
import os
import time
from typing import Any, Iterator, Optional, Union
from unittest import mock

import torch
from torch import Tensor

import detectron2.engine.defaults as d2_defaults
from detectron2.engine.train_loop import AMPTrainer, SimpleTrainer

__all__ = [
    "PRECISIONS",
    "AutocastTrainer",
    "autocast_dtype",
    "build_step_trainer",
    "cpu_has_native_bf16",
    "inference_autocast",
    "training_dtype",
    "yacs_amp_trainer",
]

logger = logging.getLogger(__name__)

# The values of SOLVER.AMP.PRECISION / TEST.AMP.PRECISION and their lazy twins.
PRECISIONS = ("auto", "float16", "bfloat16")

# oneDNN instruction-set caps (the environment variable ONEDNN_MAX_CPU_ISA, or its older name
# DNNL_MAX_CPU_ISA) below its native bfloat16 kernels: with one of these oneDNN emulates
# bfloat16. oneDNN matches the names without regard to case and ignores a value it does not
# know (no cap), so any other value leaves the CPU's own instructions in charge.
_CAPS_WITHOUT_BF16 = frozenset({
    "SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_MIC", "AVX512_MIC_4OPS",
    "AVX512_CORE", "AVX512_CORE_VNNI",
})


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 convolutions and matmuls natively: x86 with AVX-512
    BF16 or AMX (as PyTorch's CPU detection reports), and oneDNN not capped below them by
    ``ONEDNN_MAX_CPU_ISA`` (or, when that is unset, ``DNNL_MAX_CPU_ISA``).

    Without them oneDNN emulates bfloat16 through float32, and bfloat16 autocast is slower than
    float32: for the demo model's training step on this project's AVX-512 BF16 machine, 2.2x
    slower with ``ONEDNN_MAX_CPU_ISA=AVX512_CORE`` and 11x with ``AVX2`` (docs/training.md).
    Other architectures (Arm with BF16 extensions) report False: not measured here.
    """
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if cap.upper() in _CAPS_WITHOUT_BF16:
        return False
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, probe, None)
        if check is not None and check():
            return True
    return False


@functools.lru_cache(maxsize=None)
def _warn_emulated_bf16(key: str) -> None:
    """Once per key and process (inference asks at every call): warns if this CPU only
    emulates bfloat16."""
    if cpu_has_native_bf16():
        return
    logger.warning(
        "%s asks for bfloat16 on a CPU without AVX-512 BF16 or AMX (or with ONEDNN_MAX_CPU_ISA "
        "capped below them): oneDNN emulates bfloat16 there, and a training step of the demo "
        "model measured 2.2x (AVX-512 without BF16) to 11x (AVX2) slower than float32. Use "
        "float32 on this CPU (AMP off).",
        key,
    )


def autocast_dtype(precision: str, device: Union[str, torch.device], key: str) -> torch.dtype:
    """The autocast dtype that ``precision`` means on ``device``.

    Args:
        precision (str): "auto" (float16 on CUDA, bfloat16 elsewhere), "float16" or "bfloat16".
        device: the model's device ("cpu", "cuda", "cuda:1", ...).
        key (str): the config key that set ``precision``, named in errors.

    Raises:
        ValueError: an unknown precision, or float16 on CPU.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"{key} must be one of {PRECISIONS}, got {precision!r}")
    device_type = torch.device(device).type
    if precision == "auto":
        dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
    elif precision == "float16" and device_type == "cpu":
        raise ValueError(
            f"{key} = 'float16' on CPU: float16 autocast on CPU has no fast kernels and needs "
            "a GradScaler, which detectron2 only runs on CUDA; use 'bfloat16' (or 'auto')"
        )
    else:
        dtype = getattr(torch, precision)
    if device_type == "cpu" and dtype == torch.bfloat16:
        _warn_emulated_bf16(key)
    return dtype


def training_dtype(
    enabled: bool, precision: str, device: Union[str, torch.device], key: str
) -> Optional[torch.dtype]:
    """The autocast dtype of training (None: AMP off, float32), checked as
    :func:`autocast_dtype`; ``key`` names the precision key."""
    if not enabled:
        return None
    return autocast_dtype(precision, device, key)


@contextlib.contextmanager
def inference_autocast(
    precision: Optional[str], device: torch.device, key: str = "test_amp_precision"
) -> Iterator[Optional[torch.dtype]]:
    """Autocast for the backbone and head in inference; yields its dtype (None: float32,
    ``precision`` None)."""
    if precision is None:
        yield None
        return
    dtype = autocast_dtype(precision, device, key)
    with torch.autocast(device.type, dtype=dtype):
        yield dtype


class AutocastTrainer(SimpleTrainer):
    """detectron2's ``SimpleTrainer`` with the forward pass (model and losses) under
    ``torch.autocast(device_type, dtype=precision)`` and no GradScaler: the trainer of bfloat16
    mixed precision, on CPU or CUDA. The backward pass and the optimizer step run outside
    autocast, on float32 weights.

    Its state is ``SimpleTrainer``'s (no grad scaler), so a run can be resumed with AMP switched
    on or off.

    Args:
        model, data_loader, optimizer: as ``SimpleTrainer``'s.
        precision (torch.dtype): the autocast dtype (bfloat16).
        device_type (str): "cpu" or "cuda", the model's device type.
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        precision: torch.dtype = torch.bfloat16,
        device_type: str = "cpu",
    ):
        super().__init__(model, data_loader, optimizer)
        self.precision = precision
        self.device_type = device_type

    def run_step(self) -> None:
        if not self.model.training:
            raise RuntimeError("[AutocastTrainer] the model was put in eval mode during training")
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
        if isinstance(loss_dict, Tensor):
            loss_dict = {"total_loss": loss_dict}
        losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        losses.backward()
        # Later detectron2 runs its hooks' after_backward here; 0.6 has none.
        after_backward = getattr(self, "after_backward", None)
        if after_backward is not None:
            after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def build_step_trainer(
    model, data_loader, optimizer, dtype: Optional[torch.dtype], device: Union[str, torch.device]
) -> SimpleTrainer:
    """The trainer of one step: ``SimpleTrainer`` (``dtype`` None), detectron2's
    ``AMPTrainer`` (float16), or :class:`AutocastTrainer` (bfloat16).

    Args:
        model, data_loader, optimizer: as ``SimpleTrainer``'s.
        dtype (torch.dtype, optional): from :func:`training_dtype`.
        device: the model's device.
    """
    if dtype is None:
        return SimpleTrainer(model, data_loader, optimizer)
    if dtype == torch.float16:
        return AMPTrainer(model, data_loader, optimizer)
    logger.info("Mixed precision training: %s autocast, no GradScaler", dtype)
    return AutocastTrainer(
        model, data_loader, optimizer, precision=dtype, device_type=torch.device(device).type
    )


@contextlib.contextmanager
def yacs_amp_trainer(cfg: Any) -> Iterator[None]:
    """While active, detectron2's ``DefaultTrainer`` builds the trainer ``SOLVER.AMP`` asks
    for (:func:`build_step_trainer`): with ``SOLVER.AMP.ENABLED``, where it would build
    ``AMPTrainer``. Without AMP, or float16 on CUDA, nothing changes."""
    dtype = training_dtype(
        cfg.SOLVER.AMP.ENABLED,
        cfg.SOLVER.AMP.PRECISION,
        cfg.MODEL.DEVICE,
        "SOLVER.AMP.PRECISION",
    )
    if dtype is None or dtype == torch.float16:
        yield
        return
    build = functools.partial(_amp_trainer, dtype=dtype, device=cfg.MODEL.DEVICE)
    with mock.patch.object(d2_defaults, "AMPTrainer", build):
        yield


def _amp_trainer(model, data_loader, optimizer, *, dtype: torch.dtype, device: str):
    return build_step_trainer(model, data_loader, optimizer, dtype, device)
