"""
The training set's per-class statistics, kept in the model as buffers so that a
checkpoint carries them: ``--eval-only`` and post-hoc calibration need no training
json, and a resumed run sees exactly what the original saw.

Buffers (C = number of foreground classes):
``image_count`` (C,), ``instance_count`` (C,), ``frequency_group`` (C,; 0 = rare,
1 = common, 2 = frequent), ``num_images``, ``num_images_with_annotations`` and
``is_set`` (0-dim). Counts are int64, exact at LVIS scale.
"""
import torch
from torch import nn

__all__ = ["ClassStatsBuffers", "find_class_stats", "FREQUENCY_GROUP_INDEX"]

FREQUENCY_GROUP_INDEX = {"r": 0, "c": 1, "f": 2}


class ClassStatsBuffers(nn.Module):
    #: the config key of the class count, named when a dataset's classes do not match
    NUM_CLASSES_KEY = "MODEL.ROI_HEADS.NUM_CLASSES"

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("image_count", torch.zeros(num_classes, dtype=torch.int64))
        self.register_buffer("instance_count", torch.zeros(num_classes, dtype=torch.int64))
        self.register_buffer("frequency_group", torch.full((num_classes,), -1, dtype=torch.int64))
        self.register_buffer("num_images", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_images_with_annotations", torch.zeros((), dtype=torch.int64))
        self.register_buffer("is_set", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def set_from(self, stats, dataset_name: str = "dataset"):
        """Copy a :class:`eqlosses_d2.data.ClassStatistics` into the buffers."""
        if stats.num_classes != self.num_classes:
            raise ValueError(
                f"'{dataset_name}' has {stats.num_classes} classes but the model has "
                f"{self.num_classes} ({self.NUM_CLASSES_KEY})"
            )
        device = self.image_count.device
        self.image_count.copy_(torch.as_tensor(stats.image_count, dtype=torch.int64, device=device))
        self.instance_count.copy_(torch.as_tensor(stats.instance_count, dtype=torch.int64, device=device))
        groups = [FREQUENCY_GROUP_INDEX[f] for f in stats.frequency]
        self.frequency_group.copy_(torch.as_tensor(groups, dtype=torch.int64, device=device))
        self.num_images.fill_(int(stats.num_images))
        self.num_images_with_annotations.fill_(int(stats.num_images_with_annotations))
        self.is_set.fill_(True)
        return self

    def require(self, who: str):
        """Raise a one-line error if the statistics were never set (neither from data nor a checkpoint)."""
        if not bool(self.is_set):
            raise RuntimeError(
                f"{who} needs per-class statistics, but the model has none: train with a dataset "
                f"that has an annotation file (MODEL.EQLOSSES.CLASS_STATS_DATASET) or load a "
                f"checkpoint trained with eqlosses_d2"
            )
        return self

    def image_frequency(self) -> torch.Tensor:
        """image_count / images with annotations: the frequency EQL, EQLv2 and RFS use."""
        return self.image_count.double() / self.num_images_with_annotations.clamp(min=1).double()

    def extra_repr(self):
        return f"num_classes={self.num_classes}, is_set={bool(self.is_set)}"


def find_class_stats(model: nn.Module):
    """The model's :class:`ClassStatsBuffers` (unwrapping DDP), or None."""
    for module in model.modules():
        if isinstance(module, ClassStatsBuffers):
            return module
    return None
