"""
Losses of the long-tailed image classifier: pure PyTorch, one file per method, registered by name
in ``IMAGE_CLS_LOSS_REGISTRY`` (``MODEL.EQLOSSES.CLASSIFICATION.LOSS``); interface in :mod:`.base`.
"""
from ...registry import IMAGE_CLS_LOSS_REGISTRY
from .base import ImageClassificationLoss, build_image_loss

# registration: one module per method
from . import softmax as _softmax  # noqa: F401,E402
from . import balanced_softmax as _balanced_softmax  # noqa: F401,E402
from . import softmax_eql as _softmax_eql  # noqa: F401,E402
from . import grw as _grw  # noqa: F401,E402
from . import cdb as _cdb  # noqa: F401,E402
from . import difficulty_net as _difficulty_net  # noqa: F401,E402
from . import sigmoid as _sigmoid  # noqa: F401,E402
from . import eqlv2 as _eqlv2  # noqa: F401,E402
from . import seesaw as _seesaw  # noqa: F401,E402
from . import iif as _iif  # noqa: F401,E402
from . import bal_bce as _bal_bce  # noqa: F401,E402

__all__ = ["IMAGE_CLS_LOSS_REGISTRY", "ImageClassificationLoss", "build_image_loss"]
