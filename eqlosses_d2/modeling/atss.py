"""
ATSS: Adaptive Training Sample Selection (Zhang et al., "Bridging the Gap Between
Anchor-based and Anchor-free Detection via Adaptive Training Sample Selection", CVPR 2020),
the assignment of the EFL authors' improved one-stage baseline.

For every ground-truth box: on each pyramid level, the ``topk`` anchors whose centers are
closest (L2) to the box center are candidates; their IoUs with the box give the adaptive
threshold mean + std (over the candidates of that box); a candidate is positive when its
IoU reaches the threshold and its center lies inside the box (by more than 0.01 px, as
the ATSS code). An anchor that is positive for several boxes takes the one of highest IoU.
There are no ignored anchors.

``anchor_scale`` enlarges the anchors about their centers for the IoUs: 1 for RetinaNet's
anchors, 8 for FCOS's anchor points (stride-sized boxes; the ATSS paper's FCOS variant
uses one 8S square anchor per location).
"""
from typing import List

import torch

from detectron2.structures import Boxes, Instances, pairwise_iou

__all__ = ["atss_label_anchors", "atss_match"]


def _scaled(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return boxes
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (scale / 2)
    return torch.cat([centers - half, centers + half], dim=1)


@torch.no_grad()
def atss_match(anchors: List[Boxes], gt_boxes: Boxes, topk: int = 9, anchor_scale: float = 1.0) -> torch.Tensor:
    """(R,) index of the ground-truth box each of the R anchors (all levels) is assigned, -1 for none."""
    all_anchors = Boxes.cat(anchors).tensor
    num_anchors, num_gt = all_anchors.shape[0], len(gt_boxes)
    matched = torch.full((num_anchors,), -1, dtype=torch.long, device=all_anchors.device)
    if num_gt == 0 or num_anchors == 0:
        return matched
    gt = gt_boxes.tensor
    anchor_centers = (all_anchors[:, :2] + all_anchors[:, 2:]) / 2
    gt_centers = (gt[:, :2] + gt[:, 2:]) / 2
    distances = torch.cdist(anchor_centers, gt_centers)  # (R, M)

    candidates, start = [], 0
    for level in anchors:
        count = len(level)
        if count:
            _, index = distances[start : start + count].topk(min(topk, count), dim=0, largest=False)
            candidates.append(index + start)
        start += count
    candidates = torch.cat(candidates)  # (K, M)

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
    for instances in gt_instances:
        matched = atss_match(anchors, instances.gt_boxes, topk, anchor_scale)
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
