"""``python -m eqlosses_d2.evaluation``: see :mod:`eqlosses_d2.evaluation.cli`."""
import gc
import sys

from .cli import main

# The imports above (torch, Detectron2) leave ~10^6 objects that every full collection
# would rescan while the results are read; this process creates no cycles worth collecting.
gc.freeze()
sys.exit(main())
