"""
The config keys of long-tailed image classification, under ``MODEL.EQLOSSES.CLASSIFICATION``
and ``INPUT.EQLOSSES.CLASSIFICATION`` (our own nodes; no upstream leaf name reused).

:func:`add_classification_config` adds the keys every classifier shares (the class count, the
head and the loss by their registry names, the pooled feature, the input pipeline); each head
and loss declares its own node (``MODEL.EQLOSSES.CLASSIFICATION.<NODE>``) in ``add_config``,
and both base classes call this function first, so that
:func:`eqlosses_d2.add_eqlosses_config` (which collects every registered class's
``add_config``) adds everything. The config check is :mod:`.checks` (it builds the head and
the loss, whose modules import this one).
"""
from ..registry import config_node

__all__ = ["CLASSIFICATION_META_ARCHITECTURES", "add_classification_config", "is_classification"]

#: meta-architectures configured by MODEL.EQLOSSES.CLASSIFICATION
CLASSIFICATION_META_ARCHITECTURES = ("LongTailImageClassifier",)


def is_classification(cfg) -> bool:
    """Whether ``cfg`` trains an image classifier (the loaders, evaluator and table differ)."""
    return cfg.MODEL.META_ARCHITECTURE in CLASSIFICATION_META_ARCHITECTURES


def add_classification_config(cfg):
    """The shared keys (idempotent: an existing node is left as it is)."""
    node = config_node(cfg, "MODEL.EQLOSSES.CLASSIFICATION")
    if "NUM_CLASSES" in node:
        return cfg
    # Number of classes of the image classifier (MODEL.META_ARCHITECTURE "LongTailImageClassifier");
    # checked against the datasets' classes.
    node.NUM_CLASSES = 1000
    # Classifier head, by its name in CLASSIFIER_HEAD_REGISTRY: "linear", "cosine", "tau_norm", "lws", "marc",
    # "tde", "vmf".
    node.HEAD = "linear"
    # Loss, by its name in IMAGE_CLS_LOSS_REGISTRY: "softmax", "balanced_softmax", "softmax_eql", "sigmoid",
    # "eqlv2", "seesaw", "iif", "bal_bce", "cdb_w", "difficulty_net", "grw".
    node.LOSS = "softmax"
    # Backbone output that is globally average-pooled into the head's input ("": the last one).
    node.IN_FEATURE = ""
    # Evaluation batch size per process.
    node.TEST_IMS_PER_BATCH = 64
    inputs = config_node(cfg, "INPUT.EQLOSSES.CLASSIFICATION")
    # Training: the image's short edge is resized to one of these (chosen at random) ...
    inputs.TRAIN_SHORT_EDGE = [256]
    # ... then zero-padded by this many pixels on each side (0: none; CIFAR's RandomCrop(32, padding=4): 4) ...
    inputs.TRAIN_PAD = 0
    # ... then a random square crop of this side is taken (0: no crop), and flipped with this probability.
    inputs.TRAIN_CROP = 224
    inputs.HFLIP_PROB = 0.5
    # Evaluation: short edge resized to this, then the centre square crop of TEST_CROP (0: no crop).
    inputs.TEST_SHORT_EDGE = 256
    inputs.TEST_CROP = 224
    return cfg
