"""The compat module on the installed Detectron2 (v0.6 without C++ ops in CI, or main)."""
import importlib
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
