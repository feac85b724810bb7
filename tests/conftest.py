import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # train_net.py

import eqlosses_d2  # noqa: E402,F401  # compat shims before any test imports detectron2.layers


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """The tiny synthetic splits, generated once per session into a temporary root."""
    from eqlosses_d2.data import TINY_SPEC, prepare_dataset, register_synthetic_lvis

    root = str(tmp_path_factory.mktemp("synthetic_data"))
    train, val = register_synthetic_lvis("pytest_tiny", TINY_SPEC, root=root)
    prepare_dataset(train)  # generate now, so that tests read no progress bar
    prepare_dataset(val)
    return {"train": train, "val": val, "root": root, "spec": TINY_SPEC}
