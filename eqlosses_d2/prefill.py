"""
LOCE's pre-fill of the feature memory before training (the authors' ``InitializerHook``
with their ``DistributedBalancedSampler``): for every class, the first
``PREFILL_IMAGES_PER_CLASS`` training images that contain it (the class's image list
repeated if it is shorter; process r takes the r-th block of that many), run through the
model's training forward without gradients. That enqueues their ground-truth jitters
and, as in the authors' code, also updates the mean scores. Each process fills its own
queues; all processes run the same number of batches (the mean-score update is a
collective).

Eval mode, as the authors (``model.eval()`` then their training forward): the
normalization and dropout layers run in eval mode during the pass (BatchNorm uses, and
does not update, its running statistics), while the detector keeps its training flow
(Detectron2 switches to inference when the top module is in eval mode); every module's
mode is put back afterwards.

The annotations: the hook reads the training records from the trainer's data loader (the
``DatasetFromList`` Detectron2 built from ``DATASETS.TRAIN``, already in each process's
memory; walking it unpickles one record at a time), and keeps only the selected images'
records. Only where no such list is found (another loader) does it load
``DATASETS.TRAIN[0]`` from the ``DatasetCatalog`` again, once.

Resume: each process's queues are part of its per-rank resume state
(``MODEL.EQLOSSES.MFS.CHECKPOINT_QUEUES``, default), so after ``--resume`` they are restored
and the pre-fill is skipped. Without them (the authors' code never saves the queues) the
pre-fill runs again before the first iteration after ``--resume``; there it leaves the mean
scores and the random number generators exactly as the checkpoint restored them (it
snapshots and puts them back), so the resumed run differs from an uninterrupted one only
in the queue contents (fresh jitters of the pre-fill images instead of the last
iterations' boxes).
"""
import contextlib
import copy
import logging
from collections import defaultdict

import torch

from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data.common import DatasetFromList
from detectron2.engine import HookBase
import detectron2.utils.comm as comm

__all__ = ["MemoryPrefillHook", "loader_dataset", "norm_layers_in_eval_mode", "prefill_image_indices",
           "prefill_feature_memory"]

#: layers whose output depends on the module's mode (the rest of the detector keeps its
#: training flow in the pre-fill)
_MODE_DEPENDENT_LAYERS = (torch.nn.modules.batchnorm._NormBase, torch.nn.modules.dropout._DropoutNd)

logger = logging.getLogger(__name__)


def prefill_image_indices(dataset_dicts, num_classes: int, per_class: int, rank: int = 0, world_size: int = 1):
    """The dataset indices this process pre-fills with, class by class (ids 0..C−1)."""
    images_of_class = defaultdict(list)
    for index, record in enumerate(dataset_dicts):
        for category in sorted({a["category_id"] for a in record.get("annotations", [])}):
            images_of_class[category].append(index)
    indices = []
    total = per_class * world_size
    for category in range(num_classes):
        images = images_of_class.get(category)
        if not images:
            continue
        repeated = (images * -(-total // len(images)))[:total]
        indices.extend(repeated[rank * per_class : (rank + 1) * per_class])
    return indices


@contextlib.contextmanager
def norm_layers_in_eval_mode(model):
    """The detector in training mode with its normalization and dropout layers in eval mode
    (the authors' ``model.eval()`` around a training forward); every module's own mode is
    restored on exit."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.train()
        for module in model.modules():
            if isinstance(module, _MODE_DEPENDENT_LAYERS):
                module.eval()
        yield model
    finally:
        for module, training in modes:
            module.training = training


def loader_dataset(data_loader):
    """The ``DatasetFromList`` a Detectron2 train loader reads its records from (v0.6 and
    main: through ``dataset`` / ``_dataset`` attributes), or None."""
    node, seen = data_loader, set()
    while node is not None and id(node) not in seen:
        if isinstance(node, DatasetFromList):
            return node
        seen.add(id(node))
        node = getattr(node, "dataset", None) if hasattr(node, "dataset") else getattr(node, "_dataset", None)
    return None


@torch.no_grad()
def prefill_feature_memory(cfg, model, dataset=None) -> int:
    """Run the pre-fill pass on ``model`` (unwrapped from DDP); returns the images used.
    ``dataset``: the training records (a sequence; default: ``DATASETS.TRAIN[0]`` from the
    ``DatasetCatalog``, loaded here)."""
    model = getattr(model, "module", model)
    heads = model.roi_heads
    per_class = cfg.MODEL.EQLOSSES.MFS.PREFILL_IMAGES_PER_CLASS
    if not hasattr(heads, "memory") or per_class <= 0:
        return 0
    if dataset is None:
        logger.info("MFS pre-fill: loading %s from the DatasetCatalog", cfg.DATASETS.TRAIN[0])
        dataset = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    # one record at a time (a DatasetFromList unpickles each); only the selected ones are kept
    indices = prefill_image_indices(
        (dataset[i] for i in range(len(dataset))), heads.num_classes, per_class, comm.get_rank(), comm.get_world_size()
    )
    records = {i: dataset[i] for i in sorted(set(indices))}
    mapper = DatasetMapper(cfg, is_train=True)
    batch_size = max(1, cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())
    with norm_layers_in_eval_mode(model):
        for start in range(0, len(indices), batch_size):
            batch = [mapper(copy.deepcopy(records[i])) for i in indices[start : start + batch_size]]
            model(batch)
    filled = int((heads.memory.filled > 0).sum())
    logger.info("MFS pre-fill: %d images, %d of %d class queues non-empty", len(indices), filled, heads.num_classes)
    return len(indices)


class MemoryPrefillHook(HookBase):
    """Pre-fills LOCE's feature memory before the first training iteration."""

    def __init__(self, cfg):
        self.cfg = cfg

    def before_train(self):
        from .resume import RandomStates

        model = getattr(self.trainer.model, "module", self.trainer.model)
        resumed = getattr(self.trainer, "start_iter", 0) > 0
        if resumed and bool((model.roi_heads.memory.filled > 0).any()):
            logger.info("MFS pre-fill skipped: the feature queues were restored from this rank's resume state")
            return
        if resumed:
            rng, mean_score = RandomStates().state_dict(), model.roi_heads.box_predictor.cls_loss.mean_score.clone()
        dataset = loader_dataset(self.trainer.data_loader)
        if dataset is None:
            logger.info("MFS pre-fill: the train loader's records are not reachable (not a DatasetFromList)")
        prefill_feature_memory(self.cfg, model, dataset=dataset)
        if resumed:
            RandomStates().load_state_dict(rng)
            model.roi_heads.box_predictor.cls_loss.mean_score.copy_(mean_score)
