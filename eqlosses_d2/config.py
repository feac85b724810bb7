"""
Config keys of eqlosses_d2, under the package's own nodes, and their validation.

Every key has a default and a one-line comment. No leaf name that upstream
Detectron2 defines is reused (Detectron2 main added ``ROI_BOX_HEAD.USE_FED_LOSS``
and ``USE_SIGMOID_CE``; our keys live under ``MODEL.EQLOSSES`` instead).
"""
import os

from detectron2.config import CfgNode as CN

__all__ = [
    "ConfigError",
    "add_eqlosses_config",
    "class_stats_dataset",
    "merge_config_file",
    "merge_config_list",
    "validate_num_classes",
    "validate_one_stage",
]


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
    # Classification loss of the RoI box predictor, by registry name (eqlosses_d2.losses):
    # "softmax" (Detectron2's default), "sigmoid", "eql", "eqlv2", "softmax_eql", "seesaw",
    # "federated", "gumbel", "gumbel_droploss", "iif", "pcb", "equilibrium" (LOCE's EBL); each
    # method's hyper-parameters live in its own node below.
    _C.MODEL.EQLOSSES.LOSS = "softmax"
    # > 0: cosine classifier s * x/|x| * W/|W| with this scale s (Seesaw's LVIS recipe: 20);
    # 0: Detectron2's linear classifier.
    _C.MODEL.EQLOSSES.COSINE_SCALE = 0.0
    # > 0: normalized mask predictor, s * cos(x, w_k) + b_k per pixel, with this scale s
    # (GOL's LVIS recipe: 20; an option of Seesaw's); 0: Detectron2's 1x1 convolution.
    _C.MODEL.EQLOSSES.MASK_PREDICTOR_SCALE = 0.0

    _C.MODEL.EQLOSSES.SIGMOID = CN()
    # Prior probability pi of the classifier bias init, b = -log((1 - pi) / pi).
    _C.MODEL.EQLOSSES.SIGMOID.PRIOR_PROB = 0.001

    _C.MODEL.EQLOSSES.EQL = CN()
    # λ: classes with image frequency below it lose their negatives on foreground RoIs
    # (LVIS v1 0.0011, v0.5 0.00177).
    _C.MODEL.EQLOSSES.EQL.TAIL_THRESHOLD = 0.0011
    # Prior π of the classifier bias init, b = -log((1 - π) / π).
    _C.MODEL.EQLOSSES.EQL.PRIOR_PROB = 0.001

    _C.MODEL.EQLOSSES.EQLV2 = CN()
    # γ of the weight mapping f(g) = 1 / (1 + exp(-γ (g - μ))).
    _C.MODEL.EQLOSSES.EQLV2.GAMMA = 12.0
    # μ of the weight mapping f.
    _C.MODEL.EQLOSSES.EQLV2.MU = 0.8
    # α of the positive weight q = 1 + α (1 - r).
    _C.MODEL.EQLOSSES.EQLV2.ALPHA = 4.0
    # Inference p_j = σ(z_j)·(1 - σ(z_bg)) (True) or σ(z_j) (False).
    _C.MODEL.EQLOSSES.EQLV2.TEST_WITH_OBJ = True
    # Prior π of the bias init of all C + 1 channels, objectness included (authors' head).
    _C.MODEL.EQLOSSES.EQLV2.PRIOR_PROB = 0.001

    _C.MODEL.EQLOSSES.SOFTMAX_EQL = CN()
    # τ: margin τ·log(max(G_j, ε) / max(G_y, ε)), or the prior's exponent.
    _C.MODEL.EQLOSSES.SOFTMAX_EQL.TAU = 1.0
    # ε: lower clamp of the accumulated gradients G (and the prior's denominator).
    _C.MODEL.EQLOSSES.SOFTMAX_EQL.EPS = 1e-4
    # G from "pos" (label = j), "neg" (label ≠ j) or "pos_and_neg" gradients.
    _C.MODEL.EQLOSSES.SOFTMAX_EQL.INDICATOR = "pos"
    # "margin" (pairwise, on foreground RoIs; default) or "prior" (z_j + log((G_j/ΣG)^τ + 1e-9)).
    _C.MODEL.EQLOSSES.SOFTMAX_EQL.FORM = "margin"

    _C.MODEL.EQLOSSES.SEESAW = CN()
    # Mitigation (N_j / N_y)^p for N_j < N_y (N: cumulative positive RoI counts).
    _C.MODEL.EQLOSSES.SEESAW.P = 0.8
    # Compensation (σ_j / σ_y)^q for σ_j > σ_y.
    _C.MODEL.EQLOSSES.SEESAW.Q = 2.0
    # Lower clamp of σ_y in the compensation.
    _C.MODEL.EQLOSSES.SEESAW.EPS = 0.01
    # Weight of both terms (loss_cls and loss_cls_objectness), as mmdet's.
    _C.MODEL.EQLOSSES.SEESAW.LOSS_WEIGHT = 1.0

    _C.MODEL.EQLOSSES.FEDERATED = CN()
    # |S|: classes in the loss per batch, the background index counted when present (as Detectron2 main).
    _C.MODEL.EQLOSSES.FEDERATED.NUM_FED_CLASSES = 50
    # Extra classes are drawn with probability ∝ image_count ** power.
    _C.MODEL.EQLOSSES.FEDERATED.FREQ_WEIGHT_POWER = 0.5
    # Classifier bias init -log((1 - π) / π) (CenterNet2's 0.01); 0.5 gives main's zero bias.
    _C.MODEL.EQLOSSES.FEDERATED.PRIOR_PROB = 0.01

    _C.MODEL.EQLOSSES.GUMBEL = CN()
    # Classifier bias of all channels ("gumbel" and "gumbel_droploss").
    _C.MODEL.EQLOSSES.GUMBEL.BIAS_INIT = -2.0
    # DropLoss λ (LVIS v1 0.0011, v0.5 0.00177); "gumbel_droploss" only.
    _C.MODEL.EQLOSSES.GUMBEL.TAIL_THRESHOLD = 0.0011

    _C.MODEL.EQLOSSES.PCB = CN()
    # Base loss PCB composes with: "softmax", "seesaw" or "eqlv2" (its own node's keys apply).
    _C.MODEL.EQLOSSES.PCB.BASE = "softmax"
    # α of PCB: positive RoIs' loss (1 − α)·CE + α·KL(soft label ‖ prediction).
    _C.MODEL.EQLOSSES.PCB.ALPHA = 0.4
    # μ of the confusion matrix's moving average, M[c] ← μ·M[c] + (1 − μ)·batch mean.
    _C.MODEL.EQLOSSES.PCB.MOMENTUM = 0.99
    # Fraction of SOLVER.MAX_ITER after which the soft labels are used (the paper: 17/24).
    _C.MODEL.EQLOSSES.PCB.START = 17 / 24

    _C.MODEL.EQLOSSES.EQUILIBRIUM = CN()
    # α of LOCE's mean-score update, s_c ← α^n s_c + (1 − α^n)·mean of the class's n entries.
    _C.MODEL.EQLOSSES.EQUILIBRIUM.ALPHA = 0.9
    # The background's fixed "mean score".
    _C.MODEL.EQLOSSES.EQUILIBRIUM.BACKGROUND_SCORE = 0.01
    # Every class's mean score before its first entry.
    _C.MODEL.EQLOSSES.EQUILIBRIUM.INITIAL_SCORE = 0.01

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

    # Only parameters whose names start with one of these prefixes are trained (empty: all);
    # LOCE's fine-tune protocol trains the classifier, box regressor, RPN and mask head.
    _C.MODEL.EQLOSSES.TRAINABLE_MODULES = []

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

    _C.MODEL.EQLOSSES.IIF = CN()
    # raw | smooth | prob | normit | gombit | base2 | base10, each also as <variant>_obj
    # (instance counts instead of image counts).
    _C.MODEL.EQLOSSES.IIF.VARIANT = "raw"

    # One-stage detectors: MODEL.META_ARCHITECTURE "LongTailRetinaNet" or "LongTailFCOS"
    # (eqlosses_d2.modeling.one_stage). Both read their head (NUM_CONVS, NORM, PRIOR_PROB),
    # classes, features and test thresholds from Detectron2's MODEL.RETINANET node.
    _C.MODEL.EQLOSSES.ONE_STAGE = CN()
    # Classification loss of the dense head: "focal" (sigmoid focal loss) or "efl" (Equalized Focal Loss).
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

    # Sigmoid focal loss of the one-stage models (read instead of MODEL.RETINANET.FOCAL_LOSS_*).
    _C.MODEL.EQLOSSES.FOCAL = CN()
    # α: weight of the positives' terms, 1 - α of the negatives' (< 0: no α weighting).
    _C.MODEL.EQLOSSES.FOCAL.ALPHA = 0.25
    # γ: focusing factor (1 - p_t)^γ.
    _C.MODEL.EQLOSSES.FOCAL.GAMMA = 2.0

    # Equalized Focal Loss (Li et al. 2022): γ_j = GAMMA + SCALE_FACTOR·(1 - g_j), weight γ_j / GAMMA.
    _C.MODEL.EQLOSSES.EFL = CN()
    # α of the focal terms (< 0: no α weighting).
    _C.MODEL.EQLOSSES.EFL.ALPHA = 0.25
    # γ_b: the focusing factor of a class with balanced gradients (g_j = 1).
    _C.MODEL.EQLOSSES.EFL.GAMMA = 2.0
    # s: how much γ_j grows as the class's positive/negative gradient ratio g_j falls to 0.
    _C.MODEL.EQLOSSES.EFL.SCALE_FACTOR = 8.0

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
    # "none", "norcal" (Pan et al. 2021), "iif" (IIF weights on a softmax head) or
    # "tau_norm" (τ-normalized classifier weights, Kang et al. 2020).
    _C.TEST.EQLOSSES.CALIBRATION.METHOD = "none"
    # NorCal's γ: foreground scores divided by n_c^γ (0: uncalibrated); with FACTOR
    # "effective_number" it is the β in [0, 1) of (1 − β) / (1 − β^n_c).
    _C.TEST.EQLOSSES.CALIBRATION.GAMMA = 0.0
    # NorCal variant: "exps" (the authors' default), "probs" or "logits".
    _C.TEST.EQLOSSES.CALIBRATION.VARIANT = "exps"
    # NorCal factor: "power" (n_c^-γ) or "effective_number" ((1 − γ) / (1 − γ^n_c)).
    _C.TEST.EQLOSSES.CALIBRATION.FACTOR = "power"
    # NorCal: renormalize each proposal's scores over the classes and background.
    _C.TEST.EQLOSSES.CALIBRATION.RENORM = True
    # n_c of NorCal: training "image" counts (the paper's) or "instance" counts.
    _C.TEST.EQLOSSES.CALIBRATION.COUNT = "image"
    # IIF variant of METHOD "iif" (those of MODEL.EQLOSSES.IIF.VARIANT).
    _C.TEST.EQLOSSES.CALIBRATION.IIF_VARIANT = "raw"
    # τ of METHOD "tau_norm": classifier weights w_c / |w_c|^τ.
    _C.TEST.EQLOSSES.CALIBRATION.TAU = 1.0

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
    return cfg


def validate_copy_paste(cfg):
    """One-line errors for INPUT.EQLOSSES.LSJ / COPY_PASTE (values, and what they need)."""
    from .data.copy_paste import SOURCE_SAMPLINGS

    node = cfg.INPUT.get("EQLOSSES")
    if node is None:
        return
    lsj, paste = node.LSJ, node.COPY_PASTE
    checks = [
        ("LSJ.IMAGE_SIZE", lsj.IMAGE_SIZE, lsj.IMAGE_SIZE > 0, "must be > 0"),
        ("LSJ.MIN_SCALE", lsj.MIN_SCALE, lsj.MIN_SCALE > 0, "must be > 0"),
        ("LSJ.MAX_SCALE", lsj.MAX_SCALE, lsj.MAX_SCALE >= lsj.MIN_SCALE, f"must be >= LSJ.MIN_SCALE ({lsj.MIN_SCALE})"),
        ("LSJ.HFLIP_PROB", lsj.HFLIP_PROB, 0 <= lsj.HFLIP_PROB <= 1, "must be in [0, 1]"),
        ("COPY_PASTE.PROB", paste.PROB, 0 <= paste.PROB <= 1, "must be in [0, 1]"),
        ("COPY_PASTE.MAX_OBJECTS", paste.MAX_OBJECTS, paste.MAX_OBJECTS >= 0, "must be >= 0 (0: no limit)"),
        ("COPY_PASTE.SOURCE_SAMPLING", paste.SOURCE_SAMPLING, paste.SOURCE_SAMPLING in SOURCE_SAMPLINGS,
         f"must be one of {', '.join(SOURCE_SAMPLINGS)}"),
        ("COPY_PASTE.SOURCE_REPEAT_THRESHOLD", paste.SOURCE_REPEAT_THRESHOLD, paste.SOURCE_REPEAT_THRESHOLD > 0,
         "must be > 0"),
        ("COPY_PASTE.MIN_VISIBLE_PIXELS", paste.MIN_VISIBLE_PIXELS, paste.MIN_VISIBLE_PIXELS >= 0, "must be >= 0"),
        ("COPY_PASTE.MIN_VISIBLE_FRACTION", paste.MIN_VISIBLE_FRACTION, 0 <= paste.MIN_VISIBLE_FRACTION <= 1,
         "must be in [0, 1]"),
    ]
    for key, value, ok, rule in checks:
        if not ok:
            raise ConfigError(f"INPUT.EQLOSSES.{key} {rule}; got {value!r}")
    if paste.ENABLED and not lsj.ENABLED:
        raise ConfigError("INPUT.EQLOSSES.COPY_PASTE.ENABLED needs INPUT.EQLOSSES.LSJ.ENABLED (the mapper that pastes)")
    if lsj.ENABLED and cfg.MODEL.KEYPOINT_ON:
        raise ConfigError("INPUT.EQLOSSES.LSJ.ENABLED: the copy-paste mapper has no keypoints (MODEL.KEYPOINT_ON)")
    if lsj.ENABLED and cfg.MODEL.LOAD_PROPOSALS:
        raise ConfigError("INPUT.EQLOSSES.LSJ.ENABLED: the copy-paste mapper loads no proposals (MODEL.LOAD_PROPOSALS)")


EVAL_PROTOCOLS = ("standard", "fixed", "boundary")


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
    from .calibration import calibration_from_cfg
    from .losses import LOSS_REGISTRY, build_loss_from_cfg

    try:
        calibration = calibration_from_cfg(cfg)
        if cfg.MODEL.EQLOSSES.LOSS in LOSS_REGISTRY:
            # an instance (C = 1): a loss built on another takes its family from it
            loss = build_loss_from_cfg(cfg.MODEL.EQLOSSES, 1)
            calibration.check_head(loss, cfg.MODEL.EQLOSSES.COSINE_SCALE > 0)
    except ValueError as e:
        raise ConfigError(f"TEST.EQLOSSES.CALIBRATION.{e}") from None
    return calibration


#: meta-architectures whose classes and head are configured in MODEL.RETINANET
ONE_STAGE_META_ARCHITECTURES = ("RetinaNet", "LongTailRetinaNet", "LongTailFCOS")
ONE_STAGE_ASSIGNERS = ("default", "atss")


def validate_one_stage(cfg):
    """One-line errors for MODEL.EQLOSSES.ONE_STAGE / FOCAL / EFL (values, and what the
    one-stage models do not support)."""
    from .losses.dense import build_dense_loss_from_cfg

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


def merge_config_file(cfg, config_file):
    """``cfg.merge_from_file`` with one-line errors naming the file and the key at fault.
    A model-zoo name (``eqlosses_d2/model_zoo``) stands for its config file and opts."""
    if not os.path.isfile(config_file):
        from . import model_zoo

        if model_zoo.is_model_zoo_name(config_file):
            return model_zoo.merge_model_zoo_config(cfg, config_file)
        matches = model_zoo.close_matches(config_file)
        hint = f"; model-zoo names close to it: {', '.join(matches)}" if matches else ""
        raise ConfigError(f"config file not found: {config_file}{hint}")
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
