"""Counting the ways a tensor's value reaches the host, for tests of sync-free code."""

import collections
import contextlib

import torch


@contextlib.contextmanager
def counted_host_reads():
    """Count every way a tensor's value can reach the host (each is a device sync on CUDA)."""
    counts: collections.Counter[str] = collections.Counter()
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return read

    try:
        for name in names:
            setattr(torch.Tensor, name, counting(name))
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
