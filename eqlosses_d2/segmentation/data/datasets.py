"""
Registration of the semantic segmentation datasets, and their per-class statistics.

Registered at import (nothing generated or read until first use):

- ``synthetic_lt_sem_seg_train`` / ``_val``: the embedded long-tailed set of the quickstart
  (:mod:`.synthetic`, ``QUICKSTART_SEM_SEG_SPEC``); ``synthetic_lt_sem_seg_tiny_train`` / ``_val``
  for tests (``TINY_SEM_SEG_SPEC``). Generated on first use into the data root
  (``$EQLOSSES_D2_DATA``, else ``~/.cache/eqlosses_d2/datasets``). Records are Detectron2's
  semantic segmentation dicts: ``file_name``, ``sem_seg_file_name`` (uint8 PNG, 255 = ignore),
  ``height``, ``width``, ``image_id``.
- ADE20K keeps Detectron2's own registration (``ade20k_sem_seg_train`` / ``_val`` from
  ``detectron2.data.datasets.builtin``: ``$DETECTRON2_DATASETS/ADEChallengeData2016/`` with
  ``images/{training,validation}/*.jpg`` and ``annotations_detectron2/{training,validation}/*.png``,
  the masks Detectron2's ``datasets/prepare_ade20k_sem_seg.py`` writes: 150 classes, 255 = ignore).
  We only add ``class_count_dataset`` (its training split) and a ``layout_hint`` to its metadata.

Every one has the metadata Detectron2's ``SemSegEvaluator`` reads (``stuff_classes``,
``ignore_label=255``, ``evaluator_type="sem_seg"``) and ``class_count_dataset``: the training
split whose per-class image counts define the evaluation's frequency groups.

:func:`prepare_sem_seg_dataset` generates what is embedded, checks the files and puts the
dataset's own :class:`~eqlosses_d2.segmentation.stats.SemSegClassStatistics` (computed from its
masks, cached: :mod:`.statistics`) into ``metadata.class_statistics``.
"""
import dataclasses
import functools
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from ...data.datasets import DatasetError
from ...data.synthetic_spec import default_data_root
from ..stats import SemSegClassStatistics
from .statistics import load_sem_seg_statistics
from .synthetic import (IGNORE_LABEL, QUICKSTART_SEM_SEG_SPEC, SPLITS, TINY_SEM_SEG_SPEC, SyntheticSemSegSpec,
                        class_names, dataset_dir_for, image_file, mask_file)

__all__ = ["SYNTHETIC_SEM_SEG_DATASETS", "ADE20K_SEM_SEG_DATASETS", "register_synthetic_sem_seg",
           "register_ade20k_sem_seg", "prepare_sem_seg_dataset", "get_sem_seg_class_statistics",
           "load_synthetic_sem_seg", "training_split_of"]

EVALUATOR_TYPE = "sem_seg"

#: prefix -> spec of the embedded sets
SYNTHETIC_SEM_SEG_DATASETS = {
    "synthetic_lt_sem_seg": QUICKSTART_SEM_SEG_SPEC,
    "synthetic_lt_sem_seg_tiny": TINY_SEM_SEG_SPEC,
}
#: Detectron2's builtin ADE20K-150 registration (SceneParsing challenge 2016)
ADE20K_SEM_SEG_DATASETS = ("ade20k_sem_seg_train", "ade20k_sem_seg_val")
_ADE20K_HINT = (
    "set $DETECTRON2_DATASETS to the directory that holds ADEChallengeData2016/, with "
    "annotations_detectron2/ written by Detectron2's datasets/prepare_ade20k_sem_seg.py"
)


def register_synthetic_sem_seg(prefix: str, spec: SyntheticSemSegSpec, root: str = None):
    """Register ``<prefix>_train`` and ``<prefix>_val`` of a spec (generated on first use)."""
    root = root or default_data_root()
    dataset_dir = dataset_dir_for(spec, root)
    names = []
    for split in SPLITS:
        name = f"{prefix}_{split}"
        DatasetCatalog.register(name, functools.partial(_load_synthetic, name))
        MetadataCatalog.get(name).set(
            stuff_classes=class_names(spec),
            ignore_label=IGNORE_LABEL,
            evaluator_type=EVALUATOR_TYPE,
            image_root=os.path.join(dataset_dir, "images", split),
            sem_seg_root=os.path.join(dataset_dir, "masks", split),
            class_count_dataset=f"{prefix}_train",
            sem_seg_spec=dataclasses.asdict(spec),
            sem_seg_data_root=root,
            sem_seg_split=split,
        )
        names.append(name)
    return names


def load_synthetic_sem_seg(spec: SyntheticSemSegSpec, split: str, root: str = None):
    """The records of a generated split (generates nothing; see :func:`prepare_sem_seg_dataset`)."""
    dataset_dir = dataset_dir_for(spec, root)
    count = spec.num_train_images if split == "train" else spec.num_val_images
    return [{"file_name": image_file(dataset_dir, split, i), "sem_seg_file_name": mask_file(dataset_dir, split, i),
             "height": spec.image_size, "width": spec.image_size, "image_id": i} for i in range(1, count + 1)]


def _load_synthetic(name):
    meta = prepare_sem_seg_dataset(name, with_statistics=False)
    return load_synthetic_sem_seg(SyntheticSemSegSpec(**meta.sem_seg_spec), meta.sem_seg_split, meta.sem_seg_data_root)


def training_split_of(name: str) -> str:
    """The dataset whose per-class counts define ``name``'s frequency groups (its metadata's
    ``class_count_dataset``; ``name`` itself when it names none)."""
    return MetadataCatalog.get(name).get("class_count_dataset") or name


def prepare_sem_seg_dataset(name: str, with_statistics: bool = True):
    """
    Make a registered semantic segmentation dataset ready: generate the embedded set if absent,
    check its directories, and (``with_statistics``) check every record's image and mask and put
    the statistics of its masks into ``metadata.class_statistics`` (from the cache when no mask
    changed). Returns the metadata. Any failure is one :class:`DatasetError` line naming the
    dataset and the file. Safe from every process (generation takes a file lock).
    """
    if name not in DatasetCatalog.list():
        raise DatasetError(f"dataset '{name}' is not registered (known: see DatasetCatalog.list())")
    meta = MetadataCatalog.get(name)
    if meta.get("stuff_classes") is None:
        raise DatasetError(f"dataset '{name}' is not a semantic segmentation dataset (its metadata has no "
                           f"stuff_classes)")
    spec = meta.get("sem_seg_spec")
    if spec is not None:
        from .synthetic import ensure_synthetic_sem_seg

        ensure_synthetic_sem_seg(SyntheticSemSegSpec(**spec), root=meta.sem_seg_data_root)
    hint = meta.get("layout_hint") or "set $DETECTRON2_DATASETS to the directory that holds the dataset"
    for key, what in (("sem_seg_root", "mask"), ("image_root", "image")):
        directory = meta.get(key)
        if directory is not None and not os.path.isdir(directory):
            raise DatasetError(f"dataset '{name}': {what} directory {directory} not found ({hint})")
    if not with_statistics or meta.get("class_statistics") is not None:
        return meta
    sem_seg_root = meta.get("sem_seg_root")
    if sem_seg_root is not None and not any(f.endswith(".png") for f in os.listdir(sem_seg_root)):
        raise DatasetError(f"dataset '{name}': no .png mask in {sem_seg_root} ({hint})")
    records = DatasetCatalog.get(name)
    if not records:
        raise DatasetError(f"dataset '{name}' has no images")
    mask_files = []
    for record in records:
        if "sem_seg_file_name" not in record:
            raise DatasetError(f"dataset '{name}': record of {record.get('file_name')} has no 'sem_seg_file_name'")
        if not os.path.isfile(record["file_name"]):
            raise DatasetError(f"dataset '{name}': image {record['file_name']} not found")
        mask_files.append(record["sem_seg_file_name"])
    stats = load_sem_seg_statistics(mask_files, len(meta.stuff_classes), meta.get("ignore_label", IGNORE_LABEL),
                                    dataset_name=name)
    meta.set(class_statistics=stats)
    return meta


def get_sem_seg_class_statistics(name: str) -> SemSegClassStatistics:
    """The per-class statistics of a registered dataset's own masks (see
    :func:`training_split_of` for the split whose counts the evaluation uses)."""
    return prepare_sem_seg_dataset(name).class_statistics


def _add_ade20k_metadata():
    for name in ADE20K_SEM_SEG_DATASETS:
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if meta.get("class_count_dataset") is None:
                meta.set(class_count_dataset=ADE20K_SEM_SEG_DATASETS[0])
            if meta.get("layout_hint") is None:
                meta.set(layout_hint=_ADE20K_HINT)


def register_ade20k_sem_seg(root: str):
    """(Re-)register ``ade20k_sem_seg_train`` / ``_val`` with Detectron2's own function for the
    datasets root ``root`` (the directory holding ``ADEChallengeData2016/``), replacing the
    registration Detectron2 made at import from ``$DETECTRON2_DATASETS``."""
    from detectron2.data.datasets.builtin import register_all_ade20k

    for name in ADE20K_SEM_SEG_DATASETS:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    register_all_ade20k(os.path.expanduser(root))
    _add_ade20k_metadata()
    return list(ADE20K_SEM_SEG_DATASETS)


def _register_all():
    for prefix, spec in SYNTHETIC_SEM_SEG_DATASETS.items():
        register_synthetic_sem_seg(prefix, spec)
    _add_ade20k_metadata()  # Detectron2's builtin registration, made when detectron2.data was imported


_register_all()
