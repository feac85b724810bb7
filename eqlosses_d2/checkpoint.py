"""
A :class:`DetectionCheckpointer` that never leaves a half-written checkpoint and never
runs code from one it reads.

Writing: the file is written under a temporary name in the same directory and renamed into
place, and the ``last_checkpoint`` tag is only updated afterwards, the same way.

Reading, with the safest loader that works for each format:

- ``.pth`` (PyTorch): ``torch.load(weights_only=True)``, which only rebuilds tensors and
  plain containers; a file that needs more is refused in one line (Detectron2 would hand it
  to torch's full unpickler on torch < 2.6).
- ``.pkl`` (Detectron2's model zoo, Caffe2/Detectron1 weights: pickled dicts of numpy
  arrays): a restricted unpickler that only resolves the numpy and collections names such
  files need (Detectron2 uses the full unpickler); what the dict holds is then read as
  Detectron2 does.
- ``.pyth`` (pycls) and everything else: Detectron2's own handling.

Model-zoo checkpoints (``eqlosses_d2://NAME``) reach the loader only after their digest has
been verified (``eqlosses_d2/model_zoo/download.py``).

Checking, before a run writes anything: :func:`check_checkpoint_file` refuses, in one line
(:class:`CheckpointError`), a local checkpoint that is missing, truncated or not a dict (a
``.pth`` is opened memory-mapped: its tensors are not read), and a ``last_checkpoint`` tag
that names such a file (:func:`tagged_checkpoint`). After loading,
:func:`check_predictors_loaded` refuses weights that leave a parameter of the box
predictor, the mask predictor or a one-stage head unloaded (for evaluation: such a model
is partly random).
"""
import inspect
import os
import pickle

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import Checkpointer

from .atomic import atomic_write, remove_stale_temporaries
from .compat import torch_load

__all__ = [
    "AtomicCheckpointer",
    "CheckpointError",
    "check_checkpoint_file",
    "check_predictors_loaded",
    "drop_unmarked_entries",
    "load_pickled_checkpoint",
    "tagged_checkpoint",
]

#: base names of the files a training run's checkpointer writes in OUTPUT_DIR (checkpoints,
#: their per-rank states, the tag)
CHECKPOINTER_FILES = ("*.pth", "*.pth.rank*", "last_checkpoint")


def drop_unmarked_entries(state_dict, prefix: str, marker: str, submodule: str):
    """For a ``load_state_dict`` pre-hook of a re-trained (cRT) module: unless ``state_dict`` holds
    ``<prefix><marker>`` (a checkpoint of the re-training run itself), remove its
    ``<prefix><submodule>.*`` entries, so that submodule keeps its fresh initialisation. Returns the
    keys removed (for the caller's log line)."""
    if prefix + marker in state_dict:
        return []
    skipped = [key for key in state_dict if key.startswith(prefix + submodule + ".")]
    for key in skipped:
        del state_dict[key]
    return skipped


class CheckpointError(ValueError):
    """A checkpoint (or the ``last_checkpoint`` tag) cannot be used as asked; the message,
    one line, names the file and what is wrong."""

# What a pickled dict of numpy arrays refers to: numpy's array and scalar reconstructors
# (numpy < 2 names them numpy.core.*, numpy >= 2 numpy._core.*; protocol 5 uses
# _frombuffer), dtypes, OrderedDict, and protocol-2 bytes (_codecs.encode).
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED_GLOBALS |= {(_module, "_reconstruct"), (_module, "scalar")}
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED_GLOBALS.add((_module, "_frombuffer"))


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED_GLOBALS` (and numpy's dtype classes); anything else,
    which could run code while unpickling, is refused."""

    def find_class(self, module, name):
        allowed = (module, name) in _ALLOWED_GLOBALS or (module == "numpy.dtypes" and name.endswith("DType"))
        if not allowed:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy >= 2, without its deprecation shim
        return super().find_class(module, name)


def load_pickled_checkpoint(f, filename=None):
    """
    Unpickle a checkpoint that holds numpy arrays in (nested) dicts, refusing any other
    object. ``f`` is a binary file object; ``filename`` names it in errors. Strings of
    Python 2 pickles (Caffe2's) are read as latin-1, as Detectron2 does.
    """
    try:
        return _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        name = filename or getattr(f, "name", "checkpoint")
        raise pickle.UnpicklingError(
            f"{name}: not a pickled dict of numpy arrays, refusing to load it ({e})"
        ) from None


class _SafeTorchLoad(Checkpointer):
    """Placed after :class:`DetectionCheckpointer` in the MRO: where Detectron2 (v0.6 in
    ``_load_file``, main in ``_torch_load``) asks fvcore to ``torch.load`` a file, this
    loads tensors only."""

    def _load_file(self, f):
        return torch_load(f, map_location="cpu")


class AtomicCheckpointer(DetectionCheckpointer, _SafeTorchLoad):
    """
    ``rank_states`` (a :class:`eqlosses_d2.resume.RankStates`, training only): every
    :meth:`save` is then collective (Detectron2's checkpoint hook saves on every rank):
    each rank r > 0 writes its own state beside the checkpoint, rank 0 puts its own into
    the checkpoint, after all the others have written theirs; :meth:`resume_or_load` with
    ``resume=True`` restores each rank's own and checks that all ranks resumed from the
    same checkpoint and iteration.
    """

    def __init__(self, model, save_dir="", *, rank_states=None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.rank_states = rank_states
        self._resumed_from = None
        #: what the last :meth:`load` left unloaded (fvcore's ``_IncompatibleKeys``) or None
        self.incompatible = None

    def remove_stale_temporaries(self) -> int:
        """Remove the temporaries of this writer's killed writes from ``save_dir`` (training
        start-up, main process: no write is under way then). Returns how many."""
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return 0
        return remove_stale_temporaries(self.save_dir, CHECKPOINTER_FILES)

    def save(self, name: str, **kwargs) -> None:
        if self.rank_states is not None and self.save_dir:
            path = os.path.join(self.save_dir, f"{name}.pth")
            rank0_state = self.rank_states.save(path, kwargs.get("iteration", -1))
            if rank0_state is not None:
                kwargs["rank_state"] = rank0_state
        if not self.save_dir or not self.save_to_disk:
            return
        if not os.path.isdir(self.save_dir):
            # a remote PathManager location: no rename there, keep Detectron2's behaviour
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible

    def load(self, path, checkpointables=None):
        self.incompatible = None
        checkpoint = super().load(path, checkpointables=checkpointables)
        if self.rank_states is not None and checkpointables is None and path:  # a resume
            iteration = checkpoint.get("iteration", -1)
            status, message = self.rank_states.restore(path, checkpoint, iteration)
            self._resumed_from = (os.path.basename(path), iteration, status, message)
        return checkpoint

    def resume_or_load(self, path, *, resume=True):
        self._resumed_from = None
        if not (resume and self.rank_states is not None):
            return super().resume_or_load(path, resume=resume)
        from .resume import RankStates

        # every rank must see the same tag before any of them loads (loading is collective)
        RankStates.check_same_checkpoint(self.get_checkpoint_file() if self.has_checkpoint() else None)
        ret = super().resume_or_load(path, resume=resume)
        RankStates.check_consistent(self._resumed_from or (None, -1, "none", ""))
        return ret

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not os.path.isdir(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        tag = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(tag, lambda f: f.write(last_filename_basename.encode()))

    def _load_file(self, filename):
        if not filename.endswith(".pkl"):
            return super()._load_file(filename)
        with PathManager.open(filename, "rb") as f:
            data = load_pickled_checkpoint(f, filename)
        if not isinstance(data, dict):
            raise pickle.UnpicklingError(f"{filename}: expected a pickled dict, got {type(data).__name__}")
        # what the dict holds, read as Detectron2 reads it
        if "model" in data and "__author__" in data:  # Detectron2's model-zoo format
            self.logger.info(f"Reading a file from '{data['__author__']}'")
            return data
        blobs = data.get("blobs", data)  # Caffe2 detection models nest their weights
        weights = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
        return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}


# -- checks ---------------------------------------------------------------------------------
def _first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _open_pth(path):
    """The object a ``.pth`` holds, tensors memory-mapped where torch can (zip format),
    else read (an old pickle format), with the tensors-only loader either way."""
    params = inspect.signature(torch.load).parameters
    if "mmap" in params and "weights_only" in params:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "zip" not in str(e) or not _is_legacy_format(path):
                raise
    with open(path, "rb") as f:
        return torch_load(f, map_location="cpu")


def _is_legacy_format(path):
    """A file torch wrote before its zip format (1.6), or with ``_use_new_zipfile_serialization=False``."""
    import zipfile

    return not zipfile.is_zipfile(path)


def check_checkpoint_file(path: str, what: str = "MODEL.WEIGHTS") -> None:
    """
    Refuse, in one line naming ``path`` (:class:`CheckpointError`), a local checkpoint that
    is missing, unreadable (truncated, not a checkpoint, objects beyond tensors) or holds
    something else than a dict (of weights, or with a ``model`` dict). ``what`` says where
    the path came from. URLs and other remote paths are left to the loader.
    """
    if "://" in path:
        return
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: checkpoint not found: {path}")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data = load_pickled_checkpoint(f, path)
        elif path.endswith(".pyth"):
            return  # pycls: Detectron2's own handling
        else:
            data = _open_pth(path)
    except Exception as e:  # truncated, foreign, or needing code to unpickle
        raise CheckpointError(
            f"{what}: {path} is truncated or not a checkpoint, cannot be read ({_first_line(e)})"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} holds a {type(data).__name__}, not a checkpoint (a dict of weights)")
    model = data.get("model", data)
    if not isinstance(model, dict):
        raise CheckpointError(f"{what}: {path}: its 'model' is a {type(model).__name__}, not a dict of weights")


def tagged_checkpoint(save_dir: str):
    """The checkpoint that ``<save_dir>/last_checkpoint`` names (what ``--resume`` loads),
    or None without a tag; :class:`CheckpointError` when the tag names a file that is
    missing or cannot be read."""
    tag = os.path.join(save_dir, "last_checkpoint")
    if not os.path.isfile(tag):
        return None
    with open(tag) as f:
        name = f.read().strip()
    path = os.path.join(save_dir, name)
    what = f"--resume: {tag} names '{name}'"
    if not name or not os.path.isfile(path):
        raise CheckpointError(
            f"{what}, which is missing; delete the tag to start again, or write an intact checkpoint's name in it"
        )
    try:
        check_checkpoint_file(path, what)
    except CheckpointError as e:
        raise CheckpointError(
            f"{e}; delete the tag to start again, or write an intact checkpoint's name in it"
        ) from None
    return path


def _head_prefixes(model):
    """name prefix -> what it is, for the modules evaluation cannot do without trained
    weights: the box predictor(s), the mask predictor, a one-stage detector's head, a semantic
    segmentation head's predictor."""
    model = getattr(model, "module", model)
    prefixes = {}
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None:
        if getattr(roi_heads, "box_predictor", None) is not None:
            prefixes["roi_heads.box_predictor."] = "box predictor"
        mask_head = getattr(roi_heads, "mask_head", None)
        if mask_head is not None and getattr(mask_head, "predictor", None) is not None:
            prefixes["roi_heads.mask_head.predictor."] = "mask predictor"
    if roi_heads is None and isinstance(getattr(model, "head", None), torch.nn.Module):
        prefixes["head."] = "one-stage head"
    sem_seg_head = getattr(model, "sem_seg_head", None)
    if sem_seg_head is not None and isinstance(getattr(sem_seg_head, "predictor", None), torch.nn.Module):
        prefixes["sem_seg_head.predictor."] = "semantic segmentation predictor"
    return prefixes


def check_predictors_loaded(model, incompatible, path: str) -> None:
    """
    Refuse (:class:`CheckpointError`, one line) weights that left a parameter of the box
    predictor, the mask predictor or a one-stage head unloaded: absent from the checkpoint
    or of another shape (another ``NUM_CLASSES``). ``incompatible``: what
    :meth:`AtomicCheckpointer.load` recorded (None: nothing was loaded, nothing checked).
    """
    if incompatible is None:
        return
    prefixes = _head_prefixes(model)
    parameters = {name for name, _ in getattr(model, "module", model).named_parameters()}
    shapes = {k: (tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes}
    unloaded = [k for k in incompatible.missing_keys if k in parameters and any(k.startswith(p) for p in prefixes)]
    if not unloaded:
        return
    first = unloaded[0]
    kinds = []
    for key in unloaded:
        kind = next(what for prefix, what in prefixes.items() if key.startswith(prefix))
        if kind not in kinds:
            kinds.append(kind)
    detail = (
        f"shape {shapes[first][0]} in the checkpoint, {shapes[first][1]} in the model: another NUM_CLASSES?"
        if first in shapes
        else "absent from the checkpoint"
    )
    raise CheckpointError(
        f"MODEL.WEIGHTS {path} does not fit this model: {len(unloaded)} parameter(s) of the {' and '.join(kinds)} "
        f"would stay random, e.g. {first} ({detail}); evaluation refuses it"
    )
