"""
The CIFAR ResNet of He et al. ("Deep Residual Learning for Image Recognition", CVPR 2016, §4.2),
as the long-tailed CIFAR literature trains it (LDAM-DRW, Balanced Softmax, and the methods that
compare with them on CIFAR-10/100-LT): a 3×3 stem convolution of 16 channels, then 3 stages of n
basic blocks with 16, 32 and 64 channels (strides 1, 2, 2), depth 6n + 2 (20, 32, 44, 56, 110,
1202: ResNet-32 is n = 5), global average pooling (the classifier's, not the backbone's).

Read: kaidic/LDAM-DRW ``models/resnet_cifar.py`` (commit 2536330f; the same file is
``models/ResNet32Feature.py`` of jiawei-ren/BalancedMetaSoftmax-Classification, commit 34a61e43).
As theirs:

- basic block: ``relu(bn(conv3x3(x)))``, ``bn(conv3x3(.))``, plus the shortcut, then ReLU; the
  stem is ``relu(bn(conv3x3))``; every convolution without bias;
- the shortcut of a block that halves the resolution and doubles the channels is He et al.'s
  "option A", parameter-free: the input subsampled by 2 (``x[:, :, ::2, ::2]``) and zero-padded
  with (C_out − C_in)/2 channels on each side; the identity otherwise;
- initialisation: ``kaiming_normal_`` (fan-in, gain √2: std √(2 / (9 · C_in))) on every
  convolution weight; BatchNorm at PyTorch's default (weight 1, bias 0);
- parameters: 463,504 in the backbone of ResNet-32, 0.46M with a 10-class linear classifier
  (464,154), the figure of their table; 0.27M / 0.66M / 0.85M / 1.7M for 20 / 44 / 56 / 110.

Their classifier is a plain ``nn.Linear(64, C)`` (also kaiming-normal initialised) for CE, Focal
and the re-weighting rules; the cosine ``NormedLinear`` (no scale inside; the loss multiplies by
s = 30) only with ``--loss_type LDAM`` (``use_norm = args.loss_type == 'LDAM'`` in
``cifar_train.py``). Here the classifier is the configured head
(``MODEL.EQLOSSES.CLASSIFICATION.HEAD``): "linear" is their ``nn.Linear`` with PyTorch's default
initialisation instead of kaiming-normal (the one deviation), "cosine" the normalized classifier.

Detectron2 interface (``BACKBONE_REGISTRY``: ``MODEL.BACKBONE.NAME: "build_cifar_resnet_backbone"``):
outputs ``stem`` (16 channels, stride 1), ``res2`` (16, stride 1), ``res3`` (32, stride 2),
``res4`` (64, stride 4): the names of the first three stages of Detectron2's ResNet, so that its
default ``MODEL.RESNETS.OUT_FEATURES`` ``["res4"]`` is the last stage. Read from Detectron2's
``MODEL.RESNETS`` node: ``DEPTH`` (6n + 2), ``NORM`` (``BN``, their ``nn.BatchNorm2d``, or a
synchronized BN; ``FrozenBN`` and ``GN`` are refused: the network trains from scratch, and 16
channels do not split into GN's 32 groups), ``OUT_FEATURES``. The other ``MODEL.RESNETS`` keys
and ``MODEL.BACKBONE.FREEZE_AT`` do not apply (freeze with ``MODEL.EQLOSSES.TRAINABLE_MODULES``).
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = ["CifarResNet", "CifarBasicBlock", "build_cifar_resnet_backbone", "CIFAR_RESNET_WIDTHS"]

#: channels of the stem and of the three stages
CIFAR_RESNET_WIDTHS = (16, 32, 64)
STAGE_NAMES = ("res2", "res3", "res4")
_REFUSED_NORMS = ("", "FrozenBN", "GN")


class OptionAShortcut(nn.Module):
    """He et al.'s parameter-free shortcut: subsample by ``stride``, zero-pad the channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad_before = (out_channels - in_channels) // 2
        self.pad_after = out_channels - in_channels - self.pad_before

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class CifarBasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str = "BN"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = get_norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.norm2 = get_norm(norm, out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = OptionAShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Backbone):
    """The CIFAR ResNet of depth ``6n + 2`` (see the module docstring)."""

    def __init__(self, depth: int = 32, in_channels: int = 3, norm: str = "BN",
                 out_features: Sequence[str] = ("res4",)):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"MODEL.RESNETS.DEPTH: the CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110), got {depth}")
        if norm in _REFUSED_NORMS:
            raise ValueError(f"MODEL.RESNETS.NORM: the CIFAR ResNet trains from scratch with BN or SyncBN, got '{norm}'")
        known = ("stem",) + STAGE_NAMES
        unknown = [name for name in out_features if name not in known]
        if unknown or not out_features:
            raise ValueError(f"MODEL.RESNETS.OUT_FEATURES: the CIFAR ResNet's outputs are {', '.join(known)}; "
                             f"got {list(out_features)}")
        blocks_per_stage = (depth - 2) // 6
        num_stages = max(known.index(name) for name in out_features)  # later stages are not built
        width = CIFAR_RESNET_WIDTHS[0]
        self.stem_conv = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.stem_norm = get_norm(norm, width)
        channels, strides = {"stem": width}, {"stem": 1}
        self.stage_names = list(STAGE_NAMES[:num_stages])
        stride = 1
        for index, name in enumerate(self.stage_names):
            out_width, first_stride = CIFAR_RESNET_WIDTHS[index], 1 if index == 0 else 2
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(CifarBasicBlock(width, out_width, first_stride if b == 0 else 1, norm))
                width = out_width
            self.add_module(name, nn.Sequential(*blocks))
            stride *= first_stride
            channels[name], strides[name] = out_width, stride
        self.depth = depth
        self._out_features = list(out_features)
        self._out_feature_channels = {name: channels[name] for name in self._out_features}
        self._out_feature_strides = {name: strides[name] for name in self._out_features}
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor):
        outputs = {}
        x = F.relu(self.stem_norm(self.stem_conv(x)))
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self):
        return {name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
                for name in self._out_features}


@BACKBONE_REGISTRY.register()
def build_cifar_resnet_backbone(cfg, input_shape: ShapeSpec):
    """``MODEL.BACKBONE.NAME: "build_cifar_resnet_backbone"`` (keys: see the module docstring)."""
    node = cfg.MODEL.RESNETS
    return CifarResNet(depth=node.DEPTH, in_channels=input_shape.channels, norm=node.NORM,
                       out_features=tuple(node.OUT_FEATURES))
