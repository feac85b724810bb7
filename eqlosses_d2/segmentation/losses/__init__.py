"""
Per-pixel losses of the semantic segmentation heads: pure PyTorch, one file per method, registered
by name in ``PIXEL_LOSS_REGISTRY`` (``MODEL.EQLOSSES.SEM_SEG.LOSS``); interface in :mod:`.base`,
the fused chunked softmax CE they share in :mod:`.kernels`.
"""
from ...registry import PIXEL_LOSS_REGISTRY
from .base import PixelLoss, build_pixel_loss

# registration: one module per method
from . import softmax as _softmax  # noqa: F401,E402
from . import softmax_eql as _softmax_eql  # noqa: F401,E402
from . import ohem as _ohem  # noqa: F401,E402
from . import seesaw as _seesaw  # noqa: F401,E402
from . import iif as _iif  # noqa: F401,E402
from . import balanced_softmax as _balanced_softmax  # noqa: F401,E402

__all__ = ["PIXEL_LOSS_REGISTRY", "PixelLoss", "build_pixel_loss"]
