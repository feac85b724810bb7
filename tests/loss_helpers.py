"""Helpers the loss tests share: central finite differences of a float64 function and a
counter of host reads (``.item()``, ``bool()``, ``float()``, ... on any tensor)."""
import collections

import numpy as np
import torch

#: the Tensor methods that read a value back on the host
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def fd_grad(f, z, h=1e-6):
    """Central finite differences of a float64 numpy function ``f`` at ``z``."""
    z = np.array(z, dtype=np.float64)
    grad = np.zeros_like(z)
    for index in np.ndindex(*z.shape):
        plus, minus = z.copy(), z.copy()
        plus[index] += h
        minus[index] -= h
        grad[index] = (f(plus) - f(minus)) / (2 * h)
    return grad


def count_host_reads(monkeypatch):
    """A Counter of host reads per method name, counting while its ``on`` attribute is true (the
    Tensor methods are patched through ``monkeypatch``, undone with it)."""
    counts = collections.Counter()
    counts.on = False
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            if counts.on:
                counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts
