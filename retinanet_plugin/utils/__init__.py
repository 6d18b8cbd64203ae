"""Small helpers that depend on the environment rather than on the model."""

from .env import has_compiled_ops

__all__ = ["has_compiled_ops"]
