"""
Every difference between the Detectron2 lines we support, and every shim for
today's libraries, in one place.

Supported: official Detectron2 main (built from its repository, with or without
its C++/CUDA extension) and Detectron2 v0.6 as installed from PyPI's
``pb1-detectron2==0.6`` source without the extension. Both report version "0.6",
so everything here detects *features*, never version strings.

What is handled (each function says how it detects the need):

- ``detectron2._C`` missing (no C++ extension): v0.6 imports it eagerly in
  ``detectron2.layers``. We bind a placeholder as the package attribute (not in
  ``sys.modules``, so ``import detectron2._C`` still fails and Detectron2's
  ``collect_env`` reports the extension as missing). Any use of an op it would
  provide (rotated boxes, deformable convolution, rotated RoIAlign, rotated NMS,
  the C++ COCO evaluator) raises :class:`MissingExtensionError` with one clear line.
  Main looks its rotated ops up in ``torch.ops.detectron2`` instead (v0.6: only
  ``nms_rotated``); that namespace gets the same treatment.
- Pillow >= 10 removed ``Image.LINEAR`` (v0.6 uses it as a default argument).
- numpy >= 1.24 removed ``np.int`` (v0.6's class histogram uses it) and ``np.float`` (v0.6's
  ``SemSegEvaluator`` uses both).
- setuptools >= 82 has no ``pkg_resources`` (``detectron2.model_zoo`` imports it,
  v0.6 and main): :func:`import_detectron2_model_zoo` provides the one function it
  uses, for that import only.
- torch >= 2.6 loads with ``weights_only=True`` by default: :func:`torch_load`
  tries the safe loader first.
- ``SimpleTrainer`` creates its data-loader iterator eagerly in v0.6 and lazily in main:
  :func:`replace_data_loader`.
- v0.6's ``DefaultTrainer`` does not checkpoint the optimizer (main does, as
  ``_trainer``): :class:`TrainerStateMixin` adds it, so ``--resume`` keeps SGD momentum.
- Several processes without a GPU: v0.6's ``launch`` asserts CUDA and NCCL, main's spawns
  gloo workers, and both lines' ``create_ddp_model`` pass ``device_ids=[local_rank]``,
  which PyTorch refuses for a CPU module. :func:`launch` runs CPU jobs itself (gloo, the
  local process group made the way this Detectron2 provides) and builds CPU DDP models
  without ``device_ids``; with a GPU, or one process, it is Detectron2's ``launch``.

- One-stage detectors: v0.6's ``RetinaNetHead`` probes its norm with ``get_norm(norm, 1)``,
  which fails for "GN" (32 groups of 1 channel; main probes with 32):
  :func:`dense_head_norm` gives it a GroupNorm factory that survives the probe. FCOS's
  anchor matching changed between the lines: v0.6 has ``FCOS.match_anchors(anchors,
  gt_instances)`` and its ``label_anchors`` returns the matched boxes as ``Boxes``; main has
  ``FCOS._match_anchors(gt_boxes, anchors)`` (one image) and returns tensors, which its
  ``compute_ctrness_targets`` then expects. :func:`matched_boxes_as_tensors` and
  :func:`fcos_centerness_targets` take either. Neither line registers FCOS or gives it a
  ``from_config``.

:func:`apply_detectron2_patches` must run before ``detectron2.layers`` or
``detectron2.data.transforms`` is imported; ``import eqlosses_d2`` does that.

Only what is lacking is applied, each need detected by feature (Detectron2's own source
text, read without importing it, and the libraries' attributes): :func:`needed_patches`
says what this install lacks, :func:`applied` what was applied in this process (the
patches at import, then ``pkg-resources`` while the model zoo is imported and ``cpu-ddp``
in the CPU workers of :func:`launch`); what is applied is logged once. The names:

- ``missing-extension``: no ``detectron2._C``: placeholders that fail in one line;
- ``pillow-linear``: Detectron2's transforms use ``Image.LINEAR`` and Pillow has none;
- ``numpy-int-histogram``: Detectron2's class histogram uses ``np.int`` and numpy has none;
- ``numpy-int-sem-seg``: Detectron2's ``SemSegEvaluator`` uses ``np.int`` / ``np.float`` and numpy
  has none: that module's global ``np`` becomes numpy with the two aliases (``int``, ``float``),
  nothing else of numpy changed;
- ``pkg-resources``: ``detectron2.model_zoo`` imports ``pkg_resources`` and setuptools has none;
- ``cpu-ddp``: ``create_ddp_model`` without ``device_ids`` for CPU models (CPU workers only).

The adapters (:func:`replace_data_loader`, :class:`TrainerStateMixin`,
:func:`dense_head_norm`, :func:`matched_boxes_as_tensors`, :func:`fcos_centerness_targets`,
:func:`torch_load`) patch nothing: they pick the call that the installed line takes.
"""
import importlib
import importlib.util
import inspect
import logging
import os
import pickle
import sys
import types

import numpy as np

__all__ = [
    "MissingExtensionError",
    "TrainerStateMixin",
    "applied",
    "apply_detectron2_patches",
    "default_trainer_saves_optimizer",
    "dense_head_norm",
    "fcos_centerness_targets",
    "has_detectron2_extension",
    "import_detectron2_model_zoo",
    "launch",
    "matched_boxes_as_tensors",
    "needed_patches",
    "replace_data_loader",
    "torch_load",
]

logger = logging.getLogger(__name__)

_INSTALL_HINT = (
    "install Detectron2 from its repository with its C++/CUDA ops (README: 'Install with CUDA ops')"
)


class MissingExtensionError(RuntimeError):
    """An operation needs Detectron2's C++ extension, which this install lacks."""


class _MissingExtension(types.ModuleType):
    """Stands in for ``detectron2._C``; any op looked up on it raises one clear error."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingExtensionError(
            f"detectron2._C.{name} is unavailable: this Detectron2 was installed without its "
            f"C++ extension, which rotated boxes, deformable convolution and the C++ COCO "
            f"evaluator need; {_INSTALL_HINT}"
        )


def has_detectron2_extension() -> bool:
    """True when Detectron2's compiled ops (``detectron2._C``) can be imported."""
    import detectron2

    attr = getattr(detectron2, "_C", None)
    if isinstance(attr, _MissingExtension):
        return False
    if isinstance(attr, types.ModuleType):  # imported already
        return True
    try:
        return importlib.util.find_spec("detectron2._C") is not None
    except (ImportError, ValueError):
        return False


def _patch_missing_extension():
    import detectron2

    if has_detectron2_extension():
        return False
    detectron2._C = _MissingExtension("detectron2._C")
    return True


class _MissingOpNamespace:
    """Stands in for ``torch.ops.detectron2``, where Detectron2 main looks up its compiled
    ops (``box_iou_rotated``, ``roi_align_rotated_forward``/``backward``, ``nms_rotated``;
    v0.6 uses ``nms_rotated`` there too): any op looked up raises one clear error instead of
    torch's ``AttributeError`` ('_OpNamespace' 'detectron2' object has no attribute ...)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingExtensionError(
            f"torch.ops.detectron2.{name} is unavailable: this Detectron2 was installed without its "
            f"C++ extension, which rotated boxes (IoU, NMS, RoIAlign) need; {_INSTALL_HINT}"
        )


def _patch_missing_torch_ops():
    """Without the extension no op is registered under ``torch.ops.detectron2``: bind the
    namespace to :class:`_MissingOpNamespace` (torch caches namespaces as attributes of
    ``torch.ops``; Detectron2's own docs build mocks it the same way)."""
    import torch

    torch.ops.detectron2 = _MissingOpNamespace()


def _patch_rotated_nms():
    """v0.6 and main call ``torch.ops.detectron2.nms_rotated``, which only the extension
    registers; without it, say so in one line instead of 'no such operator'."""
    import detectron2.layers as layers

    # not `from detectron2.layers import nms`: that name is torchvision's nms function
    nms_module = importlib.import_module("detectron2.layers.nms")

    def nms_rotated(boxes, scores, iou_threshold):
        raise MissingExtensionError(f"nms_rotated is unavailable without detectron2._C; {_INSTALL_HINT}")

    nms_module.nms_rotated = nms_rotated
    layers.nms_rotated = nms_rotated


def _source(module_name: str) -> str:
    """The source text of a module, read from its file without importing it or its parent
    packages (importing ``detectron2.data`` is what fails on v0.6 with Pillow >= 10);
    "" when there is none."""
    top, _, rest = module_name.partition(".")
    try:
        spec = importlib.util.find_spec(top)  # the top-level package only
    except (ImportError, ValueError):
        return ""
    if spec is None or not spec.submodule_search_locations:
        return ""
    for root in spec.submodule_search_locations:
        base = os.path.join(root, *rest.split(".")) if rest else root
        for path in (base + ".py", os.path.join(base, "__init__.py")):
            try:
                with open(path, encoding="utf-8") as f:
                    return f.read()
            except OSError:
                continue
    return ""


_PILLOW_ALIASED = False  # Image.LINEAR set here


def _pillow_linear_needed() -> bool:
    """Detectron2's transforms name ``Image.LINEAR`` (v0.6; main says ``Image.BILINEAR``),
    which Pillow >= 10 removed."""
    from PIL import Image

    lacks = _PILLOW_ALIASED or not hasattr(Image, "LINEAR")
    return lacks and "Image.LINEAR" in _source("detectron2.data.transforms.transform")


def _patch_pillow():
    global _PILLOW_ALIASED
    from PIL import Image

    if not _pillow_linear_needed() or _PILLOW_ALIASED:
        return False
    Image.LINEAR = Image.BILINEAR
    _PILLOW_ALIASED = True
    return True


def _class_histogram_source_needs_patch(source: str) -> bool:
    return not hasattr(np, "int") and ("np.int)" in source or "np.int," in source)


def _class_histogram_needs_patch(fn) -> bool:
    if hasattr(np, "int"):
        return False
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return "np.int)" in source or "np.int," in source


def _print_instances_class_histogram(dataset_dicts, class_names):
    """Log a table of instance counts per class (Detectron2's function without ``np.int``)."""
    from tabulate import tabulate
    from termcolor import colored

    from detectron2.utils.logger import log_first_n

    num_classes = len(class_names)
    counts = np.zeros(num_classes, dtype=np.int64)
    for record in dataset_dicts:
        for anno in record["annotations"]:
            if not anno.get("iscrowd", 0):
                counts[anno["category_id"]] += 1
    max_name_len = 13

    def short(name):
        return name if len(name) <= max_name_len else name[: max_name_len - 2] + ".."

    rows = [(short(name), int(n)) for name, n in zip(class_names, counts)]
    columns = 3
    flat = [item for row in rows for item in row]
    flat += [None] * ((2 * columns - len(flat) % (2 * columns)) % (2 * columns))
    if num_classes > 1:
        flat += ["total", int(counts.sum())]
    table_rows = [flat[i : i + 2 * columns] for i in range(0, len(flat), 2 * columns)]
    table = tabulate(
        table_rows,
        headers=["category", "#instances"] * columns,
        tablefmt="pipe",
        numalign="left",
        stralign="center",
    )
    log_first_n(
        logging.INFO,
        f"Distribution of instances among all {num_classes} categories:\n" + colored(table, "cyan"),
        key="message",
    )


def _patch_class_histogram():
    if not _class_histogram_source_needs_patch(_source("detectron2.data.build")):
        return False
    from detectron2.data import build

    if _class_histogram_needs_patch(build.print_instances_class_histogram):
        build.print_instances_class_histogram = _print_instances_class_histogram
        return True
    return False


_SEM_SEG_EVALUATION = "detectron2.evaluation.sem_seg_evaluation"
_REMOVED_NUMPY_ALIASES = {"int": int, "float": float}  # removed in numpy 1.24 (deprecated since 1.20)


def _sem_seg_numpy_aliases_needed() -> bool:
    """Detectron2's ``SemSegEvaluator`` (v0.6: ``np.array(output, dtype=np.int)``,
    ``np.full(..., dtype=np.float)``; main says ``int`` / ``float``) names an alias this numpy lacks."""
    source = _source(_SEM_SEG_EVALUATION)
    return any(not hasattr(np, alias) and (f"np.{alias})" in source or f"np.{alias}," in source)
               for alias in _REMOVED_NUMPY_ALIASES)


class _NumpyWithRemovedAliases(types.ModuleType):
    """numpy for one Detectron2 module's global ``np``: every attribute is numpy's, plus the
    aliases numpy 1.24 removed (``np.int`` is ``int``, ``np.float`` is ``float``, as they were)."""

    def __init__(self):
        super().__init__("numpy")
        for alias, value in _REMOVED_NUMPY_ALIASES.items():
            if not hasattr(np, alias):
                setattr(self, alias, value)

    def __getattr__(self, name):
        return getattr(np, name)


def _patch_sem_seg_evaluator():
    if not _sem_seg_numpy_aliases_needed():
        return False
    module = importlib.import_module(_SEM_SEG_EVALUATION)
    if isinstance(module.np, _NumpyWithRemovedAliases):
        return False
    module.np = _NumpyWithRemovedAliases()
    return True


def _pkg_resources_needed() -> bool:
    """``detectron2.model_zoo`` imports ``pkg_resources`` (v0.6 and main), which setuptools
    >= 82 no longer ships."""
    if "pkg_resources" not in _source("detectron2.model_zoo.model_zoo"):
        return False
    try:
        return importlib.util.find_spec("pkg_resources") is None
    except (ImportError, ValueError):
        return True


def needed_patches() -> tuple:
    """The names of the patches this Detectron2 and these libraries lack (see the module
    docstring), detected by feature; ``cpu-ddp`` is left out (it depends on the job, not
    the install). Reads Detectron2's source files, imports nothing of it."""
    needed = []
    if not has_detectron2_extension():
        needed.append("missing-extension")
    if _pillow_linear_needed():
        needed.append("pillow-linear")
    if _class_histogram_source_needs_patch(_source("detectron2.data.build")):
        needed.append("numpy-int-histogram")
    if _sem_seg_numpy_aliases_needed():
        needed.append("numpy-int-sem-seg")
    if _pkg_resources_needed():
        needed.append("pkg-resources")
    return tuple(needed)


_APPLIED = None
_APPLIED_LATER = []  # applied on demand: pkg-resources, cpu-ddp


def applied() -> tuple:
    """The names of the patches applied in this process so far, in the order applied."""
    return (_APPLIED or ()) + tuple(_APPLIED_LATER)


def _applied_later(name: str):
    if name not in _APPLIED_LATER:
        _APPLIED_LATER.append(name)
        logger.info("eqlosses_d2.compat applied: %s", name)


def apply_detectron2_patches():
    """Idempotently apply the shims this Detectron2 needs; returns the names applied."""
    global _APPLIED
    if _APPLIED is not None:
        return _APPLIED
    names = []
    if _patch_missing_extension():
        names.append("missing-extension")
        _patch_missing_torch_ops()
        _patch_rotated_nms()
    if _patch_pillow():
        names.append("pillow-linear")
    if _patch_class_histogram():
        names.append("numpy-int-histogram")
    if _patch_sem_seg_evaluator():
        names.append("numpy-int-sem-seg")
    _APPLIED = tuple(names)
    if names:
        logger.info("eqlosses_d2.compat applied (lacking in this Detectron2 or its libraries): %s", ", ".join(names))
    return _APPLIED


class _PkgResourcesShim(types.ModuleType):
    """The one ``pkg_resources`` function ``detectron2.model_zoo`` calls."""

    @staticmethod
    def resource_filename(package, resource):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"package {package!r} not found")
        return os.path.join(list(spec.submodule_search_locations)[0], resource)


def import_detectron2_model_zoo():
    """Import ``detectron2.model_zoo``, also where setuptools no longer ships ``pkg_resources``."""
    if "detectron2.model_zoo" in sys.modules:
        return sys.modules["detectron2.model_zoo"]
    try:
        import pkg_resources  # noqa: F401

        return importlib.import_module("detectron2.model_zoo")
    except ImportError:
        pass
    sys.modules["pkg_resources"] = _PkgResourcesShim("pkg_resources")
    _applied_later("pkg-resources")
    try:
        return importlib.import_module("detectron2.model_zoo")
    finally:
        # the shim is only for that import: the module keeps its own reference
        del sys.modules["pkg_resources"]


def torch_load(f, map_location="cpu", trusted=False):
    """
    ``torch.load`` with the safest loader that works: ``weights_only=True`` first (the
    default of torch >= 2.6, and what plain tensor checkpoints need), full unpickling
    only when ``trusted`` is True (a file this project wrote or verified).
    """
    import torch

    params = inspect.signature(torch.load).parameters
    if "weights_only" not in params:  # torch < 1.13
        return torch.load(f, map_location=map_location)
    seek = getattr(f, "seek", None)
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not trusted:
            raise pickle.UnpicklingError(
                f"{getattr(f, 'name', f)}: refusing to unpickle arbitrary objects from an untrusted "
                f"checkpoint ({str(e).splitlines()[0]})"
            ) from None
    if seek is not None:
        seek(0)
    return torch.load(f, map_location=map_location, weights_only=False)


def replace_data_loader(simple_trainer, data_loader, iterator=None):
    """Give Detectron2's ``SimpleTrainer`` a (new or re-positioned) data loader and an
    iterator over it (default: a fresh one, created now). v0.6 keeps the iterator in
    ``_data_loader_iter`` (made in ``__init__``); main in ``_data_loader_iter_obj`` (made
    lazily on first use)."""
    simple_trainer.data_loader = data_loader
    if iterator is None:
        iterator = iter(data_loader)
    if hasattr(simple_trainer, "_data_loader_iter_obj"):  # main
        simple_trainer._data_loader_iter_obj = iterator
    else:  # v0.6 (the old iterator and its workers are dropped)
        simple_trainer._data_loader_iter = iterator


def default_trainer_saves_optimizer() -> bool:
    """Whether ``DefaultTrainer.state_dict`` includes the inner trainer's state (optimizer,
    AMP grad scaler). Main does; v0.6 does not, so its ``--resume`` restarts SGD momentum."""
    from detectron2.engine import DefaultTrainer
    from detectron2.engine.train_loop import TrainerBase

    return DefaultTrainer.state_dict is not TrainerBase.state_dict


class TrainerStateMixin:
    """For ``DefaultTrainer`` subclasses: checkpoint the optimizer (and grad scaler) state
    on Detectron2 lines whose ``DefaultTrainer`` does not, under main's key ``_trainer``,
    so checkpoints are interchangeable between the two lines."""

    def state_dict(self):
        ret = super().state_dict()
        if "_trainer" not in ret:
            ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if not default_trainer_saves_optimizer() and "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _create_local_process_group(num_workers_per_machine: int):
    """Give ``detectron2.utils.comm`` its per-machine process group: main has a function
    for it; v0.6 keeps a module global that its ``launch`` sets."""
    import torch.distributed as dist
    from detectron2.utils import comm

    if hasattr(comm, "create_local_process_group"):  # main
        comm.create_local_process_group(num_workers_per_machine)
        return
    machine_rank = dist.get_rank() // num_workers_per_machine
    for i in range(dist.get_world_size() // num_workers_per_machine):
        # every process creates every group (new_group is collective)
        group = dist.new_group(list(range(i * num_workers_per_machine, (i + 1) * num_workers_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def _patch_cpu_ddp():
    """Make ``detectron2.engine.defaults.create_ddp_model`` (what ``DefaultTrainer`` calls)
    leave ``device_ids`` unset for a model on the CPU."""
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    if getattr(original, "_eqlosses_cpu_aware", False):
        return

    def create_ddp_model(model, **kwargs):
        if "device_ids" not in kwargs and all(p.device.type == "cpu" for p in model.parameters()):
            kwargs["device_ids"] = None
        return original(model, **kwargs)

    create_ddp_model._eqlosses_cpu_aware = True
    defaults.create_ddp_model = create_ddp_model
    _applied_later("cpu-ddp")


def _cpu_worker(local_rank, main_func, world_size, num_workers_per_machine, machine_rank, dist_url, args, timeout):
    import torch.distributed as dist
    from detectron2.utils import comm

    dist.init_process_group(
        "gloo",
        init_method=dist_url,
        world_size=world_size,
        rank=machine_rank * num_workers_per_machine + local_rank,
        timeout=timeout,
    )
    _create_local_process_group(num_workers_per_machine)
    _patch_cpu_ddp()
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=(), timeout=None):
    """
    Detectron2's ``launch`` (same arguments), extended to several processes on machines
    without a GPU: ``num_gpus_per_machine`` then counts CPU worker processes, joined by
    gloo. On a machine with CUDA, or for one process, Detectron2's own ``launch`` runs.
    """
    import torch
    from detectron2.engine import launch as detectron2_launch
    from detectron2.engine.launch import DEFAULT_TIMEOUT

    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1 or torch.cuda.is_available():
        return detectron2_launch(
            main_func, num_gpus_per_machine, num_machines=num_machines, machine_rank=machine_rank,
            dist_url=dist_url, args=args, timeout=timeout,
        )
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("--dist-url auto only works on one machine; give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    torch.multiprocessing.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
    )


# ----------------------------------------------------------------------------- one-stage detectors


def _retinanet_head_probes_one_channel() -> bool:
    """v0.6's ``RetinaNetHead.__init__`` calls ``get_norm(norm, 1)`` to name the norm type."""
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    try:
        source = inspect.getsource(RetinaNetHead.__init__)
    except (OSError, TypeError):
        return False
    return "get_norm(norm, 1)" in source


class _GroupNorm32:
    """``GroupNorm(32, channels)``, Detectron2's "GN", except for a probe with fewer than 32
    channels (one group then), which only serves to name the norm type."""

    def __call__(self, channels):
        from torch import nn

        return nn.GroupNorm(32 if channels >= 32 else 1, channels)

    def __repr__(self):
        return "GN"


def dense_head_norm(norm):
    """The ``norm`` to give Detectron2's ``RetinaNetHead`` / ``FCOSHead`` for the config's
    ``MODEL.RETINANET.NORM``: "GN" becomes a factory where the head probes with one channel."""
    if norm == "GN" and _retinanet_head_probes_one_channel():
        return _GroupNorm32()
    return norm


def matched_boxes_as_tensors(matched_boxes):
    """``label_anchors``' per-image matched boxes as (R, 4) tensors (v0.6's FCOS gives ``Boxes``)."""
    return [getattr(boxes, "tensor", boxes) for boxes in matched_boxes]


def fcos_centerness_targets(fcos, anchors, matched_boxes):
    """``FCOS.compute_ctrness_targets`` with the matched boxes in the form this Detectron2's
    FCOS takes: tensors where it has ``_match_anchors`` (main), ``Boxes`` otherwise (v0.6)."""
    from detectron2.modeling.meta_arch.fcos import FCOS
    from detectron2.structures import Boxes

    boxes = matched_boxes_as_tensors(matched_boxes)
    if not hasattr(FCOS, "_match_anchors"):
        boxes = [Boxes(b) for b in boxes]
    return fcos.compute_ctrness_targets(anchors, boxes)
