"""ATSS with several anchors per location: the candidates of a level are the anchors of the
``topk`` closest locations (``topk`` × A anchors, as the ATSS authors' code), checked on
Detectron2's own anchor generator with 9 anchors per location and against a
brute-force reference of the assignment."""
import numpy as np
import torch

from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.structures import Boxes

from eqlosses_d2.modeling.atss import anchors_per_location, atss_candidates, atss_match

STRIDES = (8, 16)
GRID = ((12, 16), (6, 8))  # (H, W) of the two levels: a 96 x 128 image


def _anchors(sizes, ratios):
    generator = DefaultAnchorGenerator(
        sizes=sizes, aspect_ratios=ratios, strides=list(STRIDES), offset=0.5)
    features = [torch.zeros(1, 1, h, w) for h, w in GRID]
    return generator(features), generator.num_cell_anchors


def _nine_per_location():
    return _anchors([[16, 20, 25], [32, 40, 50]], [[0.5, 1.0, 2.0]])


def _random_gt(seed, count=6):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=g) * torch.tensor([100.0, 70.0])
    wh = torch.rand(count, 2, generator=g) * 40 + 6
    return Boxes(torch.cat([xy, xy + wh], dim=1))


def test_anchors_per_location_is_read_off_detectron2_anchors():
    anchors, num_cell = _nine_per_location()
    assert num_cell == [9, 9]
    assert anchors_per_location(anchors) == [9, 9]
    single, num_cell = _anchors([[16], [32]], [[1.0]])
    assert num_cell == [1, 1] and anchors_per_location(single) == [1, 1]


def test_candidates_are_the_anchors_of_topk_locations_per_level():
    anchors, _ = _nine_per_location()
    gt = _random_gt(0)
    topk = 9
    candidates = atss_candidates(anchors, gt, topk=topk)
    first = len(anchors[0])
    assert candidates.shape == (2 * topk * 9, len(gt))  # 81 per level, not 9
    for level, (lo, hi) in enumerate([(0, first), (first, first + len(anchors[1]))]):
        per_level = candidates[level * topk * 9 : (level + 1) * topk * 9]
        assert bool(((per_level >= lo) & (per_level < hi)).all())
        for column in per_level.T:
            locations = torch.div(column - lo, 9, rounding_mode="floor")
            # exactly topk locations, each with all of its 9 anchors
            assert locations.unique().numel() == topk
            assert sorted(column.tolist()) == sorted(
                (lo + 9 * loc + a) for loc in locations.unique().tolist() for a in range(9))
    # an explicit A of 1 takes topk anchors per level (one location's nine here)
    assert atss_candidates(anchors, gt, topk=topk, anchors_per_loc=1).shape == (2 * topk, len(gt))


def _reference_match(anchors, gt, topk):
    """ATSS as the paper and the authors' code state it, location by location, in numpy."""
    boxes = [a.tensor.double().numpy() for a in anchors]
    gt = gt.tensor.double().numpy()
    all_boxes = np.concatenate(boxes)
    offsets = np.cumsum([0] + [len(b) for b in boxes])

    def iou(a, b):
        lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
        inter = np.prod(np.clip(rb - lt, 0, None))
        return inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)

    quality = np.full((len(all_boxes), len(gt)), -1.0)
    for j, box in enumerate(gt):
        center = (box[:2] + box[2:]) / 2
        candidates = []
        for level, level_boxes in enumerate(boxes):
            location_centers = (level_boxes[::9, :2] + level_boxes[::9, 2:]) / 2
            nearest = np.argsort(np.linalg.norm(location_centers - center, axis=1), kind="stable")[:topk]
            candidates += [offsets[level] + 9 * loc + a for loc in nearest for a in range(9)]
        ious = np.array([iou(all_boxes[i], box) for i in candidates])
        threshold = ious.mean() + ious.std(ddof=1)
        for i, value in zip(candidates, ious):
            c = (all_boxes[i, :2] + all_boxes[i, 2:]) / 2
            inside = min(c[0] - box[0], c[1] - box[1], box[2] - c[0], box[3] - c[1]) > 0.01
            if value >= threshold and inside:
                quality[i, j] = value
    best = quality.max(axis=1)
    return np.where(best >= 0, quality.argmax(axis=1), -1)


def test_match_with_nine_anchors_per_location_equals_the_reference():
    anchors, _ = _nine_per_location()
    positives = 0
    for seed in range(4):
        gt = _random_gt(seed)
        matched = atss_match(anchors, gt, topk=9)
        expected = _reference_match(anchors, gt, topk=9)
        assert matched.tolist() == expected.tolist(), seed
        positives += int((matched >= 0).sum())
    assert positives > 20  # the comparison covers real assignments
