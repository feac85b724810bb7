"""Config keys, every shipped config file, and one-line errors for bad config input."""
import glob
import os

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model

import numpy as np

from eqlosses_d2 import ClassStatistics, add_eqlosses_config, find_class_stats
from eqlosses_d2.data.class_stats import frequency_group
from eqlosses_d2.config import ConfigError, merge_config_file, merge_config_list

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(
    f
    for f in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
    if not os.path.basename(f).startswith("Base-")
)


def _cfg():
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    return cfg


def test_keys_have_defaults():
    cfg = _cfg()
    assert cfg.MODEL.EQLOSSES.CLASS_STATS_DATASET == ""
    assert cfg.MODEL.EQLOSSES.REQUIRE_CLASS_STATS is True
    assert cfg.TEST.EQLOSSES.PRINT_TABLE is True


def test_no_upstream_leaf_names_reused():
    # Detectron2 main added ROI_BOX_HEAD.USE_FED_LOSS / USE_SIGMOID_CE; we add nothing there
    plain = get_cfg()
    ours = _cfg()
    assert set(ours.MODEL.ROI_BOX_HEAD.keys()) == set(plain.MODEL.ROI_BOX_HEAD.keys())
    assert set(ours.MODEL.ROI_HEADS.keys()) == set(plain.MODEL.ROI_HEADS.keys())


def test_there_are_configs():
    names = [os.path.relpath(f, os.path.join(ROOT, "configs")) for f in CONFIG_FILES]
    assert "quickstart/mask_rcnn_R18_FPN_synthetic.yaml" in names
    assert "LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml" in names


@pytest.mark.parametrize("config_file", CONFIG_FILES, ids=lambda f: os.path.relpath(f, ROOT))
def test_config_merges_and_builds(config_file):
    cfg = _cfg()
    merge_config_file(cfg, config_file)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    if cfg.MODEL.META_ARCHITECTURE == "LongTailImageClassifier":  # an image classifier: tests/test_classification.py
        assert find_class_stats(model).num_classes == cfg.MODEL.EQLOSSES.CLASSIFICATION.NUM_CLASSES
        return
    if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":  # a semantic segmenter: tests/test_seg_train.py
        assert find_class_stats(model).num_classes == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        assert "sem_seg_head.class_stats.pixel_count" in model.state_dict()
        return
    # one-stage detectors keep classes and thresholds in MODEL.RETINANET, their statistics at the top
    one_stage = cfg.MODEL.META_ARCHITECTURE in ("LongTailRetinaNet", "LongTailFCOS")
    heads = cfg.MODEL.RETINANET if one_stage else cfg.MODEL.ROI_HEADS
    stats = find_class_stats(model)
    assert stats is not None and stats.num_classes == heads.NUM_CLASSES
    assert ("" if one_stage else "roi_heads.") + "class_stats.image_count" in model.state_dict()
    # some methods (IIF) need counts at inference: give it a long tail 1..C
    num = stats.num_classes
    stats.set_from(ClassStatistics(
        category_ids=list(range(1, num + 1)), class_names=[str(i) for i in range(num)],
        image_count=np.arange(1, num + 1), instance_count=np.arange(1, num + 1) * 2,
        frequency=[frequency_group(n) for n in range(1, num + 1)], num_images=num + 5,
        num_images_with_annotations=num,
    ))
    if "LVISv1" in config_file:
        assert heads.NUM_CLASSES == 1203
        assert cfg.TEST.DETECTIONS_PER_IMAGE == 300
        assert heads.SCORE_THRESH_TEST == pytest.approx(1e-4)
        # the papers' random-sampler recipes say so; everything else keeps the base's RFS 0.001
        assert cfg.DATALOADER.SAMPLER_TRAIN in ("RepeatFactorTrainingSampler", "TrainingSampler",
                                                "ClassDifficultyTrainingSampler")  # CDB-S: its own sampler
        assert cfg.DATALOADER.REPEAT_THRESHOLD == pytest.approx(1e-3)
        if os.path.basename(config_file).startswith("mask_rcnn_R_50"):
            assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
    # a forward pass in eval mode on a small image works
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 64, 64), "height": 64, "width": 64}])
    assert "instances" in out[0]


def test_unknown_key_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  EQLOSSES:\n    NOT_A_KEY: 1\n")
    with pytest.raises(ConfigError) as e:
        merge_config_file(_cfg(), str(bad))
    msg = str(e.value)
    assert "\n" not in msg and "MODEL.EQLOSSES.NOT_A_KEY" in msg and str(bad) in msg


def test_unknown_key_on_command_line_is_one_line():
    with pytest.raises(ConfigError) as e:
        merge_config_list(_cfg(), ["SOLVER.NOT_A_KEY", "1"])
    assert "\n" not in str(e.value) and "SOLVER.NOT_A_KEY" in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        merge_config_file(_cfg(), str(tmp_path / "nope.yaml"))


def _merged(name):
    cfg = _cfg()
    merge_config_file(cfg, os.path.join(ROOT, "configs", name))
    return cfg


def test_lvis_recipes_follow_the_authors_configs():
    """The values checked against the authors' configs (GOL: mmdetection configs; EFL: EOD's
    improved baseline), or documented where not followed."""
    # GOL authors: the 1x Gumbel ablation tests with mmdetection's LVIS NMS 0.5, the 2x GOL recipe with 0.3
    assert _merged("LVISv1-InstanceSegmentation/gumbel_mask_rcnn_R_50_FPN_1x.yaml").MODEL.ROI_HEADS.NMS_THRESH_TEST == 0.5
    gol = _merged("LVISv1-InstanceSegmentation/gol_mask_rcnn_R_50_FPN_2x.yaml")
    assert gol.MODEL.ROI_HEADS.NMS_THRESH_TEST == 0.3 and gol.MODEL.EQLOSSES.GUMBEL.BIAS_INIT == -2.0
    # EFL authors: prior 0.001 for 1,203 classes and batch 16 in every LVIS one-stage config
    for name in ("focal_retinanet_R_50_FPN_2x", "efl_retinanet_R_50_FPN_2x", "efl_atss_retinanet_R_50_FPN_2x",
                 "focal_fcos_R_50_FPN_2x", "efl_fcos_R_50_FPN_2x"):
        cfg = _merged(f"LVISv1-Detection/{name}.yaml")
        assert cfg.MODEL.RETINANET.PRIOR_PROB == pytest.approx(0.001), name
        assert cfg.SOLVER.IMS_PER_BATCH == 16, name
    # their improved baseline: 2 square anchors (6x, 8x the stride) per location, ATSS over 9 locations
    atss = _merged("LVISv1-Detection/efl_atss_retinanet_R_50_FPN_2x.yaml")
    strides = (8, 16, 32, 64, 128)
    assert atss.MODEL.ANCHOR_GENERATOR.SIZES == [[6 * s, 8 * s] for s in strides]
    assert atss.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS == [[1.0]]
    assert atss.MODEL.EQLOSSES.ONE_STAGE.ATSS_TOPK == 9  # x 2 anchors: their top_n 18


def test_loce_fine_tune_configs_say_where_their_weights_come_from():
    """Each LOCE fine-tune config's MODEL.WEIGHTS is the model_final.pth of the baseline run
    its comment gives (config + options), so following the comment produces the file."""
    import re
    import shlex

    # quickstart: the plain quickstart config's own OUTPUT_DIR
    loce = _merged("quickstart/loce_mask_rcnn_R18_FPN_synthetic.yaml")
    baseline = _merged("quickstart/mask_rcnn_R18_FPN_synthetic.yaml")
    assert loce.MODEL.WEIGHTS == os.path.join(baseline.OUTPUT_DIR, "model_final.pth")
    # LVIS: the command in the comment
    name = "LVISv1-InstanceSegmentation/loce_mask_rcnn_R_50_FPN_2x_finetune.yaml"
    comment = [line[1:].strip() for line in open(os.path.join(ROOT, "configs", name)) if line.startswith("#")]
    start = next(i for i, line in enumerate(comment) if line.startswith("python train_net.py"))
    command = " ".join(line.rstrip("\\").strip() for line in comment[start : start + 3])
    args = shlex.split(command)[2:]
    config = args[args.index("--config-file") + 1]
    opts = args[args.index("--num-gpus") + 2 :]
    cfg = _merged(os.path.relpath(os.path.join(ROOT, config), os.path.join(ROOT, "configs")))
    merge_config_list(cfg, opts)
    loce = _merged(name)
    assert loce.MODEL.WEIGHTS == os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    assert cfg.MODEL.EQLOSSES.MASK_PREDICTOR_SCALE == loce.MODEL.EQLOSSES.MASK_PREDICTOR_SCALE == 20.0
    assert re.search(r"no trained\s+checkpoint is published", " ".join(comment))
