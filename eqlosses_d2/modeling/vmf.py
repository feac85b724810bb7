"""
The vMF classifier of vMF-OP (Wang et al., "Towards Calibrated Hyper-Sphere Representation via
Distribution Overlap Coefficient for Long-tailed Learning", ECCV 2022) as the RoI box predictor's
``cls_score`` (``MODEL.EQLOSSES.DECOUPLING.CLASSIFIER "vmf"``, hyper-parameters ``MODEL.EQLOSSES.VMF``):
the classification head :class:`eqlosses_d2.classification.heads.vmf.VMFHead` itself, over the C + 1
classes of a detector's softmax (background last, a vMF class like the others):

    z_j = κ_j · <x̂, μ_j> + b(κ_j),   j = 0 .. C,   κ_j = max(κ'_j, 1),  b(κ) = log C_p(κ) − log C_p(16),

p = D the box feature size (1024 in the LVIS recipes: the Bessel series of ``VMFHead`` holds for any p),
ICD, the inter-class overlap loss Σ_{i≠j} OP_ij / (C + 1)² with OP_ij = 1/(1 + KL(vMF_i ‖ vMF_j)),
added to the box predictor's losses as ``loss_icd`` with weight w · (1 − iteration/SOLVER.MAX_ITER)^0.9,
and at inference the overlap calibration κ*_j = κ_j^α · r_j^(1 − α) (r the rows' mean overlaps,
the buffer ``cls_score.overlap``, min-max rescaled to [min κ, max κ]; α = TEST_ALPHA; it acts at
inference only: ``--eval-only`` with another ``MODEL.EQLOSSES.VMF.TEST_ALPHA`` re-calibrates). See
that module for the formulas, the Bessel functions and the differences from the authors' code.

What applies from the classification head, and what does not:

- the prior: their classifier adds log n_j to the training logits; here that is the loss's job
  (``LOSS balanced_softmax`` with ``BALANCED_SOFTMAX.FORM softmax``: CE(z + log π), π_bg the batch's
  background share, π_j ∝ (1 − π_bg)·image count; or plain ``softmax`` without a prior);
- CFC (class-feature consistency) is not offered: their recipe (``vmf_icd.yaml``) trains with ICD
  only, and a detection batch's per-class mean directions would mix in the background RoIs' class;
- the authors have no detection code (their repository is image classification only; their
  appendix says LVIS v1.0 kept K_INIT 16 "without tuning"); the background row, the prior's form and
  the recipes are ours;
- post-hoc calibration (``TEST.EQLOSSES.CALIBRATION``) is refused: the overlap calibration is the
  method's own, and τ-norm would read W without κ.
"""
from ..classification.heads.vmf import VMFHead
from ..config import ConfigError
from .decoupling import check_own_box_classifier, check_own_classifier_roi_heads
from ..registry import CONFIG_CHECK_REGISTRY

__all__ = ["validate_box_vmf", "vmf_classifier_from_cfg"]


def vmf_classifier_from_cfg(cfg, in_features: int, out_features: int) -> VMFHead:
    """The box predictor's vMF classifier from ``MODEL.EQLOSSES.VMF`` (no CFC)."""
    node = cfg.MODEL.EQLOSSES.VMF
    return VMFHead(in_features, out_features, k_init=node.K_INIT, icd_weight=node.ICD_WEIGHT, cfc_weight=0.0,
                   aux_decay_power=node.AUX_DECAY_POWER, test_alpha=node.TEST_ALPHA)


@CONFIG_CHECK_REGISTRY.register()
def validate_box_vmf(cfg):
    """One-line errors for DECOUPLING.CLASSIFIER "vmf": MODEL.EQLOSSES.VMF's values and what the box
    classifier needs (C + 1 softmax logits, a standard or cascade long-tail RoI head, no cosine
    classifier, no cRT, no post-hoc calibration)."""
    node = cfg.MODEL.EQLOSSES.get("VMF")
    if node is None or cfg.MODEL.EQLOSSES.DECOUPLING.CLASSIFIER != "vmf":
        return
    key = "MODEL.EQLOSSES.VMF"
    if not node.K_INIT >= 1:
        raise ConfigError(f"{key}.K_INIT must be >= 1 (κ is clamped at 1); got {node.K_INIT}")
    for name in ("ICD_WEIGHT", "AUX_DECAY_POWER"):
        if not node[name] >= 0:
            raise ConfigError(f"{key}.{name} must be >= 0; got {node[name]}")
    if not 0 <= node.TEST_ALPHA <= 1:
        raise ConfigError(f"{key}.TEST_ALPHA must be in [0, 1]; got {node.TEST_ALPHA}")
    what = "MODEL.EQLOSSES.DECOUPLING.CLASSIFIER 'vmf'"
    check_own_classifier_roi_heads(cfg, what)
    loss = cfg.MODEL.EQLOSSES.LOSS
    softmax_form = loss == "softmax" or (loss == "balanced_softmax" and cfg.MODEL.EQLOSSES.BALANCED_SOFTMAX.FORM == "softmax")
    if not softmax_form:
        raise ConfigError(f"{what} models the C + 1 classes of a softmax: MODEL.EQLOSSES.LOSS must be softmax or "
                          f"balanced_softmax with MODEL.EQLOSSES.BALANCED_SOFTMAX.FORM softmax, got '{loss}'")
    check_own_box_classifier(cfg, what, "its overlap calibration, MODEL.EQLOSSES.VMF.TEST_ALPHA,")
