"""
The mapper of classification records (``file_name``, ``label``; CIFAR's ``array_file``, ``array_index``) for Detectron2's loaders: reads
the image (``INPUT.FORMAT``), applies Detectron2 transforms and returns ``{"image": (C, H, W)
uint8 tensor, "label": int, "image_id", "file_name"}``.

Training: short edge resized to one of ``INPUT.EQLOSSES.CLASSIFICATION.TRAIN_SHORT_EDGE``,
``TRAIN_PAD`` zero pixels added on each side, a random ``TRAIN_CROP`` square crop, a horizontal flip with ``HFLIP_PROB``. Evaluation: short edge
``TEST_SHORT_EDGE``, the centre ``TEST_CROP`` square. Random draws use numpy's global generator
(Detectron2's transforms), which the per-rank resume state saves.
"""
import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

__all__ = ["ClassificationDatasetMapper", "CenterCrop"]


class CenterCrop(T.Augmentation):
    """The centre ``size`` × ``size`` crop (the whole image where smaller)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def get_transform(self, image):
        h, w = image.shape[:2]
        ch, cw = min(self.size, h), min(self.size, w)
        return T.CropTransform((w - cw) // 2, (h - ch) // 2, cw, ch)


class ClassificationDatasetMapper:
    @configurable
    def __init__(self, is_train: bool, augmentations, image_format: str = "RGB"):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        node = cfg.INPUT.EQLOSSES.CLASSIFICATION
        if is_train:
            augs = [T.ResizeShortestEdge(list(node.TRAIN_SHORT_EDGE), max_size=100000, sample_style="choice")]
            if node.TRAIN_PAD > 0:  # zeros (black) on each side, as torchvision's RandomCrop(padding=...)
                augs.append(T.PadTransform(*[node.TRAIN_PAD] * 4, pad_value=0))
            if node.TRAIN_CROP > 0:
                augs.append(T.RandomCrop("absolute", (node.TRAIN_CROP, node.TRAIN_CROP)))
            if node.HFLIP_PROB > 0:
                augs.append(T.RandomFlip(prob=node.HFLIP_PROB, horizontal=True))
        else:
            augs = [T.ResizeShortestEdge(node.TEST_SHORT_EDGE, max_size=100000)]
            if node.TEST_CROP > 0:
                augs.append(CenterCrop(node.TEST_CROP))
        return {"is_train": is_train, "augmentations": augs, "image_format": cfg.INPUT.FORMAT}

    def __call__(self, record):
        if "array_file" in record:  # CIFAR: an RGB image of a pickled array
            from .datasets import cifar_images

            image = cifar_images(record["array_file"])[record["array_index"]]
            image = image[:, :, ::-1] if self.image_format == "BGR" else image
            image = np.ascontiguousarray(image)
        else:
            image = utils.read_image(record["file_name"], format=self.image_format)
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        image = aug_input.image
        return {
            "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": int(record["label"]),
            "image_id": record.get("image_id"),
            "file_name": record["file_name"],
        }
