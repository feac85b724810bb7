"""
The eqlosses_d2 model zoo: a name gives a config and, where trained weights are published,
a checkpoint that is downloaded once, verified, cached and loaded.

    from eqlosses_d2 import model_zoo
    cfg = model_zoo.get_config("LVISv1-InstanceSegmentation/eqlv2_mask_rcnn_R_50_FPN_1x")
    model = model_zoo.get("Detectron2/LVISv0.5-InstanceSegmentation/mask_rcnn_R_50_FPN_1x", trained=True)

    python train_net.py --config-file NAME --eval-only MODEL.WEIGHTS eqlosses_d2://NAME
    python -m eqlosses_d2.model_zoo list | fetch NAME | path NAME

``manifest.py``: the manifest (``model_zoo/manifest.yaml``) and name lookup; ``download.py``:
the verified, resumable, lock-protected download into the cache; ``model_zoo.py``: the API
and the ``eqlosses_d2://`` path handler, registered with Detectron2's ``PathManager`` on
import. Checkpoints are loaded by :class:`eqlosses_d2.checkpoint.AtomicCheckpointer`, with
the safest loader that works for them.
"""
from .download import CACHE_ENV, ChecksumError, DownloadError, cache_dir
from .manifest import (
    MANIFEST_ENV,
    PREFIX,
    SYNTHETIC_DATA,
    ModelZooEntry,
    ModelZooError,
    close_matches,
    find_entry,
    load_manifest,
)
from .model_zoo import (
    ModelZooHandler,
    get,
    get_checkpoint_path,
    get_checkpoint_url,
    get_config,
    get_config_file,
    is_model_zoo_name,
    list_models,
    merge_model_zoo_config,
    register_handler,
)

register_handler()

__all__ = [
    "CACHE_ENV",
    "MANIFEST_ENV",
    "PREFIX",
    "SYNTHETIC_DATA",
    "ChecksumError",
    "DownloadError",
    "ModelZooEntry",
    "ModelZooError",
    "ModelZooHandler",
    "cache_dir",
    "close_matches",
    "find_entry",
    "get",
    "get_checkpoint_path",
    "get_checkpoint_url",
    "get_config",
    "get_config_file",
    "is_model_zoo_name",
    "list_models",
    "load_manifest",
    "merge_model_zoo_config",
]
