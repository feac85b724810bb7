"""The semantic segmentation heads (eqlosses_d2/segmentation/heads): built from a config, their
training loss is the registry loss on logits upsampled as Detectron2's heads do (equal to
Detectron2's own SemSegFPNHead / DeepLabV3PlusHead loss for softmax, and to a hand-derived float64
value), ignored pixels skipped, inference shapes, the DeepLab head's strides and its equality with
Detectron2's DeepLab project head on the same weights, the class statistics in the state dict, the
config checks, the poly LR schedule and the training augmentations."""
import copy
import math

import pytest
import torch
from torch.nn import functional as F

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model, build_sem_seg_head
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead

from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.config import ConfigError, validate_config
from eqlosses_d2.registry import PIXEL_LOSS_REGISTRY, names
from eqlosses_d2.segmentation import SemSegClassStatistics, SemSegClassStatsBuffers
from eqlosses_d2.segmentation.training import build_poly_lr_scheduler, build_sem_seg_train_aug

NUM_CLASSES = 5


def _cfg(head="LongTailSemSegFPNHead", **opts):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.SEM_SEG_HEAD.NAME = head
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT = 0.5
    if head == "LongTailDeepLabV3PlusHead":
        cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
        # a narrow R-50 (Detectron2's R-18 has no dilated res5)
        cfg.MODEL.RESNETS.DEPTH = 50
        cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
        cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res5"]
        cfg.MODEL.RESNETS.RES5_DILATION = 2
        cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res5"]
        cfg.MODEL.SEM_SEG_HEAD.NORM = "BN"
        cfg.MODEL.EQLOSSES.SEM_SEG.DEEPLAB.ASPP_CHANNELS = 32
        cfg.MODEL.EQLOSSES.SEM_SEG.DEEPLAB.PROJECT_CHANNELS = [8]
    else:
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.merge_from_list([x for kv in opts.items() for x in kv])
    return cfg


FPN_SHAPES = {f"p{level}": ShapeSpec(channels=8, stride=2**level) for level in (2, 3, 4, 5)}
DEEPLAB_SHAPES = {"res2": ShapeSpec(channels=8, stride=4), "res5": ShapeSpec(channels=16, stride=16)}
BOTH_HEADS = [("LongTailSemSegFPNHead", FPN_SHAPES), ("LongTailDeepLabV3PlusHead", DEEPLAB_SHAPES)]


def _features(shapes, height=64, width=96, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(batch, s.channels, height // s.stride, width // s.stride, generator=g)
        for name, s in shapes.items()
    }


def _targets(height=64, width=96, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, NUM_CLASSES, (batch, height, width), generator=g)
    targets[:, :5, :] = 255  # an ignored band, as Detectron2's padding and unlabelled pixels
    targets[0, :, :7] = 255
    return targets


def _head(name, shapes, **opts):
    cfg = _cfg(name, **opts)
    cfg.MODEL.SEM_SEG_HEAD.NORM = ""  # batch-independent layers, so per-image checks hold
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = list(shapes)
    cfg.MODEL.EQLOSSES.SEM_SEG.DEEPLAB.ASPP_DROPOUT = 0.0
    cfg.MODEL.EQLOSSES.SEM_SEG.DEEPLAB.PROJECT_CHANNELS = [4] * (len(shapes) - 1)
    torch.manual_seed(0)
    return build_sem_seg_head(cfg, shapes)


@pytest.mark.parametrize("name, shapes", BOTH_HEADS)
def test_training_loss_is_weighted_softmax_ce_on_upsampled_logits(name, shapes):
    head = _head(name, shapes)
    assert type(head).__name__ == name
    features, targets = _features(shapes), _targets()
    head.train()
    results, losses = head(features, targets)
    assert results is None and set(losses) == {"loss_sem_seg"}
    logits = F.interpolate(head.layers(features), scale_factor=4, mode="bilinear", align_corners=False)
    assert logits.shape == (2, NUM_CLASSES, 64, 96)
    expected = 0.5 * F.cross_entropy(logits.double(), targets, ignore_index=255)
    assert torch.allclose(losses["loss_sem_seg"].double(), expected, rtol=1e-6, atol=0)
    if name == "LongTailSemSegFPNHead":
        # Detectron2's own SemSegFPNHead.losses on the same head and logits
        theirs = SemSegFPNHead.losses(head, head.layers(features), targets)["loss_sem_seg"]
        assert torch.allclose(losses["loss_sem_seg"], theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("loss", names(PIXEL_LOSS_REGISTRY))
def test_every_registered_pixel_loss_is_the_heads_loss(loss):
    """For every loss of the registry: the head's loss_sem_seg is LOSS_WEIGHT x the loss (a copy of
    the head's, state included) on the upsampled logits, and its inference the loss's predict."""
    head = _head("LongTailSemSegFPNHead", FPN_SHAPES, **{"MODEL.EQLOSSES.SEM_SEG.LOSS": loss})
    stats = SemSegClassStatistics(image_count=[20, 9, 5, 2, 1], pixel_count=[5000, 700, 300, 90, 20], num_images=24,
                                  num_images_with_annotations=24)
    head.class_stats.set_from(stats)
    assert head.loss.name == loss and head.loss.class_stats is head.class_stats
    features, targets = _features(FPN_SHAPES), _targets()
    head.train()
    reference = copy.deepcopy(head.loss)
    object.__setattr__(reference, "class_stats", head.class_stats)
    logits = F.interpolate(head.layers(features), scale_factor=4, mode="bilinear", align_corners=False)
    expected = {k: 0.5 * v for k, v in reference(logits.detach(), targets).items()}
    losses = head(features, targets)[1]
    assert losses.keys() == expected.keys()
    for key in losses:
        assert torch.allclose(losses[key], expected[key], rtol=1e-5, atol=1e-7), key
    head.eval()
    with torch.no_grad():
        assert torch.allclose(head(features)[0], head.loss.predict(logits.detach()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, shapes", BOTH_HEADS)
def test_loss_by_hand_with_constant_logits_and_ignored_pixels(name, shapes):
    """Predictor weights 0 and bias b: every pixel's logits are b (bilinear upsampling keeps a
    constant), so a pixel of class y costs logsumexp(b) - b_y; the loss is 0.5 x their mean over the
    pixels not labelled 255, derived here in float64 from the label counts."""
    head = _head(name, shapes)
    bias = [0.3, -1.2, 2.0, 0.0, 0.7]
    with torch.no_grad():
        head.predictor.weight.zero_()
        head.predictor.bias.copy_(torch.tensor(bias))
    targets = _targets()
    head.train()
    loss = head(_features(shapes), targets)[1]["loss_sem_seg"]
    lse = math.log(sum(math.exp(b) for b in bias))
    counts = [int((targets == c).sum()) for c in range(NUM_CLASSES)]
    expected = 0.5 * sum(n * (lse - b) for n, b in zip(counts, bias)) / sum(counts)
    assert sum(counts) == int((targets != 255).sum()) < targets.numel()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # logits at ignored pixels do not matter: the gradient of the loss flows only through valid ones
    features = _features(shapes)
    head.zero_grad()
    all_ignored = torch.full_like(targets, 255)
    loss = head(features, all_ignored)[1]["loss_sem_seg"]
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in head.parameters())


@pytest.mark.parametrize("name, shapes", BOTH_HEADS)
def test_inference_returns_the_loss_scores_at_input_resolution(name, shapes):
    head = _head(name, shapes).eval()
    features = _features(shapes)
    with torch.no_grad():
        results, losses = head(features)
    assert losses == {} and results.shape == (2, NUM_CLASSES, 64, 96)
    logits = F.interpolate(head.layers(features), scale_factor=4, mode="bilinear", align_corners=False)
    assert torch.equal(results, head.loss.predict(logits))
    # a method's predict is what inference returns
    head.loss.predict = lambda x: 2 * x + 1
    with torch.no_grad():
        assert torch.allclose(head(features)[0], 2 * logits + 1)


def test_deeplab_loss_on_a_batch_not_divisible_by_the_stride():
    """ResNet (no size divisibility) on a 62 x 94 batch: res2 is 16 x 24, the logits 64 x 96; the
    loss is CE over their top-left 62 x 94 (where sem_seg_postprocess crops at inference)."""
    head = _head("LongTailDeepLabV3PlusHead", DEEPLAB_SHAPES)
    features, targets = _features(DEEPLAB_SHAPES), _targets()[:, :62, :94]
    head.train()
    loss = head(features, targets)[1]["loss_sem_seg"]
    logits = F.interpolate(head.layers(features), scale_factor=4, mode="bilinear", align_corners=False)[..., :62, :94]
    assert torch.allclose(loss.double(), 0.5 * F.cross_entropy(logits.double(), targets, ignore_index=255), rtol=1e-6)


def test_heads_own_the_class_statistics_and_the_loss_reads_them():
    for name, shapes in (("LongTailSemSegFPNHead", FPN_SHAPES), ("LongTailDeepLabV3PlusHead", DEEPLAB_SHAPES)):
        head = _head(name, shapes)
        assert isinstance(head.class_stats, SemSegClassStatsBuffers)
        assert head.loss.class_stats is head.class_stats
        keys = head.state_dict().keys()
        assert {"class_stats.pixel_count", "class_stats.image_count", "class_stats.is_set"} <= set(keys)
        assert not any(k.startswith("loss.class_stats") for k in keys)  # saved once, by the head


@pytest.mark.parametrize("name", ["LongTailSemSegFPNHead", "LongTailDeepLabV3PlusHead"])
def test_full_model_builds_from_config_and_predicts_the_image_size(name):
    cfg = _cfg(name)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model.sem_seg_head).__name__ == name
    images = [torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8).float(), torch.rand(3, 64, 64) * 255]
    batch = [{"image": images[0], "sem_seg": _targets(64, 96, 1)[0]},
             {"image": images[1], "sem_seg": _targets(64, 64, 1)[0]}]
    model.train()
    losses = model(batch)
    assert set(losses) == {"loss_sem_seg"} and torch.isfinite(losses["loss_sem_seg"])
    model.eval()
    with torch.no_grad():
        out = model([{"image": images[0], "height": 32, "width": 48}, {"image": images[1]}])
    assert out[0]["sem_seg"].shape == (NUM_CLASSES, 32, 48)
    assert out[1]["sem_seg"].shape == (NUM_CLASSES, 64, 64)


def test_deeplab_strides_and_shapes():
    cfg = _cfg("LongTailDeepLabV3PlusHead")
    model = build_model(cfg)
    shapes = model.backbone.output_shape()
    assert shapes["res2"].stride == 4 and shapes["res5"].stride == 16  # RES5_DILATION 2: output stride 16
    head = model.sem_seg_head
    assert head.in_features == ["res2", "res5"] and head.common_stride == 4
    assert head.aspp.convs[1].dilation == (6, 6) and head.aspp.convs[3].dilation == (18, 18)
    assert head.projections[0].out_channels == 8 and head.fusions[0][0].in_channels == 8 + 32
    features = model.backbone(torch.rand(2, 3, 64, 96))
    assert features["res5"].shape[-2:] == (4, 6) and features["res2"].shape[-2:] == (16, 24)
    assert head.layers(features).shape == (2, NUM_CLASSES, 16, 24)
    with pytest.raises(ValueError, match="COMMON_STRIDE 8 must be the stride of the finest input feature 'res2'"):
        build_model(_cfg("LongTailDeepLabV3PlusHead", **{"MODEL.SEM_SEG_HEAD.COMMON_STRIDE": 8}))


def test_deeplab_head_equals_detectron2_deeplab_project_head():
    """Same weights in Detectron2's DeepLab project head (projects/DeepLab, shipped in the wheel):
    the same logits and, with its cross_entropy loss, the same loss."""
    from detectron2.projects.deeplab import DeepLabV3PlusHead

    shapes = DEEPLAB_SHAPES
    ours = _head("LongTailDeepLabV3PlusHead", shapes, **{"MODEL.SEM_SEG_HEAD.NORM": "BN"})
    torch.manual_seed(1)
    theirs = DeepLabV3PlusHead(
        shapes, project_channels=[4], aspp_dilations=[6, 12, 18], aspp_dropout=0.0, decoder_channels=[32, 32],
        common_stride=4, norm="", train_size=None, loss_weight=0.5, loss_type="cross_entropy", ignore_value=255,
        num_classes=NUM_CLASSES,
    )
    rename = {"decoder.res5.project_conv.": "aspp.", "decoder.res2.project_conv.": "projections.0.",
              "decoder.res2.fuse_conv.": "fusions.0."}
    mapped = {}
    for key, value in theirs.state_dict().items():
        for old, new in rename.items():
            key = key.replace(old, new)
        mapped[key] = value
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert unexpected == [] and all(k.startswith("class_stats.") for k in missing)
    features, targets = _features(shapes), _targets()
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert torch.allclose(ours(features)[0], theirs(features)[0], rtol=1e-5, atol=1e-6)
    ours.train(), theirs.train()
    ours_loss, theirs_loss = ours(features, targets)[1]["loss_sem_seg"], theirs(features, targets)[1]["loss_sem_seg"]
    assert torch.allclose(ours_loss, theirs_loss, rtol=1e-6)


def _check(**opts):
    cfg = _cfg(opts.pop("head", "LongTailSemSegFPNHead"), **opts)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_config_checks_are_one_line():
    validate_config(_cfg())
    validate_config(_cfg("LongTailDeepLabV3PlusHead"))
    message = _check(**{"MODEL.EQLOSSES.SEM_SEG.LOSS": "nope"})
    assert message.startswith("MODEL.EQLOSSES.SEM_SEG.LOSS: unknown pixel loss 'nope' (known: ")
    assert "softmax" in message
    message = _check(**{"MODEL.SEM_SEG_HEAD.NAME": "NoSuchHead"})
    assert "unknown 'NoSuchHead'" in message and "LongTailDeepLabV3PlusHead" in message
    assert "PROJECT_CHANNELS has 2 values" in _check(head="LongTailDeepLabV3PlusHead", **{
        "MODEL.EQLOSSES.SEM_SEG.DEEPLAB.PROJECT_CHANNELS": [8, 8]})
    assert "ASPP_DILATIONS needs 3 rates" in _check(head="LongTailDeepLabV3PlusHead", **{
        "MODEL.EQLOSSES.SEM_SEG.DEEPLAB.ASPP_DILATIONS": [6, 12]})
    assert "needs a head of eqlosses_d2" in _check(**{"MODEL.SEM_SEG_HEAD.NAME": "SemSegFPNHead",
                                                      "MODEL.EQLOSSES.SEM_SEG.LOSS": "softmax_eql"})
    validate_config(_cfg(**{"MODEL.SEM_SEG_HEAD.NAME": "SemSegFPNHead"}))  # Detectron2's head, its own CE
    assert "CROP_SINGLE_CATEGORY_MAX_AREA must be in (0, 1]" in _check(**{
        "INPUT.EQLOSSES.SEM_SEG.CROP_SINGLE_CATEGORY_MAX_AREA": 0.0})
    assert "NUM_CLASSES must be >= 1" in _check(**{"MODEL.SEM_SEG_HEAD.NUM_CLASSES": 0})
    assert "POLY_LR_POWER must be > 0" in _check(**{
        "SOLVER.LR_SCHEDULER_NAME": "WarmupPolyLR", "SOLVER.EQLOSSES.POLY_LR_POWER": 0.0})


def test_poly_lr_schedule_by_hand():
    cfg = _cfg(**{"SOLVER.LR_SCHEDULER_NAME": "WarmupPolyLR", "SOLVER.BASE_LR": 0.01, "SOLVER.MAX_ITER": 100,
                  "SOLVER.WARMUP_ITERS": 0, "SOLVER.EQLOSSES.POLY_LR_END": 1e-4})
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.01)
    scheduler = build_poly_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # mmsegmentation's poly: (base - min) (1 - t / T)^0.9 + min
    for it in (0, 1, 50, 99):
        assert lrs[it] == pytest.approx((0.01 - 1e-4) * (1 - it / 100) ** 0.9 + 1e-4, rel=1e-9)
    # with warmup: linear from WARMUP_FACTOR x lr(0) to the schedule's lr at the end of warmup (Detectron2's)
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.WARMUP_FACTOR = 10, 0.1
    optimizer = torch.optim.SGD([param], lr=0.01)
    scheduler = build_poly_lr_scheduler(cfg, optimizer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001, rel=1e-9)


def test_train_augmentations():
    import detectron2.data.transforms as T

    cfg = _cfg(**{"INPUT.CROP.ENABLED": True, "INPUT.CROP.TYPE": "absolute", "INPUT.CROP.SIZE": [32, 32],
                  "INPUT.EQLOSSES.SEM_SEG.CROP_SINGLE_CATEGORY_MAX_AREA": 0.75})
    resize, crop, flip = build_sem_seg_train_aug(cfg)
    assert isinstance(resize, T.ResizeShortestEdge) and isinstance(flip, T.RandomFlip)
    assert isinstance(crop, T.RandomCrop_CategoryAreaConstraint)
    assert crop.single_category_max_area == 0.75 and crop.ignored_category == 255
    # a crop is redrawn while one class fills >= 75% of its labelled pixels
    import numpy as np

    sem_seg = np.zeros((64, 64), dtype=np.uint8)
    sem_seg[:, 32:] = 1
    np.random.seed(0)
    for _ in range(20):
        tfm = crop.get_transform(np.zeros((64, 64, 3), dtype=np.uint8), sem_seg)
        patch = tfm.apply_segmentation(sem_seg)
        counts = np.bincount(patch.ravel(), minlength=2)
        assert counts.max() < 0.75 * counts.sum() or tfm.x0 in (0, 32)  # 10 draws: rarely all fail
