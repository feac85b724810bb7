"""
Class difficulty measured during training, the Detectron2 way: :class:`ClassDifficultyHook`, a
training hook that every ``UPDATE_PERIOD`` iterations runs the model in eval mode over a held-out
split (the classification test loader: each process its shard), counts each class's images and
top-1 hits, sums the counts over the processes and hands them to the loss
(``loss.update_class_accuracy(correct, count)``), which turns them into its weights.

A loss asks for it by declaring ``measures_class_difficulty = True`` and, in its config node,
``UPDATE_PERIOD`` and ``DIFFICULTY_DATASET`` (:mod:`.losses.cdb`, :mod:`.losses.difficulty_net`); with
``measure_before_training = True`` the hook also measures once before the first iteration of a
run that starts from iteration 0. :func:`build_classification_hooks` looks the configured loss up
in ``IMAGE_CLS_LOSS_REGISTRY`` and returns the hooks it needs, which
``train_net.py`` places right after Detectron2's iteration timer, so that a checkpoint written at
the same iteration already holds the new difficulties (an exact ``--resume``) and the measurement
does not count as step time.

The measurement leaves the training untouched otherwise: BatchNorm runs on its running statistics
(eval mode, as the authors' ``model.eval()``), nothing is back-propagated, and the CPU random
generator is restored afterwards (the data loader draws its seed from it), so the training stream
of images and augmentations is that of a run without the hook.
"""
import logging

import torch

import detectron2.utils.comm as comm
from detectron2.engine import HookBase
from detectron2.evaluation import inference_context

from ..config import ConfigError
from ..losses.base import sync_state
from ..registry import CONFIG_CHECK_REGISTRY, IMAGE_CLS_LOSS_REGISTRY, lookup
from .config import is_classification

__all__ = ["ClassDifficultyHook", "build_classification_hooks", "class_accuracy_counts", "difficulty_dataset"]

logger = logging.getLogger(__name__)


def _measures_difficulty(cfg) -> bool:
    cls = lookup(IMAGE_CLS_LOSS_REGISTRY, cfg.MODEL.EQLOSSES.CLASSIFICATION.LOSS)
    return bool(getattr(cls, "measures_class_difficulty", False))


def _node_key(cfg) -> str:
    """``MODEL.EQLOSSES.CLASSIFICATION.<the loss's node>``: where its hook settings are."""
    node = lookup(IMAGE_CLS_LOSS_REGISTRY, cfg.MODEL.EQLOSSES.CLASSIFICATION.LOSS).config_node
    return f"MODEL.EQLOSSES.CLASSIFICATION.{node}"


def _node(cfg):
    return cfg.MODEL.EQLOSSES.CLASSIFICATION[_node_key(cfg).rsplit(".", 1)[1]]


def difficulty_dataset(cfg) -> str:
    """The loss node's ``DIFFICULTY_DATASET``, or the ``_val`` split of ``DATASETS.TRAIN[0]`` when it is empty."""
    name = _node(cfg).DIFFICULTY_DATASET
    if name:
        return name
    train = cfg.DATASETS.TRAIN[0] if len(cfg.DATASETS.TRAIN) else ""
    if not train.endswith("_train"):
        raise ConfigError(
            f"{_node_key(cfg)}.DIFFICULTY_DATASET is empty and DATASETS.TRAIN[0] '{train}' does "
            f"not end in _train: name the split the class accuracies are measured on"
        )
    return train[: -len("_train")] + "_val"


@torch.no_grad()
def class_accuracy_counts(model, data_loader, num_classes: int, device=None):
    """(correct, count): (C,) float64 top-1 hits and images per class of this process's share of
    ``data_loader`` (records with a ``"label"``), the model in eval mode (restored afterwards)."""
    correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
    count = torch.zeros(num_classes, dtype=torch.float64, device=device)
    with inference_context(model):
        for batch in data_loader:
            if not batch:
                continue
            scores = torch.stack([output["scores"] for output in model(batch)])
            labels = torch.as_tensor([record["label"] for record in batch], device=scores.device)
            hits = (scores.argmax(dim=1) == labels).to(torch.float64)
            count.index_add_(0, labels.to(count.device), torch.ones_like(hits).to(count.device))
            correct.index_add_(0, labels.to(correct.device), hits.to(correct.device))
    return correct, count


class ClassDifficultyHook(HookBase):
    """Every ``period`` iterations (not after the last), measure each class's accuracy on
    ``dataset_name`` and pass the counts to the loss; logs the loss's ``difficulty_scalars()``."""

    def __init__(self, cfg, period: int, dataset_name: str):
        self._cfg = cfg
        self._period = int(period)
        self._dataset_name = dataset_name
        self._loader = None

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg, _node(cfg).UPDATE_PERIOD, difficulty_dataset(cfg))

    def _loss(self):
        model = self.trainer.model
        return getattr(model, "module", model).loss

    def before_train(self):
        from .data import build_classification_test_loader, prepare_classification_dataset

        if comm.is_main_process():  # generate / convert once before the other processes read it
            prepare_classification_dataset(self._dataset_name)
        comm.synchronize()
        stats = prepare_classification_dataset(self._dataset_name).class_statistics
        num_classes = self._cfg.MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES
        if stats.num_classes != num_classes:
            raise ConfigError(
                f"{_node_key(self._cfg)}.DIFFICULTY_DATASET '{self._dataset_name}' has {stats.num_classes} "
                f"classes, NUM_CLASSES is {num_classes}"
            )
        self._loader = build_classification_test_loader(self._cfg, self._dataset_name)
        if getattr(self._loss(), "measure_before_training", False) and self.trainer.iter == 0:
            self.update()  # a fresh run (a resumed one has the measurements in its checkpoint)

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter % self._period == 0 and next_iter < self.trainer.max_iter:
            self.update()

    def update(self):
        """Measure, all-reduce the counts, set the loss's difficulties (a collective)."""
        loss = self._loss()
        with torch.random.fork_rng(devices=[]):
            correct, count = class_accuracy_counts(self.trainer.model, self._loader, loss.num_classes,
                                                   device=loss.class_weights.device)
        correct, count = sync_state(correct, count, dtype=torch.float64)
        loss.update_class_accuracy(correct, count)
        missing = int((count == 0).sum())
        if missing and comm.is_main_process():
            logger.warning("Class difficulty: %d classes have no image in '%s'; they keep their last value",
                           missing, self._dataset_name)
        self.trainer.storage.put_scalars(**loss.difficulty_scalars(), smoothing_hint=False)


def build_classification_hooks(cfg) -> list:
    """The training hooks the configured classification loss needs (none for most)."""
    if not is_classification(cfg) or not _measures_difficulty(cfg):
        return []
    return [ClassDifficultyHook.from_config(cfg)]


@CONFIG_CHECK_REGISTRY.register()
def validate_difficulty_dataset(cfg):
    """A loss that measures class difficulty needs a registered split to measure it on."""
    if not is_classification(cfg) or not _measures_difficulty(cfg):
        return
    from detectron2.data import DatasetCatalog

    name = difficulty_dataset(cfg)
    if name not in DatasetCatalog.list():
        raise ConfigError(f"{_node_key(cfg)}.DIFFICULTY_DATASET: dataset '{name}' is not registered")
