"""Running detectron2's trainer where detectron2 0.6 does not: several processes on CPU."""

from .launch import launch, wrap_ddp_on_cpu

__all__ = ["launch", "wrap_ddp_on_cpu"]
