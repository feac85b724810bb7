"""The classifier's train and test loaders: Detectron2's ``build_detection_train_loader`` /
``build_detection_test_loader`` with the classification mapper and samplers. The train loader is
resumable as the detectors' (its sampler wrapped in :class:`eqlosses_d2.resume.SkipSampler`,
kept as ``resume_sampler``)."""
import torch

from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.data.samplers import InferenceSampler

from ...resume import SkipSampler
from .mapper import ClassificationDatasetMapper
from .samplers import build_classification_sampler

__all__ = ["build_classification_train_loader", "build_classification_test_loader"]


def build_classification_train_loader(cfg):
    records = get_detection_dataset_dicts(list(cfg.DATASETS.TRAIN), filter_empty=False)
    sampler = SkipSampler(build_classification_sampler(cfg.DATALOADER.SAMPLER_TRAIN, records))
    loader = build_detection_train_loader(
        dataset=records,
        mapper=ClassificationDatasetMapper(cfg, is_train=True),
        sampler=sampler,
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    loader.resume_sampler = sampler
    return loader


def build_classification_test_loader(cfg, dataset_name):
    """Detectron2's test loader (``InferenceSampler``: each process its contiguous shard, every
    image once), in batches of ``MODEL.EQLOSSES.CLASSIFICATION.TEST_IMS_PER_BATCH`` per process
    (Detectron2 v0.6's ``build_detection_test_loader`` has no batch size)."""
    records = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    dataset = MapDataset(DatasetFromList(records, copy=False), ClassificationDatasetMapper(cfg, is_train=False))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.MODEL.EQLOSSES.CLASSIFICATION.TEST_IMS_PER_BATCH,
        sampler=InferenceSampler(len(dataset)),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=trivial_batch_collator,
    )
