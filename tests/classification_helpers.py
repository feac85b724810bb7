"""What the classification tests share: a stand-in for the model's class statistics and the
``MODEL.EQLOSSES.CLASSIFICATION`` node with overrides."""
import torch

from detectron2.config import get_cfg

from eqlosses_d2 import add_eqlosses_config


class Counts:
    """Stand-in for the model's ClassStatsBuffers: ``image_count`` (of ``dtype``) and ``is_set``."""

    def __init__(self, counts, dtype=torch.int64):
        self.image_count = torch.tensor(counts, dtype=dtype)
        self.is_set = torch.tensor(True)


def classification_node(**overrides):
    """``MODEL.EQLOSSES.CLASSIFICATION`` of a default config, with ``overrides`` (dotted keys below
    the node, e.g. ``**{"SOFTMAX_EQL.TAU": 0.5}``) set."""
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    node = cfg.MODEL.EQLOSSES.CLASSIFICATION
    for key, value in overrides.items():
        path = key.split(".")
        target = node
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    return node
