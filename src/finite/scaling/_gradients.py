"""An optimizer's gradients, grouped for the fused foreach kernels.

The loss scaler reads every gradient once to unscale it and check it for
inf/NaN. Grouping the gradients by (device, dtype) lets one fused kernel
launch handle each group, and keeps the check free of host synchronisation:
the found-inf flag stays a device tensor.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

try:  # torch.distributed.tensor is absent from builds without distributed support.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None  # type: ignore[assignment,misc]

GradientGroups = dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]

_HALF_PRECISION_ADVICE = {
    torch.float16: (
        "Unscaling in float16 flushes to zero exactly the small gradients that loss scaling "
        "is meant to protect. Keep float32 master weights: mw = finite.MasterWeights("
        "model.parameters()), build the optimizer on mw.parameters(), and call "
        "mw.accumulate_grads_() after backward and before scaler.step(optimizer)."
    ),
    torch.bfloat16: (
        "bfloat16 has float32's exponent range and needs no loss scaling: construct the "
        "scaler with enabled=False, or keep float32 master weights with finite.MasterWeights."
    ),
}


def parameter_label(optimizer: torch.optim.Optimizer, group_index: int, index: int) -> str:
    """The name the optimizer knows the parameter by, else its position in ``param_groups``."""
    names = optimizer.param_groups[group_index].get("param_names")
    if names is not None:
        return str(names[index])
    return f"param_groups[{group_index}]['params'][{index}]"


def local_values(grad: torch.Tensor) -> torch.Tensor:
    """The values this process holds: a DTensor's local shard, a sparse tensor's values."""
    if DTensor is not None and isinstance(grad, DTensor):
        grad = grad.to_local()
    return grad._values() if grad.layout is torch.sparse_coo else grad


def _dense_view(param: torch.Tensor) -> torch.Tensor:
    """The tensor holding the values of ``param.grad``, coalescing a sparse gradient in place.

    For a DTensor (FSDP2) it is the local shard, a view: unscaling is elementwise and the
    found-inf flag is agreed over the process group, so each rank handles its own shard.
    """
    grad = param.grad
    assert grad is not None
    if DTensor is not None and isinstance(grad, DTensor):
        grad = grad.to_local()
    if grad.layout is torch.strided:
        return grad
    if grad.layout is torch.sparse_coo:
        # Duplicate indices are summed when the optimizer applies the gradient; that sum,
        # not each summand, is what must be finite, so check the coalesced values.
        param.grad = grad.coalesce()
        return param.grad._values()
    raise TypeError(
        f"gradients with layout {grad.layout} are not supported; use strided or sparse_coo"
    )


def group_gradients(optimizer: torch.optim.Optimizer) -> GradientGroups:
    """The optimizer's gradients grouped by (device, dtype); parameters without one are left out.

    Raises
    ------
    TypeError
        If a gradient is float16 or bfloat16 (see the message for what to do instead),
        or has a layout other than strided or sparse COO.
    """
    groups: GradientGroups = defaultdict(list)
    for group_index, group in enumerate(optimizer.param_groups):
        for index, param in enumerate(group["params"]):
            if param.grad is None:
                continue
            dtype = param.grad.dtype
            if dtype in _HALF_PRECISION_ADVICE:
                label = parameter_label(optimizer, group_index, index)
                raise TypeError(
                    f"LossScaler cannot unscale the {dtype} gradient of {label}. "
                    + _HALF_PRECISION_ADVICE[dtype]
                )
            values = _dense_view(param)
            groups[(values.device, values.dtype)].append(values)
    return dict(groups)


def unscale_and_find_nonfinite_(
    groups: GradientGroups, inv_scale: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Multiply every gradient by ``inv_scale`` in place and flag inf/NaN.

    Returns a float32 0-d tensor on ``device`` that is positive when any gradient
    held an inf or NaN before unscaling, and zero otherwise (also with no gradients).
    """
    found_per_device: dict[torch.device, torch.Tensor] = {}
    inv_scale_per_device: dict[torch.device, torch.Tensor] = {}
    for (grad_device, _), grads in groups.items():
        if grad_device not in found_per_device:
            found_per_device[grad_device] = torch.zeros((), dtype=torch.float32, device=grad_device)
            inv_scale_per_device[grad_device] = inv_scale.to(grad_device, non_blocking=True)
        torch._amp_foreach_non_finite_check_and_unscale_(
            grads, found_per_device[grad_device], inv_scale_per_device[grad_device]
        )
    found = torch.zeros((), dtype=torch.float32, device=device)
    for flag in found_per_device.values():
        found += flag.to(device, non_blocking=True)
    return found


def largest_magnitude(groups: GradientGroups, device: torch.device) -> torch.Tensor:
    """``max |g|`` over all gradients as a float64 0-d tensor on ``device`` (0 with no gradients).

    float64 keeps the maximum of float64 gradients beyond float32's range finite.
    """
    maxima = [torch.zeros((), dtype=torch.float64, device=device)]
    for grads in groups.values():
        per_tensor = torch._foreach_norm(grads, math.inf)
        maxima.append(torch.stack(per_tensor).max().to(device, torch.float64, non_blocking=True))
    return torch.stack(maxima).max()
