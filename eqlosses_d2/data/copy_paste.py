"""
Simple Copy-Paste with large-scale jitter, as a Detectron2 dataset mapper.

Ghiasi et al., "Simple Copy-Paste is a Strong Data Augmentation Method for Instance
Segmentation", CVPR 2021. Each training image (the *target*) and a second training image
(the *source*) get their own large-scale jitter: a horizontal flip with probability
``hflip_prob``, a resize that fits the image into a square of side ``s * image_size``
with ``s ~ U(min_scale, max_scale)`` (the paper: 0.1 .. 2.0), a random crop to at most
``image_size`` and padding (right/bottom, value 128 as Detectron2's ``FixedSizeCrop``) to
exactly ``image_size``. A random subset of the source's objects (k uniform in
``1 .. min(n, max_pasted)``, then a uniform k-subset) is pasted on top:

    image  = α · source + (1 − α) · target,   α = union of the pasted masks
    target mask_i ← mask_i ∧ ¬α,   box_i ← tight box of mask_i

A target object the paste covers partly is dropped when what stays visible is under
``min_visible_pixels`` pixels or ``min_visible_fraction`` of its own pixels (the paper
drops the fully covered ones; an object the paste does not touch is never dropped). The
pasted objects keep their masks and classes, their boxes are their masks' tight boxes,
and so are every other object's. Masks are ``BitMasks`` after the mapper, whether the
json has polygons or RLE. ``prob`` is the probability that an image gets a paste at all
(1 in the paper); without one the output is the jittered target alone (LSJ only).

Paste sources (``source_sampling``): ``"uniform"`` over the training images with at least
one object; ``"repeat_factor"``: ∝ the image's LVIS repeat factor r(I) = max over its
classes of max(1, sqrt(t / f(c))) (Detectron2's ``RepeatFactorTrainingSampler``
formula, ``t = source_repeat_threshold``); ``"class_balanced"``: a class drawn uniformly
among the classes present, then an image containing it uniformly, i.e. P(I) ∝ Σ_{c ∈ I}
1 / n_c with n_c the images of class c. The last two favour rare classes. (The sampler
of the *target* images is Detectron2's: ``DATALOADER.SAMPLER_TRAIN``, e.g. RFS.)

LVIS federated lists (``neg_category_ids``, ``not_exhaustive_category_ids``, in the json's
category ids as Detectron2's ``load_lvis_json`` keeps them). After the paste the visible
pixels are the target's uncovered pixels and the pasted masks' pixels. What we know:

- a category the target lists as negative is absent from all of the target, so from its
  uncovered part: it stays negative unless an instance of it is in the result (pasted);
- the pasted pixels are exactly the pasted objects' masks, so they show only the pasted
  categories. The source's own negatives (absent from the whole source) therefore add no
  knowledge about the result's target pixels, where those categories may be present:
  they are not carried over;
- the target's not-exhaustive categories may have unannotated instances in its uncovered
  part: they stay not exhaustive (also when all their annotated instances were covered);
- the source's not-exhaustive categories: their unannotated instances lie outside the
  pasted (annotated) masks, so nothing unannotated is pasted: not carried over.

So ``neg = target neg − categories present in the result`` and ``not_exhaustive = target
not_exhaustive``: lists are only ever shrunk, never grown (a category whose instances
were all covered or cropped away is not made negative: slivers of it may remain). Both
lists keep the target's order. Training does not read them today (Detectron2's
``DatasetMapper`` passes them through in the dict, and so does this mapper, so a loss
that wants them per image gets consistent ones); the evaluation reads them from the val
json. ``height``/``width`` of the output dict are the canvas size (``image_size``), so
every image falls into one aspect-ratio group.

Random draws: all from a ``numpy.random.Generator`` of the mapper, in this order per
sample: target flip, scale, crop offsets; paste or not; source index; source flip, scale,
crop offsets; k; the subset. With ``seed=None`` (the config's choice) each sample's
generator is seeded by one draw from numpy's global RNG, which Detectron2 seeds per
data-loader worker from ``SEED`` and which ``eqlosses_d2.resume.RandomStates``
checkpoints, so runs are reproducible and ``--resume`` is exact with ``NUM_WORKERS 0``, as
with Detectron2's own augmentations. With an integer ``seed`` the mapper owns one
generator per process, seeded by ``(seed, data-loader worker id)``.

Libraries: the geometry is Detectron2's / fvcore's transforms (``HFlipTransform``,
``ResizeTransform``, ``CropTransform``, ``PadTransform``), applied to the polygon vertices
and RLE masks (nearest); the image's resize and crop are one PIL ``Image.resize(box=...)``
of the region the crop keeps (bilinear; within 1 grey level of Detectron2's
resize-then-crop, at the output's cost rather than the enlarged image's). Polygons are
rasterized once, at the output geometry and inside their box, by pycocotools
(``polygons_to_bitmask``, which also clips what the crop cut off); RLE is decoded by
``pycocotools.mask``; boxes are the masks' tight boxes (``BitMasks.get_bounding_boxes``'
convention, computed inside each object's box); the rest is numpy.

Differences from the paper: no Gaussian blending of the pasted edges (the paper found it
unnecessary); the source is drawn from the whole training set, so it can be the target
image itself (at another jitter).
"""
import logging
from collections import Counter
from typing import Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image

from detectron2.config import configurable
from detectron2.data import MetadataCatalog, get_detection_dataset_dicts
from detectron2.data import detection_utils as utils
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.data.transforms import (
    CropTransform,
    HFlipTransform,
    NoOpTransform,
    PadTransform,
    ResizeTransform,
    TransformList,
)
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.structures.masks import polygons_to_bitmask

from ..config import CONFIG_CHECK_REGISTRY, ConfigError

__all__ = [
    "CopyPasteDatasetMapper",
    "SOURCE_SAMPLINGS",
    "validate_copy_paste",
    "merge_lvis_id_lists",
    "paste_source_weights",
    "uses_copy_paste_mapper",
]

logger = logging.getLogger(__name__)

#: the paste-source samplings (``INPUT.EQLOSSES.COPY_PASTE.SOURCE_SAMPLING``)
SOURCE_SAMPLINGS = ("uniform", "repeat_factor", "class_balanced")


@CONFIG_CHECK_REGISTRY.register()
def validate_copy_paste(cfg):
    """One-line errors for INPUT.EQLOSSES.LSJ / COPY_PASTE (values, and what they need); a
    registered config check (also ``eqlosses_d2.config.validate_copy_paste``)."""
    node = cfg.INPUT.get("EQLOSSES")
    if node is None:
        return
    lsj, paste = node.LSJ, node.COPY_PASTE
    checks = [
        ("LSJ.IMAGE_SIZE", lsj.IMAGE_SIZE, lsj.IMAGE_SIZE > 0, "must be > 0"),
        ("LSJ.MIN_SCALE", lsj.MIN_SCALE, lsj.MIN_SCALE > 0, "must be > 0"),
        ("LSJ.MAX_SCALE", lsj.MAX_SCALE, lsj.MAX_SCALE >= lsj.MIN_SCALE, f"must be >= LSJ.MIN_SCALE ({lsj.MIN_SCALE})"),
        ("LSJ.HFLIP_PROB", lsj.HFLIP_PROB, 0 <= lsj.HFLIP_PROB <= 1, "must be in [0, 1]"),
        ("COPY_PASTE.PROB", paste.PROB, 0 <= paste.PROB <= 1, "must be in [0, 1]"),
        ("COPY_PASTE.MAX_OBJECTS", paste.MAX_OBJECTS, paste.MAX_OBJECTS >= 0, "must be >= 0 (0: no limit)"),
        ("COPY_PASTE.SOURCE_SAMPLING", paste.SOURCE_SAMPLING, paste.SOURCE_SAMPLING in SOURCE_SAMPLINGS,
         f"must be one of {', '.join(SOURCE_SAMPLINGS)}"),
        ("COPY_PASTE.SOURCE_REPEAT_THRESHOLD", paste.SOURCE_REPEAT_THRESHOLD, paste.SOURCE_REPEAT_THRESHOLD > 0,
         "must be > 0"),
        ("COPY_PASTE.MIN_VISIBLE_PIXELS", paste.MIN_VISIBLE_PIXELS, paste.MIN_VISIBLE_PIXELS >= 0, "must be >= 0"),
        ("COPY_PASTE.MIN_VISIBLE_FRACTION", paste.MIN_VISIBLE_FRACTION, 0 <= paste.MIN_VISIBLE_FRACTION <= 1,
         "must be in [0, 1]"),
    ]
    for key, value, ok, rule in checks:
        if not ok:
            raise ConfigError(f"INPUT.EQLOSSES.{key} {rule}; got {value!r}")
    if paste.ENABLED and not lsj.ENABLED:
        raise ConfigError("INPUT.EQLOSSES.COPY_PASTE.ENABLED needs INPUT.EQLOSSES.LSJ.ENABLED (the mapper that pastes)")
    if lsj.ENABLED and cfg.MODEL.KEYPOINT_ON:
        raise ConfigError("INPUT.EQLOSSES.LSJ.ENABLED: the copy-paste mapper has no keypoints (MODEL.KEYPOINT_ON)")
    if lsj.ENABLED and cfg.MODEL.LOAD_PROPOSALS:
        raise ConfigError("INPUT.EQLOSSES.LSJ.ENABLED: the copy-paste mapper loads no proposals (MODEL.LOAD_PROPOSALS)")


#: padding value of the canvas (Detectron2's ``FixedSizeCrop`` default)
PAD_VALUE = 128.0


def uses_copy_paste_mapper(cfg) -> bool:
    """Whether ``cfg`` trains with :class:`CopyPasteDatasetMapper` (``INPUT.EQLOSSES.LSJ.ENABLED``)."""
    node = cfg.INPUT.get("EQLOSSES")
    return bool(node is not None and node.LSJ.ENABLED)


def _pasteable(annotation) -> bool:
    return annotation.get("iscrowd", 0) == 0 and bool(annotation.get("segmentation"))


def paste_source_weights(dataset_dicts, sampling: str = "uniform", repeat_threshold: float = 0.001) -> np.ndarray:
    """
    Per-image paste-source weights (float64, unnormalized) for ``sampling`` (one of
    :data:`SOURCE_SAMPLINGS`); 0 for an image with no object that can be pasted (no
    non-crowd annotation with a segmentation).
    """
    if sampling not in SOURCE_SAMPLINGS:
        raise ValueError(f"SOURCE_SAMPLING must be one of {', '.join(SOURCE_SAMPLINGS)}; got '{sampling}'")
    classes = [{a["category_id"] for a in d.get("annotations", []) if _pasteable(a)} for d in dataset_dicts]
    has_objects = np.array([len(c) > 0 for c in classes], dtype=np.float64)
    if sampling == "uniform":
        return has_objects
    if sampling == "repeat_factor":
        if repeat_threshold <= 0:
            raise ValueError(f"SOURCE_REPEAT_THRESHOLD must be > 0 for 'repeat_factor'; got {repeat_threshold}")
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            [{"annotations": [{"category_id": c} for c in cats]} for cats in classes], repeat_threshold
        )
        return np.asarray(factors, dtype=np.float64) * has_objects
    image_count = Counter(c for cats in classes for c in cats)
    return np.array([sum(1.0 / image_count[c] for c in cats) for cats in classes], dtype=np.float64)


def merge_lvis_id_lists(neg_category_ids, not_exhaustive_category_ids, present_category_ids):
    """
    The LVIS lists of a pasted result (rule in the module docstring): the target's
    negatives without the categories present in the result, and the target's
    not-exhaustive categories. Ids are the json's; order is the target's.
    """
    present = set(present_category_ids)
    return [c for c in neg_category_ids if c not in present], list(not_exhaustive_category_ids)


def _tight_box(mask):
    """(x0, y0, x1, y1) of a bool mask's pixels (x1, y1 exclusive, as
    ``BitMasks.get_bounding_boxes``), or None if it is empty."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if len(cols) == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.int64)


class _Sample:
    """One image after its jitter: HWC image, (N, H, W) bool masks, (N,) classes and
    (N, 4) int boxes, the masks' tight boxes."""

    __slots__ = ("image", "masks", "classes", "boxes")

    def __init__(self, image, masks, classes, boxes):
        self.image, self.masks, self.classes, self.boxes = image, masks, classes, boxes


class CopyPasteDatasetMapper:
    """
    Training mapper: large-scale jitter of each image and Simple Copy-Paste of another
    training image's objects (module docstring). Output: Detectron2's ``DatasetMapper``
    format (``image`` CHW uint8 tensor, ``instances`` with ``gt_boxes``, ``gt_classes``,
    ``gt_masks`` as ``BitMasks``), plus ``copy_paste_source_id`` (the source's
    ``image_id``, or None), ``copy_paste_num_pasted`` (the pasted objects are the last
    instances) and the merged LVIS lists.
    """

    @configurable
    def __init__(
        self,
        *,
        dataset: Sequence[dict],
        image_format: str = "BGR",
        image_size: int = 1024,
        min_scale: float = 0.1,
        max_scale: float = 2.0,
        hflip_prob: float = 0.5,
        copy_paste: bool = True,
        paste_prob: float = 1.0,
        max_pasted: int = 0,
        source_weights: Optional[Sequence[float]] = None,
        min_visible_pixels: int = 10,
        min_visible_fraction: float = 0.01,
        use_instance_mask: bool = True,
        category_id_to_dataset_id=None,
        seed: Optional[int] = None,
    ):
        """
        Args:
            dataset: the training dataset dicts the paste sources are drawn from (a list is
                serialized into a ``DatasetFromList``, available as ``self.dataset``).
            image_format: as ``INPUT.FORMAT``.
            image_size: side of the square output canvas.
            min_scale, max_scale: jitter scale range, relative to ``image_size``.
            hflip_prob: probability of a horizontal flip, per image.
            copy_paste: paste (True) or jitter only (False).
            paste_prob: probability that an image gets a paste.
            max_pasted: most objects pasted per image (0: no limit).
            source_weights: per-image source weights (:func:`paste_source_weights`);
                None: uniform over all images.
            min_visible_pixels, min_visible_fraction: a partly covered target object is
                dropped below either.
            use_instance_mask: put ``gt_masks`` into the instances.
            category_id_to_dataset_id: contiguous class -> json category id (for the LVIS
                lists); None: ``id + 1`` (Detectron2's ``load_lvis_json``).
            seed: None: each sample seeded from numpy's global RNG; an int: one generator
                per process, seeded by (seed, worker id).
        """
        if image_size <= 0:
            raise ValueError(f"image_size must be > 0, got {image_size}")
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        if not 0.0 <= hflip_prob <= 1.0 or not 0.0 <= paste_prob <= 1.0:
            raise ValueError(f"probabilities must be in [0, 1], got hflip {hflip_prob}, paste {paste_prob}")
        if max_pasted < 0 or min_visible_pixels < 0 or not 0.0 <= min_visible_fraction <= 1.0:
            raise ValueError("max_pasted and min_visible_pixels must be >= 0, min_visible_fraction in [0, 1]")
        serialize = isinstance(dataset, list) and len(dataset) > 0
        self.dataset = DatasetFromList(dataset, copy=False, serialize=True) if serialize else dataset
        self.image_format = image_format
        self.image_size = int(image_size)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.hflip_prob = float(hflip_prob)
        self.copy_paste = bool(copy_paste)
        self.paste_prob = float(paste_prob)
        self.max_pasted = int(max_pasted)
        self.min_visible_pixels = int(min_visible_pixels)
        self.min_visible_fraction = float(min_visible_fraction)
        self.use_instance_mask = bool(use_instance_mask)
        self.category_id_to_dataset_id = category_id_to_dataset_id
        self.seed = seed
        self._rng, self._rng_owner = None, None
        if source_weights is None:
            self._source_cdf = np.arange(1, len(self.dataset) + 1, dtype=np.float64)
        else:
            weights = np.asarray(source_weights, dtype=np.float64)
            if weights.shape != (len(self.dataset),) or (weights < 0).any() or not np.isfinite(weights).all():
                raise ValueError(f"source_weights: need {len(self.dataset)} finite weights >= 0")
            self._source_cdf = np.cumsum(weights)

    @classmethod
    def from_config(cls, cfg, dataset=None):
        """``INPUT.EQLOSSES.LSJ.*`` / ``INPUT.EQLOSSES.COPY_PASTE.*``; the training dataset
        of ``DATASETS.TRAIN`` unless given (its dicts, as the train loader loads them)."""
        validate_copy_paste(cfg)
        if dataset is None:
            dataset = get_detection_dataset_dicts(
                cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
            )
        lsj, paste = cfg.INPUT.EQLOSSES.LSJ, cfg.INPUT.EQLOSSES.COPY_PASTE
        weights = None
        if paste.ENABLED:
            if not isinstance(dataset, list):
                dataset = list(dataset)
            weights = paste_source_weights(dataset, paste.SOURCE_SAMPLING, paste.SOURCE_REPEAT_THRESHOLD)
            logger.info(
                "Copy-paste: %s sources (%d of %d images have objects to paste)",
                paste.SOURCE_SAMPLING, int((weights > 0).sum()), len(dataset),
            )
        id_map = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_dataset_id_to_contiguous_id")
        return {
            "dataset": dataset,
            "image_format": cfg.INPUT.FORMAT,
            "image_size": lsj.IMAGE_SIZE,
            "min_scale": lsj.MIN_SCALE,
            "max_scale": lsj.MAX_SCALE,
            "hflip_prob": lsj.HFLIP_PROB,
            "copy_paste": paste.ENABLED,
            "paste_prob": paste.PROB,
            "max_pasted": paste.MAX_OBJECTS,
            "source_weights": weights,
            "min_visible_pixels": paste.MIN_VISIBLE_PIXELS,
            "min_visible_fraction": paste.MIN_VISIBLE_FRACTION,
            "use_instance_mask": cfg.MODEL.MASK_ON,
            "category_id_to_dataset_id": {v: k for k, v in id_map.items()} if id_map else None,
            "seed": None,
        }

    # ------------------------------------------------------------------ random numbers
    def _generator(self) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(np.random.randint(0, 2**32, size=4, dtype=np.uint64))
        info = torch.utils.data.get_worker_info()
        owner = -1 if info is None else info.id
        if self._rng is None or self._rng_owner != owner:
            self._rng, self._rng_owner = np.random.default_rng([int(self.seed), owner + 1]), owner
        return self._rng

    # ------------------------------------------------------------------ one image
    def _jitter(self, height: int, width: int, rng):
        """Flip, resize into (s · image_size)², random crop and pad to image_size²: the
        transforms, and the (flip, resize, crop) parameters for :meth:`_warp_image`."""
        size = self.image_size
        tfms = []
        flip = rng.random() < self.hflip_prob
        if flip:
            tfms.append(HFlipTransform(width))
        scale = rng.uniform(self.min_scale, self.max_scale) * size / max(height, width)
        new_h, new_w = max(1, int(round(height * scale))), max(1, int(round(width * scale)))
        if (new_h, new_w) != (height, width):
            tfms.append(ResizeTransform(height, width, new_h, new_w))
        y0 = int(rng.integers(0, new_h - size + 1)) if new_h > size else 0
        x0 = int(rng.integers(0, new_w - size + 1)) if new_w > size else 0
        crop_h, crop_w = min(new_h, size), min(new_w, size)
        if (crop_h, crop_w) != (new_h, new_w):
            tfms.append(CropTransform(x0, y0, crop_w, crop_h))
        if (crop_h, crop_w) != (size, size):
            tfms.append(PadTransform(0, 0, size - crop_w, size - crop_h, crop_w, crop_h, pad_value=PAD_VALUE))
        return TransformList(tfms or [NoOpTransform()]), (flip, new_h, new_w, x0, y0, crop_w, crop_h)

    def _warp_image(self, image, tfms, params):
        """``tfms.apply_image``, with the resize and the crop done as one PIL resize of the
        cropped region (``Image.resize(box=...)``): the same pixels, at the cost of the
        output size rather than of the enlarged image (up to 4x the canvas at scale 2)."""
        flip, new_h, new_w, x0, y0, crop_w, crop_h = params
        height, width = image.shape[:2]
        if image.dtype != np.uint8 or (new_h, new_w) == (height, width):
            return tfms.apply_image(image)
        if flip:
            image = image[:, ::-1]
        squeeze = image.ndim == 3 and image.shape[2] == 1
        pil = Image.fromarray(np.ascontiguousarray(image[:, :, 0] if squeeze else image))
        sx, sy = new_w / width, new_h / height
        box = (x0 / sx, y0 / sy, (x0 + crop_w) / sx, (y0 + crop_h) / sy)
        image = np.asarray(pil.resize((crop_w, crop_h), Image.BILINEAR, box=box))
        if squeeze:
            image = image[:, :, None]
        size = self.image_size
        if (crop_h, crop_w) != (size, size):
            image = PadTransform(0, 0, size - crop_w, size - crop_h, pad_value=PAD_VALUE).apply_image(image)
        return image

    def _instance_mask(self, segmentation, tfms, height, width):
        """The object's (size, size) bool mask and its tight box (x0, y0, x1, y1), or None
        if nothing of it is left on the canvas."""
        size = self.image_size
        if isinstance(segmentation, list):  # polygons: move the vertices, rasterize once, in their box
            polygons = [tfms.apply_coords(np.array(p, dtype=np.float64).reshape(-1, 2)) for p in segmentation]
            points = np.concatenate(polygons)
            lo = np.clip(np.floor(points.min(axis=0)).astype(int), 0, size)
            hi = np.clip(np.ceil(points.max(axis=0)).astype(int) + 1, 0, size)
            if (hi <= lo).any():
                return None
            # pycocotools' rasterization is invariant to integer shifts: rasterize the window only
            local = polygons_to_bitmask([(p - lo).reshape(-1) for p in polygons], hi[1] - lo[1], hi[0] - lo[0])
            mask = np.zeros((size, size), dtype=bool)
            mask[lo[1]:hi[1], lo[0]:hi[0]] = local
            box = _tight_box(local)
            return None if box is None else (mask, box + np.array([lo[0], lo[1], lo[0], lo[1]]))
        if isinstance(segmentation, dict):  # RLE, compressed or not
            rle = mask_util.frPyObjects(segmentation, height, width) if isinstance(segmentation["counts"], list) else segmentation
            mask = mask_util.decode(rle)
        else:
            mask = np.asarray(segmentation, dtype=np.uint8)
            if mask.shape != (height, width):
                raise ValueError(f"a mask of shape {mask.shape} in an image of {height}x{width}")
        mask = tfms.apply_segmentation(mask).astype(bool)
        box = _tight_box(mask)
        return None if box is None else (mask, box)

    def _load(self, record, rng) -> _Sample:
        image = utils.read_image(record["file_name"], format=self.image_format)
        utils.check_image_size(record, image)
        height, width = image.shape[:2]
        tfms, params = self._jitter(height, width, rng)
        image = self._warp_image(image, tfms, params)
        masks, boxes, classes = [], [], []
        for annotation in record.get("annotations", []):
            if annotation.get("iscrowd", 0):
                continue
            if not annotation.get("segmentation"):
                raise ValueError(
                    f"{record.get('file_name')}: an annotation without 'segmentation'; "
                    f"CopyPasteDatasetMapper needs instance masks"
                )
            # None: the crop removed the object, or it is too small at this scale
            mask_and_box = self._instance_mask(annotation["segmentation"], tfms, height, width)
            if mask_and_box is not None:
                masks.append(mask_and_box[0])
                boxes.append(mask_and_box[1])
                classes.append(annotation["category_id"])
        size = self.image_size
        masks = np.stack(masks) if masks else np.zeros((0, size, size), dtype=bool)
        boxes = np.stack(boxes).astype(np.int64) if boxes else np.zeros((0, 4), dtype=np.int64)
        return _Sample(np.ascontiguousarray(image), masks, np.asarray(classes, dtype=np.int64), boxes)

    def _draw_source(self, rng) -> Optional[int]:
        total = self._source_cdf[-1] if len(self._source_cdf) else 0.0
        if total <= 0:
            return None
        index = int(np.searchsorted(self._source_cdf, rng.random() * total, side="right"))
        return min(index, len(self._source_cdf) - 1)

    # ------------------------------------------------------------------ the paste
    def _paste(self, target: _Sample, source: _Sample, rng):
        """The pasted sample, and how many objects were pasted (its last instances). Work
        is done inside the objects' boxes, not over the whole canvas."""
        n = len(source.classes)
        cap = n if self.max_pasted == 0 else min(n, self.max_pasted)
        k = int(rng.integers(1, cap + 1))
        picked = np.sort(rng.choice(n, size=k, replace=False))
        pasted_masks, pasted_boxes = source.masks[picked], source.boxes[picked]
        alpha = np.zeros(pasted_masks.shape[1:], dtype=bool)
        for mask, (x0, y0, x1, y1) in zip(pasted_masks, pasted_boxes):
            alpha[y0:y1, x0:x1] |= mask[y0:y1, x0:x1]
        ax0, ay0 = pasted_boxes[:, :2].min(axis=0)
        ax1, ay1 = pasted_boxes[:, 2:].max(axis=0)
        image = target.image.copy()
        window = (slice(ay0, ay1), slice(ax0, ax1))
        image[window] = np.where(alpha[window][..., None], source.image[window], target.image[window])

        keep = np.ones(len(target.classes), dtype=bool)
        boxes = target.boxes.copy()
        for i, (x0, y0, x1, y1) in enumerate(target.boxes):
            covered = alpha[y0:y1, x0:x1]
            if not covered.any():
                continue  # an object the paste does not touch is never dropped
            own = target.masks[i, y0:y1, x0:x1]
            visible = own & ~covered
            own_area, visible_area = int(own.sum()), int(visible.sum())
            if visible_area == 0 or (visible_area < own_area and (
                    visible_area < self.min_visible_pixels or visible_area < self.min_visible_fraction * own_area)):
                keep[i] = False
                continue
            target.masks[i, y0:y1, x0:x1] = visible  # the sample is ours: cut in place
            boxes[i] = _tight_box(visible) + np.array([x0, y0, x0, y0])
        masks = np.concatenate([target.masks[keep], pasted_masks])
        classes = np.concatenate([target.classes[keep], source.classes[picked]])
        return _Sample(image, masks, classes, np.concatenate([boxes[keep], pasted_boxes])), k

    def _dataset_id(self, class_id: int) -> int:
        if self.category_id_to_dataset_id is None:
            return int(class_id) + 1
        return self.category_id_to_dataset_id[int(class_id)]

    def __call__(self, dataset_dict):
        rng = self._generator()
        result = self._load(dataset_dict, rng)
        source_id, num_pasted = None, 0
        if self.copy_paste and rng.random() < self.paste_prob:
            index = self._draw_source(rng)
            if index is not None:
                record = self.dataset[index]
                source = self._load(record, rng)
                if len(source.classes):
                    result, num_pasted = self._paste(result, source, rng)
                    source_id = record.get("image_id")
        size = self.image_size
        out = {k: v for k, v in dataset_dict.items() if k != "annotations"}
        out["height"], out["width"] = size, size
        out["image"] = torch.as_tensor(np.ascontiguousarray(result.image.transpose(2, 0, 1)))
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(torch.from_numpy(result.boxes).to(torch.float32))
        instances.gt_classes = torch.from_numpy(result.classes)
        if self.use_instance_mask:
            instances.gt_masks = BitMasks(torch.from_numpy(result.masks))
        out["instances"] = instances
        out["copy_paste_source_id"] = source_id
        out["copy_paste_num_pasted"] = num_pasted  # the pasted objects are the last instances
        if "neg_category_ids" in out or "not_exhaustive_category_ids" in out:
            present = {self._dataset_id(c) for c in np.unique(result.classes)}
            neg, not_exhaustive = merge_lvis_id_lists(
                out.get("neg_category_ids", []), out.get("not_exhaustive_category_ids", []), present
            )
            if "neg_category_ids" in out:
                out["neg_category_ids"] = neg
            if "not_exhaustive_category_ids" in out:
                out["not_exhaustive_category_ids"] = not_exhaustive
        return out

    def __repr__(self):
        return (
            f"CopyPasteDatasetMapper(image_size={self.image_size}, scale=({self.min_scale}, {self.max_scale}), "
            f"hflip_prob={self.hflip_prob}, copy_paste={self.copy_paste}, paste_prob={self.paste_prob}, "
            f"max_pasted={self.max_pasted}, sources={len(self.dataset)})"
        )
