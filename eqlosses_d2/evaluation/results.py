"""
LVIS results kept as arrays instead of one dict per detection.

Detectron2's ``LVISEvaluator`` turns every image's ``Instances`` into a list of COCO-style
dicts (``instances_to_coco_json``), gathers every process's lists on the main process,
pickles them all into ``instances_predictions.pth`` and ``json.dumps`` them all into one
string for ``lvis_instances_results.json``: at LVIS size (19,809 val images x 300 results)
that is about 6 million dicts, each several hundred bytes, held more than once on one
process. Here each image's results are a few numpy arrays (``compact_instances``):
boxes, scores and classes at 4 bytes a number, and the masks as their RLE strings, the
only per-detection objects left. The main process concatenates the gathered images into
one :class:`ResultArrays` (references to the same RLE strings), which the LVIS
evaluation reads directly (boxes go to hotcoco as one ``(N, 7)`` array), and which writes
``lvis_instances_results.json`` in chunks, byte for byte what Detectron2 writes.

Dicts are made only where a consumer needs them: the masks' evaluation (hotcoco reads one
dict per mask result; only the keys it reads), lvis-api (the ``ignore``-flag fallback,
Boundary AP) and Fixed AP's per-category pools.
"""
import json
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

__all__ = ["ResultArrays", "compact_instances"]

#: detections converted to dicts (and json) at a time when writing the results file
_JSON_CHUNK = 10000


def compact_instances(instances, image_id) -> dict:
    """
    One image's results (Detectron2 ``Instances`` on the CPU, ``pred_boxes`` XYXY) as
    Detectron2's ``instances_to_coco_json`` would give them, in arrays: ``boxes`` (K, 4)
    float32 XYWH, ``scores`` (K,) float32, ``classes`` (K,) int64 (contiguous ids), and
    with masks ``rles``: their RLE ``counts`` strings (pycocotools', as Detectron2
    encodes them) and ``mask_size`` (h, w). A plain dict, so that it pickles compactly and
    loads without this package.
    """
    import pycocotools.mask as mask_util
    from detectron2.structures import BoxMode

    boxes = instances.pred_boxes.tensor.numpy()
    record = {
        "image_id": image_id,
        "boxes": BoxMode.convert(boxes, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS).astype(np.float32, copy=False),
        "scores": instances.scores.numpy().astype(np.float32, copy=False),
        "classes": instances.pred_classes.numpy().astype(np.int64, copy=False),
    }
    if instances.has("pred_masks"):
        masks = instances.pred_masks
        height, width = (int(s) for s in masks.shape[1:]) if len(masks) else instances.image_size
        rles = []
        if len(masks):
            # all masks in one call; the same RLEs as Detectron2's one call per mask
            stacked = np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8))
            rles = [rle["counts"].decode("utf-8") for rle in mask_util.encode(stacked)]
        record["rles"] = rles
        record["mask_size"] = (height, width)
    return record


@dataclass
class ResultArrays:
    """
    Results of a whole dataset in arrays, in results order: ``image_ids``,
    ``category_ids`` (dataset ids), ``boxes`` (N, 4) float32 XYWH, ``scores`` float32,
    and, for mask results, ``rles`` (N RLE ``counts`` strings) with ``mask_sizes`` (N, 2).
    """

    image_ids: np.ndarray
    category_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    rles: Optional[List[str]] = None
    mask_sizes: Optional[np.ndarray] = None

    def __len__(self):
        return len(self.scores)

    @property
    def has_masks(self) -> bool:
        return self.rles is not None

    @classmethod
    def from_records(cls, records, dataset_category_ids=None) -> "ResultArrays":
        """
        Concatenate :func:`compact_instances` records (images in the given order),
        mapping contiguous class k to the dataset id ``dataset_category_ids[k]`` (None:
        k + 1, LVIS's ids). Mask results are kept when every image with results has
        them (Detectron2's models give all or none).
        """
        records = [r for r in records if len(r["scores"])]
        if not records:
            empty = np.zeros(0, dtype=np.int64)
            return cls(empty, empty.copy(), np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
        counts = [len(r["scores"]) for r in records]
        has_masks = all("rles" in r for r in records)
        classes = np.concatenate([r["classes"] for r in records])
        if dataset_category_ids is None:
            category_ids = classes + 1
        else:
            category_ids = np.asarray(dataset_category_ids, dtype=np.int64)[classes]
        return cls(
            image_ids=np.repeat(np.array([r["image_id"] for r in records], dtype=np.int64), counts),
            category_ids=category_ids,
            boxes=np.concatenate([r["boxes"] for r in records]).reshape(-1, 4),
            scores=np.concatenate([r["scores"] for r in records]),
            rles=[rle for r in records for rle in r["rles"]] if has_masks else None,
            mask_sizes=np.repeat(np.array([r["mask_size"] for r in records], np.int64), counts, axis=0)
            if has_masks
            else None,
        )

    @classmethod
    def from_dicts(cls, results) -> "ResultArrays":
        """The arrays of a list of LVIS result dicts that all have ``bbox`` (and all or
        none an RLE ``segmentation`` with string counts)."""
        has_masks = bool(results) and all("segmentation" in d for d in results)
        return cls(
            image_ids=np.array([d["image_id"] for d in results], dtype=np.int64),
            category_ids=np.array([d["category_id"] for d in results], dtype=np.int64),
            boxes=np.array([d["bbox"] for d in results], dtype=np.float32).reshape(-1, 4),
            scores=np.array([d["score"] for d in results], dtype=np.float32),
            rles=[d["segmentation"]["counts"] for d in results] if has_masks else None,
            mask_sizes=np.array([d["segmentation"]["size"] for d in results], np.int64).reshape(-1, 2)
            if has_masks
            else None,
        )

    def take(self, index: np.ndarray) -> "ResultArrays":
        """The results at ``index`` (an integer array), in that order."""
        return ResultArrays(
            self.image_ids[index],
            self.category_ids[index],
            self.boxes[index],
            self.scores[index],
            [self.rles[i] for i in index.tolist()] if self.has_masks else None,
            self.mask_sizes[index] if self.has_masks else None,
        )

    def segmentations(self, index=None):
        """RLE dicts (``size``, ``counts``) of the results at ``index`` (default: all)."""
        index = range(len(self)) if index is None else index.tolist()
        sizes = self.mask_sizes.tolist()
        return [{"size": sizes[i], "counts": self.rles[i]} for i in index]

    def to_dicts(self, start: int = 0, stop: Optional[int] = None) -> list:
        """Detectron2's result dicts (``instances_to_coco_json`` with dataset category ids)
        of results ``start:stop``: the same keys, order and values."""
        stop = len(self) if stop is None else min(stop, len(self))
        image_ids = self.image_ids[start:stop].tolist()
        category_ids = self.category_ids[start:stop].tolist()
        boxes = self.boxes[start:stop].tolist()
        scores = self.scores[start:stop].tolist()
        out = [
            {"image_id": i, "category_id": c, "bbox": b, "score": s}
            for i, c, b, s in zip(image_ids, category_ids, boxes, scores)
        ]
        if self.has_masks:
            sizes = self.mask_sizes[start:stop].tolist()
            for d, size, counts in zip(out, sizes, self.rles[start:stop]):
                d["segmentation"] = {"size": size, "counts": counts}
        return out

    def write_json(self, f):
        """Write the results as ``json.dumps(self.to_dicts())`` would, in chunks."""
        f.write("[")
        for start in range(0, len(self), _JSON_CHUNK):
            text = json.dumps(self.to_dicts(start, start + _JSON_CHUNK))
            f.write(("" if start == 0 else ", ") + text[1:-1])
        f.write("]")
