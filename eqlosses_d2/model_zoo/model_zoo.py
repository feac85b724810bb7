"""
Model-zoo names to configs and verified checkpoints, with Detectron2's model-zoo API
(``get_config_file``, ``get_config``, ``get``, ``get_checkpoint_url``) and a path scheme,
``eqlosses_d2://NAME``, that Detectron2's ``PathManager`` resolves to the verified cached
checkpoint (so it works in ``MODEL.WEIGHTS`` and anywhere Detectron2 opens a path).
"""
import os
from typing import Optional

from detectron2.utils.file_io import PathHandler, PathManager

from ..config import CONFIG_SOURCE_REGISTRY, add_eqlosses_config, merge_config_file, merge_config_list
from ..registry import register
from .download import cache_dir, fetch
from .manifest import PREFIX, ModelZooEntry, ModelZooError, close_matches, find_entry, load_manifest, normalize_name

__all__ = [
    "PREFIX",
    "ModelZooHandler",
    "get",
    "get_checkpoint_path",
    "get_checkpoint_url",
    "get_config",
    "get_config_file",
    "is_model_zoo_name",
    "list_models",
    "merge_model_zoo_config",
    "register_handler",
]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def list_models():
    """Every model-zoo name, in manifest order."""
    return list(load_manifest())


def is_model_zoo_name(name: str) -> bool:
    """True when ``name`` (or ``eqlosses_d2://name``, ``name.yaml``) is in the manifest."""
    if not isinstance(name, str) or not name:
        return False
    return normalize_name(name) in load_manifest()


def _configs_dir(package):
    if package == "eqlosses_d2":
        # installed: eqlosses_d2/configs (setup.py); a checkout: configs/ beside the package
        for candidate in (os.path.join(_PACKAGE_DIR, "configs"), os.path.join(_PACKAGE_DIR, os.pardir, "configs")):
            if os.path.isdir(candidate):
                return os.path.abspath(candidate)
        raise ModelZooError("eqlosses_d2's configs directory not found (installed packages carry eqlosses_d2/configs)")
    from ..compat import import_detectron2_model_zoo

    zoo = import_detectron2_model_zoo()
    return os.path.join(os.path.dirname(os.path.abspath(zoo.__file__)), "configs")


def _config_file(entry: ModelZooEntry) -> str:
    path = os.path.join(_configs_dir(entry.config_package), entry.config)
    if not os.path.isfile(path):
        raise ModelZooError(
            f"model zoo '{entry.name}': its config {entry.config} is not among {entry.config_package}'s configs"
        )
    return path


def get_config_file(name: str) -> str:
    """The config file of a model-zoo name (Detectron2's own for ``Detectron2/...`` names:
    :func:`get_config` also applies the entry's ``opts``)."""
    return _config_file(find_entry(name))


def merge_model_zoo_config(cfg, name: str):
    """Merge a model-zoo entry's config file and its ``opts`` into ``cfg`` (which has the
    eqlosses_d2 keys); what ``--config-file NAME`` does."""
    entry = find_entry(name)
    merge_config_file(cfg, _config_file(entry))
    merge_config_list(cfg, list(entry.opts))
    return cfg


def get_config(name: str, trained: bool = False):
    """
    The config of a model-zoo name: Detectron2's defaults, every eqlosses_d2 key (so the
    calibration keys can be set on Detectron2's own models too), the entry's file and opts.

    Args:
        trained: set ``MODEL.WEIGHTS`` to the entry's checkpoint (``eqlosses_d2://NAME``,
            verified on download); an entry without one fails.
    """
    from detectron2.config import get_cfg


    entry = find_entry(name)
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_model_zoo_config(cfg, entry.name)
    if trained:
        _require_weights(entry)
        cfg.MODEL.WEIGHTS = PREFIX + entry.name
    return cfg


def get(name: str, trained: bool = False, device: Optional[str] = None):
    """
    The model of a model-zoo name (in training mode, as Detectron2's ``model_zoo.get``),
    with the entry's verified checkpoint loaded when ``trained``.
    """
    import torch
    from detectron2.modeling import build_model

    from ..checkpoint import AtomicCheckpointer

    cfg = get_config(name, trained=trained)
    if device is None and not torch.cuda.is_available():
        device = "cpu"
    if device is not None:
        cfg.MODEL.DEVICE = device
    model = build_model(cfg)
    AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model


def _require_weights(entry):
    if not entry.has_weights:
        raise ModelZooError(
            f"model zoo '{entry.name}' has no published checkpoint (weights: none, config only); "
            f"train it with `train_net.py --config-file {entry.name}`"
        )


def get_checkpoint_url(name: str) -> str:
    """The URL the checkpoint of a model-zoo name is downloaded from."""
    entry = find_entry(name)
    _require_weights(entry)
    return entry.weights.url


def checkpoint_cache_path(entry: ModelZooEntry) -> str:
    """Where the verified checkpoint of an entry is kept."""
    return os.path.join(cache_dir(), *entry.name.split("/"), entry.weights.filename)


def get_checkpoint_path(name: str, force: bool = False) -> str:
    """The local path of the verified checkpoint of a model-zoo name, downloading it (once,
    under a lock shared by all processes) if the cache has no verified copy."""
    entry = find_entry(name)
    _require_weights(entry)
    label = f"model zoo '{entry.name}'"
    return fetch(entry.weights.url, checkpoint_cache_path(entry), entry.weights.checksum, label=label, force=force)


class ModelZooHandler(PathHandler):
    """Resolves ``eqlosses_d2://NAME`` to the verified cached checkpoint of NAME."""

    PREFIX = PREFIX

    def _get_supported_prefixes(self):
        return [self.PREFIX]

    def _get_local_path(self, path, force=False, **kwargs):
        self._check_kwargs(kwargs)
        return get_checkpoint_path(path, force=force)

    def _open(self, path, mode="r", buffering=-1, **kwargs):
        self._check_kwargs(kwargs)
        if any(c in mode for c in "wax+"):
            raise ModelZooError(f"{path}: model-zoo checkpoints are read-only")
        return open(self._get_local_path(path), mode, buffering=buffering)

    def _exists(self, path, **kwargs):
        self._check_kwargs(kwargs)
        entries = load_manifest()
        name = normalize_name(path)
        return name in entries and entries[name].has_weights

    def _isfile(self, path, **kwargs):
        return self._exists(path, **kwargs)

    def _isdir(self, path, **kwargs):
        self._check_kwargs(kwargs)
        return False


def register_handler():
    """Make Detectron2's PathManager resolve ``eqlosses_d2://`` (idempotent: a second call
    replaces the handler, silently on Detectron2's own PathManager)."""
    PathManager.register_handler(ModelZooHandler())


@register(CONFIG_SOURCE_REGISTRY)
class ModelZooConfigSource:
    """The model zoo's names as ``--config-file`` values (``eqlosses_d2.config.merge_config_file``
    asks every source in ``CONFIG_SOURCE_REGISTRY``: config.py imports no model-zoo module)."""

    name = "model_zoo"
    what = "model-zoo"

    @staticmethod
    def is_name(name: str) -> bool:
        return is_model_zoo_name(name)

    @staticmethod
    def merge(cfg, name: str):
        return merge_model_zoo_config(cfg, name)

    @staticmethod
    def close_matches(name: str):
        return close_matches(name)
