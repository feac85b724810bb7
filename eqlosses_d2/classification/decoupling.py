"""
The decoupled two-stage protocol (Kang et al., "Decoupling Representation and Classifier for
Long-Tailed Recognition", ICLR 2020; authors' code facebookresearch/classifier-balancing, commit
f162adef63fdf592d0b8a0f6e52bc481fc08785f: ``run_networks.py``, ``config/ImageNet_LT/cls_*.yaml``):
stage 1 trains backbone and classifier jointly (instance-balanced sampling, any quickstart or
ImageNet-LT softmax config); stage 2 starts from that checkpoint (``MODEL.WEIGHTS``), freezes
the backbone (``MODEL.EQLOSSES.TRAINABLE_MODULES``) and adjusts the classifier only:

- cRT (``HEAD linear``, ``DECOUPLING.RETRAIN_HEAD True``): the classifier re-initialised and
  re-trained with class-balanced sampling;
- LWS (``HEAD lws``): per-class scales of the frozen stage-1 classifier, class-balanced sampling;
- MARC (``HEAD marc``): per-class ω, β on the frozen logits (its authors' stage 2: instance-balanced
  sampling, the GRW re-weighted loss);
- τ-norm (``HEAD tau_norm``): no training, ``--eval-only`` on the stage-1 checkpoint.

The keys of ``MODEL.EQLOSSES.CLASSIFICATION.DECOUPLING`` (added by the decoupling heads'
``add_config``):

- ``RETRAIN_HEAD``: cRT. The model carries a buffer ``retrained_head``; loading a checkpoint
  without it (a stage-1 model) leaves the head out (:func:`skip_stage1_head`), so the head keeps
  its fresh initialisation, as the authors' cRT (``load_model`` skips a ``DotProductClassifier``
  when training). A stage-2 checkpoint has the buffer, so ``--resume`` and ``--eval-only`` load its
  head.
- ``STAGE1_COMMAND``: the command that writes the stage-1 ``MODEL.WEIGHTS`` of a config; when that
  file is missing, ``train_net.py`` names it in its one-line error (:func:`missing_weights_hint`).

BatchNorm: the authors call ``model.train()`` on every network in stage 2, the frozen feature
model included (``requires_grad`` off, nothing else): the backbone's BatchNorm layers normalise
with the batch statistics and keep updating their running statistics on the class-balanced
batches; only the weights (convolutions and BatchNorm affine parameters) stay fixed. The
Detectron2 trainer does the same (``model.train()``, ``TRAINABLE_MODULES`` only turns
``requires_grad`` off); nothing here changes it. MARC's code (microsoft/robustlearn, commit
31580cd19572, ``marc/run_networks.py``) does the same.

Differs from the authors' stage 2: the cosine schedule is per iteration (theirs per epoch, stepped
at the start of each epoch); their class-aware sampler draws 4 images of a class in a row
(``ClassAwareSampler``, ``num_samples_cls: 4``), ``ClassBalancedTrainingSampler`` one; we keep the
final model (they keep the epoch of the best val accuracy and test it). Several processes: the
fresh cRT head is rank 0's (Detectron2's DDP wrapper broadcasts it before the checkpoint is loaded).
"""
import logging

import torch

from ..checkpoint import drop_unmarked_entries
from ..config import ConfigError
from ..registry import CONFIG_CHECK_REGISTRY, config_node
from .config import is_classification

__all__ = ["add_decoupling_config", "skip_stage1_head", "missing_weights_hint", "validate_decoupling", "RETRAINED_HEAD_BUFFER",
           "FROZEN_CLASSIFIER_HEADS"]

logger = logging.getLogger(__name__)

#: the buffer of a cRT model that marks its head as already re-trained (absent from stage-1 checkpoints)
RETRAINED_HEAD_BUFFER = "retrained_head"


def add_decoupling_config(cfg):
    """``MODEL.EQLOSSES.CLASSIFICATION.DECOUPLING`` (idempotent)."""
    node = config_node(cfg, "MODEL.EQLOSSES.CLASSIFICATION.DECOUPLING")
    if "RETRAIN_HEAD" in node:
        return cfg
    # cRT: MODEL.WEIGHTS is a stage-1 model whose classifier head is NOT loaded (it keeps its fresh
    # initialisation and is re-trained); a checkpoint of such a run (buffer "retrained_head") loads whole.
    node.RETRAIN_HEAD = False
    # The command that writes this config's stage-1 MODEL.WEIGHTS, quoted when that file is missing ("": none).
    node.STAGE1_COMMAND = ""
    return cfg


def skip_stage1_head(module, state_dict, prefix, *args):
    """``load_state_dict`` pre-hook of a cRT model: a checkpoint without ``retrained_head`` (stage 1)
    loses its ``head.*`` entries before they are loaded; one with it (stage 2) loads whole."""
    skipped = drop_unmarked_entries(state_dict, prefix, RETRAINED_HEAD_BUFFER, "head")
    if skipped:
        logger.info("cRT (DECOUPLING.RETRAIN_HEAD): stage-1 checkpoint: its classifier head (%s) is not loaded; "
                    "the head keeps its fresh initialisation", ", ".join(skipped))


def retrained_head_marker() -> torch.Tensor:
    return torch.ones((), dtype=torch.bool)


def missing_weights_hint(cfg) -> str:
    """What ``train_net.py`` appends to "MODEL.WEIGHTS: checkpoint not found: X" for a stage-2 config."""
    node = cfg.MODEL.EQLOSSES.get("CLASSIFICATION", {}).get("DECOUPLING", {})
    command = node.get("STAGE1_COMMAND", "") if node else ""
    return f"; it is the stage-1 model, written by: {command}" if command else ""



#: heads that use the stage-1 classifier's W, b unchanged
FROZEN_CLASSIFIER_HEADS = ("lws", "marc", "tau_norm")


@CONFIG_CHECK_REGISTRY.register()
def validate_decoupling(cfg):
    """RETRAIN_HEAD (cRT) re-initialises the head: refused with a head that keeps the stage-1
    classifier frozen (lws, marc) or only rescales it (tau_norm), which would then be random."""
    if not is_classification(cfg):
        return
    node = cfg.MODEL.EQLOSSES.CLASSIFICATION
    if node.DECOUPLING.RETRAIN_HEAD and node.HEAD in FROZEN_CLASSIFIER_HEADS:
        raise ConfigError(
            f"MODEL.EQLOSSES.CLASSIFICATION.DECOUPLING.RETRAIN_HEAD re-initialises the head, but HEAD '{node.HEAD}' "
            f"uses the stage-1 classifier as it is (cRT is HEAD 'linear')"
        )
