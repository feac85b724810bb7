"""
iNaturalist 2018 (Van Horn et al., CVPR 2018; 8,142 species, 437,513 training and 24,426
validation images, 1,000 .. 2 training images per class), registered as the long-tailed
classification literature uses it (OLTR / decoupling / Balanced Softmax / the equalization
losses): trained on ``train2018``, evaluated on ``val2018`` (balanced, 3 images per class; the
competition's test set has no public labels), top-1 accuracy and the many (> 100 training images)
/ medium (20 .. 100) / few (< 20) splits.

Layout (nothing is downloaded; the competition's files, unchanged)::

    $DETECTRON2_DATASETS/inaturalist2018/
        train2018.json              # COCO-like: images, annotations (one category_id per image), categories
        val2018.json
        train_val2018/<supercategory>/<category_id>/<hash>.jpg   # the images (paths as in the json)
        iNaturalist18_train.txt     # optional: the decoupling code's lists, "<path> <label>" per line
        iNaturalist18_val.txt

Registered at import (nothing read until first use):

- ``inaturalist2018_{train,val}``: from ``train2018.json`` / ``val2018.json``. Category ids are
  0 .. 8141, so the contiguous label (sorted-id order, as the house's class statistics) equals the
  category id. The recipes (``configs/iNaturalist2018/``) use these.
- ``inaturalist2018_list_{train,val}``: from the decoupling code's split lists
  (facebookresearch/classifier-balancing, ``data/iNaturalist18/``, commit f162adef), read by the
  house's list reader (converted once into a COCO-style json in the class-statistics cache). Their
  ``gen_lists.py`` writes each json's images in order with ``label = category_id``, so both
  registrations give the same records; the lists are for those who have them instead of the json.

Per-class training image counts come from the house's class statistics of ``train2018.json``
(metadata ``class_statistics``, ``class_count_dataset="inaturalist2018_train"``), which
``train_net.py`` puts in the model's ``class_stats`` buffers, as for the other datasets.

Records are built from one typed msgspec parse (the package's json parser, see
:mod:`eqlosses_d2.evaluation.json_io`): only ``id``, ``file_name``, ``width``, ``height`` of the
images, ``image_id``, ``category_id`` of the annotations and the categories' ``id`` are
decoded (types checked in C, the other fields skipped), with no dict per image until the records
themselves. A missing file, invalid JSON, a field of the wrong type, an unknown category, an image
with no or several labels: one-line :class:`~eqlosses_d2.data.DatasetError` naming the dataset and
the file.
"""
import functools
import os
from typing import List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

from ...data.datasets import DatasetError
from ...evaluation.json_io import gc_paused
from .datasets import EVALUATOR_TYPE, prepare_classification_dataset

__all__ = ["INATURALIST2018_DIR", "INATURALIST2018_NUM_CLASSES", "register_inaturalist2018",
           "load_coco_classification_records"]

#: directory under $DETECTRON2_DATASETS
INATURALIST2018_DIR = "inaturalist2018"
INATURALIST2018_NUM_CLASSES = 8142
#: split -> (annotation json, decoupling-code list)
INATURALIST2018_FILES = {
    "train": ("train2018.json", "iNaturalist18_train.txt"),
    "val": ("val2018.json", "iNaturalist18_val.txt"),
}
_LAYOUT = ("iNaturalist 2018 layout: $DETECTRON2_DATASETS/inaturalist2018/{train2018.json,val2018.json,"
           "train_val2018/}; nothing is downloaded")


def register_inaturalist2018(prefix: str = "inaturalist2018", directory: Optional[str] = None):
    """Register ``<prefix>_{train,val}`` (the json) and ``<prefix>_list_{train,val}`` (the
    decoupling code's lists) from ``directory`` (default ``$DETECTRON2_DATASETS/inaturalist2018``)."""
    if directory is None:
        root = os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))
        directory = os.path.join(root, INATURALIST2018_DIR)
    names = []
    for split, (json_name, list_name) in INATURALIST2018_FILES.items():
        for name, source in ((f"{prefix}_{split}", {"json_file": os.path.join(directory, json_name)}),
                             (f"{prefix}_list_{split}", {"list_file": os.path.join(directory, list_name)})):
            DatasetCatalog.register(name, functools.partial(_load, name))
            MetadataCatalog.get(name).set(
                image_root=directory + os.sep,
                evaluator_type=EVALUATOR_TYPE,
                layout_hint=_LAYOUT,
                class_count_dataset=f"{prefix}_train" if "json_file" in source else f"{prefix}_list_train",
                **source,
            )
            names.append(name)
    return names


@functools.lru_cache(maxsize=1)
def _decoder():
    """(msgspec decoder of the fields read, msgspec's error class); built on first use."""
    import msgspec  # an install requirement of the package (see json_io)

    class Image(msgspec.Struct, gc=False):
        id: int
        file_name: str
        width: Optional[int] = None
        height: Optional[int] = None

    class Annotation(msgspec.Struct, gc=False):
        image_id: int
        category_id: int

    class Category(msgspec.Struct, gc=False):
        id: int

    class ClassificationFile(msgspec.Struct, gc=False):
        images: List[Image]
        annotations: List[Annotation]
        categories: List[Category]

    return msgspec.json.Decoder(ClassificationFile), msgspec.MsgspecError


def load_coco_classification_records(json_file: str, image_root: str, name: str = "dataset"):
    """Records ``{file_name, image_id, label, [height, width]}`` of a COCO-like classification json
    (one annotation per image; label = index of the category in sorted-id order), in the file's
    image order; :class:`DatasetError` in one line naming ``name`` and the file otherwise."""
    if not os.path.isfile(json_file):
        raise DatasetError(f"dataset '{name}': {json_file} not found ({_LAYOUT})")
    decoder, decode_error = _decoder()
    with open(json_file, "rb") as f:
        data = f.read()
    try:
        with gc_paused():
            parsed = decoder.decode(data)
    except decode_error as e:  # invalid JSON, a missing list, a field of the wrong type
        raise DatasetError(f"dataset '{name}': {json_file}: {str(e).splitlines()[0]}") from None
    index = {c: i for i, c in enumerate(sorted(c.id for c in parsed.categories))}
    label_of = {}
    for ann in parsed.annotations:
        label = index.get(ann.category_id)
        if label is None:
            raise DatasetError(f"dataset '{name}': {json_file}: an annotation of image {ann.image_id} has unknown "
                               f"category_id {ann.category_id}")
        if ann.image_id in label_of:
            raise DatasetError(f"dataset '{name}': {json_file}: image {ann.image_id} has several annotations "
                               f"(a classification set has one label per image)")
        label_of[ann.image_id] = label
    records = []
    with gc_paused():
        for image in parsed.images:
            label = label_of.get(image.id)
            if label is None:
                raise DatasetError(f"dataset '{name}': {json_file}: image {image.id} ({image.file_name}) has no "
                                   f"annotation")
            record = {"file_name": os.path.join(image_root, image.file_name), "image_id": image.id, "label": label}
            if image.height is not None and image.width is not None:
                record["height"], record["width"] = image.height, image.width
            records.append(record)
    if len(records) != len(label_of):  # an image listed twice, or an annotation of no image
        image_ids = [image.id for image in parsed.images]
        if len(set(image_ids)) != len(image_ids):
            seen = set()
            twice = next(i for i in image_ids if i in seen or seen.add(i))
            raise DatasetError(f"dataset '{name}': {json_file}: image {twice} is listed twice in 'images'")
        known = set(image_ids)
        missing = next(i for i in label_of if i not in known)
        raise DatasetError(f"dataset '{name}': {json_file}: an annotation refers to image {missing}, which is not "
                           f"in 'images'")
    return records


def _load(name):
    meta = MetadataCatalog.get(name)
    json_file = meta.get("json_file")
    if json_file is not None and not os.path.isfile(json_file):  # before the house's generic message
        raise DatasetError(f"dataset '{name}': {json_file} not found ({_LAYOUT})")
    meta = prepare_classification_dataset(name)  # checks, class statistics (cached), list -> json
    return load_coco_classification_records(meta.json_file, meta.image_root, name)


register_inaturalist2018()
