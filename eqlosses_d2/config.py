"""
Config keys of eqlosses_d2, under the package's own nodes, and their validation.

Every key has a default and a one-line comment. No leaf name that upstream
Detectron2 defines is reused (Detectron2 main added ``ROI_BOX_HEAD.USE_FED_LOSS``
and ``USE_SIGMOID_CE``; our keys live under ``MODEL.EQLOSSES`` instead).

The keys shared by every method are here; each registered method (loss, calibration)
declares its own node and defaults next to its code, in ``add_config``, and
:func:`add_eqlosses_config` collects them from the registries (:mod:`eqlosses_d2.registry`).
Config checks are functions registered in ``CONFIG_CHECK_REGISTRY``, each next to what it
checks (the copy-paste mapper's in :mod:`eqlosses_d2.data.copy_paste`); :func:`validate_config`
runs them all. This module imports no data or model-zoo module: the model zoo registers the
config names it resolves in ``CONFIG_SOURCE_REGISTRY``.
"""
import os

from detectron2.config import CfgNode as CN

from . import calibration as _calibration  # noqa: F401  # registration: calibration methods
from . import losses as _losses  # noqa: F401  # registration: losses
from .calibration import calibration_from_cfg
from .losses import build_dense_loss_from_cfg, build_loss_from_cfg
from .registry import CONFIG_CHECK_REGISTRY, KINDS, ROI_CLS_LOSS_REGISTRY, Registry, add_registered_configs, lookup

__all__ = [
    "CONFIG_CHECK_REGISTRY",
    "CONFIG_SOURCE_REGISTRY",
    "ConfigError",
    "add_eqlosses_config",
    "class_stats_dataset",
    "merge_config_file",
    "merge_config_list",
    "validate_config",
    "validate_num_classes",
    "validate_one_stage",
    "validate_registry_names",
]

#: Where a ``--config-file`` value that is no file may come from: objects with ``is_name(name)``,
#: ``merge(cfg, name)`` and ``close_matches(name)``, registered by name (the model zoo registers
#: ``eqlosses_d2.model_zoo``'s names when it is imported).
CONFIG_SOURCE_REGISTRY = Registry("CONFIG_SOURCE")


class ConfigError(ValueError):
    """A config problem, reported in one line that names the key, file or value."""


def add_eqlosses_config(cfg):
    """Add every eqlosses_d2 key, with its default, to a Detectron2 config (in place)."""
    _C = cfg
    _C.MODEL.EQLOSSES = CN()
    # Dataset whose per-class statistics (image/instance counts, r/c/f groups) are stored
    # in the model's buffers when training starts; "" means DATASETS.TRAIN[0].
    _C.MODEL.EQLOSSES.CLASS_STATS_DATASET = ""
    # Fail at the start of training if the class-statistics dataset has none (True), or
    # train with empty statistics, which only methods that need none tolerate (False).
    _C.MODEL.EQLOSSES.REQUIRE_CLASS_STATS = True
    # Classification loss of the RoI box predictor, by its name in ROI_CLS_LOSS_REGISTRY
    # (eqlosses_d2.losses): "softmax" (Detectron2's default), "sigmoid", "eql", "eqlv2",
    # "softmax_eql", "seesaw", "federated", "gumbel", "gumbel_droploss", "iif", "pcb",
    # "equilibrium" (LOCE's EBL); each method's hyper-parameters live in its own node
    # (MODEL.EQLOSSES.<NODE>), declared by its class (add_config).
    _C.MODEL.EQLOSSES.LOSS = "softmax"
    # > 0: cosine classifier s * x/|x| * W/|W| with this scale s (Seesaw's LVIS recipe: 20);
    # 0: Detectron2's linear classifier.
    _C.MODEL.EQLOSSES.COSINE_SCALE = 0.0
    # > 0: normalized mask predictor, s * cos(x, w_k) + b_k per pixel, with this scale s
    # (GOL's LVIS recipe: 20; an option of Seesaw's); 0: Detectron2's 1x1 convolution.
    _C.MODEL.EQLOSSES.MASK_PREDICTOR_SCALE = 0.0

    # LOCE's memory-augmented feature sampling (MODEL.ROI_HEADS.NAME "LongTailLOCEROIHeads").
    _C.MODEL.EQLOSSES.MFS = CN()
    # RoI features kept per class (FIFO).
    _C.MODEL.EQLOSSES.MFS.QUEUE_SIZE = 80
    # Classes drawn per iteration (∝ 1 / mean score, with replacement).
    _C.MODEL.EQLOSSES.MFS.SAMPLED_CLASSES = 8
    # Features drawn from each drawn class's queue.
    _C.MODEL.EQLOSSES.MFS.SAMPLED_FEATURES = 4
    # Storage of the queues on the CPU: "float16" (LVIS: 2.4 GB per process), "bfloat16" or
    # "float32" (4.8 GB).
    _C.MODEL.EQLOSSES.MFS.STORAGE_DTYPE = "float16"
    # Pre-fill before training: this many training images per class and process (0: none).
    _C.MODEL.EQLOSSES.MFS.PREFILL_IMAGES_PER_CLASS = 5
    # Save each process's queues in its per-rank resume state at every checkpoint, so that
    # --resume is exact (LVIS: up to 2.4 GB per process and checkpoint in float16); False:
    # not saved, the pre-fill rebuilds them after --resume (the authors' code).
    _C.MODEL.EQLOSSES.MFS.CHECKPOINT_QUEUES = True

    # Only parameters whose names start with one of these prefixes are trained (empty: all);
    # LOCE's fine-tune protocol trains the classifier, box regressor, RPN and mask head.
    _C.MODEL.EQLOSSES.TRAINABLE_MODULES = []

    # Decoupling (Kang et al. 2020) in the RoI box predictor (eqlosses_d2/modeling/decoupling.py).
    _C.MODEL.EQLOSSES.DECOUPLING = CN()
    # "default": the predictor's classifier; "lws": f_k * (w_k x + b_k), W, b frozen, scales f learned;
    # "tde": TDE's causal-norm classifier with counterfactual inference (MODEL.EQLOSSES.TDE);
    # "vmf": vMF-OP's von Mises-Fisher classifier (MODEL.EQLOSSES.VMF).
    _C.MODEL.EQLOSSES.DECOUPLING.CLASSIFIER = "default"
    # cRT: a checkpoint without the predictor's "retrained_classifier" buffer (stage 1) does not load cls_score.
    _C.MODEL.EQLOSSES.DECOUPLING.RETRAIN_CLASSIFIER = False

    # TDE (Tang et al. 2020), the box classifier of DECOUPLING.CLASSIFIER "tde" (eqlosses_d2/modeling/tde.py);
    # defaults: the authors' LVIS v1 code.
    _C.MODEL.EQLOSSES.TDE = CN()
    # K: the box feature and the class weights are split into K heads.
    _C.MODEL.EQLOSSES.TDE.NUM_HEAD = 2
    # τ: the logits are (τ/K) * Σ_k <x_k/|x_k|, w_jk/(|w_jk| + γ)>.
    _C.MODEL.EQLOSSES.TDE.TAU = 16.0
    # γ of the causal norm w/(|w| + γ).
    _C.MODEL.EQLOSSES.TDE.GAMMA = 0.03125
    # μ of the foreground direction c <- μ c + foreground mean feature (their LVIS v1: 1 - 0.1 * 0.002).
    _C.MODEL.EQLOSSES.TDE.MOMENTUM = 0.9998
    # α of the counterfactual inference (0: the training logits); inference only, change it with --eval-only.
    _C.MODEL.EQLOSSES.TDE.ALPHA = 1.5
    # Background-Exempted Inference: the background keeps its probability; inference only.
    _C.MODEL.EQLOSSES.TDE.BACKGROUND_EXEMPTED = True

    # vMF-OP (Wang et al. 2022), the box classifier of DECOUPLING.CLASSIFIER "vmf" (eqlosses_d2/modeling/vmf.py).
    _C.MODEL.EQLOSSES.VMF = CN()
    # Initial concentration κ of every class, the background included (κ is clamped at >= 1).
    _C.MODEL.EQLOSSES.VMF.K_INIT = 16.0
    # Weight of the inter-class overlap loss loss_icd (0: off; the authors' vmf_icd.yaml 0.2).
    _C.MODEL.EQLOSSES.VMF.ICD_WEIGHT = 0.2
    # The ICD weight decays as w * (1 - iteration / SOLVER.MAX_ITER)^power.
    _C.MODEL.EQLOSSES.VMF.AUX_DECAY_POWER = 0.9
    # α of the overlap calibration κ* = κ^α r^(1-α) (1: none; the authors test 0.5); inference only.
    _C.MODEL.EQLOSSES.VMF.TEST_ALPHA = 0.5

    # PCB's iterative box head (MODEL.ROI_HEADS.NAME "LongTailIterativeROIHeads").
    _C.MODEL.EQLOSSES.ITERATIVE_HEAD = CN()
    # Passes of the box head over the RoI features, each modulated by the previous predictions.
    _C.MODEL.EQLOSSES.ITERATIVE_HEAD.PASSES = 3
    # Weight of each pass's losses (one per pass).
    _C.MODEL.EQLOSSES.ITERATIVE_HEAD.LOSS_WEIGHTS = [0.2, 0.2, 0.6]
    # The pass whose box regression loss is used, unweighted (-1: weighted like the others).
    _C.MODEL.EQLOSSES.ITERATIVE_HEAD.REG_PASS = 2
    # Layers of the two modulation MLPs (hidden width 512).
    _C.MODEL.EQLOSSES.ITERATIVE_HEAD.MLP_LAYERS = 2
    # LayerNorm on the input of the channel MLP (the authors' EQLv2 + PCB recipe).
    _C.MODEL.EQLOSSES.ITERATIVE_HEAD.LAYER_NORM = False

    # One-stage detectors: MODEL.META_ARCHITECTURE "LongTailRetinaNet" or "LongTailFCOS"
    # (eqlosses_d2.modeling.one_stage). Both read their head (NUM_CONVS, NORM, PRIOR_PROB),
    # classes, features and test thresholds from Detectron2's MODEL.RETINANET node.
    _C.MODEL.EQLOSSES.ONE_STAGE = CN()
    # Classification loss of the dense head, by its name in DENSE_CLS_LOSS_REGISTRY: "focal"
    # (sigmoid focal loss) or "efl" (Equalized Focal Loss); their nodes FOCAL and EFL.
    _C.MODEL.EQLOSSES.ONE_STAGE.LOSS = "focal"
    # Anchor assignment: "default" (the detector's own: RetinaNet's IoU matcher, FCOS's center
    # sampling and scale ranges) or "atss" (adaptive training sample selection, Zhang et al. 2020).
    _C.MODEL.EQLOSSES.ONE_STAGE.ASSIGNER = "default"
    # ATSS: per pyramid level and ground-truth box, the anchors of the k locations whose
    # centers are closest to the box's are candidates (k x anchors per location, as the ATSS code).
    _C.MODEL.EQLOSSES.ONE_STAGE.ATSS_TOPK = 9
    # Inference: per level, each class's top k anchors above the score threshold are kept (0:
    # Detectron2's top MODEL.RETINANET.TOPK_CANDIDATES_TEST over all classes), then per-class NMS
    # and the TEST.DETECTIONS_PER_IMAGE best per image.
    _C.MODEL.EQLOSSES.ONE_STAGE.TEST_TOPK_PER_CLASS = 100
    # FCOS ("default" assigner): radius, in strides, of the center-sampling region of a box.
    _C.MODEL.EQLOSSES.ONE_STAGE.FCOS_CENTER_SAMPLING_RADIUS = 1.5

    _C.TEST.EQLOSSES = CN()
    # Print the LVIS AP table (bbox and segm; AP, AP50, AP75, APs/m/l, APr/c/f) after evaluation.
    _C.TEST.EQLOSSES.PRINT_TABLE = True
    # LVIS evaluation protocol: "standard" (lvis-api: top TEST.DETECTIONS_PER_IMAGE per image
    # across classes), "fixed" (Fixed AP, Dave et al. 2021: no per-image cap at inference or
    # evaluation, the top FIXED_AP_DETS_PER_CLASS results per class over the dataset) or
    # "boundary" (standard, plus a task "boundary": Boundary AP of the masks, Cheng et al.
    # 2021; slow, lvis-api's matching).
    _C.TEST.EQLOSSES.PROTOCOL = "standard"
    # K of Fixed AP (10,000 for LVIS).
    _C.TEST.EQLOSSES.FIXED_AP_DETS_PER_CLASS = 10000
    # Also report Pooled AP (Dave et al. 2021): AP-pooled-all/r/c/f, each pool of classes
    # ranked as one list (usually with PROTOCOL "fixed", as the paper does).
    _C.TEST.EQLOSSES.POOLED_AP = False

    # Post-hoc score calibration at inference (eqlosses_d2.calibration), from the class
    # statistics stored in the model.
    _C.TEST.EQLOSSES.CALIBRATION = CN()
    # By its name in CALIBRATION_REGISTRY: "none", "norcal" (Pan et al. 2021), "iif" (IIF
    # weights on a softmax head) or "tau_norm" (τ-normalized classifier weights, Kang et al.
    # 2020); each method's keys are declared by its class (eqlosses_d2.calibration).
    _C.TEST.EQLOSSES.CALIBRATION.METHOD = "none"

    # Training-time augmentation of eqlosses_d2.data.CopyPasteDatasetMapper (built by the
    # train loader when LSJ.ENABLED): large-scale jitter, Simple Copy-Paste (Ghiasi et al. 2021).
    _C.INPUT.EQLOSSES = CN()
    _C.INPUT.EQLOSSES.LSJ = CN()
    # Train with the copy-paste mapper's large-scale jitter instead of Detectron2's DatasetMapper
    # (whose INPUT.MIN_SIZE_TRAIN / MAX_SIZE_TRAIN / RANDOM_FLIP / CROP are then unused).
    _C.INPUT.EQLOSSES.LSJ.ENABLED = False
    # Side of the square training canvas: the jittered image is cropped / padded to it.
    _C.INPUT.EQLOSSES.LSJ.IMAGE_SIZE = 1024
    # Smallest jitter scale: the image is resized to fit a square of side scale × IMAGE_SIZE.
    _C.INPUT.EQLOSSES.LSJ.MIN_SCALE = 0.1
    # Largest jitter scale (the paper's range: 0.1 .. 2.0; standard scale jitter 0.8 .. 1.25).
    _C.INPUT.EQLOSSES.LSJ.MAX_SCALE = 2.0
    # Probability of a horizontal flip, per image (target and paste source independently).
    _C.INPUT.EQLOSSES.LSJ.HFLIP_PROB = 0.5
    _C.INPUT.EQLOSSES.COPY_PASTE = CN()
    # Paste a random subset of another training image's objects onto each image (needs LSJ.ENABLED).
    _C.INPUT.EQLOSSES.COPY_PASTE.ENABLED = False
    # Probability that an image gets objects pasted (the paper: 1.0).
    _C.INPUT.EQLOSSES.COPY_PASTE.PROB = 1.0
    # Most objects pasted per image (0: no limit); k is uniform in 1 .. min(n, this).
    _C.INPUT.EQLOSSES.COPY_PASTE.MAX_OBJECTS = 0
    # Paste-source images: "uniform", "repeat_factor" (∝ LVIS repeat factor) or "class_balanced"
    # (a present class uniformly, then one of its images).
    _C.INPUT.EQLOSSES.COPY_PASTE.SOURCE_SAMPLING = "uniform"
    # t of the "repeat_factor" source sampling, r(c) = max(1, sqrt(t / f(c))).
    _C.INPUT.EQLOSSES.COPY_PASTE.SOURCE_REPEAT_THRESHOLD = 0.001
    # A partly covered object is dropped when fewer than this many of its pixels stay visible.
    _C.INPUT.EQLOSSES.COPY_PASTE.MIN_VISIBLE_PIXELS = 10
    # ... or when less than this fraction of its own pixels stays visible.
    _C.INPUT.EQLOSSES.COPY_PASTE.MIN_VISIBLE_FRACTION = 0.01

    # every registered method's own node (MODEL.EQLOSSES.<NODE>, its keys of TEST.EQLOSSES.CALIBRATION)
    add_registered_configs(cfg)
    return cfg


EVAL_PROTOCOLS = ("standard", "fixed", "boundary")


@CONFIG_CHECK_REGISTRY.register()
def validate_registry_names(cfg):
    """Every name a config gives a registry (``MODEL.EQLOSSES.LOSS``, ``ONE_STAGE.LOSS``,
    ``TEST.EQLOSSES.CALIBRATION.METHOD``) is registered: one line listing the registered names."""
    for kind in KINDS:
        node = cfg
        for part in kind.key.split("."):
            node = node.get(part) if isinstance(node, CN) else None
        if node is None:
            continue  # a kind whose keys this config does not have (its package adds them)
        try:
            lookup(kind.registry, node)
        except KeyError as e:
            raise ConfigError(e.args[0]) from None


@CONFIG_CHECK_REGISTRY.register()
def validate_losses(cfg):
    """The RoI loss's hyper-parameters (its constructor's checks, on an instance of one class), and
    the config it requires besides its name (its ``required_config``)."""
    name = cfg.MODEL.EQLOSSES.LOSS
    try:
        build_loss_from_cfg(cfg.MODEL.EQLOSSES, 1)
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    except ValueError as e:
        node = getattr(lookup(ROI_CLS_LOSS_REGISTRY, name), "config_node", None)
        if node and str(e).startswith(f"{node}."):
            raise ConfigError(f"MODEL.EQLOSSES.{e}") from None
        raise ConfigError(f"MODEL.EQLOSSES.LOSS {name}: {e}") from None
    if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN":  # the RoI heads train with this loss
        for key, value in lookup(ROI_CLS_LOSS_REGISTRY, name).required_config:  # e.g. CDB-S: its sampler
            found = cfg
            for part in key.split("."):
                found = found[part]
            if found != value:
                raise ConfigError(f"MODEL.EQLOSSES.LOSS {name} needs {key} {value}; got {found!r}")


@CONFIG_CHECK_REGISTRY.register()
def validate_eval_protocol(cfg):
    """One-line errors for the evaluation-protocol keys."""
    protocol = cfg.TEST.EQLOSSES.PROTOCOL
    if protocol not in EVAL_PROTOCOLS:
        raise ConfigError(f"TEST.EQLOSSES.PROTOCOL must be one of {', '.join(EVAL_PROTOCOLS)}; got '{protocol}'")
    if protocol == "boundary" and not cfg.MODEL.MASK_ON:
        raise ConfigError("TEST.EQLOSSES.PROTOCOL 'boundary' evaluates masks: it needs MODEL.MASK_ON True")
    if protocol == "fixed" and cfg.TEST.EQLOSSES.FIXED_AP_DETS_PER_CLASS <= 0:
        raise ConfigError(
            f"TEST.EQLOSSES.FIXED_AP_DETS_PER_CLASS must be > 0, got {cfg.TEST.EQLOSSES.FIXED_AP_DETS_PER_CLASS}"
        )
    validate_calibration(cfg)


def validate_calibration(cfg):
    """One-line errors for TEST.EQLOSSES.CALIBRATION (values, and the head it needs)."""
    try:
        calibration = calibration_from_cfg(cfg)
        if cfg.MODEL.EQLOSSES.LOSS in ROI_CLS_LOSS_REGISTRY:
            # an instance (C = 1): a loss built on another takes its family from it
            loss = build_loss_from_cfg(cfg.MODEL.EQLOSSES, 1)
            calibration.check_head(loss, cfg.MODEL.EQLOSSES.COSINE_SCALE > 0)
    except ValueError as e:
        raise ConfigError(f"TEST.EQLOSSES.CALIBRATION.{e}") from None
    return calibration


#: meta-architectures whose classes and head are configured in MODEL.RETINANET
ONE_STAGE_META_ARCHITECTURES = ("RetinaNet", "LongTailRetinaNet", "LongTailFCOS")
ONE_STAGE_ASSIGNERS = ("default", "atss")


@CONFIG_CHECK_REGISTRY.register()
def validate_one_stage(cfg):
    """One-line errors for MODEL.EQLOSSES.ONE_STAGE / FOCAL / EFL (values, and what the
    one-stage models do not support)."""
    node = cfg.MODEL.EQLOSSES.ONE_STAGE
    try:
        build_dense_loss_from_cfg(cfg.MODEL.EQLOSSES, 1)
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    except ValueError as e:
        raise ConfigError(f"MODEL.EQLOSSES.{e}") from None
    if node.ASSIGNER not in ONE_STAGE_ASSIGNERS:
        raise ConfigError(
            f"MODEL.EQLOSSES.ONE_STAGE.ASSIGNER must be one of {', '.join(ONE_STAGE_ASSIGNERS)}; got '{node.ASSIGNER}'"
        )
    if node.ATSS_TOPK < 1:
        raise ConfigError(f"MODEL.EQLOSSES.ONE_STAGE.ATSS_TOPK must be >= 1, got {node.ATSS_TOPK}")
    if node.TEST_TOPK_PER_CLASS < 0:
        raise ConfigError(
            f"MODEL.EQLOSSES.ONE_STAGE.TEST_TOPK_PER_CLASS must be >= 0 (0: Detectron2's), got {node.TEST_TOPK_PER_CLASS}"
        )
    if node.FCOS_CENTER_SAMPLING_RADIUS <= 0:
        raise ConfigError(
            f"MODEL.EQLOSSES.ONE_STAGE.FCOS_CENTER_SAMPLING_RADIUS must be > 0, got {node.FCOS_CENTER_SAMPLING_RADIUS}"
        )
    if cfg.MODEL.META_ARCHITECTURE in ("LongTailRetinaNet", "LongTailFCOS"):
        retina = cfg.MODEL.RETINANET
        if (retina.FOCAL_LOSS_ALPHA, retina.FOCAL_LOSS_GAMMA) != (0.25, 2.0):
            raise ConfigError(
                f"{cfg.MODEL.META_ARCHITECTURE} reads MODEL.EQLOSSES.FOCAL / EFL, not MODEL.RETINANET.FOCAL_LOSS_*: set those"
            )
        if cfg.TEST.EQLOSSES.CALIBRATION.METHOD != "none":
            raise ConfigError(f"TEST.EQLOSSES.CALIBRATION: not supported by {cfg.MODEL.META_ARCHITECTURE}")
        if cfg.TEST.EQLOSSES.PROTOCOL == "boundary":
            raise ConfigError(f"TEST.EQLOSSES.PROTOCOL 'boundary' evaluates masks; {cfg.MODEL.META_ARCHITECTURE} has none")


def validate_config(cfg):
    """Every registered config check (``CONFIG_CHECK_REGISTRY``), in the order they were
    registered: the registry names first, then each method's values, the evaluation protocol,
    the one-stage models, the copy-paste mapper. Raises :class:`ConfigError` in one line."""
    for _, check in CONFIG_CHECK_REGISTRY:
        check(cfg)
    return cfg


def __getattr__(name):
    """A check registered by another module, under its function name (``validate_copy_paste``,
    in :mod:`eqlosses_d2.data.copy_paste`), is also ``eqlosses_d2.config.<name>``."""
    if name in CONFIG_CHECK_REGISTRY:
        return CONFIG_CHECK_REGISTRY.get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def merge_config_file(cfg, config_file):
    """``cfg.merge_from_file`` with one-line errors naming the file and the key at fault.
    A name of a registered config source (the model zoo's, ``eqlosses_d2/model_zoo``) stands
    for its config file and opts."""
    if not os.path.isfile(config_file):
        hints = []
        for _, source in CONFIG_SOURCE_REGISTRY:
            if source.is_name(config_file):
                return source.merge(cfg, config_file)
            matches = source.close_matches(config_file)
            if matches:
                hints.append(f"; {source.what} names close to it: {', '.join(matches)}")
        raise ConfigError(f"config file not found: {config_file}{''.join(hints)}")
    try:
        cfg.merge_from_file(config_file)
    except KeyError as e:
        # yacs: "Non-existent config key: MODEL.FOO"
        raise ConfigError(f"{config_file}: {e.args[0] if e.args else e}") from None
    except ValueError as e:
        raise ConfigError(f"{config_file}: {str(e).splitlines()[0]}") from None


def merge_config_list(cfg, opts):
    """``cfg.merge_from_list`` with one-line errors naming the key at fault."""
    try:
        cfg.merge_from_list(opts)
    except KeyError as e:
        raise ConfigError(f"command line: {e.args[0] if e.args else e}") from None
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"command line: {str(e).splitlines()[0] if str(e) else opts}") from None


def class_stats_dataset(cfg):
    """The name of the dataset whose class statistics a model trained with ``cfg`` stores."""
    name = cfg.MODEL.EQLOSSES.CLASS_STATS_DATASET
    if name:
        return name
    if len(cfg.DATASETS.TRAIN) == 0:
        raise ConfigError("DATASETS.TRAIN is empty and MODEL.EQLOSSES.CLASS_STATS_DATASET is unset")
    return cfg.DATASETS.TRAIN[0]


def validate_num_classes(cfg, dataset_names):
    """Every dataset's class count must equal the model's NUM_CLASSES."""
    from detectron2.data import MetadataCatalog

    keys = []
    if cfg.MODEL.META_ARCHITECTURE in ONE_STAGE_META_ARCHITECTURES:
        keys.append("MODEL.RETINANET.NUM_CLASSES")
    else:
        keys.append("MODEL.ROI_HEADS.NUM_CLASSES")
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is None:
            continue
        for key in keys:
            node = cfg
            for part in key.split(".")[:-1]:
                node = node[part]
            value = node[key.split(".")[-1]]
            if value != len(classes):
                raise ConfigError(
                    f"{key}={value} does not match dataset '{name}', which has {len(classes)} classes"
                )
