"""
TDE's box classifier: the causal-norm multi-head classifier of Tang et al., "Long-Tailed
Classification by Keeping the Good and Removing the Bad Momentum Causal Effect" (NeurIPS 2020),
with its counterfactual (Total Direct Effect) inference and Background-Exempted Inference, as the
RoI box predictor's ``cls_score`` (``MODEL.EQLOSSES.DECOUPLING.CLASSIFIER "tde"``, hyper-parameters
``MODEL.EQLOSSES.TDE``). The classifier is pure PyTorch, its logits the classification head's
(:func:`eqlosses_d2.classification.heads.tde.causal_norm_logits`); :func:`validate_box_tde` is the
config check (one-line errors naming the key).

Training (softmax CE, ``MODEL.EQLOSSES.LOSS softmax``): C + 1 outputs, background last, the
background a row of the same causal-norm classifier (the authors' ``fc_cls`` is (C + 1, D)):

    z_j = (τ/K) · Σ_k <x_k/‖x_k‖,  w_jk/(‖w_jk‖ + γ)>,      j = 0 .. C,  no bias,

and the moving feature direction, over the foreground RoIs (labels 0 .. C − 1) of every step:

    c ← μ · c + (Σ_{i fg} x_i) / #fg      (a decayed sum, no (1 − μ) factor; only c's direction is used)

(a float64 buffer ``feature_moving_average``, in checkpoints; the foreground sum and count are
summed over processes with ``sync_state`` first, so every rank accumulates the global batch's
foreground mean). :meth:`CausalNormClassifier.forward` keeps the training step's features; the box
predictor's ``losses`` hands the RoIs' labels to :meth:`CausalNormClassifier.update_direction`.

Inference (eval mode): the TDE logits, with ĉ_k = c_k/‖c_k‖ and cos_k = <x̂_k, ĉ_k>,

    y_j = z_j − (τ/K) · Σ_k α · cos_k · <ĉ_k, w_jk/(‖w_jk‖ + γ)>,

then Background-Exempted Inference (``BACKGROUND_EXEMPTED``, their ``KEEP_FG``): with p = softmax(z)
and q = softmax(y), the background keeps p_bg and the foreground mass P = Σ_{j<C} p_j is shared as
q's foreground: p̃_bg = p_bg, p̃_j = P · q_j / Σ_{l<C} q_l. The classifier outputs log p̃, computed
in log space,

    log p̃_j = logsumexp(z_fg) − logsumexp(z) + y_j − logsumexp(y_fg),  log p̃_bg = z_bg − logsumexp(z),

so that the softmax loss's own activation (``predict_probs``) returns p̃ exactly (Σ p̃ = 1). Without
the exemption the outputs are y (their ``KEEP_FG False``). α = 0: the training logits z.

Defaults (``MODEL.EQLOSSES.TDE``): NUM_HEAD 2, TAU 16, GAMMA 1/32, ALPHA 1.5, MOMENTUM 0.9998,
BACKGROUND_EXEMPTED True, the authors' LVIS v1 values (``NUM_HEAD``, ``SCALE = 16/NUM_HEAD``,
``SCALE_WEIGHT = 1/32``, ``ALPHA = 1.5``, ``MU = 1 − (1 − 0.9)·0.002``, ``KEEP_FG``); weight
initialisation U(−1/√D, 1/√D), theirs. ALPHA and BACKGROUND_EXEMPTED act at inference only:
``--eval-only`` with ``MODEL.EQLOSSES.TDE.ALPHA`` changes α without re-training (their README:
pick α so that α·cos ≈ 1 on average).

Authors' code read: KaihuaTang/Long-Tailed-Recognition.pytorch at
5c916d0d0fd5e1fa984621b86f15cda2bc69df17, ``lvis1.0/mmdet/models/roi_heads/bbox_heads/convfc_bbox_head.py``
(``cos_forward``, ``update_embed``), ``lvis1.0/mmdet/models/roi_heads/htc_roi_head.py``,
``lvis1.0/mmdet/models/roi_heads/bbox_heads/bbox_head.py`` (``get_bboxes``),
``htc_r101_fpn_20e_causal.py`` (their ``lvis1.0`` configs, folder ``htc``), and ``lvis_old`` (their LVIS v0.5 code).
Differences from it:

- foreground RoIs are labels 0 .. C − 1: their lvis1.0 ``update_embed`` keeps ``gt_label > 0``,
  which in mmdetection 2 (background label C) drops class 0's RoIs and keeps the background ones; the
  line is from their LVIS v0.5 code (mmdetection 1, background label 0), where it selects the
  foreground, as its comment ("remove background") says. We follow the intent;
- the direction accumulates the global batch's foreground mean (theirs: each process its own
  local mean; mmdetection's DDP does not broadcast buffers, rank 0's is saved); a step without
  foreground RoIs in the global batch decays c (theirs: a NaN mean, never reached with background
  RoIs selected);
- log space for the exempted probabilities, exact; theirs adds ε = 1e-10 to q_j and to Q = Σ_{l<C} q_l,
  which moves p̃_j by at most P·ε/Q (a floor P·ε/Q where q_j underflows; ours keeps p̃_j > 0 down to
  float's range);
- their ``get_bboxes`` applies a softmax to the (already exempted) probabilities (HTC averages
  the stages' probabilities, then ``F.softmax``): a near-monotone squashing of the scores to ≈ 1/(C + 1);
  we use the probabilities (a cascade head averages the stages' p̃, Detectron2's cascade inference);
- norms clamped at 1e-12 (``F.normalize``), theirs ``x/(‖x‖ + 1e-9)`` and ``w/(‖w‖ + 1e-9 + γ)``;
  cos is the dot product of the unit vectors (their ``get_cos_sin`` divides by the unit norms again
  and computes an unused sine);
- their detector is HTC without the semantic branch (R-101-FPN, 20 epochs); the recipes here use
  Detectron2's Cascade Mask R-CNN (what their paper's table names: "Cascade Mask R-CNN framework").
"""
import torch
from torch import nn

from ..classification.heads.tde import causal_norm_logits
from ..config import ConfigError
from .decoupling import check_own_box_classifier, check_own_classifier_roi_heads
from ..losses.base import sync_state
from ..registry import CONFIG_CHECK_REGISTRY

__all__ = ["CausalNormClassifier", "background_exempted_log_probs", "tde_classifier_from_cfg", "validate_box_tde"]


def background_exempted_log_probs(logits, tde_logits):
    """
    (N, C + 1) training logits z and TDE logits y (background last) → (N, C + 1) log p̃: the
    background keeps log softmax(z)_bg, the foreground shares softmax(z)'s foreground mass in
    proportion to softmax(y) over the foreground (see the module docstring).
    """
    log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
    log_fg_mass = torch.logsumexp(logits[:, :-1], dim=1, keepdim=True) - log_norm
    fg = log_fg_mass + torch.log_softmax(tde_logits[:, :-1], dim=1)
    return torch.cat([fg, logits[:, -1:] - log_norm], dim=1)


class CausalNormClassifier(nn.Module):
    """TDE's box classifier (C + 1 outputs, background last): causal-norm logits in training, with
    the foreground moving direction; TDE + Background-Exempted log-probabilities in eval mode."""

    def __init__(self, in_features: int, out_features: int, num_head: int = 2, tau: float = 16.0,
                 gamma: float = 0.03125, alpha: float = 1.5, momentum: float = 0.9998,
                 background_exempted: bool = True):
        super().__init__()
        if int(num_head) != num_head or num_head < 1:
            raise ValueError(f"MODEL.EQLOSSES.TDE.NUM_HEAD must be an integer >= 1, got {num_head}")
        if in_features % int(num_head):
            raise ValueError(f"MODEL.EQLOSSES.TDE.NUM_HEAD {num_head} does not divide the box head's feature size "
                             f"{in_features}")
        if out_features < 2:
            raise ValueError(f"TDE's box classifier needs C + 1 >= 2 outputs (background last), got {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.num_head = int(num_head)
        self.tau = float(tau)
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.momentum = float(momentum)
        self.background_exempted = bool(background_exempted)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        bound = in_features ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)
        # c: the decayed sum of the foreground RoIs' mean feature (float64; saved in checkpoints)
        self.register_buffer("feature_moving_average", torch.zeros(in_features, dtype=torch.float64))
        self._step_features = None  # the last training forward's features, for update_direction

    def forward(self, features):
        if self.training:
            self._step_features = features.detach()
            return causal_norm_logits(features, self.weight, self.num_head, self.tau, self.gamma)
        logits = causal_norm_logits(features, self.weight, self.num_head, self.tau, self.gamma)
        if self.alpha == 0:
            return logits
        tde_logits = causal_norm_logits(features, self.weight, self.num_head, self.tau, self.gamma,
                                        self.feature_moving_average, self.alpha)
        if not self.background_exempted:
            return tde_logits
        return background_exempted_log_probs(logits, tde_logits)

    @torch.no_grad()
    def update_direction(self, labels, features=None):
        """c ← μ·c + the global batch's foreground mean feature (foreground: 0 <= label < C; sum and
        count summed over processes first). ``features``: those of the last training forward by
        default (consumed). Every process must call it once per step (a collective)."""
        if features is None:
            features, self._step_features = self._step_features, None
        if features is None:
            raise RuntimeError("CausalNormClassifier.update_direction: no training forward to take the features of")
        foreground = ((labels >= 0) & (labels < self.out_features - 1)).to(torch.float64)
        feature_sum, count = sync_state(foreground @ features.to(torch.float64), foreground.sum().reshape(1))
        self.feature_moving_average.mul_(self.momentum).add_(feature_sum / count.clamp(min=1))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_head={self.num_head}, "
                f"tau={self.tau}, gamma={self.gamma}, alpha={self.alpha}, momentum={self.momentum}, "
                f"background_exempted={self.background_exempted}")


def tde_classifier_from_cfg(cfg, in_features: int, out_features: int) -> CausalNormClassifier:
    """The box predictor's TDE classifier from ``MODEL.EQLOSSES.TDE``."""
    node = cfg.MODEL.EQLOSSES.TDE
    return CausalNormClassifier(in_features, out_features, num_head=node.NUM_HEAD, tau=node.TAU, gamma=node.GAMMA,
                                alpha=node.ALPHA, momentum=node.MOMENTUM,
                                background_exempted=node.BACKGROUND_EXEMPTED)


@CONFIG_CHECK_REGISTRY.register()
def validate_box_tde(cfg):
    """One-line errors for DECOUPLING.CLASSIFIER "tde": MODEL.EQLOSSES.TDE's values and what TDE's
    box classifier needs (softmax CE on C + 1 logits, a standard or cascade long-tail RoI head, no
    cosine classifier, no cRT, no post-hoc calibration)."""
    node = cfg.MODEL.EQLOSSES.get("TDE")
    if node is None or cfg.MODEL.EQLOSSES.DECOUPLING.CLASSIFIER != "tde":
        return
    key = "MODEL.EQLOSSES.TDE"
    if not isinstance(node.NUM_HEAD, int) or node.NUM_HEAD < 1:
        raise ConfigError(f"{key}.NUM_HEAD must be an integer >= 1; got {node.NUM_HEAD!r}")
    if not node.TAU > 0:
        raise ConfigError(f"{key}.TAU must be > 0; got {node.TAU}")
    if not node.GAMMA >= 0:
        raise ConfigError(f"{key}.GAMMA must be >= 0; got {node.GAMMA}")
    if not node.ALPHA >= 0:
        raise ConfigError(f"{key}.ALPHA must be >= 0; got {node.ALPHA}")
    if not 0 <= node.MOMENTUM <= 1:
        raise ConfigError(f"{key}.MOMENTUM must be in [0, 1]; got {node.MOMENTUM}")
    what = "MODEL.EQLOSSES.DECOUPLING.CLASSIFIER 'tde'"
    check_own_classifier_roi_heads(cfg, what)
    if cfg.MODEL.EQLOSSES.LOSS != "softmax":
        raise ConfigError(f"{what} is trained with softmax CE on C + 1 logits (the authors'): MODEL.EQLOSSES.LOSS must "
                          f"be softmax, got '{cfg.MODEL.EQLOSSES.LOSS}'")
    check_own_box_classifier(cfg, what, "its counterfactual inference")
