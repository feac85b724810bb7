"""
LOCE's memory-augmented feature sampling, MFS (Feng et al., ICCV 2021).

Every training iteration, each ground-truth box is jittered into 16 boxes; their RoI
features (detached), with the box and its ground truth, go into per-class FIFO queues
(80 per class). Only the jitters a queue keeps (each class's first 80 of the batch) are
pooled (:meth:`FeatureMemory.jitters_to_enqueue`); the queues are the same as if all were. Then 8 classes are drawn (with replacement) with probability ∝
1 / mean score (LOCE's equilibrium loss keeps the mean scores), and 4 features from each
drawn class's queue (uniformly, with replacement, among the filled slots); they are
appended to the box head's batch with their labels and regression targets.

Jitter (the authors' ``bbox_generator``): one uniform matrix u (4, 16) per image; jitter
k of box (x1, y1, x2, y2) adds ``sign[c, k] · u[c, k] · size_c / 6`` to coordinate c
(size = w for x, h for y), with the sign patterns of :data:`JITTER_SIGNS` (all 16
combinations of ± on the four coordinates), clamped to the image.

Memory (a deliberate choice, stated here and in the README): the queues hold
``C × queue_size`` RoI features of shape (256, 7, 7); on LVIS that is 1203 × 80 × 12,544
values, 4.8 GB in float32. They are kept on the CPU in float16 by default (2.4 GB per
process; ``MODEL.EQLOSSES.MFS.STORAGE_DTYPE``), allocated at the first enqueue; a class's
slots take physical memory only once written. The authors keep them on the CPU in
float32. Sampled features return to the model's device and dtype (float16 storage
rounds each stored value to 11 significant bits).

Checkpoints: the queues are per process. With ``MODEL.EQLOSSES.MFS.CHECKPOINT_QUEUES``
(default) each process saves the slots it has written in its per-rank resume state
(:class:`eqlosses_d2.resume.RankStates`) and ``--resume`` continues exactly; on LVIS that
is up to the queues' full size (2.4 GB in float16) per process and checkpoint. Without it
(the authors' code, which never saves them) the class-balanced pre-fill pass rebuilds them
after ``--resume``. The mean scores, which drive the sampling, are a buffer of the loss and
always resume exactly.
"""
from typing import List

import torch

from detectron2.structures import Boxes

__all__ = ["FeatureMemory", "JITTER_SIGNS", "first_rows_per_class", "jitter_boxes"]


def _jitter_signs() -> torch.Tensor:
    rows = []
    for block in (8, 4, 2, 1):
        rows.append(([-1.0] * block + [1.0] * block) * (16 // (2 * block)))
    return torch.tensor(rows)


#: (4, 16) signs of the coordinate offsets of the 16 jitters (rows x1, y1, x2, y2)
JITTER_SIGNS = _jitter_signs()


def jitter_boxes(boxes: torch.Tensor, image_size, uniform: torch.Tensor = None) -> torch.Tensor:
    """
    (G, 4) boxes of one image → (G, 16, 4) jittered boxes, clamped to ``image_size``
    (height, width). ``uniform``: the (4, 16) uniform matrix (default: ``torch.rand``).
    """
    if uniform is None:
        uniform = torch.rand(JITTER_SIGNS.shape, device=boxes.device)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    sizes = torch.stack([widths, heights, widths, heights], dim=1)  # (G, 4)
    offsets = JITTER_SIGNS.to(boxes)[None] * uniform.to(boxes)[None] * sizes[:, :, None] / 6.0  # (G, 4, 16)
    jittered = (boxes[:, :, None] + offsets).permute(0, 2, 1)  # (G, 16, 4)
    height, width = image_size
    limits = torch.tensor([width - 1, height - 1, width - 1, height - 1], dtype=boxes.dtype, device=boxes.device)
    return torch.minimum(jittered.clamp(min=0), limits)


def first_rows_per_class(labels: torch.Tensor, limit: int) -> torch.Tensor:
    """(N,) bool mask of each label's first ``limit`` rows, in row order (what
    :meth:`FeatureMemory.enqueue` keeps of a batch). No host read."""
    count = labels.numel()
    order = torch.sort(labels, stable=True).indices
    ordered = labels[order]
    # position of each row among its label's rows: its index minus its label's first index
    rank = torch.arange(count, device=labels.device) - torch.searchsorted(ordered, ordered)
    keep = torch.zeros(count, dtype=torch.bool, device=labels.device)
    keep[order] = rank < limit
    return keep


class FeatureMemory:
    """Per-class FIFO queues of RoI features with their boxes (not an nn.Module: not saved)."""

    def __init__(self, num_classes: int, queue_size: int = 80, storage_dtype=torch.float16, device="cpu"):
        if queue_size <= 0:
            raise ValueError(f"MODEL.EQLOSSES.MFS.QUEUE_SIZE must be > 0, got {queue_size}")
        self.num_classes, self.queue_size = num_classes, queue_size
        self.storage_dtype, self.device = storage_dtype, torch.device(device)
        self.features = None  # (C, Q, *feature_shape), allocated at the first enqueue
        self.proposal_boxes = torch.zeros(num_classes, queue_size, 4, device=self.device)
        self.gt_boxes = torch.zeros(num_classes, queue_size, 4, device=self.device)
        self.filled = torch.zeros(num_classes, dtype=torch.long)
        self.pointer = torch.zeros(num_classes, dtype=torch.long)

    def nbytes(self, feature_shape=(256, 7, 7)) -> int:
        """Bytes the feature queues take once every slot is written."""
        count = self.num_classes * self.queue_size
        for size in feature_shape:
            count *= size
        return count * torch.empty((), dtype=self.storage_dtype).element_size()

    @torch.no_grad()
    def jitters_to_enqueue(self, gt_instances):
        """
        The 16 jitters of every ground-truth box (one uniform draw per image, as
        :func:`jitter_boxes`), cut to the rows :meth:`enqueue` keeps (each class's first
        ``queue_size`` of the batch), so that only those are pooled: on LVIS an image with
        many boxes of one class would otherwise pool 16 features per box to keep 80.
        Returns (per image: Boxes of its kept jitters, then over all images: labels,
        jittered boxes, ground-truth boxes of the kept rows, in row order).
        """
        jittered, gt_boxes, labels, images = [], [], [], []
        for index, instances in enumerate(gt_instances):
            boxes = instances.gt_boxes.tensor
            jitters = jitter_boxes(boxes, instances.image_size)  # (G, 16, 4)
            jittered.append(jitters.reshape(-1, 4))
            gt_boxes.append(boxes[:, None, :].expand_as(jitters).reshape(-1, 4))
            labels.append(instances.gt_classes[:, None].expand(-1, jitters.shape[1]).reshape(-1))
            images.append(torch.full_like(labels[-1], index))
        jittered, gt_boxes, labels, images = (torch.cat(x) for x in (jittered, gt_boxes, labels, images))
        keep = first_rows_per_class(labels, self.queue_size)
        jittered, gt_boxes, labels, images = jittered[keep], gt_boxes[keep], labels[keep], images[keep]
        per_image = [Boxes(jittered[images == index]) for index in range(len(gt_instances))]
        return per_image, labels, jittered, gt_boxes

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor, proposal_boxes: torch.Tensor, gt_boxes: torch.Tensor):
        """Per class present, its first ``queue_size`` rows (in order) into its ring buffer."""
        if labels.numel() == 0:
            return
        if self.features is None:
            self.features = torch.empty(
                (self.num_classes, self.queue_size) + tuple(features.shape[1:]), dtype=self.storage_dtype, device=self.device
            )
        features = features.detach().to(self.device, self.storage_dtype)
        labels = labels.to(self.device)
        proposal_boxes, gt_boxes = proposal_boxes.to(self.device), gt_boxes.to(self.device)
        for label in torch.unique(labels).tolist():
            rows = torch.nonzero(labels == label, as_tuple=True)[0][: self.queue_size]
            start = int(self.pointer[label])
            slots = (torch.arange(rows.numel(), device=self.device) + start) % self.queue_size
            self.features[label, slots] = features[rows]
            self.proposal_boxes[label, slots] = proposal_boxes[rows].float()
            self.gt_boxes[label, slots] = gt_boxes[rows].float()
            self.pointer[label] = (start + rows.numel()) % self.queue_size
            self.filled[label] = min(self.queue_size, int(self.filled[label]) + rows.numel())

    def sampling_probabilities(self, mean_score: torch.Tensor) -> torch.Tensor:
        """(C,) ∝ 1 / (s_c + 1e-7): the authors' class-sampling distribution."""
        inverse = 1.0 / (mean_score[: self.num_classes].double().cpu() + 1e-7)
        return inverse / inverse.sum()

    @torch.no_grad()
    def sample(self, mean_score: torch.Tensor, num_classes: int = 8, num_features: int = 4):
        """
        ``num_classes`` classes drawn with replacement ∝ 1 / mean score, ``num_features``
        filled slots of each (uniform, with replacement); classes with an empty queue give
        nothing. Returns (features, labels, proposal_boxes, gt_boxes) on the storage device.
        """
        classes = torch.multinomial(self.sampling_probabilities(mean_score), num_classes, replacement=True)
        picked: List[torch.Tensor] = []
        for label in classes.tolist():
            filled = int(self.filled[label])
            if filled == 0:
                continue
            slots = torch.randint(0, filled, (num_features,))
            picked.append(torch.stack([torch.full_like(slots, label), slots], dim=1))
        if not picked:
            shape = (0,) + (tuple(self.features.shape[2:]) if self.features is not None else (0,))
            empty = torch.zeros(0, 4, device=self.device)
            return torch.zeros(shape, device=self.device), torch.zeros(0, dtype=torch.long), empty, empty.clone()
        index = torch.cat(picked).to(self.device)
        labels, slots = index[:, 0], index[:, 1]
        return self.features[labels, slots], labels, self.proposal_boxes[labels, slots], self.gt_boxes[labels, slots]

    def _written(self):
        """(C, Q) bool: the slots written so far (a class's first ``filled`` slots)."""
        return torch.arange(self.queue_size, device=self.device)[None, :] < self.filled.to(self.device)[:, None]

    def state_dict(self):
        """The queues, for the per-rank resume state: the written feature slots only, packed
        in (class, slot) order (``features``: (written, *feature_shape)), so a checkpoint
        takes what the queues hold, not their allocated size."""
        state = {k: getattr(self, k).clone() for k in ("proposal_boxes", "gt_boxes", "filled", "pointer")}
        if self.features is not None:
            state["features"] = self.features[self._written()].clone()
        return state

    def load_state_dict(self, state):
        for key in ("proposal_boxes", "gt_boxes", "filled", "pointer"):
            value = state[key]
            if value.shape != getattr(self, key).shape:
                raise ValueError(
                    f"LOCE feature memory: saved {key} has shape {tuple(value.shape)}, this model's "
                    f"{tuple(getattr(self, key).shape)} (another NUM_CLASSES or MFS.QUEUE_SIZE)"
                )
            getattr(self, key).copy_(value)
        features = state.get("features")
        if features is None:
            self.features = None
            return
        written = self._written()
        if features.shape[0] != int(written.sum()):
            raise ValueError(
                f"LOCE feature memory: saved features hold {features.shape[0]} slots, its fill counts say {int(written.sum())}"
            )
        self.features = torch.zeros(
            (self.num_classes, self.queue_size) + tuple(features.shape[1:]), dtype=self.storage_dtype, device=self.device
        )
        self.features[written] = features.to(self.device, self.storage_dtype)
