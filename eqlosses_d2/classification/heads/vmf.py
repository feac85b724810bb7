"""
``vmf``: the von Mises-Fisher classifier of vMF-OP (Wang et al., "Towards Calibrated Hyper-Sphere
Representation via Distribution Overlap Coefficient for Long-tailed Learning", ECCV 2022): each
class j is a vMF distribution on the unit sphere S^{p−1} (p = D) with mean direction
μ_j = w_j/‖w_j‖ and its own learnt concentration κ_j = max(κ'_j, 1) (κ'_j a parameter, K_INIT 16).

Training logits, the class's vMF log-density of the unit feature x̂ up to a constant:

    z_j = κ_j · <x̂, μ_j> + b(κ_j),   b(κ) = log C_p(κ) − log C_p(16),   C_p(κ) = κ^v / I_v(κ) (·const),

v = p/2 − 1, I_v the modified Bessel function of the first kind; ∂b/∂κ = −A_p(κ), with
A_p(κ) = I_{p/2}(κ)/I_{p/2−1}(κ). The authors' classifier adds the training prior log n_j to
these logits in training only: here that is the ``balanced_softmax`` loss (τ = 1:
CE(z + log π) = CE(z + log n_j), softmax(z) at inference), so the recipe is
``HEAD: vmf, LOSS: balanced_softmax``.

Auxiliary losses (``training_step``; weights decayed as w · (1 − progress)^0.9, the authors'
(1 − epoch/epochs)^0.9, progress = iteration / SOLVER.MAX_ITER):

- ICD (inter-class overlap): OP_ij = 1 / (1 + KL(vMF_i ‖ vMF_j)),
  KL_ij = A_p(κ_i) · (κ_i − κ_j <μ_i, μ_j>) + b(κ_i) − b(κ_j);  L_icd = Σ_{i≠j} OP_ij / C²;
- CFC (class-feature consistency): for each class c in the batch, m_c the normalised sum of its
  unit features, op_c = 1 / (1 + A_p(κ_c) κ_c (1 − <μ_c, m_c>));  L_cfc = mean_c (1 − op_c).

Post-training overlap calibration (eval mode): o_j = mean_i OP_ji (its row of the overlap matrix,
the diagonal 1 included; kept in the buffer ``overlap`` at every training step and saved in
checkpoints; without ICD the authors keep b(κ_j) there instead, and so do we), min-max rescaled
to [min κ, max κ] as r_j, and

    κ*_j = κ_j^α · r_j^(1 − α),   z_j = κ*_j · <x̂, μ_j> + b(κ_j)   (b of the uncalibrated κ, theirs)

(α = TEST_ALPHA = 1: no calibration).

Bessel functions: A_p and b are computed in float64 from the power series
I_v(κ) = (κ/2)^v Σ_m (κ/2)^{2m} / (m! Γ(m+v+1)), summed in log space over a window of
``SERIES_TERMS`` = 256 terms around its largest term (exact to float64 rounding for κ up to ~10³
at any p; the window keeps its tail below e^{−12} up to κ ~ 10⁴); autograd through it gives
the exact derivatives (∂b/∂κ = −A_p, ∂A_p/∂κ = 1 − A_p² − (p−1)/κ · A_p, the authors' backward
formulas). The authors evaluate the Bessel functions with mpmath on the host, per class.

Defaults (``MODEL.EQLOSSES.CLASSIFICATION.VMF``): K_INIT 16, ICD_WEIGHT 0.2, CFC_WEIGHT 0,
AUX_DECAY_POWER 0.9, TEST_ALPHA 0.5: their ImageNet-LT ``vmf_icd.yaml`` (auxlossweight 0.2,
auxloss ['icd']) tested with ``run_test.sh``'s ``--alpha 0.5``. Weight init U(−1/√D, 1/√D), theirs.

Authors' code read: SiLangWHL/vMF-OP at 964d491c6461e45abe4e92c0660e2e5588ae73be
(linked from VipaiLab/vMF_OP), ``classification/models/multi_k_vmf_classifier.py``,
``classification/utils_multi_K_vMF.py``, ``classification/run_networks.py``,
``classification/config/ImageNet_LT/vmf{,_icd}.yaml``, ``classification/run_test.sh``.
Differences from it:

- b uses the clamped κ (theirs the raw parameter in b, the clamped one in κ·cos: the same for
  κ' ≥ 1; theirs is undefined for κ' ≤ 0);
- at inference b is recomputed from the current κ (theirs: the value of the last training step,
  computed before that step's update);
- the min-max rescaling of the overlaps with all overlaps equal gives r = min κ (theirs 0/0);
- the κ parameter gets SOLVER.WEIGHT_DECAY like every parameter (theirs ``kappa_decay: 0``), and
  the classifier the backbone's learning rate (theirs 0.1 against 0.2); one augmented view per
  image (theirs ``img_num: 2``): Detectron2's optimizer and mapper;
- no state is synchronised across processes: ``overlap`` is a function of the parameters, the
  same in every process.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from ...registry import CLASSIFIER_HEAD_REGISTRY, config_node, register
from .base import ClassifierHead

__all__ = ["VMFHead", "log_bessel_series", "vmf_log_normalizer", "mean_resultant_length"]

#: terms of the log-space Bessel series (a window around its largest term)
SERIES_TERMS = 256
#: κ of the reference normaliser b(κ) = log C_p(κ) − log C_p(16) (the authors' constant)
REFERENCE_KAPPA = 16.0
#: the authors' lower clamp of κ
KAPPA_MIN = 1.0


def log_bessel_series(kappa: torch.Tensor, order: float, terms: int = SERIES_TERMS) -> torch.Tensor:
    """log Σ_m (κ/2)^{2m} / (m! Γ(m+v+1)) = log I_v(κ) − v·log(κ/2), elementwise (κ > 0, v = order ≥ 0),
    in κ's dtype (use float64); differentiable in κ."""
    half_log = torch.log(kappa / 2)
    with torch.no_grad():
        # the largest term: m (m + v) ≈ (κ/2)²
        peak = ((order * order + kappa * kappa).sqrt() - order) / 2
        start = (peak.floor() - terms // 2).clamp(min=0)
    m = start.unsqueeze(-1) + torch.arange(terms, dtype=kappa.dtype, device=kappa.device)
    log_terms = 2 * m * half_log.unsqueeze(-1) - torch.lgamma(m + 1) - torch.lgamma(m + order + 1)
    return torch.logsumexp(log_terms, dim=-1)


def vmf_log_normalizer(kappa: torch.Tensor, dim: int) -> torch.Tensor:
    """log C_p(κ) + (p/2)·log 2π = v·log κ − log I_v(κ), v = p/2 − 1 (p = ``dim``)."""
    order = dim / 2 - 1
    return order * math.log(2.0) - log_bessel_series(kappa, order)


def mean_resultant_length(kappa: torch.Tensor, dim: int) -> torch.Tensor:
    """A_p(κ) = I_{p/2}(κ) / I_{p/2−1}(κ)."""
    order = dim / 2 - 1
    return kappa / 2 * torch.exp(log_bessel_series(kappa, order + 1) - log_bessel_series(kappa, order))


@register(CLASSIFIER_HEAD_REGISTRY)
class VMFHead(ClassifierHead):
    name = "vmf"
    config_node = "VMF"

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        _C = config_node(cfg, "MODEL.EQLOSSES.CLASSIFICATION.VMF")
        # initial concentration κ of every class (κ is clamped at >= 1)
        _C.K_INIT = 16.0
        # weight of the inter-class overlap loss L_icd (0: off; the authors' vmf.yaml 0, vmf_icd.yaml 0.2)
        _C.ICD_WEIGHT = 0.2
        # weight of the class-feature consistency loss L_cfc (0: off)
        _C.CFC_WEIGHT = 0.0
        # the auxiliary weights decay as w · (1 − iteration / SOLVER.MAX_ITER)^power
        _C.AUX_DECAY_POWER = 0.9
        # α of the overlap calibration κ* = κ^α · r^(1−α) at inference (1: none; the authors test 0.5)
        _C.TEST_ALPHA = 0.5

    def __init__(self, in_features, num_classes, k_init=16.0, icd_weight=0.2, cfc_weight=0.0,
                 aux_decay_power=0.9, test_alpha=0.5):
        super().__init__(in_features, num_classes)
        if not k_init >= KAPPA_MIN:
            raise ValueError(f"VMF.K_INIT must be >= {KAPPA_MIN}, got {k_init}")
        for key, value in (("ICD_WEIGHT", icd_weight), ("CFC_WEIGHT", cfc_weight), ("AUX_DECAY_POWER", aux_decay_power)):
            if value < 0:
                raise ValueError(f"VMF.{key} must be >= 0, got {value}")
        if not 0 <= test_alpha <= 1:
            raise ValueError(f"VMF.TEST_ALPHA must be in [0, 1], got {test_alpha}")
        self.icd_weight = float(icd_weight)
        self.cfc_weight = float(cfc_weight)
        self.aux_decay_power = float(aux_decay_power)
        self.test_alpha = float(test_alpha)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        bound = in_features ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)
        self.kappa = nn.Parameter(torch.full((num_classes,), float(k_init)))
        # o_j: mean overlap of class j (or b(κ_j) without ICD), refreshed every training step
        self.register_buffer("overlap", torch.zeros(num_classes))

    def concentration(self) -> torch.Tensor:
        """(C,) float64 κ = max(κ', 1)."""
        return self.kappa.double().clamp(min=KAPPA_MIN)

    def log_normalizer(self, kappa) -> torch.Tensor:
        """b(κ) = log C_p(κ) − log C_p(16), float64."""
        reference = vmf_log_normalizer(kappa.new_tensor(REFERENCE_KAPPA), self.in_features)
        return vmf_log_normalizer(kappa, self.in_features) - reference

    def calibrated_concentration(self, kappa) -> torch.Tensor:
        """κ* = κ^α · r^(1−α), r the overlaps min-max rescaled to [min κ, max κ]."""
        if self.test_alpha == 1:
            return kappa
        overlap = self.overlap.double()
        spread = overlap.max() - overlap.min()
        unit = torch.where(spread > 0, (overlap - overlap.min()) / spread.clamp(min=torch.finfo(overlap.dtype).tiny),
                           torch.zeros_like(overlap))
        rescaled = unit * (kappa.max() - kappa.min()) + kappa.min()
        return kappa.pow(self.test_alpha) * rescaled.pow(1 - self.test_alpha)

    def forward(self, features):
        """Training: κ_j <x̂, μ_j> + b(κ_j); eval: the same with the calibrated κ* in the first term."""
        cos = F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1).to(features.dtype))
        kappa = self.concentration()
        bias = self.log_normalizer(kappa)
        scale = kappa if self.training else self.calibrated_concentration(kappa)
        return cos * scale.to(cos.dtype) + bias.to(cos.dtype)

    def aux_weight(self, weight, progress=None) -> float:
        """w · (1 − progress)^power (w at an unknown progress)."""
        if progress is None:
            return weight
        return weight * max(1.0 - float(progress), 0.0) ** self.aux_decay_power

    def overlap_matrix(self, kappa, resultant, bias) -> torch.Tensor:
        """(C, C) OP_ij = 1 / (1 + KL(vMF_i ‖ vMF_j)) (float64)."""
        mu = F.normalize(self.weight, dim=1)
        similarity = (mu @ mu.t()).double()
        kl = resultant.unsqueeze(1) * (kappa.unsqueeze(1) - kappa.unsqueeze(0) * similarity) \
            + bias.unsqueeze(1) - bias.unsqueeze(0)
        return 1 / (1 + kl)

    def consistency_loss(self, features, labels, kappa, resultant) -> torch.Tensor:
        """L_cfc = mean over the batch's classes c of 1 − 1/(1 + A_p(κ_c) κ_c (1 − <μ_c, m_c>))."""
        directions = F.normalize(features, dim=1)
        sums = directions.new_zeros(self.num_classes, directions.shape[1]).index_add_(0, labels, directions)
        present = torch.zeros(self.num_classes, dtype=torch.bool, device=labels.device)
        present[labels] = True
        mean_directions = F.normalize(sums[present], dim=1)
        mu = F.normalize(self.weight[present], dim=1)
        similarity = (mu * mean_directions.to(mu.dtype)).sum(dim=1).double()
        kl = resultant[present] * kappa[present] * (1 - similarity)
        return (1 - 1 / (1 + kl)).mean()

    def training_step(self, features, labels, progress=None, learning_rate=None):
        """``(logits, aux losses)`` of a training step; refreshes ``overlap``."""
        return self(features), self.auxiliary_losses(features, labels, progress)

    def auxiliary_losses(self, features, labels, progress=None):
        """``{"loss_icd", "loss_cfc"}`` (those with weight > 0) of a training step; refreshes ``overlap``.
        ``features`` and ``labels`` are read by CFC only (ICD is a function of the parameters)."""
        kappa = self.concentration()
        bias = self.log_normalizer(kappa)
        losses = {}
        need_overlap = self.icd_weight > 0
        if need_overlap or self.cfc_weight > 0:
            resultant = mean_resultant_length(kappa, self.in_features)
        if need_overlap:
            overlap = self.overlap_matrix(kappa, resultant, bias)
            off_diagonal = 1 - torch.eye(self.num_classes, dtype=overlap.dtype, device=overlap.device)
            losses["loss_icd"] = self.aux_weight(self.icd_weight, progress) * (overlap * off_diagonal).mean().float()
            self.overlap.copy_(overlap.detach().mean(dim=1))
        else:
            self.overlap.copy_(bias.detach())
        if self.cfc_weight > 0:
            losses["loss_cfc"] = self.aux_weight(self.cfc_weight, progress) * \
                self.consistency_loss(features, labels, kappa, resultant).float()
        return losses

    def extra_repr(self):
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, icd_weight={self.icd_weight}, "
                f"cfc_weight={self.cfc_weight}, aux_decay_power={self.aux_decay_power}, test_alpha={self.test_alpha}")
