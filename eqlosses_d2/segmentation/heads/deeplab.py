"""
``LongTailDeepLabV3PlusHead``: the DeepLabV3+ decoder (Chen et al., "Encoder-Decoder with Atrous
Separable Convolution for Semantic Image Segmentation", ECCV 2018) as Detectron2's DeepLab
project builds it (``projects/DeepLab/deeplab/semantic_seg.py``, ``DeepLabV3PlusHead``), written
here from Detectron2's layers (``ASPP``, ``Conv2d``, ``DepthwiseSeparableConv2d``, ``get_norm``),
with its per-pixel loss from ``PIXEL_LOSS_REGISTRY`` like :class:`LongTailSemSegFPNHead`.

- encoder: ASPP on the coarsest feature of ``MODEL.SEM_SEG_HEAD.IN_FEATURES`` (``res5``; with
  ``MODEL.RESNETS.RES5_DILATION: 2`` the output stride is 16): a 1x1 conv, three 3x3 atrous convs
  (``ASPP_DILATIONS``, 6/12/18 at output stride 16), image pooling, concatenated, projected to
  ``ASPP_CHANNELS``, dropout ``ASPP_DROPOUT``;
- decoder, for each finer feature from coarse to fine (``res2``): a 1x1 projection of the feature to
  ``PROJECT_CHANNELS[i]`` (48 in the paper), the coarser output upsampled bilinearly to its size,
  concatenated, two 3x3 convs to ``MODEL.SEM_SEG_HEAD.CONVS_DIM`` (256) (or one 5x5 depthwise-separable
  conv with ``USE_DEPTHWISE_SEPARABLE_CONV``, as Detectron2's);
- a 1x1 predictor (init N(0, 0.001), bias 0, as Detectron2's), the logits upsampled by
  ``COMMON_STRIDE`` (the stride of the finest feature, 4) to the input resolution.
  With one input feature only, the head is DeepLabV3 (ASPP, predictor).

Keys: Detectron2's ``MODEL.SEM_SEG_HEAD`` (``IN_FEATURES``, ``NUM_CLASSES``, ``CONVS_DIM``,
``COMMON_STRIDE``, ``NORM``, ``LOSS_WEIGHT``, ``IGNORE_VALUE``) and ours under
``MODEL.EQLOSSES.SEM_SEG.DEEPLAB`` (the DeepLab project's keys are not in Detectron2's default
config; we do not add keys to Detectron2's nodes).

Differences from Detectron2's ``DeepLabV3PlusHead``: the loss is the registry's (its ``LOSS_TYPE``
"hard_pixel_mining" is our "ohem"-style losses' business); ASPP's image pooling is global average
pooling unless ``ASPP_POOL_KERNEL_FROM_CROP`` (Detectron2 pools over a crop-sized window whenever
``INPUT.CROP`` is enabled, which requires test feature maps divisible by that window: fine for
Cityscapes' fixed 1024x2048, not for ADE20K's varying sizes; the paper and mmsegmentation pool
globally); the decoder-only mode (``num_classes=None``, for Panoptic-DeepLab) is not provided.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ASPP, Conv2d, DepthwiseSeparableConv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .common import LongTailPixelLossMixin

__all__ = ["LongTailDeepLabV3PlusHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class LongTailDeepLabV3PlusHead(LongTailPixelLossMixin, nn.Module):
    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        loss,
        class_stats,
        aspp_channels: int = 256,
        aspp_dilations: Sequence[int] = (6, 12, 18),
        aspp_dropout: float = 0.1,
        project_channels: Sequence[int] = (48,),
        decoder_channels: int = 256,
        common_stride: int = 4,
        norm: Union[str, Callable] = "BN",
        loss_weight: float = 1.0,
        ignore_value: int = 255,
        pool_kernel_size: Optional[Tuple[int, int]] = None,
        use_depthwise_separable_conv: bool = False,
    ):
        """
        Args:
            input_shape: the input features; sorted by stride, the coarsest goes through ASPP and
                the others are the decoder's low-level features (one decoder stage each).
            num_classes: classes predicted (one logit each).
            loss, class_stats: the registry pixel loss and the statistics buffers it reads.
            aspp_channels, aspp_dilations, aspp_dropout: ASPP's output channels, its 3 dilations, dropout.
            project_channels: channels of each low-level feature's 1x1 projection (one per decoder stage).
            decoder_channels: output channels of each decoder stage.
            common_stride: stride of the logits (the finest input feature's), upsampled by it.
            norm: normalization of every conv (Detectron2's ``get_norm`` names; "" for none).
            loss_weight: multiplies the loss.
            ignore_value: label of ignored pixels.
            pool_kernel_size: ASPP's image-pooling window (None: global average pooling).
            use_depthwise_separable_conv: depthwise-separable convs in ASPP and the decoder.
        """
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda item: item[1].stride)
        if not shapes:
            raise ValueError("LongTailDeepLabV3PlusHead: no input feature (MODEL.SEM_SEG_HEAD.IN_FEATURES)")
        self.in_features: List[str] = [name for name, _ in shapes]
        low_level, (_, coarsest) = shapes[:-1], shapes[-1]
        if len(project_channels) != len(low_level):
            raise ValueError(
                f"DEEPLAB.PROJECT_CHANNELS has {len(project_channels)} values for the {len(low_level)} low-level "
                f"features of MODEL.SEM_SEG_HEAD.IN_FEATURES {self.in_features[:-1]} (one each)"
            )
        finest_stride = shapes[0][1].stride
        if common_stride != finest_stride:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.COMMON_STRIDE {common_stride} must be the stride of the finest input feature "
                f"'{self.in_features[0]}' ({finest_stride}): the logits are upsampled by it"
            )
        self.num_classes = num_classes
        self.common_stride = common_stride
        self.loss_weight = loss_weight
        self.ignore_value = ignore_value
        use_bias = norm == ""

        self.aspp = ASPP(
            coarsest.channels,
            aspp_channels,
            list(aspp_dilations),
            norm=norm,
            activation=F.relu,
            pool_kernel_size=pool_kernel_size,
            dropout=aspp_dropout,
            use_depthwise_separable_conv=use_depthwise_separable_conv,
        )
        # decoder stages, fine to coarse as in_features; run coarse to fine
        self.projections = nn.ModuleList()
        self.fusions = nn.ModuleList()
        for index, (_, shape) in enumerate(low_level):
            coarser_channels = aspp_channels if index == len(low_level) - 1 else decoder_channels
            projection = Conv2d(
                shape.channels, project_channels[index], kernel_size=1, bias=use_bias,
                norm=get_norm(norm, project_channels[index]), activation=F.relu,
            )
            weight_init.c2_xavier_fill(projection)
            self.projections.append(projection)
            fusion_in = project_channels[index] + coarser_channels
            self.fusions.append(self._fusion(fusion_in, decoder_channels, norm, use_depthwise_separable_conv))
        self.predictor = Conv2d(decoder_channels if low_level else aspp_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, 0, 0.001)
        nn.init.constant_(self.predictor.bias, 0)
        self._init_pixel_loss(loss, class_stats)

    @staticmethod
    def _fusion(in_channels, out_channels, norm, depthwise_separable):
        if depthwise_separable:
            # one 5x5 depthwise-separable conv for the two 3x3 convs (same receptive field; Panoptic-DeepLab)
            return DepthwiseSeparableConv2d(
                in_channels, out_channels, kernel_size=5, padding=2,
                norm1=norm, activation1=F.relu, norm2=norm, activation2=F.relu,
            )
        use_bias = norm == ""
        convs = [
            Conv2d(
                channels, out_channels, kernel_size=3, padding=1, bias=use_bias,
                norm=get_norm(norm, out_channels), activation=F.relu,
            )
            for channels in (in_channels, out_channels)
        ]
        for conv in convs:
            weight_init.c2_xavier_fill(conv)
        return nn.Sequential(*convs)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        node = cfg.MODEL.EQLOSSES.SEM_SEG.DEEPLAB
        missing = [name for name in head.IN_FEATURES if name not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES {missing} not among the backbone's outputs {sorted(input_shape)}"
            )
        shapes = {name: input_shape[name] for name in head.IN_FEATURES}
        pool_kernel_size = None
        if node.ASPP_POOL_KERNEL_FROM_CROP:
            if not (cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute"):
                raise ValueError(
                    "MODEL.EQLOSSES.SEM_SEG.DEEPLAB.ASPP_POOL_KERNEL_FROM_CROP needs INPUT.CROP.ENABLED with "
                    "TYPE 'absolute'"
                )
            stride = max(shape.stride for shape in shapes.values())
            height, width = cfg.INPUT.CROP.SIZE
            if height % stride or width % stride:
                raise ValueError(
                    f"INPUT.CROP.SIZE {tuple(cfg.INPUT.CROP.SIZE)} is not divisible by the ASPP input's stride {stride}"
                )
            pool_kernel_size = (height // stride, width // stride)
        ret = {
            "input_shape": shapes,
            "num_classes": head.NUM_CLASSES,
            "aspp_channels": node.ASPP_CHANNELS,
            "aspp_dilations": list(node.ASPP_DILATIONS),
            "aspp_dropout": node.ASPP_DROPOUT,
            "project_channels": list(node.PROJECT_CHANNELS),
            "decoder_channels": head.CONVS_DIM,
            "common_stride": head.COMMON_STRIDE,
            "norm": head.NORM,
            "loss_weight": head.LOSS_WEIGHT,
            "ignore_value": head.IGNORE_VALUE,
            "pool_kernel_size": pool_kernel_size,
            "use_depthwise_separable_conv": node.USE_DEPTHWISE_SEPARABLE_CONV,
        }
        ret.update(cls.pixel_loss_from_config(cfg, head.NUM_CLASSES, head.IGNORE_VALUE))
        return ret

    def layers(self, features) -> torch.Tensor:
        """Logits at ``common_stride``."""
        y = self.aspp(features[self.in_features[-1]])
        for name, projection, fusion in reversed(list(zip(self.in_features[:-1], self.projections, self.fusions))):
            x = projection(features[name])
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            y = fusion(torch.cat([x, y], dim=1))
        return self.predictor(y)

    def forward(self, features, targets=None):
        """Training: ``(None, losses)``; inference: ``(the loss's scores (N, C, H, W) at the input
        resolution, {})``."""
        y = self.layers(features)
        if self.training:
            return None, self.losses(y, targets)
        y = F.interpolate(y, scale_factor=self.common_stride, mode="bilinear", align_corners=False)
        return self.loss.predict(y), {}
