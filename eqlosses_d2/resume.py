"""
Exact resume: a run interrupted at iteration k and resumed with ``--resume`` continues
as if it had never stopped.

Detectron2 restores the model, optimizer, scheduler and iteration, but not

- the position in the training sample stream: a resumed run would start the sampler's
  index stream again from its beginning. :func:`build_resumable_train_loader` wraps the
  configured sampler (``TrainingSampler`` or ``RepeatFactorTrainingSampler``, same object,
  same seed) in a :class:`SkipSampler`; :func:`seek_train_loader` sets it to skip the
  indices the first k iterations consumed and restarts the loader's iterator;
- what each process keeps for itself (:class:`RankStates`): its random number generators
  (RoI sampling, flips, Federated's sampled classes, DropLoss and LOCE draws: Python,
  numpy, torch CPU and the current CUDA device), its position in its shard of the sample
  stream, its plain BatchNorm running statistics (DDP does not broadcast buffers) and
  per-process method state (LOCE's feature queues). Rank 0's go into the checkpoint under
  ``rank_state``; rank r > 0 writes ``<checkpoint>.rank<r>`` beside it (atomically), and
  all ranks have written theirs before rank 0 writes the checkpoint and its
  ``last_checkpoint`` tag, so a tagged checkpoint always has every rank's file.

On ``--resume`` every rank restores its own states, then the ranks compare what they
resumed from (checkpoint, iteration, per-rank state): a rank that found another
checkpoint (``OUTPUT_DIR`` not on storage all machines share), or that lacks its
per-rank state although the checkpoint was written with the same number of processes,
stops the run with one error (:class:`ResumeError`). A checkpoint written with another
number of processes (or before per-rank states existed) resumes with a warning: each rank
re-seeds its generators from (``SEED``, rank, iteration), BatchNorm statistics are rank 0's
and LOCE's queues are pre-filled again; the sample stream continues at the same global
position (the sampler shards one seeded stream by rank).

Exact replay holds when data-loader workers don't draw random numbers of their own
(``DATALOADER.NUM_WORKERS = 0``) and all images share one aspect-ratio group (or
``DATALOADER.ASPECT_RATIO_GROUPING`` is off); otherwise the resumed run sees the same
index stream, with fresh worker RNGs and regrouped batches. (A
:class:`~eqlosses_d2.data.copy_paste.CopyPasteDatasetMapper` built in code with an integer
``seed`` owns a generator that is not saved; configs build it with ``seed=None``, drawing
from numpy's global generator, which is.) Method state in buffers
(gradient statistics, counts, class statistics) is part of the model and always exact.
"""
import io
import itertools
import logging
import os
import random

import numpy as np
import torch
from torch.utils.data import Sampler

import detectron2.utils.comm as comm
from detectron2.data import build_detection_train_loader
from detectron2.data.build import _train_loader_from_config
from detectron2.utils.file_io import PathManager

from .atomic import atomic_write
from .compat import replace_data_loader, torch_load

__all__ = [
    "SkipSampler",
    "RandomStates",
    "RankStates",
    "ResumeError",
    "rank_state_file",
    "build_resumable_train_loader",
    "seek_train_loader",
]

logger = logging.getLogger(__name__)


class SkipSampler(Sampler):
    """Yields ``sampler``'s (infinite) index stream without its first ``skip`` indices."""

    def __init__(self, sampler, skip: int = 0):
        self.sampler = sampler
        self.skip = int(skip)

    def __iter__(self):
        start = getattr(self.sampler, "iter_from", None)  # a sampler that can start anywhere (CDB-S)
        if start is not None:
            return start(self.skip)
        return itertools.islice(iter(self.sampler), self.skip, None)


def build_resumable_train_loader(cfg, mapper=None):
    """Detectron2's train loader for ``cfg``, its sampler wrapped in a :class:`SkipSampler`
    (kept as the loader's ``resume_sampler`` attribute). ``DATALOADER.SAMPLER_TRAIN`` may also
    name one of ours: ``ClassDifficultyTrainingSampler`` (CDB-S, :mod:`.data.cdb_sampler`; also
    kept as ``class_difficulty_sampler``), ``ClassBalancedTrainingSampler`` or
    ``SquareRootTrainingSampler`` (:mod:`.data.class_sampling`). Without a ``mapper``, and with
    ``INPUT.EQLOSSES.LSJ.ENABLED``, the mapper is a :class:`CopyPasteDatasetMapper` over the
    same dataset, whose serialized copy the loader then reads too (one copy in memory)."""
    from .data.cdb_sampler import ClassDifficultyTrainingSampler, uses_class_difficulty_sampler
    from .data.class_sampling import SAMPLER_POWERS, ClassAwareDetectionSampler
    from .data.copy_paste import CopyPasteDatasetMapper, uses_copy_paste_mapper

    copy_paste = mapper is None and uses_copy_paste_mapper(cfg)
    by_difficulty = uses_class_difficulty_sampler(cfg)
    if by_difficulty:
        ours = ClassDifficultyTrainingSampler
    elif cfg.DATALOADER.SAMPLER_TRAIN in SAMPLER_POWERS:
        ours = ClassAwareDetectionSampler
    else:
        ours = None
    # with a stand-in mapper, Detectron2 builds (and logs) no DatasetMapper we would not use; with a
    # stand-in sampler, it does not refuse a sampler name it does not know (ours)
    kwargs = _train_loader_from_config(
        cfg, (lambda dataset_dict: dataset_dict) if copy_paste else mapper, sampler=() if ours else None
    )
    if ours is not None:
        logger.info("Using training sampler %s", cfg.DATALOADER.SAMPLER_TRAIN)
        kwargs["sampler"] = ours.from_config(cfg, kwargs["dataset"])
    if copy_paste:
        kwargs["mapper"] = CopyPasteDatasetMapper(cfg, dataset=kwargs["dataset"])
        kwargs["dataset"] = kwargs["mapper"].dataset
    kwargs["sampler"] = SkipSampler(kwargs["sampler"])
    loader = build_detection_train_loader(**kwargs)
    loader.resume_sampler = kwargs["sampler"]
    loader.class_difficulty_sampler = kwargs["sampler"].sampler if by_difficulty else None
    return loader


def seek_train_loader(simple_trainer, position: int):
    """
    Make the trainer's loader continue after the first ``position`` indices of this rank's
    sample stream (iteration k: k × images per rank). Returns False when the loader was
    not built resumable.

    A torch DataLoader draws its base seed from torch's RNG when its iterator starts, which
    the interrupted run did at iteration 0 and the resumed one would do at its first step.
    So the iterator is started, and its first batch fetched, now, and torch's RNG (just
    restored from the checkpoint) is put back afterwards. numpy's is not: the mapper's
    draws for that batch are the ones the interrupted run made at this point too.
    """
    loader = simple_trainer.data_loader
    sampler = getattr(loader, "resume_sampler", None)
    if sampler is None:
        return False
    sampler.skip = int(position)
    torch_state = torch.get_rng_state()
    iterator = iter(loader)
    first = next(iterator)
    torch.set_rng_state(torch_state)
    replace_data_loader(simple_trainer, loader, itertools.chain([first], iterator))
    return True


class RandomStates:
    """Checkpointable global RNG states (Python, numpy, torch CPU and CUDA)."""

    def state_dict(self):
        state = {
            "python": _python_state_to_tensor(random.getstate()),
            "numpy": _numpy_state_to_dict(np.random.get_state()),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()  # this process's device only
        return state

    def load_state_dict(self, state):
        random.setstate(_python_state_from_tensor(state["python"]))
        np.random.set_state(_numpy_state_from_dict(state["numpy"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            cuda = state["cuda"]
            if isinstance(cuda, (list, tuple)):  # written by an earlier version: all devices
                cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
            if cuda is not None:
                torch.cuda.set_rng_state(cuda)


# Plain tensors and ints, so a checkpoint still loads with torch.load(weights_only=True).
def _python_state_to_tensor(state):
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_state_from_tensor(d):
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])


def _numpy_state_to_dict(state):
    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _numpy_state_from_dict(d):
    keys = d["keys"].numpy().astype(np.uint32)
    return (d["name"], keys, d["pos"], d["has_gauss"], d["cached_gaussian"])


class ResumeError(RuntimeError):
    """``--resume`` cannot continue this run exactly and will not guess (one line)."""


def rank_state_file(checkpoint_path: str, rank: int) -> str:
    """The per-rank state file of rank ``rank`` (> 0) beside ``checkpoint_path``."""
    return f"{checkpoint_path}.rank{rank}"


def _batchnorm_buffers(model):
    """name -> tensor of the running statistics of every BatchNorm layer (per process
    under DDP, which Detectron2 builds with ``broadcast_buffers=False``)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                value = getattr(module, key, None)
                if value is not None:
                    out[f"{name}.{key}" if name else key] = value
    return out


def _rank_stateful_modules(model):
    """name -> module of the model's modules that keep per-process state outside their
    buffers (``rank_state_dict`` / ``load_rank_state_dict``, e.g. LOCE's feature queues)."""
    return {
        name: module
        for name, module in model.named_modules()
        if callable(getattr(module, "rank_state_dict", None)) and callable(getattr(module, "load_rank_state_dict", None))
    }


class RankStates:
    """
    The state each training process keeps for itself (see the module docstring), saved
    and restored by :class:`eqlosses_d2.checkpoint.AtomicCheckpointer` per rank.

    ``model`` is the (unwrapped) model; ``per_rank_batch`` the images one process loads per
    iteration; ``seed`` the run's ``SEED`` (re-seeding after a world-size change).
    After a resume, :attr:`sample_position` is the number of samples this rank had
    consumed (None after a re-seed: the caller derives it from the iteration) and
    :attr:`status` one of ``"exact"``, ``"reseeded"``.
    """

    def __init__(self, model, per_rank_batch: int, seed: int = -1):
        self.model = getattr(model, "module", model)
        self.per_rank_batch = int(per_rank_batch)
        self.seed = int(seed)
        self.sample_position = None
        self.status = None

    def state_dict(self, iteration: int, checkpoint: str):
        """This process's state after iteration ``iteration``, saved with ``checkpoint``."""
        state = {
            "rank": comm.get_rank(),
            "world_size": comm.get_world_size(),
            "iteration": int(iteration),
            "checkpoint": os.path.basename(checkpoint),
            "sample_position": (int(iteration) + 1) * self.per_rank_batch,
            "rng": RandomStates().state_dict(),
            "batchnorm": {k: v.detach().clone() for k, v in _batchnorm_buffers(self.model).items()},
            "modules": {k: m.rank_state_dict() for k, m in _rank_stateful_modules(self.model).items()},
        }
        return state

    def load_state_dict(self, state):
        RandomStates().load_state_dict(state["rng"])
        buffers = _batchnorm_buffers(self.model)
        for key, value in state.get("batchnorm", {}).items():
            if key in buffers and buffers[key].shape == value.shape:
                buffers[key].copy_(value)
        modules = _rank_stateful_modules(self.model)
        for key, value in state.get("modules", {}).items():
            if key in modules:
                modules[key].load_rank_state_dict(value)
        self.sample_position = int(state["sample_position"])

    # -- writing --------------------------------------------------------------------------
    def save(self, checkpoint_path: str, iteration: int):
        """Rank r > 0: write ``<checkpoint>.rank<r>``; returns rank 0's state (for the
        checkpoint itself). Collective: every rank has written its file when it returns."""
        state = self.state_dict(iteration, checkpoint_path)
        rank = comm.get_rank()
        if rank > 0:
            path = rank_state_file(checkpoint_path, rank)
            if os.path.isdir(os.path.dirname(os.path.abspath(path))):
                atomic_write(path, lambda f: torch.save(state, f))
            else:  # a remote PathManager location
                with PathManager.open(path, "wb") as f:
                    torch.save(state, f)
        comm.synchronize()
        return state if rank == 0 else None

    # -- reading --------------------------------------------------------------------------
    def restore(self, checkpoint_path: str, checkpoint: dict, iteration: int):
        """
        Restore this rank's state after ``checkpoint`` (the dict read from
        ``checkpoint_path``) was loaded. Returns ``(status, message)``: status ``"exact"``,
        ``"reseeded"`` or ``"error"`` (message: what is wrong, in one line). Not collective.
        """
        rank, world_size = comm.get_rank(), comm.get_world_size()
        name = os.path.basename(checkpoint_path)
        saved = checkpoint.get("rank_state")
        saved_world = saved.get("world_size") if isinstance(saved, dict) else None
        if saved_world == world_size:
            if rank == 0:
                state = saved
            else:
                path = rank_state_file(checkpoint_path, rank)
                try:
                    with PathManager.open(path, "rb") as f:
                        state = torch_load(io.BytesIO(f.read()), map_location="cpu")
                except FileNotFoundError:
                    return "error", (
                        f"rank {rank}: per-rank state {path} is missing (the checkpoint {name} was written by "
                        f"{world_size} processes); OUTPUT_DIR must be on storage all machines share"
                    )
                except Exception as e:  # a truncated or foreign file
                    return "error", f"rank {rank}: per-rank state {path} is unreadable ({type(e).__name__}: {e})"
            if not isinstance(state, dict) or "rng" not in state:
                return "error", f"rank {rank}: per-rank state of {name} is not a per-rank state file"
            if state.get("checkpoint") != name or state.get("iteration") != iteration or state.get("rank") != rank:
                return "error", (
                    f"rank {rank}: per-rank state of {name} belongs to {state.get('checkpoint')} "
                    f"(iteration {state.get('iteration')}, rank {state.get('rank')}), not to iteration {iteration}"
                )
            self.load_state_dict(state)
            self.status = "exact"
            return self.status, ""
        if saved_world is None and "rng" in checkpoint and world_size == 1:
            # written by an earlier version, by one process: its states are this rank's
            RandomStates().load_state_dict(checkpoint["rng"])
            self.status = "exact"
            return self.status, ""
        self._reseed(iteration)
        self.status = "reseeded"
        written = f"{saved_world} processes" if saved_world else "no per-rank states"
        return self.status, (
            f"{name} was written with {written} and this run has {world_size}: each rank re-seeds its random "
            f"number generators from (SEED, rank, iteration), BatchNorm statistics are rank 0's and per-process "
            f"method state (LOCE's queues) starts again; the run continues, but not as an exact continuation"
        )

    def _reseed(self, iteration: int):
        from detectron2.utils.env import seed_all_rng

        if self.seed < 0:
            seed_all_rng(None)
        else:
            words = np.random.SeedSequence([self.seed, comm.get_rank(), int(iteration)]).generate_state(1)
            seed_all_rng(int(words[0] % (2**31)))
        self.sample_position = None

    @staticmethod
    def check_same_checkpoint(found):
        """Collective. ``found``: the checkpoint this rank's ``last_checkpoint`` names (None:
        none). Raises :class:`ResumeError` on every rank when the ranks disagree."""
        everyone = comm.all_gather(found) if comm.get_world_size() > 1 else [found]
        for rank, theirs in enumerate(everyone):
            if theirs != everyone[0]:
                raise ResumeError(
                    f"--resume: rank {rank} found {theirs or 'no checkpoint'} in OUTPUT_DIR but rank 0 found "
                    f"{everyone[0] or 'no checkpoint'}; multi-machine runs need OUTPUT_DIR on storage all machines share"
                )

    @staticmethod
    def check_consistent(mine):
        """
        Collective. ``mine``: this rank's ``(checkpoint basename or None, iteration,
        status, message)``. Raises :class:`ResumeError` on every rank when any rank resumed
        from something else or failed; warns (once) after a re-seed.
        """
        everyone = comm.all_gather(mine) if comm.get_world_size() > 1 else [mine]
        for rank, (_, _, status, message) in enumerate(everyone):
            if status == "error":
                raise ResumeError(message)
        reference = everyone[0][:2]
        for rank, theirs in enumerate(everyone):
            if theirs[:2] != reference:
                def what(x):
                    return "no checkpoint" if x[0] is None else f"{x[0]} (iteration {x[1]})"

                raise ResumeError(
                    f"--resume: rank {rank} found {what(theirs)} in OUTPUT_DIR but rank 0 found {what(reference)}; "
                    f"multi-machine runs need OUTPUT_DIR on storage all machines share"
                )
        if everyone[0][2] == "reseeded" and comm.is_main_process():
            logger.warning("--resume: %s", everyone[0][3])
