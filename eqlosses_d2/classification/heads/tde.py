"""
``tde``: the causal-norm multi-head classifier of TDE (Tang et al., "Long-Tailed Classification
by Keeping the Good and Removing the Bad Momentum Causal Effect", NeurIPS 2020), with its
counterfactual (Total Direct Effect) inference.

Training (plain softmax CE on these logits, the authors' setting; ``LOSS: softmax``): the
feature x (N, D) and the class weights w_j are split into K heads of D/K channels, and

    z_j = (τ/K) · Σ_k  <x_k / ‖x_k‖,  w_jk / (‖w_jk‖ + γ)>,

while a moving average of the batch's mean feature is kept (a float64 buffer, saved in
checkpoints; the batch mean is summed over processes with ``sync_state`` before accumulation):

    c ← μ · c + mean_i x_i     (the authors' update: no (1 − μ) factor; only c's direction is used)

with μ = 1 − (1 − m) · min(s · lr, 1), m = MOMENTUM, s = MOMENTUM_LR_SCALE, lr the learning rate
(their ImageNet-LT / Places-LT rule: μ = 0.9 while lr ≥ 1/50, rising to 1 as the cosine
schedule's lr goes to 0; s = 0 is their CIFAR rule, μ = m throughout).

Inference (eval mode): with ĉ_k = c_k/‖c_k‖, x̂_k = x_k/‖x_k‖, ŵ_jk = w_jk/(‖w_jk‖ + γ) and
cos_k = <x̂_k, ĉ_k>, the counterfactual term is removed head by head:

    z_j^TDE = (τ/K) · Σ_k  <x̂_k − α · cos_k · ĉ_k,  ŵ_jk>

(α = 0: the training logits). The authors' ``get_cos_sin`` divides <x̂_k, ĉ_k> by ‖x̂_k‖·‖ĉ_k‖
again (unit vectors: a no-op up to rounding) and computes a sine it never uses; we take the
dot product of the unit vectors and no sine.

Defaults (``MODEL.EQLOSSES.CLASSIFICATION.TDE``): NUM_HEAD 2, TAU 16, GAMMA 1/32, ALPHA 3.0
(their ImageNet-LT ``causal_norm.yaml``), MOMENTUM 0.9, MOMENTUM_LR_SCALE 50. Weight
initialisation U(−1/√D, 1/√D), theirs. ALPHA acts at inference only: change it with
``--eval-only`` (their README's advice; theirs: pick α so that α·cos ≈ 1 on average).

Authors' code read: KaihuaTang/Long-Tailed-Recognition.pytorch at
5c916d0d0fd5e1fa984621b86f15cda2bc69df17, ``classification/models/CausalNormClassifier.py``,
``classification/run_networks.py`` (the moving average and its lr-scaled μ),
``classification/config/ImageNet_LT/causal_norm.yaml``. Differences from it:

- μ is computed every iteration from the previous iteration's learning rate (the trainer's
  ``lr`` scalar; the base momentum at the first iteration), theirs once per epoch from that
  epoch's learning rate;
- norms are clamped at 1e-12 (``F.normalize``): a zero feature head, or inference before any
  training step (c = 0), gives finite logits (the latter: the training logits), theirs NaN;
- with several processes c accumulates the mean over the global batch (theirs, one process with
  DataParallel, the same global mean).
"""
import torch
from torch import nn
from torch.nn import functional as F

from ...losses.base import sync_state
from ...registry import CLASSIFIER_HEAD_REGISTRY, config_node, register
from .base import ClassifierHead

__all__ = ["TDEHead", "causal_norm_logits"]


def causal_norm_logits(features, weight, num_head: int, tau: float, gamma: float, direction=None,
                       alpha: float = 0.0):
    """
    (N, D) features, (C, D) class weights → (N, C) logits (pure function; shared with the detection
    box classifier, :mod:`eqlosses_d2.modeling.tde`):

        z_j = (τ/K) · Σ_k <x̂_k − α · cos_k · ĉ_k,  w_jk / (‖w_jk‖ + γ)>,   cos_k = <x̂_k, ĉ_k>

    x̂_k = x_k/‖x_k‖, ĉ_k = c_k/‖c_k‖ (norms clamped at 1e-12), ``direction`` c (D,) the moving
    feature direction; α = 0 or ``direction`` None: the training (causal-norm) logits.
    """
    head_dim = features.shape[1] // num_head  # explicit: a batch of 0 rows has no −1 to infer
    normed_x = F.normalize(features.reshape(features.shape[0], num_head, head_dim), dim=2)
    heads_w = weight.reshape(weight.shape[0], num_head, head_dim)
    normed_w = (heads_w / (heads_w.norm(dim=2, keepdim=True) + gamma)).to(normed_x.dtype)
    if direction is not None and alpha > 0:
        unit_c = F.normalize(direction.reshape(1, num_head, head_dim), dim=2).to(normed_x.dtype)
        cos = (normed_x * unit_c).sum(dim=2, keepdim=True)  # (N, K, 1)
        normed_x = normed_x - alpha * cos * unit_c
    return (tau / num_head) * torch.einsum("nkd,ckd->nc", normed_x, normed_w)


@register(CLASSIFIER_HEAD_REGISTRY)
class TDEHead(ClassifierHead):
    name = "tde"
    config_node = "TDE"

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        _C = config_node(cfg, "MODEL.EQLOSSES.CLASSIFICATION.TDE")
        # K: the feature and the class weights are split into K heads (D must be a multiple of K)
        _C.NUM_HEAD = 2
        # τ: the logits are (τ/K) · Σ_k cos-like terms
        _C.TAU = 16.0
        # γ of the causal norm w / (‖w‖ + γ)
        _C.GAMMA = 0.03125
        # α of the counterfactual inference (0: plain causal-norm logits); inference only
        _C.ALPHA = 3.0
        # m: the moving average c ← μ·c + batch mean, μ = 1 − (1 − m)·min(s·lr, 1)
        _C.MOMENTUM = 0.9
        # s of that rule (0: μ = m always, the authors' CIFAR rule)
        _C.MOMENTUM_LR_SCALE = 50.0

    def __init__(self, in_features, num_classes, num_head=2, tau=16.0, gamma=0.03125, alpha=3.0,
                 momentum=0.9, momentum_lr_scale=50.0):
        super().__init__(in_features, num_classes)
        if int(num_head) != num_head or num_head < 1:
            raise ValueError(f"TDE.NUM_HEAD must be an integer >= 1, got {num_head}")
        if in_features % int(num_head):
            raise ValueError(f"TDE.NUM_HEAD {num_head} does not divide the feature size {in_features}")
        if not tau > 0:
            raise ValueError(f"TDE.TAU must be > 0, got {tau}")
        if gamma < 0:
            raise ValueError(f"TDE.GAMMA must be >= 0, got {gamma}")
        if alpha < 0:
            raise ValueError(f"TDE.ALPHA must be >= 0, got {alpha}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"TDE.MOMENTUM must be in [0, 1], got {momentum}")
        if momentum_lr_scale < 0:
            raise ValueError(f"TDE.MOMENTUM_LR_SCALE must be >= 0, got {momentum_lr_scale}")
        self.num_head = int(num_head)
        self.tau = float(tau)
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.momentum = float(momentum)
        self.momentum_lr_scale = float(momentum_lr_scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        bound = in_features ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)
        # c: the moving average of the batch mean feature (float64; saved in checkpoints)
        self.register_buffer("feature_moving_average", torch.zeros(in_features, dtype=torch.float64))

    @property
    def scale(self) -> float:
        """τ / K."""
        return self.tau / self.num_head

    def _heads(self, tensor):
        """(N, D) -> (N, K, D/K)."""
        return tensor.reshape(tensor.shape[0], self.num_head, -1)

    def normalized_weight(self) -> torch.Tensor:
        """(C, K, D/K) the causal norm w_jk / (‖w_jk‖ + γ)."""
        weight = self._heads(self.weight)
        return weight / (weight.norm(dim=2, keepdim=True) + self.gamma)

    def normalized_features(self, features) -> torch.Tensor:
        """(N, K, D/K) x_k / ‖x_k‖."""
        return F.normalize(self._heads(features), dim=2)

    def step_momentum(self, learning_rate=None) -> float:
        """μ of this step: 1 − (1 − m)·min(s·lr, 1); m when lr is unknown or s = 0."""
        if learning_rate is None or self.momentum_lr_scale == 0:
            return self.momentum
        return 1.0 - (1.0 - self.momentum) * min(self.momentum_lr_scale * float(learning_rate), 1.0)

    @torch.no_grad()
    def update_moving_average(self, features, learning_rate=None):
        """c ← μ·c + the global batch's mean feature (summed over processes first)."""
        feature_sum, count = sync_state(
            features.detach().sum(dim=0), features.new_tensor([features.shape[0]]), dtype=torch.float64
        )
        batch_mean = feature_sum / count.clamp(min=1)
        self.feature_moving_average.mul_(self.step_momentum(learning_rate)).add_(batch_mean)

    def forward(self, features, learning_rate=None):
        """Training: the causal-norm logits (and the moving average's update); eval: the TDE logits."""
        if self.training:
            self.update_moving_average(features, learning_rate)
        direction = None if self.training else self.feature_moving_average
        return causal_norm_logits(features, self.weight, self.num_head, self.tau, self.gamma, direction, self.alpha)

    def training_step(self, features, labels, progress=None, learning_rate=None):
        """``(logits, {})``: what the meta-architecture calls in training (no extra loss)."""
        return self(features, learning_rate=learning_rate), {}

    def extra_repr(self):
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, num_head={self.num_head}, "
                f"tau={self.tau}, gamma={self.gamma}, alpha={self.alpha}, momentum={self.momentum}, "
                f"momentum_lr_scale={self.momentum_lr_scale}")
