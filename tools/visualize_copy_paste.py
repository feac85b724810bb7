#!/usr/bin/env python
"""
A grid of training samples as the copy-paste mapper makes them, masks and boxes drawn
(Detectron2's Visualizer); the pasted objects' labels are marked with "+".

    python tools/visualize_copy_paste.py --output copy_paste_samples.png
    python tools/visualize_copy_paste.py --config-file CONFIG --num 16 --cols 4 [KEY VALUE ...]

Default config: configs/quickstart/copy_paste_mask_rcnn_R18_FPN_synthetic.yaml (its
DATASETS.TRAIN[0] is generated if absent). The same --seed gives the same grid.
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import eqlosses_d2  # noqa: E402,F401  # compat shims and registration
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402
from eqlosses_d2 import CopyPasteDatasetMapper, add_eqlosses_config, prepare_dataset  # noqa: E402
from eqlosses_d2.config import merge_config_file, merge_config_list, validate_copy_paste  # noqa: E402

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "quickstart", "copy_paste_mask_rcnn_R18_FPN_synthetic.yaml")


def draw(sample, class_names, image_format, scale):
    """One mapped sample as an RGB uint8 array: masks, boxes, class labels ("+": pasted)."""
    image = sample["image"].permute(1, 2, 0).numpy()
    if image_format == "BGR":
        image = image[:, :, ::-1]
    instances = sample["instances"]
    n, pasted = len(instances), sample["copy_paste_num_pasted"]
    labels = [("+" if i >= n - pasted else "") + class_names[c] for i, c in enumerate(instances.gt_classes.tolist())]
    vis = Visualizer(image, scale=scale)
    masks = instances.gt_masks.tensor.numpy() if instances.has("gt_masks") else None
    out = vis.overlay_instances(boxes=instances.gt_boxes.tensor.numpy(), masks=masks, labels=labels)
    source = sample["copy_paste_source_id"]
    caption = f"image {sample.get('image_id')}" + (f" + {pasted} from {source}" if source is not None else "")
    out = vis.draw_text(caption, (2, 1), horizontal_alignment="left", font_size=5, color="w")
    return out.get_image()


def grid(cells, cols, gap=4):
    h, w = cells[0].shape[:2]
    rows = (len(cells) + cols - 1) // cols
    canvas = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, dtype=np.uint8)
    for i, cell in enumerate(cells):
        r, c = divmod(i, cols)
        canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = cell
    return canvas


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--output", default="copy_paste_samples.png", help="PNG file to write")
    parser.add_argument("--num", type=int, default=16, help="samples in the grid")
    parser.add_argument("--cols", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=3.0, help="display scale of each sample")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs merged into the config")
    args = parser.parse_args(argv)

    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, args.config_file)
    merge_config_list(cfg, args.opts)
    cfg.INPUT.EQLOSSES.LSJ.ENABLED = True
    validate_copy_paste(cfg)
    for name in cfg.DATASETS.TRAIN:
        prepare_dataset(name)
    mapper = CopyPasteDatasetMapper(cfg)
    class_names = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes

    np.random.seed(args.seed)  # the mapper (seed None) draws from numpy's global RNG
    indices = np.random.permutation(len(mapper.dataset))[: args.num]
    cells = [draw(mapper(mapper.dataset[int(i)]), class_names, cfg.INPUT.FORMAT, args.scale) for i in indices]
    Image.fromarray(grid(cells, args.cols)).save(args.output)
    print(f"wrote {args.output}: {len(cells)} samples of {mapper}")


if __name__ == "__main__":
    main()
