"""Adaptive gradient clipping (AGC): bound each unit's gradient relative to its weights."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from finite.clipping.result import ClipResult, require_positive

try:  # torch.distributed.tensor is absent from builds without distributed support.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None  # type: ignore[assignment,misc]

# The reference's floor on a gradient norm in the clip factor, against 0 / 0.
_GRAD_NORM_FLOOR = 1e-6


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """float32 for 16-bit (and 8-bit) floats, whose squares overflow; None keeps ``dtype``."""
    return torch.float32 if dtype.itemsize <= 2 else None


def unit_dims(ndim: int) -> tuple[int, ...] | None:
    """The dimensions a unit spans: all but the first (output) one; ``None`` (the whole
    tensor) for scalars and vectors."""
    return tuple(range(1, ndim)) if ndim >= 2 else None


def _unit_norms(x: torch.Tensor) -> torch.Tensor:
    """The 2-norm of each unit of ``x``, broadcastable against ``x``, in float32 at least."""
    return torch.linalg.vector_norm(
        x, 2, dim=unit_dims(x.ndim), keepdim=True, dtype=_accumulation_dtype(x.dtype)
    )


@dataclass
class _Unit:
    """One parameter's local gradient and the norms of its units."""

    grad: torch.Tensor  # the local values: in-place scaling reaches the gradient
    param_norm: torch.Tensor
    grad_norm: torch.Tensor
    groups: tuple[dist.ProcessGroup, ...]  # the ranks a unit is spread over
    sharded: tuple[dist.ProcessGroup, ...] = field(default=())  # ranks holding other units


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def _local_unit(name: str, param: torch.Tensor, grad: torch.Tensor) -> _Unit:
    """The local pieces of one parameter; for a DTensor, the ranks its units span."""
    if not _is_dtensor(grad):
        if _is_dtensor(param):
            raise TypeError(f"{name}: the parameter is a DTensor but its gradient is not")
        return _Unit(grad, _unit_norms(param), _unit_norms(grad), ())
    assert DTensor is not None and isinstance(grad, DTensor)
    if not isinstance(param, DTensor):
        raise TypeError(f"{name}: the gradient is a DTensor but the parameter is not")
    placements = tuple(grad.placements)
    if any(p.is_partial() for p in placements):
        raise TypeError(
            f"{name}: the gradient has a Partial placement {placements}; reduce it first "
            "(FSDP2 gradients are Shard after backward)"
        )
    mesh = grad.device_mesh
    if tuple(param.placements) != placements or param.device_mesh != mesh:
        param = param.redistribute(mesh, placements)
    spanned = unit_dims(grad.ndim) or tuple(range(grad.ndim))
    groups = tuple(
        mesh.get_group(d)
        for d, p in enumerate(placements)
        if p.is_shard() and p.dim in spanned  # type: ignore[attr-defined]
    )
    sharded = tuple(mesh.get_group(d) for d, p in enumerate(placements) if p.is_shard())
    local_param, local_grad = param.to_local(), grad.to_local()
    return _Unit(local_grad, _unit_norms(local_param), _unit_norms(local_grad), groups, sharded)


def _combine_over_ranks_(units: list[_Unit]) -> None:
    """Complete the norms of units spread over ranks: one all-reduce per set of groups.

    Each rank's norm is squared in float64 (a float32 norm above 2**64 would overflow its
    square), the squares are summed over the ranks, and the root replaces the local norm.
    """
    by_groups: dict[tuple[dist.ProcessGroup, ...], list[_Unit]] = {}
    for unit in units:
        if unit.groups:
            by_groups.setdefault(unit.groups, []).append(unit)
    for groups, members in by_groups.items():
        pieces = [t for u in members for t in (u.param_norm, u.grad_norm)]
        packed = torch.cat([t.reshape(-1).to(torch.float64).square() for t in pieces])
        for group in groups:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        roots = packed.sqrt().split([t.numel() for t in pieces])
        for piece, root in zip(pieces, roots, strict=True):
            piece.copy_(root.reshape(piece.shape))


def _max_over_ranks(
    largest: torch.Tensor, clipped: torch.Tensor, groups: list[dist.ProcessGroup]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest ratio (NaN if any rank has NaN) and any-clipped over ``groups``."""
    if not groups:
        return largest, clipped
    # MAX of NaN is not specified across backends: carry "is NaN" as its own entry.
    wide = largest.to(torch.float64)
    is_nan = wide.isnan()
    packed = torch.stack((torch.where(is_nan, -torch.inf, wide), is_nan.double(), clipped.double()))
    for group in groups:
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    largest = torch.where(packed[1] > 0, torch.nan, packed[0]).to(largest.dtype)
    return largest, packed[2] > 0


class AGC:
    r"""Unit-wise adaptive gradient clipping (Brock et al. 2021, NFNets).

    Bounds each unit's gradient relative to its weights instead of bounding one global
    norm. With ``W_i`` and ``G_i`` the weights and gradient of unit ``i``::

        limit_i <- clipping [0.01] * max(||W_i||, eps [1e-3])
        if ||G_i|| > limit_i:  G_i <- G_i * limit_i / max(||G_i||, 1e-6)

    **Units in PyTorch layouts**: a unit is one output unit, i.e. the slice along the
    first dimension: a row of a Linear weight ``[out, in]``, an output channel of a Conv
    weight ``[out, in, *kernel]`` (also of a ``ConvTranspose``, whose first dimension is
    its *input* channels: the per-slice rule is applied as for any tensor). Scalars and
    vectors (biases, norm gains) are one unit each, as in the reference implementation
    (its ``unitwise_norm`` takes the norm of the whole tensor for rank <= 1). The
    reference's JAX layouts keep the output last; its rule is the same per output unit.

    The paper does not clip the final classifier: pass its name (or its parameters'
    names) in ``exclude`` and call with ``model.named_parameters()`` or the model.

    Norms of float16/bfloat16 tensors are accumulated in float32; the scaling is one
    multiply per gradient, without host synchronisation. A gradient holding inf/NaN is
    left for the loss scaler to skip (an inf gradient becomes NaN, a NaN one stays NaN).

    **Distributed**: under DDP parameters and gradients are identical on every rank, and
    so are the decisions. Under FSDP2 (``fully_shard``) a 2-D or higher parameter is
    sharded along its first dimension, so every unit is whole on one rank and clipped
    locally; a vector split over ranks is one unit spread over them, and its squared
    norm is summed over the ranks (one all-reduce per call for all such parameters).
    The returned ratio and flag are reduced (MAX) over the ranks of the shards, so every
    rank returns the same values. Every rank of the mesh must call this.

    Parameters
    ----------
    clipping : float, default 0.01
        The bound ``lambda`` on ``||G_i|| / max(||W_i||, eps)``, > 0. The paper uses 0.01
        for batch size 4096 and larger values for smaller batches.
    eps : float, default 1e-3
        Floor on the weight norm, so that units initialised at zero can still move.
    exclude : iterable of str, default ()
        Names of parameters (``"fc.weight"``) or of modules (``"fc"``, meaning all their
        parameters) left unclipped, as ``named_parameters()`` spells them.

    Raises
    ------
    TypeError
        If ``exclude`` is a string or holds a non-string, or an argument has the wrong type.
    ValueError
        If ``clipping`` or ``eps`` is not a finite positive number.

    Examples
    --------
    >>> layer = torch.nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    >>> layer.weight.grad = torch.tensor([[0.3, 0.4], [0.001, 0.0]])
    >>> result = AGC(clipping=0.01)(layer)
    >>> layer.weight.grad  # row 0: ||G|| = 0.5 > 0.01 * 5, scaled to 0.05; row 1 kept
    tensor([[0.0300, 0.0400],
            [0.0010, 0.0000]])
    >>> result.norm  # the largest ratio ||G_i|| / ||W_i|| before clipping
    tensor(0.1000)

    References
    ----------
    A. Brock, S. De, S. L. Smith, K. Simonyan, "High-Performance Large-Scale Image
    Recognition Without Normalization", ICML 2021, arXiv:2102.06171, section 4.1;
    reference implementation ``nfnets/optim.py`` in github.com/deepmind/deepmind-research.
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, exclude: Iterable[str] = ()):
        self._clipping = require_positive(clipping, "clipping")
        self._eps = require_positive(eps, "eps")
        if isinstance(exclude, str) or not isinstance(exclude, Iterable):
            raise TypeError(
                "exclude must be an iterable of parameter or module names, e.g. "
                f"exclude=('fc',); got {exclude!r}"
            )
        names = tuple(exclude)
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"exclude must hold names (str); got {name!r}")
        self._exclude = names

    @property
    def clipping(self) -> float:
        return self._clipping

    @property
    def eps(self) -> float:
        return self._eps

    @property
    def exclude(self) -> tuple[str, ...]:
        return self._exclude

    def _named(self, parameters: Any) -> list[tuple[str, torch.Tensor]]:
        """``parameters`` as (name, tensor) pairs, without the excluded ones."""
        if isinstance(parameters, torch.nn.Module):
            items: list[Any] = list(parameters.named_parameters())
        elif isinstance(parameters, torch.Tensor):
            items = [parameters]
        elif isinstance(parameters, (str, bytes)) or not isinstance(parameters, Iterable):
            raise TypeError(
                "parameters must be a module, named_parameters() pairs, a tensor or an "
                f"iterable of tensors; got {type(parameters).__name__}"
            )
        else:
            items = list(parameters)
        named: list[tuple[str, torch.Tensor]] = []
        for index, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                named.append((f"parameters[{index}]", item))
            elif (
                isinstance(item, tuple)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)
            ):
                named.append(item)
            else:
                raise TypeError(
                    f"parameters[{index}] must be a tensor or a (name, tensor) pair, "
                    f"got {type(item).__name__}"
                )
        if not self._exclude:
            return named
        if any(isinstance(item, torch.Tensor) for item in items):
            raise ValueError(
                "exclude names parameters, but the parameters came without names: call with "
                "model.named_parameters() or the model itself"
            )
        unmatched = [e for e in self._exclude if not any(_matches(name, e) for name, _ in named)]
        if unmatched:
            known = ", ".join(name for name, _ in named[:8])
            raise ValueError(
                f"exclude names {unmatched} match no parameter; parameter names start: {known}"
            )
        return [(n, p) for n, p in named if not any(_matches(n, e) for e in self._exclude)]

    @torch.no_grad()
    def __call__(self, parameters: Any) -> ClipResult:
        """Clip each unit's gradient in place.

        Parameters
        ----------
        parameters : Module, iterable of (str, Tensor) or of Tensor
            The parameters whose ``.grad`` is clipped (those without one are skipped);
            names are needed when ``exclude`` is not empty.

        Returns
        -------
        ClipResult
            ``norm``: the largest ratio ``||G_i|| / max(||W_i||, eps)`` before clipping
            (NaN if a gradient holds NaN); ``threshold``: ``clipping``; ``clipped``: whether
            any unit was scaled. Device tensors.

        Raises
        ------
        TypeError, ValueError
            For parameters of the wrong kind, or names in ``exclude`` that match none.
        """
        named = self._named(parameters)
        units = [
            _local_unit(name, param, param.grad) for name, param in named if param.grad is not None
        ]
        _combine_over_ranks_(units)
        ratios: list[torch.Tensor] = []
        triggers: list[torch.Tensor] = []
        sharded: list[dist.ProcessGroup] = []
        for unit in units:
            grad_norm = unit.grad_norm
            weight_norm = unit.param_norm.clamp(min=self._eps)
            limit = weight_norm * self._clipping
            trigger = grad_norm > limit
            factor = torch.where(trigger, limit / grad_norm.clamp(min=_GRAD_NORM_FLOOR), 1.0)
            unit.grad.mul_(factor)
            for group in unit.sharded:
                if not any(group is seen for seen in sharded):
                    sharded.append(group)
            if trigger.numel() == 0:  # a rank holding no rows of this parameter
                continue
            ratios.append((grad_norm / weight_norm).max())
            triggers.append(trigger.any())
        device = units[0].grad.device if units else torch.device("cpu")
        if ratios:
            largest = torch.stack([r.to(device) for r in ratios]).max()
            clipped = torch.stack([t.to(device) for t in triggers]).any()
        else:
            largest = torch.zeros((), device=device)
            clipped = torch.zeros((), dtype=torch.bool, device=device)
        largest, clipped = _max_over_ranks(largest, clipped, sharded)
        threshold = torch.full((), self._clipping, dtype=largest.dtype, device=device)
        return ClipResult(largest, threshold, clipped)

    def __repr__(self) -> str:
        return f"AGC(clipping={self._clipping!r}, eps={self._eps!r}, exclude={self._exclude!r})"


def _matches(name: str, excluded: str) -> bool:
    """Whether parameter ``name`` is ``excluded`` itself or belongs to the module it names."""
    return name == excluded or name.startswith(excluded + ".")
