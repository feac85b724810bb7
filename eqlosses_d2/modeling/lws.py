"""
Learnable weight scaling (LWS) of Kang et al., "Decoupling Representation and Classifier for
Long-Tailed Recognition" (ICLR 2020), as a linear layer: pure PyTorch, no Detectron2 import.

    z_k = f_k · (<w_k, x> + b_k),      k = 0 .. K−1 (every output of the layer)

``W`` (K, D) and ``b`` (K,) are the frozen stage-1 classifier, ``f`` (K,) the learnable scales,
initialised to 1 (so that the first stage-2 step computes the stage-1 logits). As the authors'
``models/TauNormClassifier.py`` (facebookresearch/classifier-balancing, commit f162adef63fd:
``x = self.fc(x); x *= self.scales`` with ``scales = ones(num_classes)``, ``fc``'s parameters
``requires_grad = False``): the scale multiplies the bias too (the paper writes ``f_i · w_i``,
without a bias), and there is one scale per output of the classifier. In a detector that is
every logit of the box classifier, the background logit of a C + 1 softmax head included (the
authors' image classifier has no background; their code scales every output, so we do).

:class:`LearnableWeightScaling` subclasses ``nn.Linear`` so that its ``weight`` and ``bias``
keep the stage-1 layer's parameter names: a stage-1 checkpoint loads into it unchanged and
``scales`` (absent there) keeps its initial 1. ``weight`` and ``bias`` are frozen twice:
``requires_grad`` off and detached in :meth:`forward`, so no optimizer can move them (a
``TRAINABLE_MODULES`` prefix that names the whole layer trains the scales only).

∂L/∂f_k = Σ_n ∂L/∂z_nk · (<w_k, x_n> + b_k): autograd's, through the detached stage-1 logits.
The classification LWS head (``eqlosses_d2/classification/heads/lws.py``) computes the same
function with its stage-1 layer as a submodule ``fc`` (its checkpoint names); it could be
written with this layer as its ``fc``.
"""
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LearnableWeightScaling"]


class LearnableWeightScaling(nn.Linear):
    """``f ⊙ (W x + b)``: a frozen linear layer with learnable per-output scales ``f`` (init 1)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "LearnableWeightScaling":
        """An LWS layer with ``linear``'s weight and bias (copied), scales 1."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer.to(linear.weight.device)

    def forward(self, x):
        bias = None if self.bias is None else self.bias.detach()
        return F.linear(x, self.weight.detach(), bias) * self.scales

    def extra_repr(self):
        return super().extra_repr() + ", learnable per-output scales (W, b frozen)"
