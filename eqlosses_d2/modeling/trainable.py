"""``MODEL.EQLOSSES.TRAINABLE_MODULES``: train only some parts of a model (LOCE's
decoupled fine-tune protocol trains the classifier, box regressor, RPN and mask head)."""
from typing import Sequence

from torch import nn

__all__ = ["restrict_trainable"]


def restrict_trainable(model: nn.Module, prefixes: Sequence[str]) -> int:
    """
    Freeze every parameter whose name starts with none of ``prefixes`` (empty: change
    nothing). Returns the number of trainable parameters left; a prefix that matches no
    parameter is an error (a typo would otherwise freeze the whole model silently).
    """
    prefixes = tuple(prefixes)
    if not prefixes:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in names):
            raise ValueError(f"MODEL.EQLOSSES.TRAINABLE_MODULES: no parameter name starts with '{prefix}'")
    trainable = 0
    for name, parameter in model.named_parameters():
        keep = name.startswith(prefixes)
        parameter.requires_grad_(keep)
        trainable += parameter.numel() if keep else 0
    return trainable
