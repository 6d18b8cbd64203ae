"""Training hooks of retinanet_plugin."""

from typing import Any

from detectron2.engine import HookBase

__all__ = ["SkippedImagesHook"]


class SkippedImagesHook(HookBase):
    """Puts the number of images skipped so far (``DATALOADER.SKIP_UNREADABLE_IMAGES``) in the
    metrics as ``data/skipped_images``, every step (a shared integer read, no device work)."""

    def __init__(self, skipped: Any):
        """
        Args:
            skipped: a ``multiprocessing.Value`` counter (``RobustDatasetMapper.skipped``).
        """
        self.skipped = skipped

    def after_step(self) -> None:
        self.trainer.storage.put_scalar(
            "data/skipped_images", self.skipped.value, smoothing_hint=False
        )
