"""What both long-tailed semantic segmentation heads share: the registry loss on logits
upsampled as Detectron2's heads do, the method's ``predict`` at inference, and the class
statistics buffers the head owns."""
from torch.nn import functional as F

from ..losses import build_pixel_loss
from ..stats import SemSegClassStatsBuffers

__all__ = ["LongTailPixelLossMixin"]


class LongTailPixelLossMixin:
    """Mixed into a Detectron2 semantic segmentation head whose ``forward(features, targets)``
    returns ``(upsampled logits or None, losses)`` and calls ``self.losses(logits, targets)``
    in training (``SemSegFPNHead`` and the DeepLab heads); the head sets ``common_stride``,
    ``ignore_value`` and ``loss_weight``."""

    @staticmethod
    def pixel_loss_from_config(cfg, num_classes: int, ignore_value: int):
        """The ``loss`` and ``class_stats`` arguments of the head, from ``cfg``."""
        class_stats = SemSegClassStatsBuffers(num_classes)
        loss = build_pixel_loss(
            cfg.MODEL.EQLOSSES.SEM_SEG, num_classes, class_stats=class_stats, ignore_value=ignore_value
        )
        return {"loss": loss, "class_stats": class_stats}

    def _init_pixel_loss(self, loss, class_stats):
        if loss.ignore_value != self.ignore_value:
            raise ValueError(
                f"the pixel loss ignores {loss.ignore_value} but the head's ignore value is {self.ignore_value} "
                f"(MODEL.SEM_SEG_HEAD.IGNORE_VALUE)"
            )
        self.loss = loss
        self.class_stats = class_stats  # a submodule: its buffers are in the head's state dict

    def forward(self, features, targets=None):
        results, losses = super().forward(features, targets)
        if not self.training:
            results = self.loss.predict(results)
        return results, losses

    def losses(self, predictions, targets):
        predictions = predictions.float()  # https://github.com/pytorch/pytorch/issues/48163 (as Detectron2's)
        predictions = F.interpolate(predictions, scale_factor=self.common_stride, mode="bilinear", align_corners=False)
        height, width = targets.shape[-2:]
        if predictions.shape[-2] >= height and predictions.shape[-1] >= width:
            # a batch not padded to a multiple of the stride (a backbone without size divisibility, e.g. the
            # dilated ResNet of DeepLab): the logits cover ceil(size / stride) x stride pixels; the image is
            # their top-left part, as sem_seg_postprocess crops at inference (Detectron2's heads fail here)
            predictions = predictions[..., :height, :width]
        losses = self.loss(predictions, targets)
        return {name: value * self.loss_weight for name, value in losses.items()}
