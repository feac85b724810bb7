"""
Per-class statistics of a semantic segmentation training set, and the buffers that keep them
in the model (so a checkpoint carries them, as for detection and classification).

- ``pixel_count[c]``: labelled pixels of class c over the training masks (ignore value excluded);
- ``image_count[c]``: training images with at least one pixel of class c;
- ``frequency[c]``: 'r' / 'c' / 'f' by ``image_count`` (thresholds
  ``MODEL.EQLOSSES.SEM_SEG.RARE_MAX_IMAGES`` / ``COMMON_MAX_IMAGES``);
- ``num_images``: all training images; ``num_images_with_annotations``: those with at least one
  labelled pixel.

:class:`SemSegClassStatsBuffers` is a :class:`~eqlosses_d2.modeling.ClassStatsBuffers` (so
``find_class_stats`` and the checkpoint handling find it) with one more buffer, ``pixel_count``
(int64). Its ``instance_count`` holds the pixel counts too: for semantic segmentation a pixel is
the sample a loss counts, and losses written for instance counts read it there.
"""
import dataclasses
from typing import List

import torch

from ..modeling.class_stats import ClassStatsBuffers

__all__ = ["SemSegClassStatistics", "SemSegClassStatsBuffers", "sem_seg_frequency_group"]


def sem_seg_frequency_group(image_count: int, rare_max_images: int, common_max_images: int) -> str:
    """'r', 'c' or 'f' for a class in ``image_count`` training images."""
    if image_count <= rare_max_images:
        return "r"
    return "c" if image_count <= common_max_images else "f"


@dataclasses.dataclass
class SemSegClassStatistics:
    image_count: List[int]
    pixel_count: List[int]
    num_images: int
    num_images_with_annotations: int
    rare_max_images: int = 10
    common_max_images: int = 100

    @property
    def num_classes(self) -> int:
        return len(self.image_count)

    @property
    def frequency(self) -> List[str]:
        return [sem_seg_frequency_group(n, self.rare_max_images, self.common_max_images) for n in self.image_count]

    @property
    def instance_count(self) -> List[int]:
        """The pixel counts (what a loss written for per-class sample counts reads)."""
        return self.pixel_count

    def with_thresholds(self, rare_max_images: int, common_max_images: int) -> "SemSegClassStatistics":
        return dataclasses.replace(self, rare_max_images=rare_max_images, common_max_images=common_max_images)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SemSegClassStatistics":
        return cls(**d)


class SemSegClassStatsBuffers(ClassStatsBuffers):
    NUM_CLASSES_KEY = "MODEL.SEM_SEG_HEAD.NUM_CLASSES"

    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        self.register_buffer("pixel_count", torch.zeros(num_classes, dtype=torch.int64))

    @torch.no_grad()
    def set_from(self, stats, dataset_name: str = "dataset"):
        """Every buffer from a :class:`SemSegClassStatistics` (``instance_count``: its pixel counts)."""
        super().set_from(stats, dataset_name)
        self.pixel_count.copy_(self.instance_count)
        return self

    def pixel_frequency(self) -> torch.Tensor:
        """pixel_count / all labelled pixels (float64)."""
        return self.pixel_count.double() / self.pixel_count.sum().clamp(min=1).double()
