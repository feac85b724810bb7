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
dict per mask result; only the keys it reads) and lvis-api (the ``ignore``-flag and
annotation-id-0 fallback, Boundary AP).

Fixed AP keeps no image's results but each category's best K so far
(:class:`CategoryPools`), in the same arrays: about 60 bytes per result plus its RLE string
(a Python ``str`` of 49 bytes plus one byte per character), where a result dict held
about 1.4 KB.
"""
import json
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

__all__ = ["CategoryPools", "ResultArrays", "compact_instances"]

#: detections converted to dicts (and json) at a time when writing the results file
_JSON_CHUNK = 10000
#: masks moved to the CPU and RLE-encoded at a time (a chunk costs 3 bytes per pixel per mask)
_ENCODE_CHUNK = 64


def compact_instances(instances, image_id) -> dict:
    """
    One image's results (Detectron2 ``Instances``, ``pred_boxes`` XYXY, on any device) as
    Detectron2's ``instances_to_coco_json`` would give them, in arrays: ``boxes`` (K, 4)
    float32 XYWH, ``scores`` (K,) float32, ``classes`` (K,) int64 (contiguous ids), and
    with masks ``rles``: their RLE ``counts`` strings (pycocotools', as Detectron2
    encodes them) and ``mask_size`` (h, w). A plain dict, so that it pickles compactly and
    loads without this package. The pasted masks (K, h, w) are copied to the CPU and
    encoded :data:`_ENCODE_CHUNK` at a time, so the copies stay bounded for any K.
    """
    import pycocotools.mask as mask_util
    from detectron2.structures import BoxMode

    boxes = instances.pred_boxes.tensor.detach().cpu().numpy()
    record = {
        "image_id": image_id,
        "boxes": BoxMode.convert(boxes, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS).astype(np.float32, copy=False),
        "scores": instances.scores.detach().cpu().numpy().astype(np.float32, copy=False),
        "classes": instances.pred_classes.cpu().numpy().astype(np.int64, copy=False),
    }
    if instances.has("pred_masks"):
        masks = instances.pred_masks
        height, width = (int(s) for s in masks.shape[1:]) if len(masks) else instances.image_size
        rles = []
        for start in range(0, len(masks), _ENCODE_CHUNK):
            # the same RLEs as Detectron2's one call per mask
            part = masks[start : start + _ENCODE_CHUNK].cpu()
            stacked = np.asfortranarray(part.permute(1, 2, 0).numpy().astype(np.uint8))
            rles += [rle["counts"].decode("utf-8") for rle in mask_util.encode(stacked)]
        record["rles"] = rles
        record["mask_size"] = (height, width)
    return record


def _rle_counts(result, index):
    """The RLE ``counts`` string of a result dict's ``segmentation``; a clear error for
    anything else (a polygon, an uncompressed RLE), which LVIS results cannot hold."""
    segmentation = result.get("segmentation")
    counts = segmentation.get("counts") if isinstance(segmentation, dict) else None
    if isinstance(counts, bytes):
        counts = counts.decode("utf-8")
    if not isinstance(counts, str) or "size" not in segmentation:
        kind = (
            "missing" if segmentation is None
            else "a polygon list" if isinstance(segmentation, list)
            else f"a {type(segmentation).__name__} without a compressed RLE 'size' and string 'counts'"
        )  # fmt: skip
        raise ValueError(
            f"segm result {index} (image_id {result.get('image_id')}, category_id {result.get('category_id')}): "
            f"'segmentation' is {kind}; LVIS mask results must be compressed RLEs "
            "({'size': [h, w], 'counts': str}, pycocotools.mask.encode)"
        )
    return counts


def check_mask_results(results):
    """Raise one clear error at the first result whose ``segmentation`` is not a compressed RLE."""
    for index, result in enumerate(results):
        _rle_counts(result, index)


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
            return cls.empty()
        counts = [len(r["scores"]) for r in records]
        has_masks = all("rles" in r for r in records)
        classes = np.concatenate([r["classes"] for r in records])
        if dataset_category_ids is None:
            category_ids = classes + 1
        else:
            category_ids = np.asarray(dataset_category_ids, dtype=np.int64)[classes]

        def per_result(record, key, scalar_key, count):  # an image's scalar, or a pooled record's array
            if key in record:
                return np.asarray(record[key], np.int64)
            return np.repeat(np.array([record[scalar_key]], np.int64), count, 0)

        return cls(
            image_ids=np.concatenate([per_result(r, "image_ids", "image_id", n) for r, n in zip(records, counts)]),
            category_ids=category_ids,
            boxes=np.concatenate([r["boxes"] for r in records]).reshape(-1, 4),
            scores=np.concatenate([r["scores"] for r in records]),
            rles=[rle for r in records for rle in r["rles"]] if has_masks else None,
            mask_sizes=np.concatenate([per_result(r, "mask_sizes", "mask_size", n) for r, n in zip(records, counts)])
            .reshape(-1, 2)
            if has_masks
            else None,
        )

    @classmethod
    def empty(cls, has_masks=False) -> "ResultArrays":
        empty = np.zeros(0, dtype=np.int64)
        return cls(
            empty, empty.copy(), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
            [] if has_masks else None, np.zeros((0, 2), np.int64) if has_masks else None,
        )  # fmt: skip

    @classmethod
    def concatenate(cls, parts) -> "ResultArrays":
        """The results of ``parts`` one after the other (all with masks or none)."""
        parts = list(parts)
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        has_masks = parts[0].has_masks
        return cls(
            np.concatenate([p.image_ids for p in parts]),
            np.concatenate([p.category_ids for p in parts]),
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.scores for p in parts]),
            [rle for p in parts for rle in p.rles] if has_masks else None,
            np.concatenate([p.mask_sizes for p in parts]) if has_masks else None,
        )

    def to_record(self) -> dict:
        """A pooled :func:`compact_instances`-style record of these results (per-result
        ``image_ids`` and ``mask_sizes``; ``classes`` = ``category_ids``), which
        :meth:`from_records` reads back: plain numpy arrays and strings."""
        record = {"image_ids": self.image_ids, "boxes": self.boxes, "scores": self.scores, "classes": self.category_ids}
        if self.has_masks:
            record["rles"] = self.rles
            record["mask_sizes"] = self.mask_sizes
        return record

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
            rles=[_rle_counts(d, i) for i, d in enumerate(results)] if has_masks else None,
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

    def top_per_category(self, k: int) -> np.ndarray:
        """
        Fixed AP's cut on arrays (:func:`~.fixed_ap.top_detections_per_category`):
        the indices of each category's ``k`` highest-scoring results, categories in order of
        first appearance, best first, ties in results order.
        """
        if k <= 0:
            raise ValueError(f"detections per category must be > 0, got {k}")
        num = len(self)
        _, first, inverse = np.unique(self.category_ids, return_index=True, return_inverse=True)
        group = np.argsort(np.argsort(first, kind="stable"), kind="stable")[inverse.reshape(-1)]
        order = np.lexsort((np.arange(num), -self.scores.astype(np.float64), group))
        grouped = group[order]
        rank = np.arange(num) - np.searchsorted(grouped, grouped, side="left")
        return order[rank < k]

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


#: a category pool's parts joined into one array set after this many additions
_MAX_PARTS = 8


class CategoryPools:
    """
    Fixed AP's per-category pools: each category's ``k`` best results so far, as
    :class:`ResultArrays` whose ``category_ids`` hold the contiguous class (0..C-1).

    :meth:`add` appends one image's results to the pools of their classes; a pool that
    then holds ``2k`` results or more is cut back to its ``k`` best (a stable sort by
    score: ties keep the order they arrived in), so after every :meth:`add` a pool holds
    at most ``2k - 1`` results. ``floor[c]`` is the ``k``-th best score of class ``c`` at
    its last cut (-inf before), which only rises: a later result scored below it can
    never enter the class's top ``k``. :meth:`results` gives each class's top ``k``.
    Exact: the kept results and their order among equal scores are those of one stable
    sort of everything added.
    """

    def __init__(self, k: int, num_classes: int):
        if k <= 0:
            raise ValueError(f"max_dets_per_category must be > 0, got {k}")
        self.k = k
        self.floor = np.full(num_classes, -np.inf, dtype=np.float32)
        self._parts = {}  # class -> [ResultArrays]
        self._counts = {}  # class -> results held

    def add(self, results: ResultArrays) -> bool:
        """Pool ``results`` (``category_ids``: contiguous classes); True if a floor rose."""
        if not len(results):
            return False
        order = np.argsort(results.category_ids, kind="stable")
        present, starts = np.unique(results.category_ids[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        raised = False
        for cls_id, start, end in zip(present.tolist(), starts.tolist(), ends.tolist()):
            parts = self._parts.setdefault(cls_id, [])
            parts.append(results.take(order[start:end]))
            self._counts[cls_id] = self._counts.get(cls_id, 0) + end - start
            if self._counts[cls_id] >= 2 * self.k or len(parts) >= _MAX_PARTS:
                raised |= self._compact(cls_id)
        return raised

    def _compact(self, cls_id) -> bool:
        """Join a class's parts; cut them to the best ``k`` when there are more."""
        pool = ResultArrays.concatenate(self._parts[cls_id])
        cut = len(pool) > self.k
        if cut:
            pool = pool.take(np.argsort(-pool.scores, kind="stable")[: self.k])
            self.floor[cls_id] = pool.scores[-1]
        self._parts[cls_id], self._counts[cls_id] = [pool], len(pool)
        return cut

    def held(self) -> dict:
        """``{class: number of results held}``."""
        return dict(self._counts)

    def results(self) -> ResultArrays:
        """Every class's best ``k`` (classes in order of their first result), which is all
        a process needs to send for the dataset-wide top ``k``."""
        for cls_id in self._parts:
            self._compact(cls_id)
        return ResultArrays.concatenate([self._parts[c][0] for c in self._parts])
