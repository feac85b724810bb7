"""
Classification losses of the RoI box predictor: pure PyTorch, one file per method,
registered by name (``MODEL.EQLOSSES.LOSS``). See :mod:`.base` for the interface.
"""
from .base import ClassificationLoss, all_reduce_sum, check_finite_logits
from .registry import LOSS_REGISTRY, build_loss, build_loss_from_cfg, loss_hparams_from_cfg, register_loss

# registration: one module per method
from . import softmax as _softmax  # noqa: F401
from . import sigmoid as _sigmoid  # noqa: F401
from . import eql as _eql  # noqa: F401
from . import eqlv2 as _eqlv2  # noqa: F401
from . import softmax_eql as _softmax_eql  # noqa: F401
from . import seesaw as _seesaw  # noqa: F401
from . import federated as _federated  # noqa: F401
from . import gumbel as _gumbel  # noqa: F401
from . import iif as _iif  # noqa: F401
from . import pcb as _pcb  # noqa: F401
from . import equilibrium as _equilibrium  # noqa: F401

# one-stage (dense) losses: their own interface and registry (MODEL.EQLOSSES.ONE_STAGE.LOSS)
from .dense import DENSE_LOSS_REGISTRY, build_dense_loss, build_dense_loss_from_cfg  # noqa: E402
from . import focal as _focal  # noqa: F401,E402
from . import efl as _efl  # noqa: F401,E402

__all__ = [
    "ClassificationLoss",
    "DENSE_LOSS_REGISTRY",
    "LOSS_REGISTRY",
    "all_reduce_sum",
    "build_dense_loss",
    "build_dense_loss_from_cfg",
    "build_loss",
    "build_loss_from_cfg",
    "check_finite_logits",
    "loss_hparams_from_cfg",
    "register_loss",
]
