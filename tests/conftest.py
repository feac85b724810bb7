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


def _drop_handlers_of_closed_streams():
    import logging

    for logger in [logging.getLogger()] + [
        item for item in logging.root.manager.loggerDict.values() if isinstance(item, logging.Logger)
    ]:
        for handler in list(logger.handlers):
            stream = getattr(handler, "stream", None)
            if stream is not None and getattr(stream, "closed", False):
                logger.removeHandler(handler)


@pytest.fixture(autouse=True)
def _no_logging_to_closed_streams():
    """Detectron2's ``setup_logger`` (run by ``train_net.setup`` in many tests) attaches a
    handler to the ``sys.stdout`` of the moment, which is a test's capture stream; pytest
    closes it after that test, and a later test's log line then prints "--- Logging error ---"
    with a traceback on stderr. Handlers writing to a closed stream are dropped before and
    after every test."""
    _drop_handlers_of_closed_streams()
    yield
    _drop_handlers_of_closed_streams()
