"""
BAGS, Balanced Group Softmax (Li et al., "Overcoming Classifier Imbalance for Long-tail Object
Detection with Balanced Group Softmax", CVPR 2020), as the authors' code computes it
(FishYuLi/BalancedGroupSoftmax: ``mmdet/models/bbox_heads/gs_bbox_head_with0.py``,
``GSBBoxHeadWith0``; the groups from ``get_cate_gs`` / ``get_split`` of their ``lvis_analyse.py``
in ``tools``; the recipe ``gs_mask_rcnn_r50_fpn_1x_lvis.py`` in their ``configs/bags``).

Groups. The C classes are split by their number of training *instances* n_j at the boundaries
b_1 < ... < b_{G-1} (``GROUP_BOUNDARIES``, the authors' 10, 100, 1000): foreground group g (1 ≤ g ≤ G)
holds the classes with b_{g-1} ≤ n_j < b_g (b_0 = −∞, b_G = +∞), in class order; the authors' bins
"(0, 10)", "[10, 100)", "[100, 1000)", "[1000, ~)" (their first bin is ``ins_count < 10``, so a
class without instances goes there too). Group 0 holds the background alone.

Logits. ``num_logits = C + G + 2`` (LVIS, G = 4: C + 6, their ``num_classes + num_bins`` with
mmdetection's background-inclusive 1231), laid out group after group as their ``pred_slice``:

    group 0:  [background, "others" (= foreground)]                      columns 0, 1
    group g:  ["others", the classes of group g in class order]          1 + |group g| columns

so group g ≥ 1 starts at column ``2 + Σ_{h<g} (1 + |group h|)``. A group without classes keeps
its lone "others" column (its softmax is 1, its loss and gradient 0). The layout follows the
model's class statistics (``instance_count``; a checkpoint carries them).

Training. Each RoI i gets a label in every group (their ``label2binlabel``): in group 0, 0 for a
background RoI and 1 ("others") for a foreground one; in group g ≥ 1, its class's position
(1, 2, ...) when its class is in g, else 0 ("others", the background included). Per group

    L_g = Σ_i w_gi · CE(softmax(z_i[group g]), label_gi) / max(Σ_i w_gi, 1),   L = LOSS_WEIGHT · Σ_g L_g

with w_0i = 1 for every RoI, and for g ≥ 1 (their ``_sample_others``): w_gi = 1 for the RoIs of
group g's classes (k_g of them) and for ``floor(k_g · OTHERS_SAMPLE_RATIO)`` of the others RoIs
drawn uniformly without replacement (all of them when there are not more than that; none, and
L_g = 0, when k_g = 0). mmdetection's ``CrossEntropyLoss`` with ``avg_factor`` is exactly that
normaliser. No state across iterations.

Random draw: every training step draws one uniform key per (group g ≥ 1, RoI), ``torch.rand(G,
N)`` from torch's default generator of the logits' device (one draw of that size every step,
whatever the labels), and takes the k others with the smallest keys (a uniformly random subset,
as ``np.random.choice(replace=False)``). ``torch.manual_seed`` (Detectron2's ``SEED``) makes it
reproducible and ``--resume`` (which restores torch's RNG states) continues it. Under the GPU
policy there is no host read (the number drawn is compared on the device).

Inference (their ``_merge_score``, the one ``get_det_bboxes`` uses): a softmax in each group,
p_bg = softmax(group 0)[0] and, for class j at position k of group g,
p_j = softmax(group 0)[1] · softmax(group g)[k]; no renormalization (the "others" probabilities are
dropped). Returned as Detectron2's (N, C + 1), background last.

Defaults (their LVIS config): GROUP_BOUNDARIES (10, 100, 1000), OTHERS_SAMPLE_RATIO 8.0,
LOSS_WEIGHT 1.0 (each group's ``loss_bin`` weight). Classifier init: Detectron2's (normal, std 0.01,
bias 0), as mmdetection's ``fc_cls``. Their protocol trains only the classifier (``selectp = 1``:
``fc_cls``) for 12 epochs from a trained softmax Mask R-CNN, whose ``fc_cls`` of another shape is
not loaded: the recipe config does the same (``TRAINABLE_MODULES``).

Differences from their code: the groups come from the model's class statistics (the instance
counts of the training annotations; theirs read the ``instance_count`` field of the LVIS json
into three files); the others are drawn with torch's generator on the logits' device (theirs with
NumPy's global generator, on the host): the same distribution, not the same stream; the loss is
returned as one ``loss_cls`` (theirs as ``loss_cls_bin0`` ... ``loss_cls_bin4``, summed by
mmdetection the same way; the per-group values are this loss's logged scalars); value and
gradient come from one fused computation (:class:`_GroupSoftmaxCE`), float32, with the sum
accumulated in float64; under the CPU policy a foreground group's softmax runs over the RoIs in its
loss only (a ``nonzero`` per group; the GPU policy takes every row with zero weights, no host read). Their cascade head averages the stages' raw logits before the merge;
the cascade head here averages the stages' merged probabilities (every method's).
"""
import math
from typing import NamedTuple, Sequence, Tuple

import torch
from torch.nn import functional as F

from .bal_bce import CachedClassConstants
from .base import ClassificationLoss, empty_loss, gpu_policy, scaled_stashed_grad
from .fused import row_ranges
from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, register

__all__ = ["BalancedGroupSoftmax", "GroupLayout", "group_layout", "sample_group_rois"]


class GroupLayout(NamedTuple):
    """Where BAGS's groups sit among the logits, for C classes and G foreground groups."""

    #: (G + 1) column ranges ``(start, length)`` of the groups (their ``pred_slice``)
    slices: Tuple[Tuple[int, int], ...]
    #: (G + 1, C + 1) int64: the label of each RoI label (C: background) in each group
    #: (their ``label2binlabel``, with the background last instead of first)
    group_labels: torch.Tensor
    #: (C,) int64: the column of each class's logit
    class_columns: torch.Tensor
    #: (C,) int64: the foreground group (1..G) of each class
    class_groups: torch.Tensor
    #: (G + 1,) int64: the first column of each group
    starts: torch.Tensor


def group_layout(instance_count, boundaries: Sequence[int]) -> GroupLayout:
    """The groups of C classes with training ``instance_count`` (C,) split at ``boundaries``
    (module docstring). One host read of the counts (the callers cache the result)."""
    counts = torch.as_tensor(instance_count).long()
    device = counts.device
    num_classes = counts.numel()
    bounds = torch.tensor(list(boundaries), dtype=torch.int64, device=device)
    class_groups = 1 + torch.bucketize(counts, bounds, right=True)  # n < b_1: 1; b_1 <= n < b_2: 2; ...
    num_groups = len(boundaries) + 1
    groups = class_groups.tolist()
    group_labels = torch.zeros(num_groups + 1, num_classes + 1, dtype=torch.int64)
    group_labels[0, :num_classes] = 1  # group 0: background 0, every foreground class "others" (1)
    sizes = [0] * (num_groups + 1)
    for j, g in enumerate(groups):
        sizes[g] += 1
        group_labels[g, j] = sizes[g]
    slices, start = [(0, 2)], 2
    for g in range(1, num_groups + 1):
        slices.append((start, 1 + sizes[g]))
        start += 1 + sizes[g]
    starts = torch.tensor([s for s, _ in slices], dtype=torch.int64)
    class_columns = starts[torch.tensor(groups, dtype=torch.int64)] + group_labels[groups, torch.arange(num_classes)]
    return GroupLayout(tuple(slices), group_labels.to(device), class_columns.to(device), class_groups,
                       starts.to(device))


def uniform_keys(rows: int, cols: int, device) -> torch.Tensor:
    """(rows, cols) uniform keys from torch's default generator of ``device`` (one function, so
    that tools/gpu_check.py can make a CUDA step and its CPU reference draw the same keys)."""
    return torch.rand(rows, cols, device=device)


def sample_group_rois(in_group: torch.Tensor, ratio: float, generator=None) -> torch.Tensor:
    """
    (G, N) bool: the RoIs in the loss of each foreground group (their ``_sample_others``). Row g:
    the RoIs of the group's classes (``in_group[g]``, k of them) and ``floor(k · ratio)`` of the
    others (uniformly, without replacement; all when there are no more; none when k = 0). One
    ``torch.rand(G, N)`` from ``generator`` (None: torch's default generator of the device),
    whatever the labels; no host read.
    """
    num_groups, num_rois = in_group.shape
    if generator is None:
        keys = uniform_keys(num_groups, num_rois, in_group.device)
    else:
        keys = torch.rand(num_groups, num_rois, generator=generator, device=in_group.device)
    wanted = torch.floor(in_group.sum(dim=1, dtype=torch.float64) * ratio).long()
    keys = keys.masked_fill(in_group, 2.0)  # the group's own RoIs rank after every "others" RoI
    order = keys.argsort(dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(num_rois, device=in_group.device).expand(num_groups, num_rois).contiguous())
    return in_group | (~in_group & (rank < wanted[:, None]))


class _GroupSoftmaxCE(torch.autograd.Function):
    """
    ``(Σ_g Σ_i w_gi · CE(z_i[group g], t_gi), per-group sums)`` for per-group row weights ``w``
    (G + 1, N) (normalized already) and target columns ``t`` (N, G + 1) (absolute), with the
    gradient ``w_gi · (softmax(z_i[group g]) − onehot(t_gi))`` computed in the same pass, group by
    group in row chunks (:func:`.fused.row_ranges` of the group's width), into the buffer handed
    to autograd. CE = lse − z_t with
    lse = max z − log max softmax over the group's columns (exact, and finite whatever the
    logits' spread: max softmax >= 1 / group size).
    """

    @staticmethod
    def forward(ctx, logits, target_columns, weights, slices):
        num_rows = logits.shape[0]
        grad = torch.empty_like(logits)
        per_group = torch.zeros(len(slices), dtype=torch.float64, device=logits.device)
        target_logits = logits.gather(1, target_columns)  # (N, G + 1)
        # CPU policy: a foreground group's softmax only over the RoIs in its loss (its own and the
        # sampled others: about (1 + ratio) k_g of N), its other rows' gradient 0; the GPU policy
        # takes every row (zero weights), which reads no row count back
        subsets = not gpu_policy(logits.device)
        for index, (first, length) in enumerate(slices):
            rows = None
            if subsets and index > 0:
                rows = weights[index].nonzero().squeeze(1)
                grad[:, first:first + length].zero_()
            count = num_rows if rows is None else rows.numel()
            # in row chunks of the group's width (two chunk-sized buffers: its logits, made
            # contiguous for torch's fused softmax kernel, which would copy a strided view itself,
            # and their softmax)
            for start, stop in row_ranges(count, length, logits.device, buffers=2):
                if rows is None:
                    group_logits = logits[start:stop, first:first + length].contiguous()
                    w, z_t = weights[index, start:stop], target_logits[start:stop, index]
                else:
                    chunk_rows = rows[start:stop]
                    group_logits = logits[chunk_rows, first:first + length]  # a contiguous copy
                    w, z_t = weights[index, chunk_rows], target_logits[chunk_rows, index]
                probs = torch.softmax(group_logits, dim=1)
                # log-sum-exp = max z − log max p (max p >= 1 / length: no underflow)
                lse = group_logits.amax(dim=1) - probs.amax(dim=1).log()
                per_group[index] += (w * (lse - z_t)).sum(dtype=torch.float64)
                if rows is None:
                    torch.mul(probs, w[:, None], out=grad[start:stop, first:first + length])
                else:
                    grad[chunk_rows, first:first + length] = probs.mul_(w[:, None])
        grad.scatter_add_(1, target_columns, -weights.t())
        ctx.grad = grad
        ctx.mark_non_differentiable(per_group)
        return per_group.sum().to(logits.dtype), per_group

    @staticmethod
    def backward(ctx, grad_output, grad_per_group):
        return scaled_stashed_grad(ctx, grad_output, "BAGS"), None, None, None


@register(ROI_CLS_LOSS_REGISTRY)
class BalancedGroupSoftmax(ClassificationLoss):
    name = "bags"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = "BAGS, balanced group softmax (Li et al., CVPR 2020)"
    doc_paper = "LVIS v0.5, classifier re-trained on a 1x Mask R-CNN R50: mask AP 26.25, box AP 25.76 (authors' README)"
    config_node = "BAGS"
    family = "softmax"

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.BAGS")
        # training-instance counts where the foreground groups split (the authors' LVIS bins
        # (0, 10), [10, 100), [100, 1000), [1000, ~)); group 0 is the background alone
        _C.GROUP_BOUNDARIES = (10, 100, 1000)
        # others RoIs per RoI of a group's own classes in that group's loss (the authors' 8.0)
        _C.OTHERS_SAMPLE_RATIO = 8.0
        # weight of every group's loss
        _C.LOSS_WEIGHT = 1.0

    def __init__(self, num_classes, class_stats=None, group_boundaries=(10, 100, 1000), others_sample_ratio=8.0,
                 loss_weight=1.0):
        super().__init__(num_classes, class_stats)
        boundaries = list(group_boundaries)
        if not boundaries or any(not float(b).is_integer() or b < 1 for b in boundaries) or any(
                a >= b for a, b in zip(boundaries, boundaries[1:])):
            raise ValueError(f"BAGS.GROUP_BOUNDARIES must be increasing integers >= 1, got {tuple(group_boundaries)}")
        if not (others_sample_ratio >= 0 and math.isfinite(others_sample_ratio)):
            raise ValueError(f"BAGS.OTHERS_SAMPLE_RATIO must be a finite number >= 0, got {others_sample_ratio}")
        self.group_boundaries = tuple(int(b) for b in boundaries)
        self.others_sample_ratio = float(others_sample_ratio)
        self.loss_weight = float(loss_weight)
        #: foreground groups G; logits C + G + 2 (module docstring)
        self.num_groups = len(self.group_boundaries) + 1
        self.extra_logits = self.num_groups + 2
        self._layouts = CachedClassConstants()
        self._last_group_losses = None

    def layout(self, device=None) -> GroupLayout:
        """The groups from the model's class statistics (cached while they are unchanged)."""
        counts = self.require_class_stats().instance_count
        layout = self._layouts.get((counts,), lambda: group_layout(counts, self.group_boundaries))
        if device is not None and layout.group_labels.device != torch.device(device):
            layout = layout._replace(**{field: getattr(layout, field).to(device) for field in
                                        ("group_labels", "class_columns", "class_groups", "starts")})
        return layout

    def forward(self, logits, labels, **context):
        self._check(logits, labels)
        layout = self.layout(logits.device)
        self._last_group_losses = None
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        group_labels = layout.group_labels[:, labels]  # (G + 1, N)
        weights = torch.ones(group_labels.shape, dtype=torch.float32, device=logits.device)
        weights[1:] = sample_group_rois(group_labels[1:] > 0, self.others_sample_ratio).float()
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0) * self.loss_weight
        target_columns = (group_labels + layout.starts[:, None]).t().contiguous()
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss, per_group = _GroupSoftmaxCE.apply(logits.float().contiguous(), target_columns, weights,
                                                    layout.slices)
        if self.scalars_wanted:
            self._last_group_losses = per_group
        return {"loss_cls": loss}

    def predict_probs(self, logits):
        layout = self.layout(logits.device)
        z = logits.float()
        probs = torch.empty_like(z)
        for first, length in layout.slices:
            probs[:, first:first + length] = F.softmax(z[:, first:first + length], dim=1)
        return torch.cat([probs[:, layout.class_columns] * probs[:, 1:2], probs[:, 0:1]], dim=1)

    def scalars(self):
        """The last step's loss of each group (``loss_group0`` the background-vs-foreground group)."""
        if self._last_group_losses is None:
            return {}
        return {f"loss_group{g}": v for g, v in enumerate(self._last_group_losses.tolist())}

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, group_boundaries={self.group_boundaries}, "
                f"others_sample_ratio={self.others_sample_ratio}, loss_weight={self.loss_weight}")
