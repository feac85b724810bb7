"""
LVIS ground truth as lvis-api 0.5.3 evaluates it, prepared once.

Ground-truth rules (the numbering follows :mod:`.rules`, which applies the results' side):

2. Zero area: lvis-api's ``get_ann_ids(cat_ids=...)`` keeps only annotations with
   ``0 < area < inf`` (the json ``area`` field); hotcoco keeps them all, so they are
   dropped here. A dropped ground truth no longer makes its category "present" in the
   image (so detections of it there are ignored unless it is in the negative list).
3. Ground truth whose ``category_id`` is not in ``categories`` is ignored.
4. lvis-api ignores ``iscrowd`` (all ground truth is matched as non-crowd); hotcoco
   honours it, so it is set to 0 on our copy. lvis-api honours a ground-truth ``ignore``
   flag, which hotcoco does not; and lvis-api records a match by the ground truth's
   ``id``, so a detection matched to an annotation with id 0 counts as a false positive
   there (hotcoco counts it as a true positive). If any kept ground truth has a truthy
   ``ignore`` or the id 0, :attr:`LVISGroundTruth.lvis_api_reason` says so and the
   evaluation falls back to lvis-api (:mod:`.lvis_api_backend`; LVIS json files have
   neither).
8. The caller's dataset is never modified (lvis-api adds ``ignore``/``_ignore`` and RLEs
   to ground truth): this holds its own copies of the kept annotations.
"""
import logging
import os
from typing import List, Optional

from .json_io import gc_paused, load_json
from .params import FREQUENCY_LABELS

__all__ = ["LVISGroundTruth", "load_dataset"]


def load_dataset(lvis_gt) -> dict:
    """The LVIS dataset dict of a json path, a loaded dict, or an object with a
    ``.dataset`` dict (``lvis.LVIS``, ``hotcoco.COCO``, pycocotools' ``COCO``)."""
    if isinstance(lvis_gt, (str, os.PathLike)):
        return load_json(lvis_gt)
    if isinstance(lvis_gt, dict):
        return lvis_gt
    dataset = getattr(lvis_gt, "dataset", None)
    if isinstance(dataset, dict):
        return dataset
    raise TypeError(f"Unsupported LVIS ground truth of type {type(lvis_gt).__name__}")


class LVISGroundTruth:
    """
    LVIS ground truth prepared once for :func:`~.evaluate.evaluate_lvis` (pass it instead
    of a path or dict to evaluate several tasks or result sets without re-preparing).

    Holds its own copies of the kept annotations (``0 < area < inf``, known category,
    ``iscrowd`` 0); the caller's dataset is not modified.
    """

    def __init__(self, lvis_gt):
        dataset = load_dataset(lvis_gt)
        self.categories: List[dict] = sorted(dataset["categories"], key=lambda c: c["id"])
        self.cat_ids: List[int] = [c["id"] for c in self.categories]
        self.images: List[dict] = list(dataset["images"])
        self.img_ids = {img["id"] for img in self.images}
        known = set(self.cat_ids)
        with gc_paused():
            self.annotations: List[dict] = [
                dict(ann, iscrowd=0)
                for ann in dataset["annotations"]
                if ann["category_id"] in known and 0 < ann["area"] < float("inf")
            ]
        # lvis-api honours a ground-truth "ignore" flag; hotcoco does not (rule 4).
        self.has_ignore_flags = any(ann.get("ignore") for ann in self.annotations)
        # lvis-api never counts a match to an annotation with id 0 (rule 4).
        self.zero_id_annotation = next((ann for ann in self.annotations if ann.get("id") == 0), None)
        # lvis-api's LVISEval._prepare_freq_group: indices into the sorted cat_ids.
        self.freq_groups: List[List[int]] = [[] for _ in FREQUENCY_LABELS]
        for idx, cat in enumerate(self.categories):
            self.freq_groups[FREQUENCY_LABELS.index(cat["frequency"])].append(idx)
        self._hotcoco_gt = None

    @property
    def lvis_api_reason(self) -> Optional[str]:
        """Why only lvis-api evaluates this ground truth exactly (rule 4), or None."""
        if self.has_ignore_flags:
            return "'ignore' flags, which hotcoco does not honour"
        if self.zero_id_annotation is not None:
            ann = self.zero_id_annotation
            return (
                f"an annotation with id 0 (image_id {ann['image_id']}, category_id {ann['category_id']}), "
                "to which lvis-api never counts a match (its detection is a false positive) and hotcoco does"
            )
        return None

    def dataset(self) -> dict:
        """The kept ground truth as an LVIS dataset dict (shares this object's lists)."""
        return {"images": self.images, "categories": self.categories, "annotations": self.annotations}

    def hotcoco(self):
        """The ground truth as a ``hotcoco.COCO`` (built on first use)."""
        if self._hotcoco_gt is None:
            import hotcoco

            self._hotcoco_gt = hotcoco.COCO(self.dataset())
        return self._hotcoco_gt

    def lvis_api(self):
        """The ground truth as an ``lvis.LVIS`` owning copies of the annotation dicts
        (lvis-api writes into them)."""
        from lvis import LVIS

        gt = LVIS.__new__(LVIS)  # LVIS() only reads from a path
        gt.logger = logging.getLogger("lvis.lvis")
        gt.dataset = {
            "images": self.images,
            "categories": self.categories,
            "annotations": [dict(ann) for ann in self.annotations],
        }
        gt._create_index()
        return gt
