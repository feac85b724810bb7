"""
Exact resume: a run interrupted at iteration k and resumed with ``--resume`` continues
as if it had never stopped.

Detectron2 restores the model, optimizer, scheduler and iteration, but not

- the position in the training sample stream: a resumed run would start the sampler's
  index stream again from its beginning. :func:`build_resumable_train_loader` wraps the
  configured sampler (``TrainingSampler`` or ``RepeatFactorTrainingSampler``, same object,
  same seed) in a :class:`SkipSampler`; :func:`seek_train_loader` sets it to skip the
  indices the first k iterations consumed and restarts the loader's iterator;
- the random number generators (RoI sampling, flips): :class:`RandomStates` is a
  checkpointable that saves and restores Python's, numpy's and torch's global RNG states.

Exact replay holds when data-loader workers don't draw random numbers of their own
(``DATALOADER.NUM_WORKERS = 0``) and all images share one aspect-ratio group (or
``DATALOADER.ASPECT_RATIO_GROUPING`` is off); otherwise the resumed run sees the same
index stream, with fresh worker RNGs and regrouped batches. Method state in buffers
(gradient statistics, counts, class statistics) is part of the model and always exact.
"""
import itertools
import random

import numpy as np
import torch
from torch.utils.data import Sampler

from detectron2.data import build_detection_train_loader
from detectron2.data.build import _train_loader_from_config

from .compat import replace_data_loader

__all__ = ["SkipSampler", "RandomStates", "build_resumable_train_loader", "seek_train_loader"]


class SkipSampler(Sampler):
    """Yields ``sampler``'s (infinite) index stream without its first ``skip`` indices."""

    def __init__(self, sampler, skip: int = 0):
        self.sampler = sampler
        self.skip = int(skip)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)


def build_resumable_train_loader(cfg, mapper=None):
    """Detectron2's train loader for ``cfg``, its sampler wrapped in a :class:`SkipSampler`
    (kept as the loader's ``resume_sampler`` attribute). Without a ``mapper``, and with
    ``INPUT.EQLOSSES.LSJ.ENABLED``, the mapper is a :class:`CopyPasteDatasetMapper` over the
    same dataset, whose serialized copy the loader then reads too (one copy in memory)."""
    from .data.copy_paste import CopyPasteDatasetMapper, uses_copy_paste_mapper

    copy_paste = mapper is None and uses_copy_paste_mapper(cfg)
    # with a stand-in mapper, Detectron2 builds (and logs) no DatasetMapper we would not use
    kwargs = _train_loader_from_config(cfg, (lambda dataset_dict: dataset_dict) if copy_paste else mapper)
    if copy_paste:
        kwargs["mapper"] = CopyPasteDatasetMapper(cfg, dataset=kwargs["dataset"])
        kwargs["dataset"] = kwargs["mapper"].dataset
    kwargs["sampler"] = SkipSampler(kwargs["sampler"])
    loader = build_detection_train_loader(**kwargs)
    loader.resume_sampler = kwargs["sampler"]
    return loader


def seek_train_loader(simple_trainer, start_iter: int, per_rank_batch: int):
    """
    Make the trainer's loader continue at iteration ``start_iter``. Returns False when the
    loader was not built resumable.

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
    sampler.skip = start_iter * per_rank_batch
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
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state):
        random.setstate(_python_state_from_tensor(state["python"]))
        np.random.set_state(_numpy_state_from_dict(state["numpy"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


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
