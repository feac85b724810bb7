"""
ATSS: Adaptive Training Sample Selection (Zhang et al., "Bridging the Gap Between
Anchor-based and Anchor-free Detection via Adaptive Training Sample Selection", CVPR 2020),
the assignment of the EFL authors' improved one-stage baseline.

For every ground-truth box: on each pyramid level, the anchors of the ``topk`` locations
whose centers are closest (L2) to the box center are candidates (``topk`` × A anchors for
A anchors per location, as the ATSS authors' code: 9 × 9 = 81 per level with RetinaNet's
nine anchors, 9 with one anchor or point per location); their IoUs with the box give the adaptive
threshold mean + std (over the candidates of that box); a candidate is positive when its
IoU reaches the threshold and its center lies inside the box (by more than 0.01 px, as
the ATSS code). An anchor that is positive for several boxes takes the one of highest IoU.
There are no ignored anchors.

``anchor_scale`` enlarges the anchors about their centers for the IoUs: 1 for RetinaNet's
anchors, 8 for FCOS's anchor points (stride-sized boxes; the ATSS paper's FCOS variant
uses one 8S square anchor per location).

A (anchors per location) is read off each level's anchors: Detectron2's anchor generators
lay a level out location by location, the A anchors of a location consecutive and sharing
its center; ``anchors_per_location`` overrides it.
"""
from typing import List, Optional, Sequence, Union

import torch

from detectron2.structures import Boxes, Instances, pairwise_iou

__all__ = ["anchors_per_location", "atss_candidates", "atss_label_anchors", "atss_match"]


def _scaled(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return boxes
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (scale / 2)
    return torch.cat([centers - half, centers + half], dim=1)


def anchors_per_location(anchors: List[Boxes]) -> List[int]:
    """Per level: how many anchors share a location (the leading anchors with the first
    anchor's center; Detectron2's layout). One host read for all levels."""
    counts = []
    for level in anchors:
        boxes = level.tensor[:1024]
        if len(boxes) == 0:
            counts.append(torch.ones((), dtype=torch.long, device=boxes.device))
            continue
        centers = boxes[:, :2] + boxes[:, 2:]  # twice the centers: compared, not used
        differs = (centers != centers[:1]).any(dim=1)
        # index of the first anchor elsewhere (all the same: every anchor read shares it)
        counts.append(torch.where(differs.any(), differs.int().argmax(), torch.tensor(len(boxes), device=boxes.device)))
    return [int(a) for a in torch.stack(counts).tolist()]


def _per_level(anchors, anchors_per_loc):
    if anchors_per_loc is None:
        return anchors_per_location(anchors)
    if isinstance(anchors_per_loc, int):
        return [anchors_per_loc] * len(anchors)
    return list(anchors_per_loc)


def _candidates(anchors, distances, topk, anchors_per_loc):
    candidates, start = [], 0
    for level, per_location in zip(anchors, anchors_per_loc):
        count = len(level)
        if count:
            k = min(topk * per_location, count)  # the anchors of the topk closest locations
            _, index = distances[start : start + count].topk(k, dim=0, largest=False)
            candidates.append(index + start)
        start += count
    return torch.cat(candidates)  # (K, M)


@torch.no_grad()
def atss_candidates(anchors: List[Boxes], gt_boxes: Boxes, topk: int = 9,
                    anchors_per_loc: Optional[Union[int, Sequence[int]]] = None) -> torch.Tensor:
    """(K, M) indices (into the concatenated levels) of each ground-truth box's candidate
    anchors, level by level: ``min(topk × A, anchors of the level)`` per level."""
    all_anchors = Boxes.cat(anchors).tensor
    gt = gt_boxes.tensor
    distances = torch.cdist((all_anchors[:, :2] + all_anchors[:, 2:]) / 2, (gt[:, :2] + gt[:, 2:]) / 2)
    return _candidates(anchors, distances, topk, _per_level(anchors, anchors_per_loc))


@torch.no_grad()
def atss_match(anchors: List[Boxes], gt_boxes: Boxes, topk: int = 9, anchor_scale: float = 1.0,
               anchors_per_loc: Optional[Union[int, Sequence[int]]] = None) -> torch.Tensor:
    """(R,) index of the ground-truth box each of the R anchors (all levels) is assigned, -1
    for none. ``anchors_per_loc``: A, per level or for all (None: :func:`anchors_per_location`)."""
    all_anchors = Boxes.cat(anchors).tensor
    num_anchors, num_gt = all_anchors.shape[0], len(gt_boxes)
    matched = torch.full((num_anchors,), -1, dtype=torch.long, device=all_anchors.device)
    if num_gt == 0 or num_anchors == 0:
        return matched
    gt = gt_boxes.tensor
    anchor_centers = (all_anchors[:, :2] + all_anchors[:, 2:]) / 2
    gt_centers = (gt[:, :2] + gt[:, 2:]) / 2
    distances = torch.cdist(anchor_centers, gt_centers)  # (R, M)
    candidates = _candidates(anchors, distances, topk, _per_level(anchors, anchors_per_loc))

    ious = pairwise_iou(Boxes(_scaled(all_anchors, anchor_scale)), gt_boxes)  # (R, M)
    candidate_ious = ious.gather(0, candidates)
    std = candidate_ious.std(dim=0) if candidates.shape[0] > 1 else torch.zeros_like(candidate_ious[0])
    threshold = candidate_ious.mean(dim=0) + std
    positive = candidate_ious >= threshold[None]

    centers = anchor_centers[candidates]  # (K, M, 2)
    margins = torch.stack(
        [centers[..., 0] - gt[None, :, 0], centers[..., 1] - gt[None, :, 1],
         gt[None, :, 2] - centers[..., 0], gt[None, :, 3] - centers[..., 1]],
        dim=2,
    )
    positive &= margins.amin(dim=2) > 0.01

    gt_index = torch.arange(num_gt, device=gt.device).expand_as(candidates)
    quality = torch.full_like(ious, -1.0)
    rows, cols = candidates[positive], gt_index[positive]
    quality[rows, cols] = ious[rows, cols]
    best, best_gt = quality.max(dim=1)
    matched = torch.where(best >= 0, best_gt, matched)
    return matched


@torch.no_grad()
def atss_label_anchors(anchors: List[Boxes], gt_instances: List[Instances], num_classes: int, topk: int = 9,
                       anchor_scale: float = 1.0):
    """As Detectron2's ``label_anchors``: per image (R,) labels in [0, C] (C: background) and
    the (R, 4) tensor of matched boxes (zeros where background)."""
    gt_labels, matched_boxes = [], []
    num_anchors = sum(len(a) for a in anchors)
    per_location = anchors_per_location(anchors)  # the same anchors for every image
    for instances in gt_instances:
        matched = atss_match(anchors, instances.gt_boxes, topk, anchor_scale, per_location)
        if len(instances):
            labels = instances.gt_classes[matched.clamp(min=0)].clone()
            labels[matched < 0] = num_classes
            boxes = instances.gt_boxes.tensor[matched.clamp(min=0)]
        else:
            device = matched.device
            labels = torch.full((num_anchors,), num_classes, dtype=torch.long, device=device)
            boxes = torch.zeros((num_anchors, 4), device=device)
        gt_labels.append(labels)
        matched_boxes.append(boxes)
    return gt_labels, matched_boxes
