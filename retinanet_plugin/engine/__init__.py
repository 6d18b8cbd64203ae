"""Running detectron2's trainer where detectron2 0.6 does not (several processes on CPU), and
what the trainer needs for bad data (non-finite loss names, skipped-image counts)."""

from .cli import DataError, argument_parser, run_main
from .hooks import SkippedImagesHook, TrainingCurvesHook
from .launch import launch, wrap_ddp_on_cpu
from .loss_guard import BatchRecorder, guard_nonfinite_losses
from .schedule import schedule_problems, warn_on_schedule

__all__ = [
    "BatchRecorder",
    "DataError",
    "SkippedImagesHook",
    "TrainingCurvesHook",
    "argument_parser",
    "guard_nonfinite_losses",
    "launch",
    "run_main",
    "schedule_problems",
    "warn_on_schedule",
    "wrap_ddp_on_cpu",
]
