"""
Training samplers for long-tailed classification, in Detectron2's style (an infinite, seeded
index stream shared by all processes and sharded by rank, as ``TrainingSampler``):

- ``TrainingSampler`` (Detectron2's): instance-balanced, every image equally likely;
- ``ClassBalancedTrainingSampler``: a class uniformly, then one of its images (the decoupling
  paper's class-balanced sampling, q = 0);
- ``SquareRootTrainingSampler``: a class with probability ∝ √n_c, then one of its images (q = ½).

Both are :class:`ClassAwareTrainingSampler` with ``p(class c) ∝ n_c^q``, drawn with replacement as
per-image weights ``n_c^(q−1)`` (``torch.multinomial`` in chunks). Selected by
``DATALOADER.SAMPLER_TRAIN`` (Detectron2's key, these names added for the classifier).
"""
import itertools

import numpy as np
import torch
from torch.utils.data import Sampler

from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm

__all__ = ["ClassAwareTrainingSampler", "SAMPLERS", "build_classification_sampler"]

#: DATALOADER.SAMPLER_TRAIN -> q (None: Detectron2's TrainingSampler)
SAMPLERS = {"TrainingSampler": None, "ClassBalancedTrainingSampler": 0.0, "SquareRootTrainingSampler": 0.5}


class ClassAwareTrainingSampler(Sampler):
    """Infinite stream of image indices with ``p(class c) ∝ n_c^power``, uniform within a class."""

    def __init__(self, labels, power: float, shuffle: bool = True, seed=None, chunk: int = 1 << 16):
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size == 0:
            raise ValueError("ClassAwareTrainingSampler: no training images")
        counts = np.bincount(labels)
        self._weights = torch.as_tensor(counts[labels].astype(np.float64) ** (power - 1.0))
        self._chunk = chunk
        if seed is None:
            seed = comm.shared_random_seed()
        self._seed = int(seed)
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()

    def __iter__(self):
        yield from itertools.islice(self._infinite_indices(), self._rank, None, self._world_size)

    def _infinite_indices(self):
        g = torch.Generator()
        g.manual_seed(self._seed)
        while True:
            yield from torch.multinomial(self._weights, self._chunk, replacement=True, generator=g).tolist()


def build_classification_sampler(name: str, records):
    """The sampler ``DATALOADER.SAMPLER_TRAIN`` names, over ``records`` (with ``label``)."""
    if name not in SAMPLERS:
        raise ValueError(f"DATALOADER.SAMPLER_TRAIN: unknown '{name}' for classification (known: {', '.join(SAMPLERS)})")
    power = SAMPLERS[name]
    if power is None:
        return TrainingSampler(len(records))
    return ClassAwareTrainingSampler([r["label"] for r in records], power)
