"""
DB: Distribution-Balanced loss (Wu et al., "Distribution-Balanced Loss for Multi-Label
Classification in Long-Tailed Datasets", ECCV 2020) on the box predictor's sigmoid head, as the
authors' code computes it (wutong16/DistributionBalancedLoss, ``mllt/models/losses/resample_loss.py``
``ResampleLoss`` with ``reweight_func='rebalance'``, focal on, ``logit_reg``; defaults of their
released configs ``configs/{coco,voc}/LT_resnet50_pfc_DB.py``).

C logits, no background logit: a background RoI is a negative of every class. With n_j the training
*image* counts (their ``class_freq``: images containing class j) and M the training images (their
``train_num = class_freq + neg_class_freq``: ``num_images`` of the class statistics):

- re-balanced weights (their ``rebalance_weight``, positives and negatives alike): for a RoI of
  class y, ``r_ij = (1/n_j) / Σ_k y_ik (1/n_k) = n_y / n_j`` and
  ``w_ij = σ(β (r_ij − μ)) + α``; a background RoI has no label, its repeat rate Σ_k y_ik/n_k is 0
  and r = +∞, so ``w = 1 + α`` on every class (the limit their formula takes, which our code
  evaluates exactly: 1/0 = inf in floating point);
- negative-tolerant regularization (their ``logit_reg_functions``): ``v_j = −κ · log(M/n_j − 1) / λ``
  (the init bias), ``x_ij = z_ij + v_j`` on the positive, ``x_ij = λ (z_ij + v_j)`` on the
  negatives, whose weights are divided by λ;
- focal term (their ``focal=dict(focal=True, balance_param, gamma)``): with p_t = exp(−BCE(x, y)),

      L = loss_weight · balance · Σ_ij w'_ij (1 − p_t,ij)^γ BCE(x_ij, y_ij) / N,   w' = w (positive), w/λ (negatives),

  N the sampled RoIs. The gradient flows through (1 − p_t)^γ too, as theirs (p_t is not detached):
  ``∂L/∂z_ij = ∓ balance · w_ij (1 − p_t)^γ (γ p_t BCE + 1 − p_t) / N`` (− on the positive, + on the
  negatives: λ cancels against w/λ).

Inference: ``p_j = σ(z_j)`` of the raw logits (the regularization is training-only, as in their
``ClsHead``, whose test path never calls the loss); the background column is ``1 − max_j p_j``.

Defaults (their DB configs): ALPHA 0.1, BETA 10.0, MU 0.2 (their ``map_param`` alpha / beta /
gamma), NEG_SCALE λ 2.0, INIT_BIAS κ 0.05, FOCAL_GAMMA 2.0, BALANCE 2.0, LOSS_WEIGHT 1.0. Their code
has no detection or LVIS version; the configs here run it in the standard LVIS Mask R-CNN recipe.

Differences from their code: the normaliser is the number of RoIs (the sum over classes averaged
over RoIs, Detectron2's sigmoid loss; theirs returns the elementwise losses, which mmcv averages over
all N · C entries: 1/C of this value, LOSS_WEIGHT 1/C reproduces it); the background RoIs, which
multi-label classification does not have, are handled as above; counts clamped to [1, M − 1] (a
class without images, or in every image, would get an infinite init bias); the classifier bias
starts at zero, as their ``ClsHead``; the ratio table ``σ(β (n_a / n_j − μ)) + α`` is computed once
per class statistics (a (C + 1, C) float32 table, 5.8 MB at LVIS scale) and a RoI reads its row;
value and analytic gradient come from one pass of elementwise kernels (no autograd graph); the
init bias is not added to the head's output in place (theirs is).
"""
import torch
from torch.nn import functional as F

from .bal_bce import CachedClassConstants
from .base import ClassificationLoss, empty_loss, scaled_stashed_grad
from .sigmoid import with_background_column
from ..registry import ROI_CLS_LOSS_REGISTRY, config_node, register

__all__ = ["DistributionBalancedLoss", "db_weight_table", "db_init_bias"]


def db_weight_table(image_count, alpha: float, beta: float, mu: float) -> torch.Tensor:
    """(C + 1, C) float64: row a < C the re-balanced weights ``σ(β (n_a / n_j − μ)) + α`` of a RoI
    of class a, row C (background) ``1 + α`` (counts clamped at 1)."""
    n = torch.as_tensor(image_count).double().clamp(min=1)
    table = torch.sigmoid(beta * (n[:, None] / n[None, :] - mu)) + alpha
    return torch.cat([table, table.new_full((1, n.numel()), 1.0 + alpha)])


def db_init_bias(image_count, num_images, init_bias: float, neg_scale: float) -> torch.Tensor:
    """(C,) float64 ``v_j = −κ · log(M / n_j − 1) / λ`` (n clamped to [1, M − 1])."""
    m = torch.as_tensor(num_images).double().clamp(min=2)
    n = torch.minimum(torch.as_tensor(image_count).double().clamp(min=1), m - 1)
    return -torch.log(m / n - 1.0) * init_bias / neg_scale


class _DistributionBalancedBCE(torch.autograd.Function):
    """Σ_ij of the DB loss terms (module docstring) times ``scale`` (balance · loss_weight / N) and
    their gradient: every entry first treated as a negative, then each foreground row's label entry
    replaced by its positive term. Eleven elementwise passes over (N, C), five buffers, one of them
    the gradient; the weights come pre-scaled from the (C + 1, C) table (scaling the table is 1/7 of
    an (N, C) pass at LVIS scale)."""

    @staticmethod
    def forward(ctx, logits, labels, table, bias, neg_scale, gamma, scale):
        num_classes = logits.shape[1]
        is_fg = (labels < num_classes).to(logits.dtype)
        rows = labels.clamp(max=num_classes - 1)[:, None]
        weight = (table * scale).index_select(0, labels)  # (N, C): scale · w, each RoI's row
        w_y = weight.gather(1, rows)[:, 0]
        x_y = logits.gather(1, rows)[:, 0] + bias[rows[:, 0]]  # z + v at the label
        # negatives: m = λ (z + v), 1 − p_t = u = σ(m), p_t = 1 − u, BCE = softplus(m)
        m = torch.add(bias * neg_scale, logits, alpha=neg_scale)
        u = torch.sigmoid(m)
        bce = F.softplus(m)
        # gradient s w (1 − p_t)^γ (γ p_t BCE + 1 − p_t) = s w u^γ (γ (1 − u) BCE + u)
        one_minus_u = torch.sub(m.new_ones(()), u, out=m)
        inner = torch.addcmul(u, one_minus_u, bce, value=gamma)
        del m, one_minus_u
        u_gamma = u.mul_(u) if gamma == 2.0 else u.pow_(gamma)
        focal = bce.mul_(u_gamma)  # u^γ BCE
        neg_total = torch.dot(focal.view(-1), weight.view(-1)).double()
        neg_y = (focal.gather(1, rows)[:, 0] * w_y).double()
        grad = u_gamma.mul_(inner).mul_(weight)
        del inner, focal, weight
        # the positive of each foreground row: x = z + v, p_t = σ(x), 1 − p_t = σ(−x), BCE = softplus(−x)
        p_pos = torch.sigmoid(x_y)
        u_pos = torch.sigmoid(-x_y)
        bce_pos = F.softplus(-x_y)
        u_pos_gamma = u_pos.pow(gamma)
        pos_terms = (u_pos_gamma * bce_pos * w_y).double()
        grad_pos = -w_y * u_pos_gamma * (gamma * p_pos * bce_pos + u_pos)
        # replace the label entries of the foreground rows (background rows keep their negative)
        label_grad = grad.gather(1, rows)[:, 0]
        grad.scatter_(1, rows, (is_fg * grad_pos + (1.0 - is_fg) * label_grad)[:, None])
        total = neg_total / neg_scale + ((pos_terms - neg_y / neg_scale) * is_fg.double()).sum()
        ctx.grad = grad
        return total.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        return scaled_stashed_grad(ctx, grad_loss, "DB loss"), None, None, None, None, None, None


@register(ROI_CLS_LOSS_REGISTRY)
class DistributionBalancedLoss(ClassificationLoss):
    name = "db"
    #: the README method table's row (``python -m eqlosses_d2.model_zoo.docs --write``)
    doc_method = "DB loss, re-balanced weights + negative-tolerant regularization (Wu et al., ECCV 2020)"
    doc_paper = "no LVIS result (multi-label classification only)"
    family = "sigmoid"
    config_node = "DB"
    extra_logits = 0

    @classmethod
    def add_config(cls, cfg):
        _C = config_node(cfg, "MODEL.EQLOSSES.DB")
        # re-balanced weight σ(β (r − μ)) + α, r = n_y / n_j (their map_param alpha, beta, gamma)
        _C.ALPHA = 0.1
        _C.BETA = 10.0
        _C.MU = 0.2
        # negative-tolerant regularization: λ (negatives' logit scale) and κ (init bias factor)
        _C.NEG_SCALE = 2.0
        _C.INIT_BIAS = 0.05
        # focal term (1 − p_t)^γ and its factor (their focal gamma and balance_param)
        _C.FOCAL_GAMMA = 2.0
        _C.BALANCE = 2.0
        # weight of the loss (1/C reproduces their mean over all N·C entries)
        _C.LOSS_WEIGHT = 1.0

    def __init__(self, num_classes, class_stats=None, alpha=0.1, beta=10.0, mu=0.2, neg_scale=2.0, init_bias=0.05,
                 focal_gamma=2.0, balance=2.0, loss_weight=1.0):
        super().__init__(num_classes, class_stats)
        if neg_scale <= 0:
            raise ValueError(f"DB.NEG_SCALE must be > 0, got {neg_scale}")
        if focal_gamma < 0:
            raise ValueError(f"DB.FOCAL_GAMMA must be >= 0, got {focal_gamma}")
        self.alpha, self.beta, self.mu = float(alpha), float(beta), float(mu)
        self.neg_scale, self.init_bias = float(neg_scale), float(init_bias)
        self.focal_gamma, self.balance, self.loss_weight = float(focal_gamma), float(balance), float(loss_weight)
        self._constants = CachedClassConstants()

    def constants(self):
        """The (C + 1, C) weight table and the (C,) init bias, float32, from the class statistics."""
        stats = self.require_class_stats()
        counts, total = stats.image_count, stats.num_images

        def compute():
            table = db_weight_table(counts, self.alpha, self.beta, self.mu).float()
            bias = db_init_bias(counts, total, self.init_bias, self.neg_scale).float()
            return table, bias

        return self._constants.get((counts, total), compute)

    def forward(self, logits, labels, **context):
        self._check(logits, labels)
        table, bias = (t.to(logits.device) for t in self.constants())
        if logits.shape[0] == 0:
            return {"loss_cls": empty_loss(logits)}
        x = logits.float().contiguous()
        with torch.autocast(device_type=x.device.type, enabled=False):
            loss = _DistributionBalancedBCE.apply(x, labels, table, bias, self.neg_scale, self.focal_gamma,
                                                  self.balance * self.loss_weight / x.shape[0])
        return {"loss_cls": loss}

    def predict_probs(self, logits):
        return with_background_column(torch.sigmoid(logits.float()))

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, alpha={self.alpha}, beta={self.beta}, mu={self.mu}, "
                f"neg_scale={self.neg_scale}, init_bias={self.init_bias}, focal_gamma={self.focal_gamma}, "
                f"balance={self.balance}, loss_weight={self.loss_weight}")
