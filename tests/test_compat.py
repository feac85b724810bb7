"""The compat module on the installed Detectron2 (v0.6 without C++ ops in CI, or main)."""
import importlib
import importlib.machinery
import importlib.util
import io
import logging
import pickle
import sys

import numpy as np
import pytest
import torch

from eqlosses_d2 import compat

no_extension = pytest.mark.skipif(
    compat.has_detectron2_extension(), reason="this Detectron2 has its C++ extension"
)


def test_patches_are_idempotent():
    assert compat.apply_detectron2_patches() is compat.apply_detectron2_patches()


@no_extension
def test_missing_extension_is_reported():
    assert "missing-extension" in compat.apply_detectron2_patches()
    with pytest.raises(ImportError):
        importlib.import_module("detectron2._C")  # collect_env can still tell it is missing
    from detectron2.utils.collect_env import collect_env_info

    assert "detectron2._C" in collect_env_info()


@no_extension
def test_deformable_conv_without_extension():
    from detectron2.layers import DeformConv, deform_conv

    # on CPU Detectron2 falls back to torchvision's op: it works without the extension
    conv = DeformConv(4, 4, kernel_size=3, padding=1)
    out = conv(torch.ones(1, 4, 8, 8), torch.zeros(1, 18, 8, 8))
    assert out.shape == (1, 4, 8, 8)
    # its CUDA path needs the extension: that use fails in one clear line
    with pytest.raises(compat.MissingExtensionError, match="without its C\\+\\+ extension"):
        deform_conv._C.deform_conv_forward


@no_extension
def test_rotated_boxes_fail_with_clear_message():
    from detectron2.layers import batched_nms_rotated
    from detectron2.structures import RotatedBoxes, pairwise_iou_rotated

    boxes = RotatedBoxes(torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0]]))
    with pytest.raises(compat.MissingExtensionError, match="box_iou_rotated"):
        pairwise_iou_rotated(boxes, boxes)
    with pytest.raises(compat.MissingExtensionError, match="nms_rotated"):
        batched_nms_rotated(boxes.tensor, torch.ones(1), torch.zeros(1, dtype=torch.long), 0.5)


def test_axis_aligned_ops_work_without_extension():
    # torchvision provides these; the model must run without detectron2._C
    from detectron2.layers import ROIAlign, batched_nms

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.long), 0.5)
    assert keep.tolist() == [0, 2]
    pooled = ROIAlign((2, 2), 1.0, 0, aligned=True)(
        torch.arange(16.0).view(1, 1, 4, 4), torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]])
    )
    assert pooled.shape == (1, 1, 2, 2)


def test_pillow_linear_default_works():
    from PIL import Image

    from detectron2.data.transforms import ExtentTransform

    t = ExtentTransform(src_rect=(0, 0, 8, 8), output_size=(4, 4))
    assert t.interp == Image.BILINEAR
    out = t.apply_image(np.full((8, 8, 3), 100, dtype=np.uint8))
    assert out.shape == (4, 4, 3) and int(out[1, 1, 0]) == 100


def test_class_histogram_counts_without_np_int(caplog):
    from detectron2.data import build

    dicts = [
        {"annotations": [{"category_id": 0}, {"category_id": 2}, {"category_id": 2, "iscrowd": 1}]},
        {"annotations": [{"category_id": 2}]},
    ]
    with caplog.at_level(logging.INFO):
        build.print_instances_class_histogram(dicts, ["apple", "banana", "cherry"])
    if "numpy-int-histogram" in compat.apply_detectron2_patches():  # v0.6 on numpy >= 1.24
        assert build.print_instances_class_histogram is compat._print_instances_class_histogram
    if not hasattr(np, "int"):  # patched (v0.6) or fixed upstream (main): same counts
        text = caplog.text
        assert "3 categories" in text and "total" in text
        # apple 1, banana 0, cherry 2 (the crowd one is not counted), total 3
        row = [line for line in text.splitlines() if "apple" in line][0]
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert cells[:6] == ["apple", "1", "banana", "0", "cherry", "2"]


def test_detectron2_model_zoo_imports_without_pkg_resources():
    model_zoo = compat.import_detectron2_model_zoo()
    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    assert path.endswith("mask_rcnn_R_50_FPN_1x.yaml")
    if importlib.util.find_spec("pkg_resources") is None:
        assert "pkg_resources" not in sys.modules


class _Custom:
    pass


def test_torch_load_prefers_weights_only():
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}, "iteration": 3}, buf)
    buf.seek(0)
    loaded = compat.torch_load(buf)
    assert loaded["iteration"] == 3 and torch.equal(loaded["model"]["w"], torch.ones(2))

    buf = io.BytesIO()
    torch.save({"obj": _Custom()}, buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="untrusted"):
        compat.torch_load(buf)
    buf.seek(0)
    assert isinstance(compat.torch_load(buf, trusted=True)["obj"], _Custom)


@no_extension
def test_rotated_ops_looked_up_in_torch_ops_fail_with_clear_message():
    """Detectron2 main calls its rotated ops as torch.ops.detectron2.<op> (box_iou_rotated,
    roi_align_rotated_forward/backward, nms_rotated): without the extension each is the
    one-line MissingExtensionError, not torch's AttributeError."""
    boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0]])
    for op, args in (
        ("box_iou_rotated", (boxes, boxes)),  # main's pairwise_iou_rotated
        ("roi_align_rotated_forward", (torch.ones(1, 1, 4, 4), torch.zeros(1, 6), 1.0, 2, 2, 0)),
        ("roi_align_rotated_backward", (torch.ones(1, 1, 2, 2), torch.zeros(1, 6), 1.0, 2, 2, 1, 1, 4, 4, 0)),
        ("nms_rotated", (boxes, torch.ones(1), 0.5)),
    ):
        with pytest.raises(compat.MissingExtensionError) as info:
            getattr(torch.ops.detectron2, op)(*args)
        message = str(info.value)
        assert f"torch.ops.detectron2.{op} is unavailable" in message and "\n" not in message
    assert not hasattr(torch.ops.detectron2, "__wrapped__")  # dunder probes stay AttributeErrors


# ----------------------------------------------------------------------------- applied only what is lacking

_D2_SOURCE = ("detectron2.data.transforms.transform", "detectron2.data.build", "detectron2.model_zoo.model_zoo",
              "detectron2.evaluation.sem_seg_evaluation")
V06_VENV = (  # the project venv: pb1-detectron2 0.6 without its extension, Pillow >= 10, numpy >= 1.24, setuptools >= 82
    not compat.has_detectron2_extension()
    and "Image.LINEAR" in compat._source(_D2_SOURCE[0])
    and int(__import__("PIL").__version__.split(".")[0]) >= 10
    and not hasattr(np, "int")
    and importlib.util.find_spec("pkg_resources") is None
)

# what Detectron2 main has instead (its files, abridged to the lines the detection reads)
_MAIN_SOURCE = {
    _D2_SOURCE[0]: "    def __init__(self, src_rect, output_size, interp=Image.BILINEAR, fill=0):\n",
    _D2_SOURCE[1]: "    histogram = np.zeros((num_classes,), dtype=int)\n",
    _D2_SOURCE[2]: "import pkg_resources\n",  # main still imports it
    _D2_SOURCE[3]: "            pred = np.array(output, dtype=int)\n",
}


@pytest.mark.skipif(not V06_VENV, reason="the exact list of the project venv (pb1-detectron2 0.6, current libraries)")
def test_applied_lists_what_this_install_lacks():
    base = ("missing-extension", "pillow-linear", "numpy-int-histogram", "numpy-int-sem-seg")
    assert compat.apply_detectron2_patches() == base
    assert compat.applied()[:4] == base and set(compat.applied()[4:]) <= {"pkg-resources"}
    assert compat.needed_patches() == base + ("pkg-resources",)
    compat.import_detectron2_model_zoo()  # applies the pkg_resources shim, for that import only
    assert compat.applied() == base + ("pkg-resources",)


@pytest.mark.skipif(not V06_VENV, reason="this stands in main's features on the project venv")
@pytest.mark.parametrize(
    "present, absent",
    [
        ("extension", "missing-extension"),
        ("transforms", "pillow-linear"),
        ("histogram", "numpy-int-histogram"),
        ("sem-seg", "numpy-int-sem-seg"),
        ("setuptools", "pkg-resources"),
        ("all", None),
    ],
)
def test_a_detectron2_that_has_the_feature_gets_no_patch_for_it(monkeypatch, present, absent):
    """Stand-ins for a Detectron2 (and setuptools) that have what v0.6 lacks: a built
    extension, main's transforms (Image.BILINEAR) and class histogram (dtype=int), a
    setuptools with pkg_resources. Each removes its entry, and only it; with all of them
    (main built with its extension, current libraries, an old setuptools) nothing applies."""
    import detectron2

    everything = ("missing-extension", "pillow-linear", "numpy-int-histogram", "numpy-int-sem-seg", "pkg-resources")
    assert compat.needed_patches() == everything
    real_find_spec = importlib.util.find_spec
    if present in ("extension", "all"):
        monkeypatch.setattr(detectron2, "_C", type(sys)("detectron2._C"))  # what importing the built extension binds
    for feature, module in (("transforms", _D2_SOURCE[0]), ("histogram", _D2_SOURCE[1]), ("sem-seg", _D2_SOURCE[3])):
        if present in (feature, "all"):
            monkeypatch.setattr(compat, "_source", lambda name, m=module, previous=compat._source: (
                _MAIN_SOURCE[name] if name == m else previous(name)))
    if present in ("setuptools", "all"):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
            importlib.machinery.ModuleSpec("pkg_resources", None) if name == "pkg_resources" else real_find_spec(name, *a)))
    expected = () if absent is None else tuple(n for n in everything if n != absent)
    assert compat.needed_patches() == expected


def test_pillow_is_left_alone_where_detectron2_does_not_name_image_linear(monkeypatch):
    """Main's transforms say Image.BILINEAR: on Pillow >= 10 nothing is added to Pillow."""
    from PIL import Image

    monkeypatch.setattr(compat, "_PILLOW_ALIASED", False)
    monkeypatch.delattr(Image, "LINEAR", raising=False)  # Pillow >= 10
    real_source = compat._source
    monkeypatch.setattr(compat, "_source", lambda name: _MAIN_SOURCE.get(name) or real_source(name))
    assert compat._patch_pillow() is False
    assert not hasattr(Image, "LINEAR")
    assert "pillow-linear" not in compat.needed_patches()


def test_patches_are_logged_once(caplog):
    """The import-time patches are one log line, at the first call only."""
    monkey = pytest.MonkeyPatch()
    try:
        monkey.setattr(compat, "_APPLIED", None)
        monkey.setattr(compat, "_patch_missing_extension", lambda: True)
        monkey.setattr(compat, "_patch_missing_torch_ops", lambda: None)
        monkey.setattr(compat, "_patch_rotated_nms", lambda: None)
        monkey.setattr(compat, "_patch_pillow", lambda: False)
        monkey.setattr(compat, "_patch_class_histogram", lambda: True)
        with caplog.at_level(logging.INFO, logger="eqlosses_d2.compat"):
            first = compat.apply_detectron2_patches()
            assert compat.apply_detectron2_patches() is first
    finally:
        monkey.undo()
    assert first == ("missing-extension", "numpy-int-histogram")
    lines = [r.getMessage() for r in caplog.records if r.name == "eqlosses_d2.compat"]
    assert lines == ["eqlosses_d2.compat applied (lacking in this Detectron2 or its libraries): "
                     "missing-extension, numpy-int-histogram"]
