"""
Accumulated gradient statistics: the shared state of the gradient-driven losses
(EQLv2 and Softmax-EQL here; EFL reuses it).

For every foreground class j the losses accumulate, from the start of training,

- ``pos_grad_j``: the summed absolute gradient of the loss with respect to logit j over
  the samples whose label is j (positive gradients);
- ``neg_grad_j``: the same over the samples whose label is not j (negative gradients);

and read them back as the ratio ``g_j = pos_grad_j / (neg_grad_j + 1e-10)`` (EQLv2, EFL)
or directly (Softmax-EQL's indicators). Each loss computes its per-batch contribution
analytically (no backward hook), so the statistics work under mixed precision too.

State semantics (the order of normalization and update every gradient-driven loss follows):

- the buffers are registered, so they are saved in checkpoints and restored on resume;
- the per-batch contribution (C,) of every process is summed with :func:`.base.sync_state`
  *before* it is accumulated, so all processes hold identical statistics (Detectron2's
  DDP does not broadcast buffers);
- a loss reads the statistics (its weights or margins for iteration t) before it adds
  iteration t's contribution: the factors of iteration t use statistics up to t - 1;
- cumulative, no decay, no reset.

The buffers are float64. They are sums over the whole schedule (up to ~10^5 iterations of
~10^4 RoIs): late in training a frequent class's ``neg_grad`` is orders of magnitude larger
than one iteration's contribution to it, and in float32 (24-bit mantissa) those additions
would be rounded (or, below half an ulp, dropped) systematically. Float64 costs nothing at
C = 1203 and keeps the sums exact to ~1e-16 relative; the contributions themselves are
computed in float32 from the float32 loss.

Before a class has any statistics (at the start of training) its ratio is
``initial_ratio``: 100 for EQLv2 (its weight mapping then gives exactly r = q = 1, plain
BCE in the first iteration, as the authors' ``pos_neg = 100`` buffer does), 1 for EFL.
After the first update every class has negative statistics (every RoI of another label
contributes to them), so from then on the ratio is ``pos_grad / (neg_grad + 1e-10)``
for every class, 0 for a class never seen as a positive, as in the authors' code.
"""
from typing import Dict, Optional

import torch
from torch import nn

from .base import sync_state

__all__ = ["GradientStats", "frequency_group_means", "label_and_off_label_sums", "FREQUENCY_GROUP_NAMES"]

#: names of the LVIS frequency groups, in the order of ``class_stats.frequency_group``
FREQUENCY_GROUP_NAMES = ("r", "c", "f")


class GradientStats(nn.Module):
    """
    Buffers ``pos_grad`` and ``neg_grad`` (C,) float64, summed over processes and iterations.

    Args:
        num_classes: C, the number of foreground classes with statistics.
        initial_ratio: :meth:`ratio` of a class without statistics yet.
    """

    def __init__(self, num_classes: int, initial_ratio: float = 100.0):
        super().__init__()
        self.num_classes = num_classes
        self.initial_ratio = float(initial_ratio)
        self.register_buffer("pos_grad", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("neg_grad", torch.zeros(num_classes, dtype=torch.float64))

    @torch.no_grad()
    def update(self, pos_contrib: torch.Tensor, neg_contrib: torch.Tensor, finite=None):
        """
        Add one iteration's (C,) contributions of this process, after summing them over
        all processes. Every process must call it every iteration (it is a collective),
        with zeros when it had no sample. ``finite``: None, or a 0-dim bool tensor (the GPU
        policy's finite check of the logits): when false this process contributes zeros.
        """
        if pos_contrib.shape != (self.num_classes,) or neg_contrib.shape != (self.num_classes,):
            raise ValueError(
                f"gradient statistics of {self.num_classes} classes got contributions of shape "
                f"{tuple(pos_contrib.shape)} and {tuple(neg_contrib.shape)}"
            )
        pos, neg = sync_state(pos_contrib.to(self.pos_grad.device), neg_contrib.to(self.pos_grad.device),
                              finite=finite, dtype=torch.float64)  # one collective for both sums
        self.pos_grad += pos
        self.neg_grad += neg

    def update_without_samples(self):
        """This process had no sample this iteration: contribute zeros, so that the
        collective in :meth:`update` still sees every process."""
        zeros = self.pos_grad.new_zeros(self.num_classes)
        self.update(zeros, zeros)

    def ratio(self) -> torch.Tensor:
        """(C,) float64 ``pos_grad / (neg_grad + 1e-10)``; ``initial_ratio`` where a class has
        no statistics yet."""
        has_stats = (self.pos_grad > 0) | (self.neg_grad > 0)
        ratio = self.pos_grad / (self.neg_grad + 1e-10)
        return torch.where(has_stats, ratio, torch.full_like(ratio, self.initial_ratio))

    def extra_repr(self):
        return f"num_classes={self.num_classes}, initial_ratio={self.initial_ratio}"


def label_and_off_label_sums(column_sums, labels, prob_y, per_row):
    """
    Per-class sums for the fused gradient-statistics computations, from the (K,) column
    sums ``Σ_i prob_ij`` of an (N, K) matrix ``prob``, labels in [0, K) and
    ``prob_y = prob[i, y_i]``: ``Σ_{i: y_i = j} per_row_i`` (the positives' share) and
    ``Σ_{i: y_i ≠ j} prob_ij`` (the negatives'), without a one-hot matrix; in the dtype of
    ``column_sums``.
    """
    zeros = torch.zeros_like(column_sums)
    on_label = zeros.clone().index_add_(0, labels, per_row.to(zeros))
    off_label = column_sums - zeros.index_add_(0, labels, prob_y.to(zeros))
    return on_label, off_label


def frequency_group_means(values: torch.Tensor, class_stats, prefix: str) -> Dict[str, float]:
    """
    ``{prefix: mean, prefix_r: mean over rare classes, prefix_c: ..., prefix_f: ...}`` of a
    (C,) tensor, as Python floats for TensorBoard (one host synchronization). The per-group entries
    need ``class_stats`` with frequency groups; groups without classes are left out.
    """
    values = values.detach().double()
    names = [prefix]
    means = [values.mean()]
    groups: Optional[torch.Tensor] = None
    if class_stats is not None and bool(getattr(class_stats, "is_set", True)):
        groups = getattr(class_stats, "frequency_group", None)
    if groups is not None and groups.shape == values.shape:
        groups = groups.to(values.device)
        for index, name in enumerate(FREQUENCY_GROUP_NAMES):
            mask = groups == index
            names.append(f"{prefix}_{name}")
            means.append(values[mask].mean())  # NaN for an empty group, dropped below
    numbers = torch.stack(means).tolist()
    return {name: number for name, number in zip(names, numbers) if number == number}
