"""
Decoupling for detection: cRT and LWS in the RoI box predictor (Kang et al., "Decoupling
Representation and Classifier for Long-Tailed Recognition", ICLR 2020; authors' code
facebookresearch/classifier-balancing, commit f162adef63fd). Stage 1 is any trained detector
(``MODEL.WEIGHTS``); stage 2 adjusts the box classifier only, everything else frozen by
``MODEL.EQLOSSES.TRAINABLE_MODULES``, with re-balanced image sampling (``DATALOADER.SAMPLER_TRAIN``).
Keys ``MODEL.EQLOSSES.DECOUPLING`` (``eqlosses_d2/config.py``):

- ``RETRAIN_CLASSIFIER`` (cRT, classifier re-training): the box predictor carries a buffer
  ``retrained_classifier``; loading a checkpoint without it (a stage-1 model) leaves the classifier
  ``cls_score`` out (:func:`skip_stage1_classifier`), so it keeps the fresh initialisation the
  predictor gave it, and is re-trained (``TRAINABLE_MODULES ["roi_heads.box_predictor.cls_score"]``).
  The authors' cRT does the same: stage 2 builds a new ``DotProductClassifier`` (an ``nn.Linear``,
  ``stage1_weights: false``: "Random initialized classifier weights") and ``run_networks.load_model``
  skips it when it loads the stage-1 model (``'DotProductClassifier' in def_file: continue``); the
  feature model is loaded and frozen (``fix: true``). A stage-2 checkpoint has the buffer, so
  ``--resume`` and ``--eval-only`` load its classifier. Differs from the authors: the fresh
  classifier has the detector's own initialisation (Detectron2's ``cls_score``: N(0, 0.01²) weights,
  zero bias, or the loss's bias prior, e.g. sigmoid's −log((1−π)/π)), not PyTorch's default
  ``nn.Linear`` initialisation of their image classifier: the background prior of a detector's
  classifier matters, and it is what stage 1 started from.
- ``CLASSIFIER "lws"`` (learnable weight scaling): ``cls_score`` is a
  :class:`~eqlosses_d2.modeling.lws.LearnableWeightScaling` layer, ``z_k = f_k (w_k·x + b_k)`` for
  every output k (the background logit included, the bias scaled too: the authors' code), W and b
  loaded from stage 1 and frozen, the scales ``cls_score.scales`` (init 1, in checkpoints) trained
  (``TRAINABLE_MODULES ["roi_heads.box_predictor.cls_score.scales"]``; a cascade head's stages are
  ``roi_heads.box_predictor.<k>.cls_score.scales``). The authors' LWS loads the stage-1 classifier
  (``load_model`` skips only a ``DotProductClassifier``) and keeps it frozen.

Sampling: the authors' stage 2 uses class-aware sampling (a class uniformly, then an image of it;
``ClassAwareSampler``, 4 images of a class in a row). A detection image holds several classes and
Detectron2 has no class-aware image sampler; the recipes here use Detectron2's repeat-factor
sampling (RFS, ``RepeatFactorTrainingSampler``, t = 0.001), the LVIS re-balanced image sampler.

BatchNorm: the authors call ``train()`` on every network in stage 2, the frozen feature model
included; the Detectron2 trainer does the same, so a backbone with BatchNorm (the quickstart's
R-18; LVIS's R-50 has FrozenBN) keeps updating its running statistics while its weights stay fixed.
τ-norm (the paper's third classifier adjustment) is a post-hoc calibration here
(``TEST.EQLOSSES.CALIBRATION.METHOD tau_norm``), refused on an LWS head (it reads the unscaled W).
"""
import logging

import torch

from ..checkpoint import drop_unmarked_entries
from ..config import ConfigError
from ..registry import CONFIG_CHECK_REGISTRY

__all__ = [
    "DECOUPLING_CLASSIFIERS",
    "RETRAINED_CLASSIFIER_BUFFER",
    "retrained_classifier_marker",
    "skip_stage1_classifier",
    "validate_box_decoupling",
]

logger = logging.getLogger(__name__)

#: MODEL.EQLOSSES.DECOUPLING.CLASSIFIER: "default" (the predictor's own: linear, or cosine with
#: COSINE_SCALE > 0), "lws" (learnable weight scaling of the frozen stage-1 classifier) or "tde"
#: (TDE's causal-norm classifier, eqlosses_d2/modeling/tde.py, checked by its validate_box_tde) or "vmf"
#: (vMF-OP's classifier, eqlosses_d2/modeling/vmf.py, checked by its validate_box_vmf)
DECOUPLING_CLASSIFIERS = ("default", "lws", "tde", "vmf")

#: the buffer of a cRT box predictor that marks its classifier as re-trained (absent from stage-1 checkpoints)
RETRAINED_CLASSIFIER_BUFFER = "retrained_classifier"


def retrained_classifier_marker() -> torch.Tensor:
    return torch.ones((), dtype=torch.bool)


def skip_stage1_classifier(module, state_dict, prefix, *args):
    """``load_state_dict`` pre-hook of a cRT box predictor: a checkpoint without
    ``<prefix>retrained_classifier`` (stage 1) loses its ``<prefix>cls_score.*`` entries before they
    are loaded, so the classifier keeps its fresh initialisation; one with it (stage 2) loads whole."""
    skipped = drop_unmarked_entries(state_dict, prefix, RETRAINED_CLASSIFIER_BUFFER, "cls_score")
    if skipped:
        logger.info("cRT (MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER): stage-1 checkpoint: its box classifier "
                    "(%s) is not loaded; it keeps its fresh initialisation", ", ".join(skipped))


#: RoI heads whose box predictors are LongTailOutputLayers
_LONG_TAIL_ROI_HEADS = ("LongTailStandardROIHeads", "LongTailCascadeROIHeads", "LongTailIterativeROIHeads",
                        "LongTailLOCEROIHeads")


#: RoI heads whose box predictor can hold a classifier of its own (TDE, vMF)
OWN_CLASSIFIER_ROI_HEADS = ("LongTailStandardROIHeads", "LongTailCascadeROIHeads")


def check_own_classifier_roi_heads(cfg, what: str):
    """A box classifier of its own (TDE, vMF) needs a GeneralizedRCNN with a standard or cascade
    long-tail RoI head."""
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN" or cfg.MODEL.ROI_HEADS.NAME not in OWN_CLASSIFIER_ROI_HEADS:
        raise ConfigError(f"{what} applies to the box predictor of a GeneralizedRCNN with MODEL.ROI_HEADS.NAME one of "
                          f"{', '.join(OWN_CLASSIFIER_ROI_HEADS)}, not {cfg.MODEL.META_ARCHITECTURE} / "
                          f"{cfg.MODEL.ROI_HEADS.NAME}")


def check_own_box_classifier(cfg, what: str, adjustment: str):
    """The checks a box classifier with its own normalization and test-time adjustment (TDE, vMF)
    shares: no cosine classifier, no cRT re-initialisation, no post-hoc calibration (``adjustment``:
    what its own test-time adjustment is, for the error)."""
    if cfg.MODEL.EQLOSSES.COSINE_SCALE > 0:
        raise ConfigError(f"{what} is its own normalized classifier: MODEL.EQLOSSES.COSINE_SCALE must be 0")
    if cfg.MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER:
        raise ConfigError(f"MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER is not supported with {what}")
    if cfg.TEST.EQLOSSES.CALIBRATION.METHOD != "none":
        raise ConfigError(f"TEST.EQLOSSES.CALIBRATION.METHOD must be none with {what} ({adjustment} is the "
                          f"test-time adjustment); got '{cfg.TEST.EQLOSSES.CALIBRATION.METHOD}'")


@CONFIG_CHECK_REGISTRY.register()
def validate_box_decoupling(cfg):
    """One-line errors for MODEL.EQLOSSES.DECOUPLING (values, and what they cannot combine with)."""
    node = cfg.MODEL.EQLOSSES.get("DECOUPLING")
    if node is None:
        return
    if node.CLASSIFIER not in DECOUPLING_CLASSIFIERS:
        raise ConfigError(
            f"MODEL.EQLOSSES.DECOUPLING.CLASSIFIER must be one of {', '.join(DECOUPLING_CLASSIFIERS)}; got '{node.CLASSIFIER}'"
        )
    lws = node.CLASSIFIER == "lws"
    if not (lws or node.RETRAIN_CLASSIFIER):
        return
    key = "CLASSIFIER 'lws'" if lws else "RETRAIN_CLASSIFIER"
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN" or cfg.MODEL.ROI_HEADS.NAME not in _LONG_TAIL_ROI_HEADS:
        raise ConfigError(
            f"MODEL.EQLOSSES.DECOUPLING.{key} applies to the box predictor of a GeneralizedRCNN with one of "
            f"{', '.join(_LONG_TAIL_ROI_HEADS)} (MODEL.ROI_HEADS.NAME), not {cfg.MODEL.META_ARCHITECTURE} / "
            f"{cfg.MODEL.ROI_HEADS.NAME}"
        )
    if lws and node.RETRAIN_CLASSIFIER:
        raise ConfigError(
            "MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER re-initialises the classifier, but CLASSIFIER 'lws' scales "
            "the stage-1 classifier as it is (cRT is CLASSIFIER 'default' with RETRAIN_CLASSIFIER True)"
        )
    if lws and cfg.MODEL.EQLOSSES.COSINE_SCALE > 0:
        raise ConfigError("MODEL.EQLOSSES.DECOUPLING.CLASSIFIER 'lws' scales a linear classifier; "
                          "MODEL.EQLOSSES.COSINE_SCALE must be 0")
    if lws and cfg.TEST.EQLOSSES.CALIBRATION.METHOD == "tau_norm":
        raise ConfigError("TEST.EQLOSSES.CALIBRATION.METHOD tau_norm reads the unscaled stage-1 weights: not defined "
                          "for MODEL.EQLOSSES.DECOUPLING.CLASSIFIER 'lws'")
