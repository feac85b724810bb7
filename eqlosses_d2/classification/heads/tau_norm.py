"""
``tau_norm``: the τ-normalised linear classifier of Kang et al., "Decoupling Representation and
Classifier for Long-Tailed Recognition" (ICLR 2020), a post-hoc classifier:

    z_j = <x, w_j> / ‖w_j‖^τ        (no bias; τ = 0: the plain classifier without its bias,
                                     τ = 1: unit-norm weights, a cosine classifier up to ‖x‖)

as the authors' ``tau_norm.py`` (facebookresearch/classifier-balancing, commit f162adef63fd:
``pnorm`` divides each row of the stage-1 ``fc.weight`` by its norm to the power τ, and the
logits are ``feat @ ws.T``; ``fc.bias`` is not used). Parameters ``fc.weight`` and ``fc.bias``,
as the ``linear`` head, so a stage-1 checkpoint loads unchanged:

    python train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS <stage-1 model_final.pth> \\
        MODEL.EQLOSSES.CLASSIFICATION.HEAD tau_norm MODEL.EQLOSSES.CLASSIFICATION.TAU_NORM.TAU 0.7

(the bias is loaded and ignored). Config ``MODEL.EQLOSSES.CLASSIFICATION.TAU_NORM.TAU`` (default
1.0). The authors choose τ on the validation split from ``np.linspace(0, 2, 21)``:
``python -m eqlosses_d2.classification.tau_sweep`` does that sweep. The arithmetic is
:func:`eqlosses_d2.calibration.tau_norm.tau_normalized_logits` (norms clamped at 1e-12, so a zero
weight row gives zero logits instead of NaN; computed in float32 from detached weights: the head is
for evaluation, and training through it would not train a τ-normalised classifier).
"""
from torch import nn
from torch.nn import functional as F

from ...calibration.tau_norm import tau_normalized_logits
from ...registry import CLASSIFIER_HEAD_REGISTRY, config_node, register
from ..decoupling import add_decoupling_config
from .base import ClassifierHead

__all__ = ["TauNormHead"]


@register(CLASSIFIER_HEAD_REGISTRY)
class TauNormHead(ClassifierHead):
    name = "tau_norm"
    config_node = "TAU_NORM"

    @classmethod
    def add_config(cls, cfg):
        super().add_config(cfg)
        add_decoupling_config(cfg)
        _C = config_node(cfg, "MODEL.EQLOSSES.CLASSIFICATION.TAU_NORM")
        # τ of w_j / |w_j|^τ (0: the stage-1 classifier without bias; 1: unit norm); pick it on val (tau_sweep)
        _C.TAU = 1.0

    def __init__(self, in_features, num_classes, tau=1.0):
        super().__init__(in_features, num_classes)
        if not tau >= 0:
            raise ValueError(f"TAU_NORM.TAU must be >= 0, got {tau}")
        self.tau = float(tau)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features):
        return tau_normalized_logits(F.linear(features, self.fc.weight), self.fc.weight, None, self.tau, self.num_classes)

    def extra_repr(self):
        return f"in_features={self.in_features}, num_classes={self.num_classes}, tau={self.tau}"
