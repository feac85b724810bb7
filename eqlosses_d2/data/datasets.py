"""
Dataset registration: the embedded synthetic long-tailed splits, and the per-class
statistics of any LVIS/COCO-format dataset (real LVIS keeps Detectron2's own
registration; we only add statistics to its metadata).

Registered at import (generated lazily, on first use, into ``$EQLOSSES_D2_DATA`` or
``~/.cache/eqlosses_d2/datasets``):

- ``synthetic_lvis_v1_train`` / ``synthetic_lvis_v1_val``: the quickstart data.
- ``synthetic_lvis_v1_tiny_train`` / ``synthetic_lvis_v1_tiny_val``: a tiny version for tests.

Their metadata carries what the LVIS tools need: ``evaluator_type="lvis"``,
``json_file``, ``image_root``, ``thing_classes``, ``class_image_count`` (Detectron2
main's format) and ``class_statistics`` (:class:`ClassStatistics`).
"""
import dataclasses
import functools
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .class_stats import ClassStatistics, load_class_statistics
from .synthetic_spec import QUICKSTART_SPEC, TINY_SPEC, SyntheticLVISSpec, default_data_root

__all__ = [
    "DatasetError",
    "register_synthetic_lvis",
    "prepare_dataset",
    "get_class_statistics",
    "SYNTHETIC_SPLITS",
]

logger = logging.getLogger(__name__)

SYNTHETIC_SPLITS = {
    "synthetic_lvis_v1": QUICKSTART_SPEC,
    "synthetic_lvis_v1_tiny": TINY_SPEC,
}


class DatasetError(ValueError):
    """A dataset cannot be used as asked; the message names the dataset and the file."""


def synthetic_dataset_dir(spec: SyntheticLVISSpec, root: str) -> str:
    return os.path.join(root, f"synthetic_lvis_{spec.key()}")


def register_synthetic_lvis(prefix: str, spec: SyntheticLVISSpec, root: str = None):
    """Register ``<prefix>_train`` and ``<prefix>_val`` for a generator spec (not generated yet)."""
    root = root or default_data_root()
    dataset_dir = synthetic_dataset_dir(spec, root)
    names = []
    for split in ("train", "val"):
        name = f"{prefix}_{split}"
        json_file = os.path.join(dataset_dir, "annotations", f"synthetic_lvis_v1_{split}.json")
        DatasetCatalog.register(name, functools.partial(_load_synthetic, name))
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=dataset_dir + os.sep,
            evaluator_type="lvis",
            synthetic_spec=dataclasses.asdict(spec),
            synthetic_root=root,
        )
        names.append(name)
    return names


def _load_synthetic(name):
    from detectron2.data.datasets.lvis import load_lvis_json

    prepare_dataset(name)
    meta = MetadataCatalog.get(name)
    return load_lvis_json(meta.json_file, meta.image_root)


def prepare_dataset(name: str, with_statistics: bool = True):
    """
    Make a registered dataset ready to use: generate the synthetic data if absent, check
    the annotation file exists, and put ``thing_classes`` and per-class statistics into its
    metadata. Safe to call from every process (generation takes a file lock).
    """
    if name not in DatasetCatalog.list():
        raise DatasetError(f"dataset '{name}' is not registered (known: see DatasetCatalog.list())")
    meta = MetadataCatalog.get(name)
    spec = meta.get("synthetic_spec")
    if spec is not None:
        from .synthetic import ensure_synthetic_lvis  # the generator, loaded when data is made

        ensure_synthetic_lvis(SyntheticLVISSpec(**spec), root=meta.synthetic_root)
    json_file = meta.get("json_file")
    if json_file is None:
        if with_statistics:
            raise DatasetError(
                f"dataset '{name}' has no 'json_file' in its metadata, so its per-class "
                f"statistics cannot be computed"
            )
        return meta
    if not os.path.isfile(json_file):
        # a registration may say where its files go (metadata "layout_hint"); LVIS's is the default
        hint = meta.get("layout_hint") or (
            "for LVIS, set $DETECTRON2_DATASETS to the directory that contains lvis/"
            if meta.get("evaluator_type", "lvis") == "lvis"
            else "set $DETECTRON2_DATASETS to the directory that holds the dataset"
        )
        raise DatasetError(f"dataset '{name}': annotation file {json_file} not found ({hint})")
    image_root = meta.get("image_root")
    if image_root is not None and not os.path.isdir(image_root):
        raise DatasetError(f"dataset '{name}': image directory {image_root} not found")
    if with_statistics and meta.get("class_statistics") is None:
        try:
            # Detectron2's LVIS loader asserts on polygons of < 3 points; check them first
            stats = load_class_statistics(json_file, lvis_polygons=meta.get("evaluator_type") == "lvis")
        except ValueError as e:  # a malformed file: the message names it and the annotation
            raise DatasetError(f"dataset '{name}': {e}") from None
        meta.set(class_statistics=stats)
        if meta.get("thing_classes") is None:
            meta.set(thing_classes=list(stats.class_names))
        if meta.get("class_image_count") is None:
            meta.set(class_image_count=stats.class_image_count())
    return meta


def get_class_statistics(name: str) -> ClassStatistics:
    """The per-class statistics of a registered dataset, computed from its annotation file."""
    return prepare_dataset(name).class_statistics


def _register_all():
    for prefix, spec in SYNTHETIC_SPLITS.items():
        register_synthetic_lvis(prefix, spec)


_register_all()
