"""
Registration of the long-tailed classification datasets. Every one has COCO-style annotations
(``json_file``: one ``category_id`` per image), so that the house's class statistics and
``prepare_dataset`` serve it unchanged, and metadata ``evaluator_type="classification"`` and
``class_count_dataset`` (the training split whose per-class image counts define the many /
medium / few-shot splits of the evaluation).

Registered at import (nothing read or generated until first use):

- ``synthetic_cls_lt_{train,val,test}``: the embedded set (:mod:`.synthetic`, the quickstart);
  ``synthetic_cls_lt_tiny_{train,val,test}`` for tests;
- ``imagenet_lt_{train,val,test}`` and ``places_lt_{train,val,test}``: from the split lists of
  the OLTR release (``ImageNet_LT_train.txt``: ``<path> <label>`` per line) under
  ``$DETECTRON2_DATASETS/{imagenet_lt,places_lt}/``, images under the same directory (paths as in
  the lists). The lists are converted once into a COCO-style json in the class-statistics cache.
  A missing list or image directory is a one-line :class:`~eqlosses_d2.data.DatasetError`; nothing
  is downloaded;
- ``cifar10_lt_{train,test}`` / ``cifar100_lt_{train,test}`` (imbalance factor 100) and
  ``cifar10_lt_if{10,50}_*`` / ``cifar100_lt_if{10,50}_*``: from torchvision's files on disk
  (``$DETECTRON2_DATASETS/cifar-10-batches-py``, ``cifar-100-python``), the train split subsampled
  with the standard exponential profile of the LDAM / decoupling code (``IMBALANCECIFAR10``):
  class i keeps ``int(n_max · (1/ρ)^(i/(C−1)))`` of its images (n_max 5,000 / 500), those of a
  per-class shuffle under ``np.random.seed(0)``, classes in order; the test split is the full
  balanced one. Images are read from the pickled arrays (records carry ``array_file`` and
  ``array_index``).
"""
import functools
import hashlib
import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from ...atomic import atomic_write
from ...data.class_stats import cache_dir
from ...data.datasets import DatasetError, prepare_dataset
from ...data.synthetic_spec import default_data_root
from .synthetic import QUICKSTART_CLS_SPEC, SPLITS, TINY_CLS_SPEC, SyntheticClassificationSpec

__all__ = ["register_synthetic_classification", "register_list_classification", "register_cifar_lt",
           "prepare_classification_dataset", "load_classification_json", "cifar_lt_counts", "cifar_images"]

EVALUATOR_TYPE = "classification"


def register_synthetic_classification(prefix: str, spec: SyntheticClassificationSpec, root: str = None):
    """Register ``<prefix>_train``, ``_val``, ``_test`` for a spec (generated on first use)."""
    root = root or default_data_root()
    from .synthetic import dataset_dir_for

    dataset_dir = dataset_dir_for(spec, root)
    names = []
    for split in SPLITS:
        name = f"{prefix}_{split}"
        DatasetCatalog.register(name, functools.partial(_load, name))
        MetadataCatalog.get(name).set(
            json_file=os.path.join(dataset_dir, "annotations", f"{split}.json"),
            image_root=dataset_dir + os.sep,
            evaluator_type=EVALUATOR_TYPE,
            class_count_dataset=f"{prefix}_train",
            classification_spec=spec,
            classification_root=root,
        )
        names.append(name)
    return names


#: the OLTR release's list names, per dataset directory
LIST_DATASETS = {
    "imagenet_lt": ("imagenet_lt", "ImageNet_LT_{split}.txt"),
    "places_lt": ("places_lt", "Places_LT_{split}.txt"),
}


def register_list_classification(prefix: str, directory: str, list_pattern: str):
    """Register ``<prefix>_{train,val,test}`` from ``<directory>/<list_pattern>`` lists (``{split}``)."""
    names = []
    for split in SPLITS:
        name = f"{prefix}_{split}"
        DatasetCatalog.register(name, functools.partial(_load, name))
        list_file = os.path.join(directory, list_pattern.format(split=split))
        MetadataCatalog.get(name).set(
            list_file=list_file,
            image_root=directory + os.sep,
            evaluator_type=EVALUATOR_TYPE,
            class_count_dataset=f"{prefix}_train",
        )
        names.append(name)
    return names


#: prefix -> (torchvision directory, train files, test files, label key, classes, n_max)
CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10, 5000),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100, 500),
}
CIFAR_IMBALANCE_FACTORS = (100, 50, 10)


def cifar_lt_counts(num_classes: int, n_max: int, imbalance_factor: float):
    """Training images per class of CIFAR-LT (the LDAM / decoupling code's ``get_img_num_per_cls``)."""
    return [int(n_max * (1.0 / imbalance_factor) ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def register_cifar_lt(prefix: str, kind: str, imbalance_factor: float, root: str):
    """Register ``<prefix>_train`` (long-tailed) and ``<prefix>_test`` (balanced) of CIFAR-10/100."""
    directory = os.path.join(root, CIFAR[kind][0])
    names = []
    for split in ("train", "test"):
        name = f"{prefix}_{split}"
        DatasetCatalog.register(name, functools.partial(_load, name))
        MetadataCatalog.get(name).set(
            cifar=(kind, split, float(imbalance_factor) if split == "train" else None),
            image_root=directory + os.sep,
            evaluator_type=EVALUATOR_TYPE,
            class_count_dataset=f"{prefix}_train",
        )
        names.append(name)
    return names


def _read_cifar_file(path):
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


@functools.lru_cache(maxsize=8)
def cifar_images(path):
    """(N, 32, 32, 3) uint8 RGB images of one torchvision CIFAR file (cached per process)."""
    import numpy as np

    data = _read_cifar_file(path)[b"data"]
    return np.ascontiguousarray(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _cifar_to_json(name, kind, split, imbalance_factor, directory):
    """The COCO-style json of a CIFAR(-LT) split, in the cache; images ``<file>#<index>``."""
    import numpy as np

    sub, train_files, test_files, label_key, num_classes, n_max = CIFAR[kind]
    files = train_files if split == "train" else test_files
    paths = [os.path.join(directory, f) for f in files]
    for path in paths:
        if not os.path.isfile(path):
            raise DatasetError(f"dataset '{name}': {path} not found (torchvision's {sub}; set $DETECTRON2_DATASETS; "
                               f"nothing is downloaded)")
    key = "|".join(f"{os.path.abspath(p)}|{os.stat(p).st_size}|{os.stat(p).st_mtime_ns}" for p in paths)
    key += f"|{split}|{imbalance_factor}"
    json_file = os.path.join(cache_dir(), "classification", hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    if os.path.isfile(json_file):
        return json_file
    entries = []  # (file, index, label) in the files' order
    for f, path in zip(files, paths):
        labels = _read_cifar_file(path)[label_key]
        entries += [(f, i, int(label)) for i, label in enumerate(labels)]
    if imbalance_factor is not None:
        targets = np.array([e[2] for e in entries])
        state = np.random.get_state()
        np.random.seed(0)  # the LDAM code's rand_number
        try:
            keep = []
            for c, count in enumerate(cifar_lt_counts(num_classes, n_max, imbalance_factor)):
                idx = np.where(targets == c)[0]
                np.random.shuffle(idx)
                keep += idx[:count].tolist()
        finally:
            np.random.set_state(state)
        entries = [entries[i] for i in keep]
    images = [{"id": n + 1, "file_name": f"{f}#{i}", "width": 32, "height": 32} for n, (f, i, _) in enumerate(entries)]
    annotations = [{"id": n + 1, "image_id": n + 1, "category_id": label + 1} for n, (_, _, label) in enumerate(entries)]
    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    atomic_write(json_file, lambda fh: json.dump({"images": images, "annotations": annotations,
                                                  "categories": categories}, fh), binary=False)
    return json_file


def _list_to_json(name, list_file):
    """The COCO-style json of a ``<path> <label>`` list, in the cache (written once, atomically)."""
    if not os.path.isfile(list_file):
        raise DatasetError(f"dataset '{name}': split list {list_file} not found (set $DETECTRON2_DATASETS; "
                           f"nothing is downloaded)")
    st = os.stat(list_file)
    key = f"{os.path.abspath(list_file)}|{st.st_size}|{st.st_mtime_ns}"
    json_file = os.path.join(cache_dir(), "classification", hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    if os.path.isfile(json_file):
        return json_file
    images, annotations, labels = [], [], set()
    with open(list_file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                raise DatasetError(f"dataset '{name}': {list_file} line {number}: expected '<path> <label>', got {line.strip()!r}")
            label = int(parts[1])
            labels.add(label)
            images.append({"id": number, "file_name": parts[0]})
            annotations.append({"id": number, "image_id": number, "category_id": label + 1})
    num_classes = max(labels) + 1 if labels else 0
    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    atomic_write(json_file, lambda f: json.dump({"images": images, "annotations": annotations,
                                                 "categories": categories}, f), binary=False)
    return json_file


def prepare_classification_dataset(name: str):
    """Generate (synthetic) or convert (split lists) a classification dataset, then the house's
    :func:`~eqlosses_d2.data.prepare_dataset` (checks, class statistics, ``thing_classes``)."""
    if name not in DatasetCatalog.list():
        raise DatasetError(f"dataset '{name}' is not registered")
    meta = MetadataCatalog.get(name)
    spec = meta.get("classification_spec")
    if spec is not None:
        from .synthetic import ensure_synthetic_classification

        ensure_synthetic_classification(spec, root=meta.classification_root)
    list_file = meta.get("list_file")
    if list_file is not None and meta.get("json_file") is None:
        json_file = _list_to_json(name, list_file)
        if not os.path.isdir(meta.image_root):
            raise DatasetError(f"dataset '{name}': image directory {meta.image_root} not found")
        meta.set(json_file=json_file)
    cifar = meta.get("cifar")
    if cifar is not None and meta.get("json_file") is None:
        meta.set(json_file=_cifar_to_json(name, *cifar, meta.image_root.rstrip(os.sep)))
    return prepare_dataset(name)


def load_classification_json(json_file: str, image_root: str):
    """Records ``{file_name, image_id, label, [height, width]}`` (label: contiguous index of the
    category in sorted-id order, as the class statistics)."""
    with open(json_file) as f:
        data = json.load(f)
    index = {c["id"]: i for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    label_of = {a["image_id"]: index[a["category_id"]] for a in data["annotations"]}
    records = []
    for image in data["images"]:
        record = {"file_name": os.path.join(image_root, image["file_name"]), "image_id": image["id"],
                  "label": label_of[image["id"]]}
        if "#" in image["file_name"]:  # an image of a pickled array (CIFAR): <file>#<index>
            array_file, index = image["file_name"].rsplit("#", 1)
            record["array_file"], record["array_index"] = os.path.join(image_root, array_file), int(index)
        if "height" in image:
            record["height"], record["width"] = image["height"], image["width"]
        records.append(record)
    return records


def _load(name):
    meta = prepare_classification_dataset(name)
    return load_classification_json(meta.json_file, meta.image_root)


def _register_all():
    register_synthetic_classification("synthetic_cls_lt", QUICKSTART_CLS_SPEC)
    register_synthetic_classification("synthetic_cls_lt_tiny", TINY_CLS_SPEC)
    root = os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    for prefix, (directory, pattern) in LIST_DATASETS.items():
        register_list_classification(prefix, os.path.join(root, directory), pattern)
    for kind in CIFAR:
        for factor in CIFAR_IMBALANCE_FACTORS:
            prefix = f"{kind}_lt" if factor == 100 else f"{kind}_lt_if{factor}"
            register_cifar_lt(prefix, kind, factor, root)


_register_all()
