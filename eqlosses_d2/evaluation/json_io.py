"""
Reading LVIS json files fast, and building many small objects without the garbage
collector rescanning them.

The parser is msgspec (a dependency of the package; the standard library's ``json`` when
it is absent): :func:`load_json` parses any json file 2-4x faster than ``json.load``,
and :func:`load_box_results` parses an LVIS box results file straight into typed records
(checked in C: integer ids, a number score, a box of 4 numbers) that become
:class:`~.results.ResultArrays`, with no dict per result: for 600,000 results that is
the difference between seconds and a few tenths. msgspec's float parsing is correctly
rounded, as the standard library's, so the numbers are the same to the last bit (the
tests compare both). Where msgspec refuses the text (``NaN``/``Infinity`` literals and
integers beyond 64 bits, which Python's ``json`` writes and reads), the standard library
parses it. A file that is not valid JSON is :class:`JSONFileError`, one line naming it.
"""
import contextlib
import gc
import json
import os
from itertools import chain
from operator import attrgetter
from typing import Optional, Tuple

import numpy as np

from .results import ResultArrays

try:
    import msgspec
except ImportError:  # pragma: no cover - msgspec is an install requirement
    msgspec = None

__all__ = ["JSONFileError", "gc_paused", "load_box_results", "load_json"]


class JSONFileError(ValueError):
    """A file that is not valid JSON (one line naming it)."""


@contextlib.contextmanager
def gc_paused():
    """
    Creating 10^5-10^6 small dicts sets off full garbage collections that rescan every
    live object (the caller's results included): 2-6x slower at 150k-600k results.
    Nothing cyclic is created meanwhile, so pause the collector for that loop.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read(path) -> bytes:
    with open(path, "rb") as f:  # OSError (FileNotFoundError...) names the file already
        return f.read()


def _stdlib_loads(data: bytes, name: str):
    try:
        return json.loads(data)
    except UnicodeDecodeError as e:
        raise JSONFileError(f"{name}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise JSONFileError(f"{name}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None


def load_json(path):
    """The parsed content of the json file ``path``, as ``json.load`` gives it;
    :class:`JSONFileError` (a ``ValueError``) naming the file when it is not valid JSON,
    ``OSError`` when it cannot be read."""
    data = _read(path)
    with gc_paused():
        if msgspec is not None:
            try:
                return msgspec.json.decode(data)
            except msgspec.MsgspecError:
                pass  # NaN/Infinity, 1e400 or a huge integer (the standard library reads those), or invalid
        return _stdlib_loads(data, os.fspath(path))


if msgspec is not None:

    class BoxResult(msgspec.Struct, gc=False):
        """The fields of an LVIS box result that the box evaluation reads (others are skipped)."""

        image_id: int
        category_id: int
        score: float
        bbox: Tuple[float, float, float, float]

    _BOX_RESULTS = msgspec.json.Decoder(list[BoxResult])


def load_box_results(path) -> Optional[ResultArrays]:
    """
    The LVIS results file ``path`` as :class:`~.results.ResultArrays` (float64 boxes and
    scores, masks not read) when every result has an integer ``image_id`` and
    ``category_id``, a number ``score`` and a ``bbox`` of 4 numbers; None otherwise (or
    without msgspec, or for an empty list): the caller then reads the file with
    :func:`load_json` and evaluates the dicts, whose checks name the result at fault.
    The arrays hold what the dicts would (the evaluation of either is the same, bit for
    bit). ``OSError`` when the file cannot be read.
    """
    if msgspec is None:
        return None
    data = _read(path)
    try:
        with gc_paused():
            results = _BOX_RESULTS.decode(data)
    except msgspec.MsgspecError:  # not this form (or not JSON): the caller's slow path
        return None
    if not results:
        return None
    count = len(results)
    try:
        with gc_paused():  # msgspec has checked the types: ints for the ids, floats for the rest
            return ResultArrays(
                image_ids=np.fromiter(map(attrgetter("image_id"), results), np.int64, count),
                category_ids=np.fromiter(map(attrgetter("category_id"), results), np.int64, count),
                boxes=np.fromiter(chain.from_iterable(map(attrgetter("bbox"), results)), np.float64, 4 * count)
                .reshape(-1, 4),
                scores=np.fromiter(map(attrgetter("score"), results), np.float64, count),
            )
    except OverflowError:  # an id beyond int64
        return None
