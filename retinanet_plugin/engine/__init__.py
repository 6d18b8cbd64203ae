"""Running detectron2's trainer where detectron2 0.6 does not (several processes on CPU), and
what the trainer needs for bad data (non-finite loss names, skipped-image counts)."""

from .hooks import SkippedImagesHook
from .launch import launch, wrap_ddp_on_cpu
from .loss_guard import BatchRecorder, guard_nonfinite_losses

__all__ = [
    "BatchRecorder",
    "SkippedImagesHook",
    "guard_nonfinite_losses",
    "launch",
    "wrap_ddp_on_cpu",
]
