"""Gradient norms and norm/value clipping: drop-ins for ``torch.nn.utils.clip_grad_norm_``,
``clip_grad_value_`` and ``get_total_norm`` that accumulate half-precision gradients in
float32 and reduce correctly over DTensor shards (FSDP2) and extra process groups.

Each tensor contributes ``||t||_p``; the total is the p-norm of those norms, as in
``torch.nn.utils.get_total_norm``. Where one logical vector is spread over several ranks
(a DTensor sharded over a device mesh, or pipeline stages that each hold their own
parameters), every rank computes the norm of what it holds and the ranks combine
``norm**p`` with a SUM all-reduce (MAX for the infinity norm), so every rank ends with the
norm of the whole vector.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeGuard

import torch
import torch.distributed as dist
from torch.utils._foreach_utils import _device_has_foreach_support

try:  # torch.distributed.tensor is absent from builds without distributed support.
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = None  # type: ignore[assignment,misc]

__all__ = ["clip_grad_norm_", "clip_grad_value_", "total_norm"]

TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]

_HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- arguments
def as_tensor_list(
    tensors: object, name: str, accepted: str = "a tensor or an iterable of tensors"
) -> list[torch.Tensor]:
    """``tensors`` (a tensor or an iterable of tensors) as a list, each checked to be a tensor.

    ``accepted`` words the TypeError for anything else."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if isinstance(tensors, (str, bytes)) or not isinstance(tensors, Iterable):
        raise TypeError(f"{name} must be {accepted}, got {type(tensors).__name__}")
    items = list(tensors)
    for index, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"{name}[{index}] must be a tensor, got {type(item).__name__}")
    return items


def check_norm_type(norm_type: object) -> float:
    """``norm_type`` as a float; any real number or +-inf, as ``torch.linalg.vector_norm``."""
    if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real):
        raise TypeError(f"norm_type must be a real number, got {type(norm_type).__name__}")
    value = float(norm_type)
    if math.isnan(value):
        raise ValueError(f"norm_type must not be NaN; got {norm_type!r}")
    return value


def check_process_group(process_group: object) -> None:
    """Raise unless ``process_group`` is None or a ``torch.distributed.ProcessGroup``."""
    if process_group is None:
        return
    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be None or a torch.distributed.ProcessGroup; "
            f"got {type(process_group).__name__}"
        )
    if not dist.is_initialized():
        raise RuntimeError(
            "a process_group was given but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group() first"
        )


def _check_values(tensor: torch.Tensor, label: str, allow_sparse: bool) -> None:
    if tensor.layout is not torch.strided and not (
        allow_sparse and tensor.layout is torch.sparse_coo and tensor.is_coalesced()
    ):
        raise TypeError(
            f"{label} has layout {tensor.layout}; only dense (strided) tensors are supported. "
            "For sparse gradients (e.g. nn.Embedding(sparse=True)), compute the norm of "
            "grad.coalesce().values() yourself, or use sparse=False"
        )
    if not (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
        raise TypeError(f"{label} must be a floating-point tensor, got dtype {tensor.dtype}")


# ----------------------------------------------------------------------------- local pieces
@dataclass
class Domain:
    """Local tensors whose ``norm**p`` is summed over the same ranks.

    ``groups`` are the process groups to reduce over, one after the other: empty for plain
    tensors (the caller's ``process_group`` is applied to the total afterwards), one per
    sharded mesh dimension for a DTensor.
    """

    groups: tuple[dist.ProcessGroup, ...]
    tensors: list[torch.Tensor] = field(default_factory=list)
    #: Views of the gradients' storage, for in-place scaling; the same objects as
    #: ``tensors`` except for a Partial DTensor, whose norm is taken of a reduced copy.
    targets: list[torch.Tensor] = field(default_factory=list)


def _is_dtensor(tensor: torch.Tensor) -> TypeGuard[DTensor]:
    return DTensor is not None and isinstance(tensor, DTensor)


def _local_values(tensor: torch.Tensor) -> torch.Tensor:
    """The values a rank holds: a view of the tensor's storage (in-place ops reach it)."""
    if tensor.layout is torch.sparse_coo:
        return tensor._values()
    return tensor


def split_domains(
    tensors: list[torch.Tensor], name: str = "tensors", *, allow_sparse: bool = False
) -> list[Domain]:
    """Group ``tensors`` by the ranks over which their norms must be combined.

    Plain tensors form one domain without groups. A DTensor contributes its local shard
    (a view, so in-place scaling reaches the DTensor) to the domain of the mesh
    dimensions it is sharded over; for a ``Partial`` placement the norm is taken of a
    ``Replicate`` copy (the norm of a sum is not a sum of norms; this communicates), while
    in-place scaling still goes to the partial values (scaling is linear).
    Domains keep their first-seen order, which every rank sees alike when the ranks hold
    the same parameters.
    """
    domains: dict[object, Domain] = {}
    for index, tensor in enumerate(tensors):
        label = f"{name}[{index}]"
        if _is_dtensor(tensor):
            target = tensor.to_local()
            _check_values(target, label, allow_sparse)
            placements = tuple(tensor.placements)
            if any(p.is_partial() for p in placements):
                placements = tuple(Replicate() if p.is_partial() else p for p in placements)
                tensor = tensor.redistribute(tensor.device_mesh, placements)
            mesh = tensor.device_mesh
            dims = tuple(d for d, p in enumerate(placements) if p.is_shard())
            key: object = (mesh, dims)
            if key not in domains:
                domains[key] = Domain(tuple(mesh.get_group(d) for d in dims))
            domains[key].tensors.append(_local_values(tensor.to_local()))
            domains[key].targets.append(_local_values(target))
        else:
            _check_values(tensor, label, allow_sparse)
            if None not in domains:
                domains[None] = Domain(())
            domains[None].tensors.append(_local_values(tensor))
            domains[None].targets.append(domains[None].tensors[-1])
    return list(domains.values())


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16 (their squares overflow), else the real ``dtype``."""
    if dtype in _HALF:
        return torch.float32
    if dtype.is_complex:
        return dtype.to_real()
    return dtype


def use_foreach(foreach: bool | None, device: torch.device) -> bool:
    """Whether to use the ``torch._foreach_*`` kernels on ``device`` (torch's rule)."""
    if foreach is None:
        return _device_has_foreach_support(device)
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return bool(foreach)


def group_by_device_and_dtype(
    tensors: list[torch.Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """``tensors`` grouped by (device, dtype), groups and members in first-seen order."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return groups


def _per_tensor_norms(
    tensors: list[torch.Tensor], norm_type: float, foreach: bool | None
) -> list[torch.Tensor]:
    """``||t||_p`` of each tensor, accumulated (and returned) in its accumulation dtype."""
    norms: list[torch.Tensor] = []
    for (device, dtype), group in group_by_device_and_dtype(tensors).items():
        acc = accumulation_dtype(dtype)
        # An empty tensor contributes nothing (and vector_norm rejects it for +-inf).
        group = [t for t in group if t.numel() > 0]
        if not group:
            continue
        dtype_arg = acc if acc != dtype and not dtype.is_complex else None
        if use_foreach(foreach, device):
            norms.extend(torch._foreach_norm(group, norm_type, dtype=dtype_arg))
        else:
            norms.extend(torch.linalg.vector_norm(t, norm_type, dtype=dtype_arg) for t in group)
    return norms


def _combine(norms: list[torch.Tensor], norm_type: float, device: torch.device) -> torch.Tensor:
    """The p-norm of the per-tensor norms, on ``device``; 0 for no norms."""
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    stacked = torch.stack([n.to(device, non_blocking=True) for n in norms])
    return torch.linalg.vector_norm(stacked, norm_type)


def _wide_dtype(device: torch.device) -> torch.dtype:
    # norm**p of a float32 norm above 2**64 overflows float32; the reduction runs in float64
    # where the device has it.
    return torch.float32 if device.type == "mps" else torch.float64


def _all_reduce_norm(
    norm: torch.Tensor, norm_type: float, groups: tuple[dist.ProcessGroup, ...]
) -> torch.Tensor:
    """The p-norm over the ranks of ``groups`` of each rank's ``norm`` (in ``norm.dtype``),
    for ``norm_type > 0`` or inf."""
    if not groups:
        return norm
    wide = _wide_dtype(norm.device)
    if math.isinf(norm_type):
        # MAX of NaN is not specified across backends: carry "is NaN" as its own entry.
        value = norm.to(wide)
        is_nan = value.isnan()
        packed = torch.stack((torch.where(is_nan, math.inf, value), is_nan.to(wide)))
        for group in groups:
            dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
        return torch.where(packed[1] > 0, math.nan, packed[0]).to(norm.dtype)
    packed = norm.to(wide).pow(norm_type).reshape(1)
    for group in groups:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return packed[0].pow(1.0 / norm_type).to(norm.dtype)


def result_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """The dtype the total norm is returned in: the promoted accumulation dtype."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, accumulation_dtype(tensor.dtype))
    return dtype


def _empty_device(process_group: dist.ProcessGroup | None) -> torch.device:
    """Where the norm of nothing lives: the group's device for NCCL, else the CPU."""
    if process_group is not None and dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def domains_norm(
    domains: list[Domain],
    norm_type: float,
    *,
    process_group: dist.ProcessGroup | None = None,
    foreach: bool | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The total p-norm of the tensors of ``domains``, reduced over their groups and then
    over ``process_group``; a plain 0-d tensor on ``device`` (default: the first tensor's)."""
    tensors = [t for d in domains for t in d.tensors]
    reduced = process_group is not None or any(d.groups for d in domains)
    if reduced and not norm_type > 0:
        # A rank holding nothing contributes 0, the identity of the SUM of norm**p only
        # for p > 0 (and of the MAX for inf).
        raise ValueError(
            "norm_type must be positive or inf when norms are combined across ranks "
            f"(DTensor gradients or a process_group); got {norm_type!r}"
        )
    if device is None:
        device = tensors[0].device if tensors else _empty_device(process_group)
    dtype = result_dtype(tensors)
    pieces = []
    for domain in domains:
        local = _combine(_per_tensor_norms(domain.tensors, norm_type, foreach), norm_type, device)
        pieces.append(_all_reduce_norm(local.to(dtype), norm_type, domain.groups))
    if len(pieces) == 1:
        total = pieces[0]
    else:
        total = _combine(pieces, norm_type, device).to(dtype)
    if process_group is not None:
        total = _all_reduce_norm(total, norm_type, (process_group,))
    return total


def total_norm(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    r"""The p-norm of ``tensors`` viewed as one vector, accumulated in float32 for half precision.

    Equal to ``torch.nn.utils.get_total_norm(tensors, norm_type)`` (the p-norm of the
    per-tensor p-norms) with three differences:

    * float16/bfloat16 tensors are reduced in float32 and the result is float32, so a norm
      above float16's 65504 (or squares that would overflow it) stays finite;
    * DTensors (FSDP2 gradients) are reduced over the ranks of their mesh, and the result is
      the norm of the full tensor as a plain tensor (no ``.full_tensor()`` needed);
    * ``process_group`` combines ranks that hold *different* tensors (pipeline stages,
      expert-parallel ranks): each rank's ``norm**p`` is SUM all-reduced (MAX for the
      infinity norm), so every rank gets the norm over all of them.

    Every rank of a DTensor's mesh and of ``process_group`` must call this function (a
    rank with no tensors still takes part in the ``process_group`` reduction). No host
    synchronisation beyond the collectives.

    Parameters
    ----------
    tensors : Tensor or iterable of Tensor
        Dense floating-point (or complex) tensors, plain or DTensor, on any devices.
    norm_type : float, default 2.0
        ``p`` of the p-norm: any real number, ``inf`` or ``-inf`` (as in
        ``torch.linalg.vector_norm``); positive or ``inf`` when the norm is combined
        across ranks (DTensors or ``process_group``).
    process_group : ProcessGroup, optional
        Ranks holding disjoint parts of the vector, combined after the DTensor meshes.

    Returns
    -------
    Tensor
        0-d plain tensor on the device of the first tensor: float32 for float16/bfloat16
        and float32 inputs, float64 if any input is float64. A zero float32 CPU tensor
        (the group's device for NCCL) when ``tensors`` is empty; empty tensors contribute
        nothing.

    Raises
    ------
    TypeError
        If ``tensors`` is not a tensor or an iterable of tensors, a tensor is sparse or
        not floating point, ``norm_type`` is not a real number, or ``process_group`` is
        not a ProcessGroup.
    ValueError
        If ``norm_type`` is NaN, or not positive when the norm is combined across ranks.

    Examples
    --------
    >>> grads = [torch.full((3,), 40000.0, dtype=torch.float16)]
    >>> total_norm(grads)  # 40000 * sqrt(3) > 65504: torch's float16 result would be inf
    tensor(69282.0312)
    """
    norm_type = check_norm_type(norm_type)
    check_process_group(process_group)
    items = as_tensor_list(tensors, "tensors")
    with torch.no_grad():
        return domains_norm(split_domains(items), norm_type, process_group=process_group)


# ----------------------------------------------------------------------------- clipping
def check_max(value: object, name: str) -> float:
    """A clipping bound as a float: a real number (or one-element tensor), >= 0, not NaN."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    number = float(value)
    if not number >= 0:
        raise ValueError(f"{name} must be >= 0 (inf for no clipping); got {value!r}")
    return number


def _check_foreach(foreach: object) -> bool | None:
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be None or a bool, got {type(foreach).__name__}")
    return foreach


def gradients_of(parameters: TensorOrTensors) -> list[torch.Tensor]:
    """The ``.grad`` of each parameter that has one, in order."""
    params = as_tensor_list(parameters, "parameters")
    return [p.grad for p in params if p.grad is not None]


def scale_(domains: list[Domain], factor: torch.Tensor, foreach: bool | None = None) -> None:
    """Multiply every gradient of ``domains`` in place by the 0-d tensor ``factor``."""
    tensors = [t for d in domains for t in d.targets]
    for (device, _), group in group_by_device_and_dtype(tensors).items():
        factor_here = factor.to(device, non_blocking=True)
        if use_foreach(foreach, device):
            torch._foreach_mul_(group, factor_here)
        else:
            for tensor in group:
                tensor.mul_(factor_here)


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(max_norm / (norm + 1e-6), 1)``, torch's clip coefficient, as a tensor (no sync)."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    r"""Scale the gradients in place so that their total norm is at most ``max_norm``.

    A drop-in for ``torch.nn.utils.clip_grad_norm_``: same arguments, same coefficient
    ``min(max_norm / (total_norm + 1e-6), 1)`` applied to every gradient without a host
    synchronisation, same return value (the total norm before clipping). It differs where
    torch's result is wrong or unavailable:

    * float16/bfloat16 gradients are reduced in float32 and the norm is returned in
      float32 (torch returns it in float16, where a norm above 65504 is ``inf`` and then
      zeroes every gradient);
    * DTensor gradients (FSDP2 ``fully_shard``) give the norm of the full gradients as a
      plain tensor on every rank (torch returns a DTensor with a pending reduction);
    * ``process_group`` all-reduces ``norm**p`` over ranks that hold different parameters
      (pipeline stages, expert-parallel ranks), so every rank clips with the global norm;
    * sparse gradients and negative ``max_norm`` raise instead of giving undefined results;
      empty gradients contribute nothing.

    The coefficient multiplies every gradient even when it is 1: deciding otherwise would
    need the norm on the host. Parameters without a gradient are skipped.

    Parameters
    ----------
    parameters : Tensor or iterable of Tensor
        Parameters whose ``.grad`` is clipped (a generator is consumed once).
    max_norm : float
        Largest allowed total norm, >= 0 (``inf`` computes the norm without clipping).
    norm_type : float, default 2.0
        ``p`` of the p-norm; ``inf`` for the largest magnitude.
    error_if_nonfinite : bool, default False
        Raise ``RuntimeError`` when the total norm is NaN or infinite (this reads the norm
        on the host: one synchronisation). Otherwise a non-finite norm scales the gradients
        by ``max_norm / inf = 0`` or NaN, as torch does.
    foreach : bool, optional
        Use the ``torch._foreach_*`` kernels; ``None`` uses them where the device supports
        them, ``True`` raises ``RuntimeError`` where it does not (as torch).
    process_group : ProcessGroup, optional
        Ranks holding different parameters whose norms combine into one (see above). Do
        not pass a data-parallel group whose ranks hold the same gradients: their norms
        would be counted once per rank.

    Returns
    -------
    Tensor
        The total norm before clipping, a plain 0-d tensor (see :func:`total_norm` for its
        device and dtype; a zero when no parameter has a gradient).

    Raises
    ------
    TypeError
        If a gradient is sparse or not floating point, or an argument has the wrong type.
    ValueError
        If ``max_norm`` is negative or NaN, or ``norm_type`` is NaN (or not positive with
        DTensor gradients or a ``process_group``).
    RuntimeError
        With ``error_if_nonfinite=True`` when the norm is not finite.

    Examples
    --------
    >>> layer = torch.nn.Linear(3, 1, bias=False)
    >>> layer.weight.grad = torch.tensor([[3.0, 4.0, 0.0]])
    >>> clip_grad_norm_(layer.parameters(), max_norm=1.0)
    tensor(5.)
    >>> layer.weight.grad
    tensor([[0.6000, 0.8000, 0.0000]])
    """
    max_norm = check_max(max_norm, "max_norm")
    norm_type = check_norm_type(norm_type)
    foreach = _check_foreach(foreach)
    check_process_group(process_group)
    grads = gradients_of(parameters)
    with torch.no_grad():
        domains = split_domains(grads, "gradients")
        norm = domains_norm(domains, norm_type, process_group=process_group, foreach=foreach)
        if error_if_nonfinite and not bool(norm.isfinite()):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is "
                f"non-finite ({norm.item()}), so it cannot be clipped. To disable this error "
                "and scale the gradients by the non-finite norm anyway, set "
                "`error_if_nonfinite=False`"
            )
        if grads:
            scale_(domains, clip_coefficient(norm, max_norm), foreach)
    return norm


def clip_grad_value_(
    parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None
) -> None:
    r"""Clamp every gradient in place to ``[-clip_value, clip_value]``.

    A drop-in for ``torch.nn.utils.clip_grad_value_`` that also clamps DTensor gradients
    (each rank clamps its shard) and rejects a negative ``clip_value`` (with which torch
    would set every gradient to ``-|clip_value|``). NaN gradients stay NaN.

    Parameters
    ----------
    parameters : Tensor or iterable of Tensor
        Parameters whose ``.grad`` is clamped; those without a gradient are skipped.
    clip_value : float
        Largest allowed magnitude, >= 0.
    foreach : bool, optional
        As in :func:`clip_grad_norm_`.

    Raises
    ------
    TypeError
        If a gradient is sparse or not floating point, or an argument has the wrong type.
    ValueError
        If ``clip_value`` is negative or NaN.

    Examples
    --------
    >>> w = torch.zeros(3, requires_grad=True)
    >>> w.grad = torch.tensor([-2.0, 0.5, 3.0])
    >>> clip_grad_value_([w], 1.0)
    >>> w.grad
    tensor([-1.0000,  0.5000,  1.0000])
    """
    clip_value = check_max(clip_value, "clip_value")
    foreach = _check_foreach(foreach)
    grads = gradients_of(parameters)
    with torch.no_grad():
        tensors = [t for d in split_domains(grads, "gradients") for t in d.targets]
        for (device, _), group in group_by_device_and_dtype(tensors).items():
            if use_foreach(foreach, device):
                torch._foreach_clamp_min_(group, -clip_value)
                torch._foreach_clamp_max_(group, clip_value)
            else:
                for tensor in group:
                    tensor.clamp_(min=-clip_value, max=clip_value)
