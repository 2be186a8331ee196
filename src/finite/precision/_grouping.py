"""Grouping tensors so that each group can feed one ``torch._foreach_*`` call."""

from __future__ import annotations

from collections.abc import Sequence

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def group_by_device_and_dtype(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices into ``tensors``, grouped by (device, dtype) in order of first appearance.

    The foreach kernels take their fast path only when every tensor of a call shares a
    device and a dtype.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    return list(groups.values())
