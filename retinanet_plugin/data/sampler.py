"""A training sampler that a resumed run continues instead of restarting.

detectron2's ``TrainingSampler`` yields the infinite stream ``shuffle(range(n)) + shuffle(...)``
from its seed. A resumed run builds a new one, which starts the stream again from its first
index: after resuming at iteration k the run sees again the images of iterations 0, 1, ... and
its augmentations are drawn from freshly seeded loader workers. A run killed and resumed thus
trains on other batches than an uninterrupted one.
"""

import itertools
import random
from typing import Iterator, Optional

import numpy as np

from detectron2.data.samplers import TrainingSampler

__all__ = ["ResumableTrainingSampler"]


class ResumableTrainingSampler(TrainingSampler):
    """``TrainingSampler`` whose stream starts at :attr:`start`, optionally seeding each image.

    Attributes:
        start (int): position in this process's share of the stream where iteration begins;
            a trainer resuming at iteration k sets it to k x images per batch per process (with
            aspect-ratio grouping that equals the images consumed only when all images fall in
            one group, e.g. all landscape or all portrait / square).
        per_image_seed (bool): before each image is loaded (in the loader worker, or in the
            main process without workers) numpy's and Python's global RNGs, which detectron2's
            augmentations draw from, are seeded from (seed, rank, position); the caller's RNG
            states are restored afterwards. The augmentations of an image then depend only on
            its position in the stream, so a resumed run repeats exactly an uninterrupted one's.
            False keeps detectron2's: one RNG stream per worker, reseeded when workers start.
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: Optional[int] = None,
        *,
        per_image_seed: bool = False,
    ):
        """
        Args:
            size, shuffle, seed: as detectron2's ``TrainingSampler``.
            per_image_seed (bool): see the class attributes.
        """
        super().__init__(size, shuffle=shuffle, seed=seed)
        self.start = 0
        self.per_image_seed = per_image_seed

    def __iter__(self) -> Iterator[int]:
        stream = itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)
        indices = itertools.islice(stream, self.start, None)
        if not self.per_image_seed:
            yield from indices
            return
        for position, index in enumerate(indices, self.start):
            np_state, py_state = np.random.get_state(), random.getstate()
            seed = np.random.SeedSequence([self._seed, self._rank, position]).generate_state(1)
            np.random.seed(int(seed[0]))
            random.seed(int(seed[0]))
            try:
                yield index  # the consumer loads and augments this image before the next call
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)
