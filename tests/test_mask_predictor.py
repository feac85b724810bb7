"""The normalized mask predictor (MODEL.EQLOSSES.MASK_PREDICTOR_SCALE): formula, gradient,
edge cases, and its wiring into both RoI heads."""
import math

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.modeling import NormalizedConv2d, normalize_mask_predictor

from test_training import QUICKSTART


def test_logit_is_scaled_cosine_plus_bias_by_hand():
    conv = NormalizedConv2d(2, 2, scale=20.0)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, -2.0]]).view(2, 2, 1, 1))
        conv.bias.copy_(torch.tensor([0.5, -1.0]))
    # one image, 2 channels, 1x2 pixels: (6, 8) and (1, 0)
    x = torch.tensor([[6.0, 1.0], [8.0, 0.0]]).view(1, 2, 1, 2)
    out = conv(x)
    # pixel (6, 8): |x| = 10; class 0: w = (3, 4), |w| = 5, cos = (18 + 32) / 50 = 1
    #               class 1: w = (0, -2), cos = -16 / 20 = -0.8
    # pixel (1, 0): class 0: cos = 3 / 5 = 0.6; class 1: cos = 0
    expected = torch.tensor([[20 * 1.0 + 0.5, 20 * 0.6 + 0.5], [20 * -0.8 - 1.0, 0.0 - 1.0]]).view(1, 2, 1, 2)
    assert torch.allclose(out, expected, atol=1e-4)


def test_scale_invariant_in_features_and_weights_and_zero_pixel_gives_bias():
    g = torch.Generator().manual_seed(0)
    conv = NormalizedConv2d(8, 3, scale=20.0)
    x = torch.randn(2, 8, 4, 4, generator=g)
    out = conv(x)
    assert torch.allclose(conv(7.0 * x), out, atol=1e-4)
    with torch.no_grad():
        conv.weight.mul_(0.5)
    assert torch.allclose(conv(x), out, atol=1e-3)
    assert out.sub(conv.bias.view(1, 3, 1, 1)).abs().max() <= 20.0 + 1e-4
    zero = conv(torch.zeros(1, 8, 2, 2))
    assert torch.equal(zero, conv.bias.detach().view(1, 3, 1, 1).expand(1, 3, 2, 2))


def test_gradient_matches_the_cosine_formula():
    g = torch.Generator().manual_seed(1)
    conv = NormalizedConv2d(5, 2, scale=3.0)
    x = torch.randn(1, 5, 1, 1, generator=g, dtype=torch.float64)
    conv = conv.double()
    w = conv.weight.detach().view(2, 5)
    xr = x.clone().requires_grad_()
    conv(xr).sum().backward()
    # d/dx of s * <x, w_k>/(|x| |w_k|) = s/(|x||w_k|) (w_k - <x, w_k> x/|x|^2), summed over k
    v = x.view(5)
    grad = sum(3.0 / (v.norm() * w[k].norm()) * (w[k] - (v @ w[k]) * v / v.norm() ** 2) for k in range(2))
    assert torch.allclose(xr.grad.view(5), grad, atol=1e-6)


def test_rejects_bad_scale_and_heads_without_a_predictor():
    with pytest.raises(ValueError, match="scale must be > 0"):
        NormalizedConv2d(4, 2, scale=0.0)
    with pytest.raises(ValueError, match="MODEL.EQLOSSES.MASK_PREDICTOR_SCALE"):
        normalize_mask_predictor(torch.nn.Linear(2, 2), 20.0)


@pytest.mark.parametrize("head", ["LongTailStandardROIHeads", "LongTailCascadeROIHeads"])
def test_config_key_swaps_the_mask_predictor_in_both_heads(head):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    cfg.merge_from_file(QUICKSTART)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NAME = head
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = head == "LongTailCascadeROIHeads"
    plain = build_model(cfg).roi_heads.mask_head.predictor
    assert type(plain) is not NormalizedConv2d
    cfg.MODEL.EQLOSSES.MASK_PREDICTOR_SCALE = 20.0
    predictor = build_model(cfg).roi_heads.mask_head.predictor
    assert isinstance(predictor, NormalizedConv2d) and predictor.scale == 20.0
    assert (predictor.in_channels, predictor.out_channels) == (plain.in_channels, plain.out_channels)
    assert math.isclose(predictor.weight.std().item(), 0.001, rel_tol=0.2)
    assert torch.count_nonzero(predictor.bias) == 0
    # the mask loss sees bounded logits: |logit - b| <= s
    feats = torch.relu(torch.randn(3, predictor.in_channels, 28, 28))
    assert predictor(feats).abs().max() <= 20.0 + 1e-4
