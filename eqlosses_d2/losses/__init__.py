"""
Classification losses: pure PyTorch, one file per method, each class registered by its name
in a Detectron2 ``Registry`` (:mod:`eqlosses_d2.registry`):

- RoI box predictor: ``ROI_CLS_LOSS_REGISTRY`` (``MODEL.EQLOSSES.LOSS``), interface in :mod:`.base`;
- one-stage heads: ``DENSE_CLS_LOSS_REGISTRY`` (``MODEL.EQLOSSES.ONE_STAGE.LOSS``), interface in :mod:`.dense`.

A loss declares its config node and defaults next to its code (``add_config``); adding one is a
new file here and one import line below.
"""
from ..registry import DENSE_CLS_LOSS_REGISTRY, ROI_CLS_LOSS_REGISTRY
from .base import (
    ClassificationLoss,
    all_reduce_sum,
    build_loss,
    build_loss_from_cfg,
    check_finite_logits,
    loss_hparams_from_cfg,
    required_opts,
)
from .dense import DenseClassificationLoss, build_dense_loss, build_dense_loss_from_cfg

# registration: one module per method
from . import softmax as _softmax  # noqa: F401,E402
from . import sigmoid as _sigmoid  # noqa: F401,E402
from . import eql as _eql  # noqa: F401,E402
from . import eqlv2 as _eqlv2  # noqa: F401,E402
from . import softmax_eql as _softmax_eql  # noqa: F401,E402
from . import seesaw as _seesaw  # noqa: F401,E402
from . import federated as _federated  # noqa: F401,E402
from . import gumbel as _gumbel  # noqa: F401,E402
from . import iif as _iif  # noqa: F401,E402
from . import pcb as _pcb  # noqa: F401,E402
from . import equilibrium as _equilibrium  # noqa: F401,E402
from . import balanced_softmax as _balanced_softmax  # noqa: F401,E402
from . import bal_bce as _bal_bce  # noqa: F401,E402
from . import ecm as _ecm  # noqa: F401,E402
from . import db as _db  # noqa: F401,E402
from . import bags as _bags  # noqa: F401,E402
from . import cdb_w as _cdb_w  # noqa: F401,E402
from . import cdb_s as _cdb_s  # noqa: F401,E402
from . import focal as _focal  # noqa: F401,E402  # dense
from . import efl as _efl  # noqa: F401,E402  # dense

#: the RoI losses' registry under its former name
LOSS_REGISTRY = ROI_CLS_LOSS_REGISTRY
#: the dense losses' registry under its former name
DENSE_LOSS_REGISTRY = DENSE_CLS_LOSS_REGISTRY

__all__ = [
    "ClassificationLoss",
    "required_opts",
    "DENSE_CLS_LOSS_REGISTRY",
    "DENSE_LOSS_REGISTRY",
    "DenseClassificationLoss",
    "LOSS_REGISTRY",
    "ROI_CLS_LOSS_REGISTRY",
    "all_reduce_sum",
    "build_dense_loss",
    "build_dense_loss_from_cfg",
    "build_loss",
    "build_loss_from_cfg",
    "check_finite_logits",
    "loss_hparams_from_cfg",
]
