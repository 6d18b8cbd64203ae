"""Names the loss, the iteration and the images when the training loss becomes non-finite.

detectron2's trainer already moves every loss to the host once per step (``_write_metrics``)
and raises ``FloatingPointError("Loss became infinite or NaN at iteration=...")`` there. The
guard adds nothing to a normal step: :class:`BatchRecorder` keeps the image ids of the batch it
handed out last (host-side Python, no device sync), and :func:`guard_nonfinite_losses` wraps the
trainer's ``_write_metrics`` so that, only when detectron2 raises, the error is raised again with
the non-finite loss names, the iteration and those image ids.
"""

import logging
import math
from typing import Any, Iterable, Iterator, List, Mapping

import torch

from detectron2.utils.events import get_event_storage

__all__ = ["BatchRecorder", "guard_nonfinite_losses"]

logger = logging.getLogger(__name__)


class BatchRecorder:
    """Wraps a training data loader; :attr:`image_ids` holds the ids of the last batch.

    Attributes:
        image_ids: ``image_id`` of each dataset dict of the batch yielded last.
        skipped: the mapper's skipped-image counter (a ``multiprocessing.Value``), or None.
    """

    def __init__(self, loader: Iterable[List[Mapping[str, Any]]], skipped: Any = None):
        self.loader = loader
        self.image_ids: List[Any] = []
        self.skipped = skipped
        # What continue_data_stream needs to skip ahead on resume.
        self.resumable_sampler = getattr(loader, "resumable_sampler", None)

    def __iter__(self) -> Iterator[List[Mapping[str, Any]]]:
        for batch in self.loader:
            self.image_ids = [d.get("image_id") for d in batch]
            yield batch

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


def _nonfinite(loss_dict: Mapping[str, torch.Tensor]) -> List[str]:
    # Runs only after detectron2 found a non-finite total: the host copies cost nothing then.
    return [k for k, v in loss_dict.items() if not math.isfinite(float(v))]


def guard_nonfinite_losses(trainer: Any, recorder: Any) -> None:
    """Makes ``trainer`` (detectron2's ``SimpleTrainer`` / ``AMPTrainer``) name the non-finite
    loss, the iteration and the batch's image ids when its loss check fails.

    Args:
        trainer: the trainer whose ``_write_metrics`` is wrapped.
        recorder: its data loader, a :class:`BatchRecorder` (another loader: ids "unknown").
    """
    write_metrics = trainer._write_metrics

    def checked_write_metrics(loss_dict: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any):
        try:
            return write_metrics(loss_dict, *args, **kwargs)
        except FloatingPointError as e:
            bad = _nonfinite(loss_dict)
            which = (
                ", ".join(f"{k} = {float(loss_dict[k])}" for k in bad)
                if bad
                else "none in this process (another process's batch produced it)"
            )
            image_ids = getattr(recorder, "image_ids", "unknown")
            raise FloatingPointError(
                f"Non-finite loss at iteration {get_event_storage().iter}: {which}; image ids of "
                f"this process's batch: {image_ids}. detectron2 said: {e}"
            ) from e

    trainer._write_metrics = checked_write_metrics
