"""Copy-paste / large-scale-jitter mapper (eqlosses_d2/data/copy_paste.py) on hand-made
images: pasted pixels and masks, occlusion, boxes, dropped objects, LVIS lists, empty
images, seeds; its config keys; the train loader, a tiny training run and --resume."""
import copy
import math
import os
import shutil

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.structures import BitMasks

import train_net
from eqlosses_d2 import CopyPasteDatasetMapper, add_eqlosses_config
from eqlosses_d2.config import ConfigError, merge_config_list, validate_copy_paste
from eqlosses_d2.data import merge_lvis_id_lists, paste_source_weights
from eqlosses_d2.resume import build_resumable_train_loader

from test_training import _opts, _run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY_PASTE = os.path.join(ROOT, "configs", "quickstart", "copy_paste_mask_rcnn_R18_FPN_synthetic.yaml")

BACKGROUND = (10, 10, 10)


def _rect(x0, y0, x1, y1):
    """COCO polygon covering exactly the pixels x0 <= x < x1, y0 <= y < y1."""
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def _rect_mask(size, *rects):
    mask = np.zeros((size, size), dtype=bool)
    for x0, y0, x1, y1 in rects:
        mask[y0:y1, x0:x1] = True
    return mask


def _record(tmp_path, name, size, objects, image_id=1, background=BACKGROUND, **extra):
    """An RGB PNG with each object's rectangles filled in its colour, and its dataset dict.
    objects: (category_id, colour, [rects]) or (category_id, colour, [rects], segmentation)."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = background
    annotations = []
    for obj in objects:
        category_id, colour, rects = obj[:3]
        for x0, y0, x1, y1 in rects:
            image[y0:y1, x0:x1] = colour
        segmentation = obj[3] if len(obj) > 3 else [_rect(*r) for r in rects]
        annotations.append({"category_id": category_id, "bbox": [0, 0, 1, 1], "bbox_mode": 1,
                            "segmentation": segmentation})
    path = str(tmp_path / f"{name}.png")
    Image.fromarray(image).save(path)
    return dict(file_name=path, height=size, width=size, image_id=image_id, annotations=annotations, **extra)


def _mapper(sources, size, **kwargs):
    """Identity jitter (scale 1, no flip) unless told otherwise."""
    args = dict(dataset=sources, image_format="RGB", image_size=size, min_scale=1.0, max_scale=1.0,
                hflip_prob=0.0, seed=0)
    args.update(kwargs)
    return CopyPasteDatasetMapper(**args)


def _image(out):
    return out["image"].permute(1, 2, 0).numpy()


def _masks(out):
    return out["instances"].gt_masks.tensor.numpy()


def test_pasted_pixels_masks_and_boxes(tmp_path):
    red, green, blue = (200, 0, 0), (0, 200, 0), (0, 0, 200)
    target = _record(tmp_path, "target", 20, [(0, red, [(2, 2, 10, 10)]), (1, green, [(14, 14, 18, 18)])])
    source = _record(tmp_path, "source", 20, [(2, blue, [(0, 0, 12, 5)])], image_id=7, background=(50, 50, 50))
    before = copy.deepcopy(target)
    out = _mapper([source], 20)(target)
    assert target == before  # the input dict is not modified

    expected = np.empty((20, 20, 3), dtype=np.uint8)
    expected[:] = BACKGROUND
    expected[2:10, 2:10] = red
    expected[14:18, 14:18] = green
    expected[0:5, 0:12] = blue  # pasted on top, source background not pasted
    np.testing.assert_array_equal(_image(out), expected)

    inst = out["instances"]
    assert inst.image_size == (20, 20) and (out["height"], out["width"]) == (20, 20)
    assert inst.gt_classes.tolist() == [0, 1, 2]
    assert isinstance(inst.gt_masks, BitMasks)
    masks = _masks(out)
    np.testing.assert_array_equal(masks[0], _rect_mask(20, (2, 5, 10, 10)))  # its top rows covered
    np.testing.assert_array_equal(masks[1], _rect_mask(20, (14, 14, 18, 18)))
    np.testing.assert_array_equal(masks[2], _rect_mask(20, (0, 0, 12, 5)))
    assert inst.gt_boxes.tensor.tolist() == [[2, 5, 10, 10], [14, 14, 18, 18], [0, 0, 12, 5]]
    assert out["copy_paste_source_id"] == 7 and out["copy_paste_num_pasted"] == 1 and "annotations" not in out


def test_covered_objects_are_dropped_by_the_thresholds(tmp_path):
    grey = (120, 120, 120)
    target = _record(tmp_path, "target", 40, [
        (0, grey, [(2, 2, 6, 6)]),      # C: fully covered
        (1, grey, [(10, 2, 20, 12)]),   # D: 5 of 100 px left (< 10 px)
        (2, grey, [(24, 2, 34, 12)]),   # E: 20 of 100 px left (< 0.3 of its pixels)
        (3, grey, [(2, 20, 12, 30)]),   # F: 40 of 100 px left: kept
        (4, grey, [(24, 24, 27, 27)]),  # G: 9 px, not covered: kept although < 10 px
    ])
    cover = [(0, 0, 8, 8), (11, 2, 20, 12), (10, 7, 11, 12), (26, 2, 34, 12), (6, 20, 12, 30)]
    source = _record(tmp_path, "source", 40, [(5, (0, 0, 250), cover)])
    out = _mapper([source], 40, min_visible_pixels=10, min_visible_fraction=0.3)(target)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [3, 4, 5]
    masks = _masks(out)
    np.testing.assert_array_equal(masks[0], _rect_mask(40, (2, 20, 6, 30)))
    np.testing.assert_array_equal(masks[1], _rect_mask(40, (24, 24, 27, 27)))
    np.testing.assert_array_equal(masks[2], _rect_mask(40, *cover))
    assert inst.gt_boxes.tensor.tolist() == [[2, 20, 6, 30], [24, 24, 27, 27], [0, 0, 34, 30]]
    # with no thresholds only the fully covered C goes; D and E keep their visible pixels
    out = _mapper([source], 40, min_visible_pixels=0, min_visible_fraction=0.0)(target)
    assert out["instances"].gt_classes.tolist() == [1, 2, 3, 4, 5]
    assert out["instances"].gt_boxes.tensor.tolist()[:2] == [[10, 2, 11, 7], [24, 2, 26, 12]]
    assert _masks(out)[:2].sum(axis=(1, 2)).tolist() == [5, 20]


def test_lvis_lists_merged(tmp_path):
    # json ids are class + 1; the source pastes class 2 (json id 3)
    target = _record(tmp_path, "target", 20, [(0, (200, 0, 0), [(2, 2, 8, 8)])],
                     neg_category_ids=[6, 3, 9], not_exhaustive_category_ids=[1])
    source = _record(tmp_path, "source", 20, [(2, (0, 0, 200), [(12, 12, 16, 16)])],
                     neg_category_ids=[8, 1], not_exhaustive_category_ids=[3])
    out = _mapper([source], 20)(target)
    assert out["instances"].gt_classes.tolist() == [0, 2]
    assert out["neg_category_ids"] == [6, 9]  # 3 was pasted in; the source's 8 is not carried over
    assert out["not_exhaustive_category_ids"] == [1]  # the target's; the source's 3 is not
    # no paste: the target's lists unchanged
    out = _mapper([source], 20, paste_prob=0.0)(target)
    assert out["neg_category_ids"] == [6, 3, 9] and out["not_exhaustive_category_ids"] == [1]
    assert out["copy_paste_source_id"] is None
    # a dataset with its own id map (COCO-style): class 2 is json id 30
    out = _mapper([source], 20, category_id_to_dataset_id={0: 10, 2: 30})(dict(target, neg_category_ids=[3, 30, 10]))
    assert out["neg_category_ids"] == [3]


def test_merge_lvis_id_lists():
    neg, not_exhaustive = merge_lvis_id_lists([5, 2, 9, 4], [7, 1], present_category_ids={2, 4, 7, 11})
    assert neg == [5, 9] and not_exhaustive == [7, 1]
    assert merge_lvis_id_lists([], [], {1}) == ([], [])


def test_empty_source_and_empty_target(tmp_path):
    red, blue = (200, 0, 0), (0, 0, 200)
    target = _record(tmp_path, "target", 20, [(0, red, [(2, 2, 8, 8)])], neg_category_ids=[2, 3])
    empty_source = _record(tmp_path, "empty_source", 20, [], image_id=5, background=(90, 90, 90))
    target_image = np.array(Image.open(target["file_name"]))
    out = _mapper([empty_source], 20)(target)
    np.testing.assert_array_equal(_image(out), target_image)
    assert out["instances"].gt_classes.tolist() == [0] and out["copy_paste_source_id"] is None
    assert out["copy_paste_num_pasted"] == 0
    assert out["neg_category_ids"] == [2, 3]

    source = _record(tmp_path, "source", 20, [(1, blue, [(10, 10, 14, 14)])], image_id=6)
    # a zero source weight is never drawn: all zero means no paste
    out = _mapper([source], 20, source_weights=[0.0])(target)
    assert len(out["instances"]) == 1 and out["copy_paste_source_id"] is None

    empty_target = _record(tmp_path, "empty_target", 20, [], neg_category_ids=[2, 3])
    out = _mapper([source], 20)(empty_target)
    assert out["instances"].gt_classes.tolist() == [1]
    np.testing.assert_array_equal(_masks(out)[0], _rect_mask(20, (10, 10, 14, 14)))
    assert out["neg_category_ids"] == [3]
    # both empty: no instances, tensors of the right shape
    out = _mapper([empty_source], 20)(empty_target)
    assert len(out["instances"]) == 0 and tuple(_masks(out).shape) == (0, 20, 20)
    assert tuple(out["instances"].gt_boxes.tensor.shape) == (0, 4)


def test_flip_resize_and_pad_geometry(tmp_path):
    target = _record(tmp_path, "target", 20, [(0, (200, 0, 0), [(2, 4, 6, 12)])])
    out = _mapper([], 20, min_scale=0.5, max_scale=0.5, hflip_prob=1.0, copy_paste=False)(target)
    # flip: x -> 20 - x gives [14, 18); half size: x [7, 9), y [2, 6) on a 10 x 10 image
    np.testing.assert_array_equal(_masks(out)[0], _rect_mask(20, (7, 2, 9, 6)))
    assert out["instances"].gt_boxes.tensor.tolist() == [[7, 2, 9, 6]]
    image = _image(out)
    assert image.shape == (20, 20, 3)
    assert (image[10:] == 128).all() and (image[:, 10:] == 128).all()  # padding
    assert (image[:10, :10] != 128).any()


def test_crop_of_an_enlarged_image(tmp_path):
    # 20 px image, object x [4, 8) y [4, 8): at scale 2 it covers [8, 16)^2 of 40 x 40,
    # then a random 20 x 20 crop at (x0, y0) in [0, 20]^2 keeps [8 - x0, 16 - x0) x ...
    target = _record(tmp_path, "target", 20, [(0, (200, 0, 0), [(4, 4, 8, 8)])])
    seen_offsets, dropped = set(), 0
    for seed in range(40):
        out = _mapper([], 20, min_scale=2.0, max_scale=2.0, copy_paste=False, seed=seed)(target)
        image = _image(out)
        assert image.shape == (20, 20, 3) and not (image == 128).all(axis=2).any()  # no padding
        if len(out["instances"]) == 0:
            dropped += 1
            continue
        mask = _masks(out)[0]
        ys, xs = np.nonzero(mask)
        x0, y0 = (8 - xs.min() if xs.min() > 0 else 16 - (xs.max() + 1)), (8 - ys.min() if ys.min() > 0 else 16 - (ys.max() + 1))
        assert 0 <= x0 <= 20 and 0 <= y0 <= 20
        expected = np.zeros((40, 40), dtype=bool)
        expected[8:16, 8:16] = True
        np.testing.assert_array_equal(mask, expected[y0:y0 + 20, x0:x0 + 20])
        assert out["instances"].gt_boxes.tensor.tolist() == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
        # the red pixels are where the mask is (inside, away from the blended edge)
        inner = np.zeros((40, 40), dtype=bool)
        inner[9:15, 9:15] = True
        assert (image[inner[y0:y0 + 20, x0:x0 + 20]] == (200, 0, 0)).all()
        seen_offsets.add((x0, y0))
    assert len(seen_offsets) > 10  # the crop moves
    assert dropped > 0  # and sometimes cuts the object off entirely: it is then dropped


def test_rle_segmentation(tmp_path):
    blue = (0, 0, 200)
    mask = _rect_mask(20, (3, 3, 9, 7), (12, 2, 15, 18))
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    source = _record(tmp_path, "source", 20, [(1, blue, [(3, 3, 9, 7), (12, 2, 15, 18)], rle)])
    target = _record(tmp_path, "target", 20, [])
    out = _mapper([source], 20)(target)
    np.testing.assert_array_equal(_masks(out)[0], mask)
    assert out["instances"].gt_boxes.tensor.tolist() == [[3, 2, 15, 18]]


def test_max_pasted(tmp_path):
    objects = [(c, (40 * c, 0, 0), [(4 * c, 0, 4 * c + 3, 3)]) for c in range(5)]
    source = _record(tmp_path, "source", 20, objects)
    target = _record(tmp_path, "target", 20, [])
    counts = set()
    for seed in range(30):
        out = _mapper([source], 20, max_pasted=2, seed=seed)(target)
        counts.add(len(out["instances"]))
        assert out["copy_paste_num_pasted"] == len(out["instances"])
        assert set(out["instances"].gt_classes.tolist()) <= set(range(5))
    assert counts == {1, 2}
    counts = {len(_mapper([source], 20, seed=seed)(target)["instances"]) for seed in range(60)}
    assert counts == {1, 2, 3, 4, 5}


def test_paste_source_weights():
    def d(*cats, crowd=False, segmentation=True):
        return {"annotations": [{"category_id": c, "iscrowd": int(crowd), "segmentation": [[0, 0, 1, 0, 1, 1]] if segmentation else []} for c in cats]}

    dicts = [d(0), d(0, 1), d(), d(2), d(3, crowd=True), d(4, segmentation=False)]
    assert paste_source_weights(dicts, "uniform").tolist() == [1, 1, 0, 1, 0, 0]
    # n_0 = 2, n_1 = n_2 = 1 images
    assert paste_source_weights(dicts, "class_balanced").tolist() == [0.5, 1.5, 0, 1, 0, 0]
    # f(0) = 2/6, f(1) = f(2) = 1/6; t = 0.5: r = max(1, sqrt(t / f))
    rf = paste_source_weights(dicts, "repeat_factor", repeat_threshold=0.5)
    np.testing.assert_allclose(rf, [math.sqrt(1.5), math.sqrt(3), 0, math.sqrt(3), 0, 0])
    with pytest.raises(ValueError, match="SOURCE_SAMPLING"):
        paste_source_weights(dicts, "nope")


def test_sources_are_drawn_by_weight(tmp_path):
    sources = [_record(tmp_path, f"s{i}", 8, [(0, (200, 0, 0), [(1, 1, 4, 4)])], image_id=i) for i in range(3)]
    target = _record(tmp_path, "target", 8, [])
    mapper = _mapper(sources, 8, source_weights=[1.0, 0.0, 3.0], seed=1)
    drawn = [mapper(target)["copy_paste_source_id"] for _ in range(400)]
    assert set(drawn) == {0, 2}
    assert 0.18 < drawn.count(0) / len(drawn) < 0.32  # 1/4 expected


def _tiny_mapper(tiny_dataset, **kwargs):
    from detectron2.data import DatasetCatalog

    dicts = DatasetCatalog.get(tiny_dataset["train"])
    args = dict(dataset=dicts, image_format="BGR", image_size=64, min_scale=0.3, max_scale=1.5, hflip_prob=0.5)
    args.update(kwargs)
    return dicts, CopyPasteDatasetMapper(**args)


def _signature(out):
    inst = out["instances"]
    return (out["image"].numpy().tobytes(), inst.gt_masks.tensor.numpy().tobytes(), inst.gt_classes.tolist(),
            out["copy_paste_source_id"])


def test_deterministic_under_a_seed(tiny_dataset):
    dicts, a = _tiny_mapper(tiny_dataset, seed=3)
    _, b = _tiny_mapper(tiny_dataset, seed=3)
    _, c = _tiny_mapper(tiny_dataset, seed=4)
    first = [_signature(a(d)) for d in dicts[:6]]
    assert first == [_signature(b(d)) for d in dicts[:6]]
    assert first != [_signature(c(d)) for d in dicts[:6]]
    # seed None (the config's): follows numpy's global RNG, which Detectron2 seeds per worker
    _, e = _tiny_mapper(tiny_dataset, seed=None)
    np.random.seed(11)
    once = [_signature(e(d)) for d in dicts[:4]]
    np.random.seed(11)
    assert once == [_signature(e(d)) for d in dicts[:4]]
    # masks and boxes agree on real data too
    for d in dicts[:6]:
        inst = a(d)["instances"]
        np.testing.assert_array_equal(inst.gt_boxes.tensor.numpy(), inst.gt_masks.get_bounding_boxes().tensor.numpy())
        assert (inst.gt_masks.tensor.flatten(1).any(1)).all()


def _cfg(*opts):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_list(cfg, list(opts))
    return cfg


def test_config_keys_and_errors():
    cfg = _cfg()
    assert cfg.INPUT.EQLOSSES.LSJ.ENABLED is False and cfg.INPUT.EQLOSSES.COPY_PASTE.ENABLED is False
    assert (cfg.INPUT.EQLOSSES.LSJ.MIN_SCALE, cfg.INPUT.EQLOSSES.LSJ.MAX_SCALE) == (0.1, 2.0)
    validate_copy_paste(cfg)
    bad = [
        (["INPUT.EQLOSSES.LSJ.MAX_SCALE", "0.05"], "INPUT.EQLOSSES.LSJ.MAX_SCALE"),
        (["INPUT.EQLOSSES.LSJ.MIN_SCALE", "0"], "INPUT.EQLOSSES.LSJ.MIN_SCALE"),
        (["INPUT.EQLOSSES.COPY_PASTE.PROB", "1.5"], "INPUT.EQLOSSES.COPY_PASTE.PROB"),
        (["INPUT.EQLOSSES.COPY_PASTE.SOURCE_SAMPLING", "rare"], "INPUT.EQLOSSES.COPY_PASTE.SOURCE_SAMPLING"),
        (["INPUT.EQLOSSES.COPY_PASTE.MAX_OBJECTS", "-1"], "INPUT.EQLOSSES.COPY_PASTE.MAX_OBJECTS"),
        (["INPUT.EQLOSSES.COPY_PASTE.ENABLED", "True"], "needs INPUT.EQLOSSES.LSJ.ENABLED"),
    ]
    for opts, message in bad:
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as e:
            validate_copy_paste(_cfg(*opts))
        assert "\n" not in str(e.value)


def test_cli_error_is_one_line(tiny_dataset, tmp_path, capsys):
    argv = ["--config-file", COPY_PASTE] + _opts(tiny_dataset, tmp_path) + ["INPUT.EQLOSSES.COPY_PASTE.PROB", "2"]
    assert train_net.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_net.py: error:") and "INPUT.EQLOSSES.COPY_PASTE.PROB" in err and "\n" not in err


def _tiny_copy_paste_opts(tiny_dataset, out, max_iter):
    return _opts(tiny_dataset, out, max_iter=max_iter) + ["INPUT.EQLOSSES.LSJ.IMAGE_SIZE", str(tiny_dataset["spec"].image_size)]


@pytest.mark.parametrize("sampler", ["TrainingSampler", "RepeatFactorTrainingSampler"])
def test_train_loader(sampler, tiny_dataset, tmp_path):
    from eqlosses_d2.config import merge_config_file

    cfg = get_cfg()
    add_eqlosses_config(cfg)
    merge_config_file(cfg, COPY_PASTE)
    merge_config_list(cfg, _tiny_copy_paste_opts(tiny_dataset, tmp_path, 2) + ["DATALOADER.SAMPLER_TRAIN", sampler])
    loader = build_resumable_train_loader(cfg)
    batches = iter(loader)  # one iterator: Detectron2's aspect-ratio buckets keep an abandoned one's batch
    batch = next(batches)
    assert len(batch) == 2
    for d in batch:
        assert tuple(d["image"].shape) == (3, 64, 64)
        assert isinstance(d["instances"].gt_masks, BitMasks) and len(d["instances"]) > 0
        assert "neg_category_ids" in d and "copy_paste_source_id" in d
    pasted = [d["copy_paste_source_id"] for _ in range(3) for d in next(batches)]
    assert any(p is not None for p in pasted)


def test_trains_and_evaluates_with_copy_paste(tiny_dataset, tmp_path):
    results = _run(["--config-file", COPY_PASTE] + _tiny_copy_paste_opts(tiny_dataset, tmp_path, 3)
                   + ["TEST.DETECTIONS_PER_IMAGE", "50"])
    for task in ("bbox", "segm"):
        assert set(results[task]) >= {"AP", "APr", "APc", "APf"}
        assert math.isnan(results[task]["AP"]) or 0.0 <= results[task]["AP"] <= 100.0
    assert os.path.isfile(tmp_path / "model_final.pth")


def test_resume_with_copy_paste(tiny_dataset, tmp_path):
    def opts(out):
        return _tiny_copy_paste_opts(tiny_dataset, out, 6) + ["SOLVER.CHECKPOINT_PERIOD", "3", "DATASETS.TEST", "()"]

    full = tmp_path / "full"
    _run(["--config-file", COPY_PASTE] + opts(full))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / "model_0000002.pth", resumed / "model_0000002.pth")
    (resumed / "last_checkpoint").write_text("model_0000002.pth")
    _run(["--config-file", COPY_PASTE, "--resume"] + opts(resumed))
    a = torch.load(full / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    b = torch.load(resumed / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fast_paths_match_detectron2_transforms():
    """The image (one PIL resize of the cropped region) is within 1 of Detectron2's
    resize-then-crop; masks rasterized in their box equal a rasterization of the canvas."""
    from detectron2.structures.masks import polygons_to_bitmask

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (97, 130, 3), dtype=np.uint8)
    for scales in [(0.1, 0.1), (0.5, 0.5), (1.3, 1.3), (2.0, 2.0), (0.1, 2.0)]:
        mapper = CopyPasteDatasetMapper(dataset=[], image_size=128, min_scale=scales[0], max_scale=scales[1])
        for _ in range(10):
            tfms, params = mapper._jitter(97, 130, rng)
            diff = mapper._warp_image(image, tfms, params).astype(int) - tfms.apply_image(image).astype(int)
            assert np.abs(diff).max() <= 1
            polygon = rng.uniform(-40, 170, size=14).tolist()  # partly off the canvas
            full = polygons_to_bitmask([tfms.apply_coords(np.reshape(polygon, (-1, 2))).reshape(-1)], 128, 128)
            out = mapper._instance_mask([polygon], tfms, 97, 130)
            if out is None:
                assert not full.any()
            else:
                np.testing.assert_array_equal(out[0], full)
                ys, xs = np.nonzero(full)
                assert out[1].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
