"""
Class-aware image sampling for detection training: draw a class, then one of the training images
that hold a (non-crowd) instance of it, uniformly. An image holds several classes, so its chance
grows with each of them (as class-aware sampling for detection does: Shen et al. 2016's
class-aware sampling, mmdetection's ``ClassAwareSampler``).

- :class:`ClassImageIndex`: the classes' image lists (CSR) and the draw, shared with CDB-S's
  sampler (:mod:`.cdb_sampler`, class probabilities from the class difficulties);
- :class:`ClassAwareDetectionSampler`: ``p(class j) ∝ n_j^q``, n_j the number of training images
  of class j: ``DATALOADER.SAMPLER_TRAIN "ClassBalancedTrainingSampler"`` (q = 0, every class
  alike: the decoupling paper's class-balanced sampling, for cRT / LWS) or
  ``"SquareRootTrainingSampler"`` (q = ½), the names the image classifier uses for the same rules.

An infinite stream seeded by the run's shared seed, drawn in chunks of 2^16 and sharded by
process as Detectron2's ``TrainingSampler`` (process r of R takes positions r, r + R, ...); a
resumed run skips the positions the interrupted one consumed (:class:`eqlosses_d2.resume.SkipSampler`).
"""
import itertools

import torch
from torch.utils.data import Sampler

import detectron2.utils.comm as comm

__all__ = ["SAMPLER_POWERS", "ClassAwareDetectionSampler", "ClassImageIndex", "class_image_index"]

#: DATALOADER.SAMPLER_TRAIN -> q of p(class j) ∝ n_j^q (n_j: training images of class j)
SAMPLER_POWERS = {"ClassBalancedTrainingSampler": 0.0, "SquareRootTrainingSampler": 0.5}


def class_image_index(dataset_dicts, num_classes: int):
    """``(offsets, images)``: int64 tensors in CSR form, ``images[offsets[j]:offsets[j + 1]]`` the
    indices (ascending) of the images with a non-crowd instance of contiguous class ``j``."""
    members = [[] for _ in range(num_classes)]
    for index, record in enumerate(dataset_dicts):
        classes = {a["category_id"] for a in record.get("annotations", ()) if not a.get("iscrowd", 0)}
        for category in classes:
            if not 0 <= category < num_classes:
                raise ValueError(
                    f"image {record.get('file_name', index)}: category_id {category} is outside the "
                    f"{num_classes} classes of MODEL.ROI_HEADS.NUM_CLASSES"
                )
            members[category].append(index)
    counts = torch.tensor([len(m) for m in members], dtype=torch.int64)
    offsets = torch.zeros(num_classes + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    images = torch.tensor([i for m in members for i in m], dtype=torch.int64)
    return offsets, images


class ClassImageIndex:
    """The training images of each class, and draws of (class, then image of the class)."""

    def __init__(self, dataset_dicts, num_classes: int, who: str = "class-aware sampler"):
        self.offsets, self.images = class_image_index(dataset_dicts, num_classes)
        self.counts = self.offsets[1:] - self.offsets[:-1]  # n_j: images of class j
        self.has_images = self.counts > 0
        if not bool(self.has_images.any()):
            raise ValueError(f"{who}: no training image has an annotated instance to sample by")

    def class_probabilities(self, weights: torch.Tensor) -> torch.Tensor:
        """(C,) float64: ``w_j / Σ w`` over the classes with an image (0 for the others; uniform over
        them when their weights sum to 0)."""
        weights = torch.where(self.has_images, weights.double().clamp(min=0), torch.zeros((), dtype=torch.float64))
        total = weights.sum()
        if not total > 0:
            weights = self.has_images.double()
            total = weights.sum()
        return weights / total

    def draw(self, probabilities: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
        """``size`` image indices: a class from ``probabilities`` (with replacement), then one of its
        images uniformly, each from ``generator``."""
        classes = torch.multinomial(probabilities, size, replacement=True, generator=generator)
        uniform = torch.rand(size, dtype=torch.float64, generator=generator)
        counts = self.counts[classes]
        within = torch.minimum((uniform * counts).long(), counts - 1)
        return self.images[self.offsets[classes] + within]


class ClassAwareDetectionSampler(Sampler):
    """This process's infinite stream with ``p(class j) ∝ n_j^power`` (see the module docstring)."""

    def __init__(self, dataset_dicts, num_classes: int, power: float, seed=None, chunk: int = 1 << 16):
        self.index = ClassImageIndex(dataset_dicts, num_classes, who="class-aware sampler")
        counts = self.index.counts.double()
        self.probabilities = self.index.class_probabilities(torch.where(counts > 0, counts.pow(power), counts))
        self.chunk = int(chunk)
        self.seed = int(comm.shared_random_seed() if seed is None else seed)
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()

    def __iter__(self):
        yield from itertools.islice(self._infinite_indices(), self.rank, None, self.world_size)

    def _infinite_indices(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        while True:
            yield from self.index.draw(self.probabilities, self.chunk, generator).tolist()

    @classmethod
    def from_config(cls, cfg, dataset_dicts):
        return cls(dataset_dicts, cfg.MODEL.ROI_HEADS.NUM_CLASSES, SAMPLER_POWERS[cfg.DATALOADER.SAMPLER_TRAIN])
