"""A training sampler that a resumed run continues instead of restarting.

detectron2's ``TrainingSampler`` yields the infinite stream ``shuffle(range(n)) + shuffle(...)``
from its seed. A resumed run builds a new one, which starts the stream again from its first
index (and, without a fixed seed, from another shuffle): after resuming at iteration k the run
sees again the images of iterations 0, 1, ... and its augmentations are drawn from freshly seeded
loader workers. A run killed and resumed thus trains on other batches than an uninterrupted one.

Positions: the images of this process's share of the stream are numbered 0, 1, 2, ... .
detectron2's loader runs the sampler in each of its workers, and each worker keeps its own slice
(every ``num_workers``-th index in detectron2 0.6, chunks of ``images_per_batch`` indices in
later versions). Without aspect-ratio grouping each worker builds whole batches from its slice;
with grouping the workers hand over single images, which wait in a landscape or a
portrait/square bucket until it holds a batch. :class:`ResumableTrainingSampler` reorders what
it yields so that batch i holds positions ``[i x B, (i + 1) x B)`` (no grouping) or the images
reach the buckets in position order (grouping), for any number of workers; on resume,
:meth:`ResumableTrainingSampler.skip_batches` computes where the stream continues and, with
grouping, which earlier images were still waiting in the buckets, from the images' sizes.
"""

import inspect
import itertools
import random
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from detectron2.data.common import ToIterableDataset
from detectron2.data.samplers import TrainingSampler

__all__ = ["ResumableTrainingSampler", "aspect_ratio_group", "loader_shard_chunk"]


def aspect_ratio_group(dataset_dict: Dict[str, Any]) -> Optional[int]:
    """The bucket detectron2's ``AspectRatioGroupedDataset`` puts an image in (0: wider than
    tall, 1: otherwise), or None when the dataset dict holds no size (the mapper then reads it
    from the image)."""
    if "width" not in dataset_dict or "height" not in dataset_dict:
        return None
    return 0 if dataset_dict["width"] > dataset_dict["height"] else 1


def loader_shard_chunk(images_per_batch: int) -> int:
    """How many consecutive sampler indices each loader worker takes in turn: 1 in detectron2
    0.6, the batch size in versions whose ``ToIterableDataset`` has ``shard_chunk_size`` (and
    ``build_batch_data_loader`` passes it the batch size)."""
    params = inspect.signature(ToIterableDataset.__init__).parameters
    return images_per_batch if "shard_chunk_size" in params else 1


def _consumption_order(block: int, workers: int, chunk: int, batch: int, grouped: bool):
    """For t in [0, block): the position at which the training loop receives the t-th index the
    sampler yields (worker k takes the indices t with (t // chunk) % workers == k)."""
    order = []
    for t in range(block):
        worker = (t // chunk) % workers
        nth = (t // (chunk * workers)) * chunk + t % chunk  # its place in that worker's share
        if grouped:  # single images, taken from the workers in turn
            order.append(nth * workers + worker)
        else:  # each worker makes whole batches; batches are taken from the workers in turn
            order.append(((nth // batch) * workers + worker) * batch + nth % batch)
    return order


class ResumableTrainingSampler(TrainingSampler):
    """``TrainingSampler`` that continues where a checkpointed run was, optionally seeding each
    image.

    The exact resume assumes a mapper that never returns None (detectron2's loader drops such an
    image, which shifts every later position); the plugin's mapper replaces an unreadable image
    instead.

    Attributes:
        per_image_seed (bool): before each image is loaded (in the loader worker, or in the
            main process without workers) numpy's and Python's global RNGs, which detectron2's
            augmentations draw from, are seeded from (seed, rank, position); the caller's RNG
            states are restored afterwards. The augmentations of an image then depend only on
            its position in the stream, so a resumed run repeats exactly an uninterrupted one's.
            False keeps detectron2's: one RNG stream per worker, reseeded when workers start.
        start (int): the first position not yet trained on (set by :meth:`skip_batches`).
        waiting (list[int]): positions before ``start`` that were still in the aspect-ratio
            buckets when the checkpoint was taken; yielded first, in bucket order.
        exact (bool): whether the positions after :meth:`skip_batches` are exactly those an
            uninterrupted run trains on next (False when the dataset dicts lack image sizes and
            the loader groups by aspect ratio).
        restored (dict or None): the state read from the checkpoint (:meth:`load_state_dict`).
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: Optional[int] = None,
        *,
        per_image_seed: bool = False,
        images_per_batch: int = 1,
        num_workers: int = 0,
        aspect_groups: Optional[Sequence[Optional[int]]] = None,
        seed_fixed: bool = True,
    ):
        """
        Args:
            size, shuffle, seed: as detectron2's ``TrainingSampler``.
            per_image_seed (bool): see the class attributes.
            images_per_batch (int): images per batch in this process.
            num_workers (int): the loader's worker processes (``DATALOADER.NUM_WORKERS``).
            aspect_groups (sequence, optional): when the loader groups by aspect ratio
                (``DATALOADER.ASPECT_RATIO_GROUPING``), each dataset image's group
                (:func:`aspect_ratio_group`; None where unknown); None when it does not.
            seed_fixed (bool): whether a new run of the same config shuffles with the same seed
                (False for detectron2 0.6 with ``SEED -1``, which draws one at random): without
                a restored state, only then is the resumed stream the checkpointed run's.
        """
        super().__init__(size, shuffle=shuffle, seed=seed)
        self.per_image_seed = per_image_seed
        self.images_per_batch = images_per_batch
        self.aspect_groups = aspect_groups
        self.seed_fixed = seed_fixed
        self.start = 0
        self.waiting: List[int] = []
        self.exact = True
        self.restored: Optional[Dict[str, int]] = None
        grouped = aspect_groups is not None
        if num_workers < 2:
            self._order = [0]
        else:
            chunk = loader_shard_chunk(images_per_batch)
            block = chunk * num_workers * images_per_batch
            self._order = _consumption_order(
                block, num_workers, chunk, images_per_batch, grouped
            )

    # ---- checkpoint state ----

    def state_dict(self) -> Dict[str, int]:
        """What makes a resumed run's stream the same: the shuffle's seed (drawn at random when
        detectron2 is given none), how the stream is split into processes and batches, and
        what is shuffled (the number of images, whether they are shuffled)."""
        return {
            "seed": int(self._seed),
            "world_size": self._world_size,
            "images_per_batch": self.images_per_batch,
            "size": self._size,
            "shuffle": int(self._shuffle),
        }

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Restore the seed; the rest is compared with this run's (:meth:`layout_changes`,
        :meth:`data_changes`). States written before "size" and "shuffle" were saved load too."""
        self._seed = int(state["seed"])
        self.restored = dict(state)

    def layout_changes(self) -> List[str]:
        """How this run splits the stream differently from the checkpointed one (empty when it
        does not, or when no state was restored)."""
        if self.restored is None:
            return []
        now = {"world_size": self._world_size, "images_per_batch": self.images_per_batch}
        names = {"world_size": "processes", "images_per_batch": "images per batch per process"}
        return [
            f"{names[key]}: {self.restored[key]} then, {value} now"
            for key, value in now.items()
            if key in self.restored and self.restored[key] != value
        ]

    def data_changes(self) -> List[str]:
        """How the images this run shuffles differ from the checkpointed run's: their number
        (e.g. images added to the training set's JSON), whether they are shuffled (empty when
        neither differs, or when the restored state does not hold them)."""
        if self.restored is None:
            return []
        changes = []
        if "size" in self.restored and int(self.restored["size"]) != self._size:
            changes.append(
                f"the training set has {self._size} images, {int(self.restored['size'])} when "
                "the checkpoint was written"
            )
        if "shuffle" in self.restored and bool(self.restored["shuffle"]) != self._shuffle:
            then, now = ("not ", "") if self._shuffle else ("", "not ")
            changes.append(f"the images were {then}shuffled then, are {now}shuffled now")
        return changes

    # ---- resuming ----

    def skip_batches(self, num_batches: int) -> None:
        """Continue after the first ``num_batches`` batches of the stream (a resumed run that
        starts at iteration ``num_batches``); the loader's iterator must be made afresh."""
        self.waiting = []
        self.exact = True
        if self.aspect_groups is None:
            self.start = num_batches * self.images_per_batch
            return
        if num_batches == 0:
            self.start = 0
            return
        # Replay the bucketing of the uninterrupted run on the images' sizes alone.
        buckets: Tuple[List[int], List[int]] = ([], [])
        batches = 0
        for position, index in enumerate(self._share()):
            group = self.aspect_groups[index]
            if group is None:  # the mapper reads the size from the image: cannot replay
                self.start = num_batches * self.images_per_batch
                self.exact = False
                return
            buckets[group].append(position)
            if len(buckets[group]) == self.images_per_batch:
                buckets[group].clear()
                batches += 1
                if batches == num_batches:
                    self.start = position + 1
                    self.waiting = buckets[0] + buckets[1]
                    return

    # ---- iteration ----

    def _share(self) -> Iterator[int]:
        """This process's share of the infinite stream, position 0 first."""
        return itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)

    def _positions(self) -> Iterator[Tuple[int, int]]:
        """(position, index) in training order: the waiting images, then the stream from
        ``start``."""
        stream = self._share()
        waiting = set(self.waiting)
        known = {}
        if waiting:
            for position, index in enumerate(itertools.islice(stream, self.start)):
                if position in waiting:
                    known[position] = index
            first = ((p, known[p]) for p in self.waiting)
        else:
            stream = itertools.islice(stream, self.start, None)
            first = iter(())
        return itertools.chain(first, zip(itertools.count(self.start), stream))

    def _in_loader_order(self, items: Iterable[Tuple[int, int]]) -> Iterator[Tuple[int, int]]:
        """Reorder so that the loader's workers hand the items over in ``items``' order."""
        if len(self._order) == 1:
            yield from items
            return
        items = iter(items)
        while True:
            block = list(itertools.islice(items, len(self._order)))
            yield from (block[k] for k in self._order)

    def __iter__(self) -> Iterator[int]:
        items = self._in_loader_order(self._positions())
        if not self.per_image_seed:
            yield from (index for _, index in items)
            return
        # SeedSequence takes non-negative entries; upstream detectron2 passes SEED -1 as the seed.
        seed = int(self._seed) % 2**64
        for position, index in items:
            np_state, py_state = np.random.get_state(), random.getstate()
            image_seed = np.random.SeedSequence([seed, self._rank, position]).generate_state(1)
            np.random.seed(int(image_seed[0]))
            random.seed(int(image_seed[0]))
            try:
                yield index  # the consumer loads and augments this image before the next call
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)
