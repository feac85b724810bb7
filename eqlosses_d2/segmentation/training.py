"""
What ``train_net.py`` needs to train a semantic segmenter beyond Detectron2's defaults, as
Detectron2's DeepLab project's ``train_net.py`` and ``build_solver.py`` add them:

- :func:`build_sem_seg_train_aug`: the training augmentations of Detectron2's ``DatasetMapper``
  (which reads ``sem_seg_file_name`` and transforms the mask with the image): resize the short
  edge (``INPUT.MIN_SIZE_TRAIN`` / ``MAX_SIZE_TRAIN`` / ``MIN_SIZE_TRAIN_SAMPLING``), then with
  ``INPUT.CROP.ENABLED`` a random crop that no single class fills beyond
  ``INPUT.EQLOSSES.SEM_SEG.CROP_SINGLE_CATEGORY_MAX_AREA`` (Detectron2's
  ``RandomCrop_CategoryAreaConstraint``, the ignored label exempt), then a random horizontal flip
  (``INPUT.RANDOM_FLIP``). Detectron2's own ``DatasetMapper`` crops before resizing and has no
  area constraint; the DeepLab project resizes first, as here;
- :func:`build_sem_seg_train_loader`: Detectron2's train loader with that mapper, resumable
  (:func:`eqlosses_d2.resume.build_resumable_train_loader`: same sampler and seed, the sample
  stream continues where an interrupted run stopped);
- :func:`build_poly_lr_scheduler` (``SOLVER.LR_SCHEDULER_NAME: "WarmupPolyLR"``): the poly
  schedule of DeepLab and mmsegmentation, ``lr = (BASE_LR - END) (1 - it / MAX_ITER)^POWER + END``
  (``SOLVER.EQLOSSES.POLY_LR_POWER`` / ``POLY_LR_END``), after Detectron2's warmup
  (``WarmupParamScheduler``: linear from ``WARMUP_FACTOR`` x the schedule's start to its value at
  the end of warmup; DeepLab's ``WarmupPolyLR`` multiplies the poly value by the warmup factor
  instead; the same without warmup, which the ADE20K recipes have none of).
"""
from fvcore.common.param_scheduler import ParamScheduler

import detectron2.data.transforms as T
from detectron2.data import DatasetMapper
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler

from ..resume import build_resumable_train_loader

__all__ = [
    "POLY_LR_SCHEDULER",
    "PolyParamScheduler",
    "build_poly_lr_scheduler",
    "build_sem_seg_train_aug",
    "build_sem_seg_train_loader",
]

#: the SOLVER.LR_SCHEDULER_NAME of the poly schedule
POLY_LR_SCHEDULER = "WarmupPolyLR"


def build_sem_seg_train_aug(cfg):
    """The training augmentations (see the module docstring)."""
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(
            T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.INPUT.EQLOSSES.SEM_SEG.CROP_SINGLE_CATEGORY_MAX_AREA,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            )
        )
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal", vertical=cfg.INPUT.RANDOM_FLIP == "vertical")
        )
    return augs


def build_sem_seg_train_loader(cfg):
    """Detectron2's resumable train loader with the segmentation mapper."""
    mapper = DatasetMapper(cfg, is_train=True, augmentations=build_sem_seg_train_aug(cfg))
    return build_resumable_train_loader(cfg, mapper=mapper)


class PolyParamScheduler(ParamScheduler):
    """``(1 - end) * (1 - where) ** power + end`` for ``where`` in [0, 1): a multiplier of the base LR."""

    def __init__(self, power: float, end: float = 0.0):
        self.power = float(power)
        self.end = float(end)

    def __call__(self, where: float) -> float:
        return (1.0 - self.end) * (1.0 - where) ** self.power + self.end


def build_poly_lr_scheduler(cfg, optimizer):
    """The poly LR schedule with Detectron2's warmup (see the module docstring)."""
    solver = cfg.SOLVER
    scheduler = PolyParamScheduler(solver.EQLOSSES.POLY_LR_POWER, solver.EQLOSSES.POLY_LR_END / solver.BASE_LR)
    scheduler = WarmupParamScheduler(
        scheduler, solver.WARMUP_FACTOR, min(solver.WARMUP_ITERS / solver.MAX_ITER, 1.0), solver.WARMUP_METHOD
    )
    return LRMultiplier(optimizer, multiplier=scheduler, max_iter=solver.MAX_ITER)
