"""
CDB-S's training sampler (``DATALOADER.SAMPLER_TRAIN: "ClassDifficultyTrainingSampler"``, with
``MODEL.EQLOSSES.LOSS: "cdb_s"``): the images of each training step are drawn by class difficulty
(Sinha et al., IJCV 2022; the rule and how it differs from the paper are in
:mod:`eqlosses_d2.losses.cdb_s`).

The stream. With ``B`` = ``SOLVER.IMS_PER_BATCH`` (images per step, all processes), ``K`` =
``CDB_S.UPDATE_PERIOD`` and ``L`` = ``CDB_S.SAMPLER_LAG``, the global stream of image indices is cut
into windows: window 0 holds positions ``[0, (K + L)·B)`` and window ``w ≥ 1`` positions
``[(wK + L)·B, ((w + 1)K + L)·B)``, i.e. the steps from ``L`` iterations after the loss closes its
w-th difficulty window. Window ``w`` draws with the class weights of the loss's first ``w`` windows
(version ``w``; version 0: ones): a class ``j`` with probability ``w_j / Σ w`` over the classes that
have a training image (uniform over them if every weight is 0), then one of the images that hold a
(non-crowd) instance of ``j``, uniformly, from a torch generator seeded by (the run's shared seed,
``w``). Process ``r`` of ``R`` takes positions ``r, r + R, ...``, as Detectron2's
``TrainingSampler``. So the stream is a function of the seed and of the loss's weights, which are
synchronised over processes: every process, and a resumed run, sees the same one.

How the weights reach the loader. Detectron2 iterates the sampler inside the data-loader workers
(``ToIterableDataset``), which are separate processes. The sampler keeps the published weights in a
small table in shared memory (``torch.Tensor.share_memory_``: a few slots of C float64 and their
version numbers), created before the workers start, so what the training process writes the workers
read. :class:`ClassDifficultySamplingHook` publishes a version after each step that closes a window
(one host read per window); :func:`start_class_difficulty_sampling` publishes the loss's last two
versions when a run starts or resumes, before the loader is positioned. A worker that needs a version
not yet published waits for it (it can only happen when the loader reads more than ``L`` steps ahead
of training: then it stops after an hour with a one-line error naming ``SAMPLER_LAG``; without
workers the error is immediate). Resume: :meth:`ClassDifficultyTrainingSampler.iter_from` starts the
stream at a process's position without drawing the windows before it (their weights are gone), from
the versions in the checkpoint (``class_weights`` and ``previous_class_weights`` of the loss).
"""
import logging
import time

import numpy as np
import torch
from torch.utils.data import Sampler, get_worker_info

import detectron2.utils.comm as comm
from detectron2.engine import HookBase

from ..config import CONFIG_CHECK_REGISTRY, ConfigError
from .class_sampling import ClassImageIndex, class_image_index

__all__ = [
    "SAMPLER_NAME",
    "ClassDifficultySamplingHook",
    "ClassDifficultyTrainingSampler",
    "SharedClassWeights",
    "class_image_index",  # (from .class_sampling)
    "driving_loss",
    "start_class_difficulty_sampling",
    "uses_class_difficulty_sampler",
    "validate_class_difficulty_sampler",
]

logger = logging.getLogger(__name__)

#: the DATALOADER.SAMPLER_TRAIN value
SAMPLER_NAME = "ClassDifficultyTrainingSampler"
#: the RoI loss that measures the difficulties (MODEL.EQLOSSES.LOSS)
LOSS_NAME = "cdb_s"
#: how long a data-loader worker waits for an unpublished version before it gives up
WAIT_SECONDS = 3600.0


def uses_class_difficulty_sampler(cfg) -> bool:
    return cfg.DATALOADER.SAMPLER_TRAIN == SAMPLER_NAME


@CONFIG_CHECK_REGISTRY.register()
def validate_class_difficulty_sampler(cfg):
    """One-line error: the sampler needs the ``cdb_s`` loss (a registered config check; that the loss
    needs the sampler is its ``required_config``, checked with the loss)."""
    node = cfg.MODEL.get("EQLOSSES")
    loss = node.get("LOSS") if node is not None else None
    if uses_class_difficulty_sampler(cfg) and loss != LOSS_NAME:
        raise ConfigError(
            f"DATALOADER.SAMPLER_TRAIN {SAMPLER_NAME} needs MODEL.EQLOSSES.LOSS {LOSS_NAME} (the loss that "
            f"measures the class difficulties it samples by); got {loss!r}"
        )


class SharedClassWeights:
    """Versioned (C,) float64 class weights in shared memory: ``slots`` of them, version ``v`` in
    slot ``v % slots``. Written by the training process, read by the data-loader workers."""

    def __init__(self, num_classes: int, slots: int = 4):
        self.slots = int(slots)
        self.weights = torch.ones(self.slots, num_classes, dtype=torch.float64).share_memory_()
        self.versions = torch.full((self.slots,), -1, dtype=torch.int64).share_memory_()
        self.versions[0] = 0  # version 0: the ones a run starts with

    def publish(self, version: int, weights: torch.Tensor):
        slot = int(version) % self.slots
        self.versions[slot] = -1  # a reader that sees -1 waits; one that saw the old version re-checks
        self.weights[slot].copy_(weights.detach().to(device="cpu", dtype=torch.float64))
        self.versions[slot] = int(version)

    def try_read(self, version: int):
        """The weights of ``version`` (a copy), or None while it is not published; raises when the
        slot already holds a later version (the reader fell more than ``slots`` windows behind)."""
        slot = int(version) % self.slots
        found = int(self.versions[slot])
        if found == version:
            weights = self.weights[slot].clone()
            if int(self.versions[slot]) == version:
                return weights
            found = int(self.versions[slot])
        if found > version:
            raise RuntimeError(
                f"{SAMPLER_NAME}: the class weights of window {version} were overwritten by window {found} "
                f"before the data loader drew with them (it lags more than {self.slots} windows)"
            )
        return None


class ClassDifficultyTrainingSampler(Sampler):
    """The infinite CDB-S index stream of this process (see the module docstring)."""

    def __init__(self, dataset_dicts, num_classes: int, images_per_batch: int, update_period: int,
                 lag: int, seed=None):
        self.num_classes = int(num_classes)
        self.images_per_batch = int(images_per_batch)
        self.update_period = int(update_period)
        self.lag = int(lag)
        if self.images_per_batch < 1 or self.update_period < 1 or self.lag < 1:
            raise ValueError(
                f"{SAMPLER_NAME}: images per batch, UPDATE_PERIOD and SAMPLER_LAG must be >= 1, got "
                f"{images_per_batch}, {update_period}, {lag}"
            )
        self.index = ClassImageIndex(dataset_dicts, self.num_classes, who=SAMPLER_NAME)
        self.seed = int(comm.shared_random_seed() if seed is None else seed)
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        self.table = SharedClassWeights(self.num_classes)

    # -- the windows ----------------------------------------------------------------------
    def window_start(self, window: int) -> int:
        """The first global stream position of ``window``."""
        return 0 if window == 0 else (window * self.update_period + self.lag) * self.images_per_batch

    def window_of(self, position: int) -> int:
        return max(0, (position // self.images_per_batch - self.lag) // self.update_period)

    def class_probabilities(self, weights: torch.Tensor) -> torch.Tensor:
        """(C,) float64: ``w_j / Σ w`` over the classes with an image (see :class:`ClassImageIndex`)."""
        return self.index.class_probabilities(weights)

    def draw_window(self, window: int, weights: torch.Tensor) -> torch.Tensor:
        """The global image indices of ``window`` (every position of it), drawn with ``weights``."""
        size = self.window_start(window + 1) - self.window_start(window)
        generator = torch.Generator()
        generator.manual_seed(int(np.random.SeedSequence([self.seed, int(window)]).generate_state(1)[0]))
        return self.index.draw(self.class_probabilities(weights), size, generator)

    def weights_of(self, version: int) -> torch.Tensor:
        """The published weights of ``version``, waiting for them inside a data-loader worker."""
        deadline = None
        while True:
            weights = self.table.try_read(version)
            if weights is not None:
                return weights
            if get_worker_info() is None or (deadline is not None and time.monotonic() > deadline):
                raise RuntimeError(
                    f"{SAMPLER_NAME}: the class weights of window {version} are not published; the data "
                    f"loader reads more than MODEL.EQLOSSES.CDB_S.SAMPLER_LAG ({self.lag}) iterations ahead "
                    f"of training: raise it"
                )
            if deadline is None:
                deadline = time.monotonic() + WAIT_SECONDS
            time.sleep(0.02)

    # -- the stream -----------------------------------------------------------------------
    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, rank_position: int):
        """This process's stream from its ``rank_position``-th index on (what a resumed run skips
        is not drawn: its windows' weights are no longer there)."""
        position = int(rank_position) * self.world_size + self.rank
        window = self.window_of(position)
        while True:
            start, end = self.window_start(window), self.window_start(window + 1)
            indices = self.draw_window(window, self.weights_of(window))
            yield from indices[position - start::self.world_size].tolist()
            position += -((position - end) // self.world_size) * self.world_size  # first of ours >= end
            window += 1

    @classmethod
    def from_config(cls, cfg, dataset_dicts):
        node = cfg.MODEL.EQLOSSES.CDB_S
        return cls(dataset_dicts, cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.SOLVER.IMS_PER_BATCH,
                   node.UPDATE_PERIOD, node.SAMPLER_LAG)


def _sampling_losses(model):
    """The model's ``cdb_s`` losses, in module order (the cascade head: one per stage)."""
    return [m for m in getattr(model, "module", model).modules() if getattr(m, "drives_class_difficulty_sampler", False)]


def driving_loss(model):
    """The loss whose weights the sampler draws by: the last ``cdb_s`` loss of the model (the
    standard head's; in the cascade head the last stage's), or None."""
    losses = _sampling_losses(model)
    return losses[-1] if losses else None


def _publish(sampler, loss):
    completed, current, previous = loss.sampling_weights()
    if completed >= 1:
        sampler.table.publish(completed - 1, previous)
    sampler.table.publish(completed, current)


def start_class_difficulty_sampling(model, data_loader, start_iter: int) -> bool:
    """Publish the loss's last two versions before the loader starts or is positioned (a resume).
    A run that starts at iteration 0 from weights carrying ``cdb_s`` state of another run starts the
    measurement again (its windows follow this run's iterations). False without the sampler."""
    sampler = getattr(data_loader, "class_difficulty_sampler", None)
    if sampler is None:
        return False
    loss = driving_loss(model)
    if loss is None:
        raise ConfigError(f"DATALOADER.SAMPLER_TRAIN {SAMPLER_NAME}: the model has no {LOSS_NAME} loss to sample by")
    steps = int(loss.num_steps)
    if steps != start_iter:
        if start_iter != 0:
            raise RuntimeError(
                f"{SAMPLER_NAME}: the {LOSS_NAME} loss has taken {steps} steps but the run resumes at iteration "
                f"{start_iter}; its windows and the sample stream would disagree"
            )
        logger.warning("CDB-S: MODEL.WEIGHTS carries %s state of %d steps; this run measures from step 0", LOSS_NAME, steps)
        for module in _sampling_losses(model):
            module.reset_state()
    _publish(sampler, loss)
    return True


class ClassDifficultySamplingHook(HookBase):
    """After each step that closes a difficulty window, publish the new weights to the sampler."""

    def __init__(self, sampler, loss):
        self.sampler = sampler
        self.loss = loss

    def after_step(self):
        if (self.trainer.iter + 1) % self.loss.update_period == 0:
            _publish(self.sampler, self.loss)

    @classmethod
    def build(cls, model, data_loader):
        """[the hook] when the loader samples by class difficulty, else []."""
        sampler = getattr(data_loader, "class_difficulty_sampler", None)
        loss = driving_loss(model)
        return [cls(sampler, loss)] if sampler is not None and loss is not None else []
