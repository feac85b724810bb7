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
"""
import os
import pickle

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager
from fvcore.common.checkpoint import Checkpointer

from .atomic import atomic_write
from .compat import torch_load

__all__ = ["AtomicCheckpointer", "load_pickled_checkpoint"]

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
    def save(self, name: str, **kwargs) -> None:
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
