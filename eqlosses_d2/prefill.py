"""
LOCE's pre-fill of the feature memory before training (the authors' ``InitializerHook``
with their ``DistributedBalancedSampler``): for every class, the first
``PREFILL_IMAGES_PER_CLASS`` training images that contain it (the class's image list
repeated if it is shorter; process r takes the r-th block of that many), run through the
model's training forward without gradients. That enqueues their ground-truth jitters
and, as in the authors' code, also updates the mean scores. Each process fills its own
queues; all processes run the same number of batches (the mean-score update is a
collective).

Resume: the queues are not checkpointed (neither are the authors'), so the pre-fill runs
again before the first iteration after ``--resume``; there it leaves the mean scores and
the random number generators exactly as the checkpoint restored them (it snapshots and
puts them back), so the resumed run differs from an uninterrupted one only in the queue
contents (fresh jitters of the pre-fill images instead of the last iterations' boxes).
"""
import copy
import logging
from collections import defaultdict

import torch

from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.engine import HookBase
import detectron2.utils.comm as comm

__all__ = ["MemoryPrefillHook", "prefill_image_indices", "prefill_feature_memory"]

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


@torch.no_grad()
def prefill_feature_memory(cfg, model) -> int:
    """Run the pre-fill pass on ``model`` (unwrapped from DDP); returns the images used."""
    model = getattr(model, "module", model)
    heads = model.roi_heads
    per_class = cfg.MODEL.EQLOSSES.MFS.PREFILL_IMAGES_PER_CLASS
    if not hasattr(heads, "memory") or per_class <= 0:
        return 0
    dataset_dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    indices = prefill_image_indices(dataset_dicts, heads.num_classes, per_class, comm.get_rank(), comm.get_world_size())
    mapper = DatasetMapper(cfg, is_train=True)
    batch_size = max(1, cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())
    was_training = model.training
    model.train()
    try:
        for start in range(0, len(indices), batch_size):
            batch = [mapper(copy.deepcopy(dataset_dicts[i])) for i in indices[start : start + batch_size]]
            model(batch)
    finally:
        model.train(was_training)
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
        if resumed:
            rng, mean_score = RandomStates().state_dict(), model.roi_heads.box_predictor.cls_loss.mean_score.clone()
        prefill_feature_memory(self.cfg, model)
        if resumed:
            RandomStates().load_state_dict(rng)
            model.roi_heads.box_predictor.cls_loss.mean_score.copy_(mean_score)
