"""AutoClip: clip the gradient norm at a percentile of the norms seen so far."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from finite.clipping.norms import (
    check_process_group,
)
from finite.clipping.result import (
    ClipResult,
    clip_by_global_norm_,
    require_int,
    require_real,
    saved_state,
    state_on,
)
from finite.clipping.zclip import statistics_dtype

# torch.nn.utils.clip_grad_norm_'s guard against a zero norm (the reference clips with it).
_NORM_EPS = 1e-6
_INITIAL_CAPACITY = 64

_STATE_KEYS = ("sorted_norms", "count")
_WINDOW_KEYS = ("recent_norms", "inserted")


@dataclass(frozen=True)
class AutoClipConfig:
    """Validated settings of :class:`AutoClip` (see its docstring).

    Raises
    ------
    TypeError
        If ``percentile`` is not a real number or ``history`` not an int or None.
    ValueError
        If ``percentile`` is outside (0, 100] or ``history < 1``.
    """

    percentile: float = 10.0
    history: int | None = None

    def __post_init__(self) -> None:
        percentile = require_real(self.percentile, "percentile")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must lie in (0, 100]; got {self.percentile!r}")
        object.__setattr__(self, "percentile", percentile)
        if self.history is not None:
            object.__setattr__(self, "history", require_int(self.history, "history", 1))


def _linear_percentile(
    sorted_values: torch.Tensor, count: torch.Tensor, percentile: float
) -> torch.Tensor:
    """``numpy.percentile(values, percentile)`` (method ``"linear"``) of the first ``count``
    entries of ``sorted_values``, on the device; ``inf`` when ``count`` is 0.

    Follows numpy's arithmetic step for step: the virtual index ``(n - 1) * q`` and its
    two-sided linear interpolation, so the result equals numpy's in float64.
    """
    quantile = percentile / 100
    last = (count - 1).clamp(min=0)
    index = last.to(sorted_values.dtype) * quantile
    below = index.floor()
    gamma = index - below
    lower = below.to(torch.int64).clamp(max=sorted_values.numel() - 1)
    upper = torch.minimum(lower + 1, last)
    a = sorted_values.gather(0, lower.reshape(1))[0]
    b = sorted_values.gather(0, upper.reshape(1))[0]
    difference = b - a
    # numpy interpolates from the nearer end: b - d (1 - t) for t >= 0.5, else a + d t.
    value = torch.where(gamma >= 0.5, b - difference * (1 - gamma), a + difference * gamma)
    return torch.where(count > 0, value, math.inf)


class AutoClip:
    r"""Clip the global gradient norm at the p-th percentile of its history.

    Seetharaman et al. (2020)'s rule, with the current norm counted in the history as in
    their algorithm, and numpy's default (``"linear"``) percentile, which their reference
    code calls::

        history <- history + [g]                  # g: global 2-norm of the gradients
        (history <- its last `history` entries)  # when history is not None
        threshold <- numpy.percentile(history, percentile [10])
        if g > threshold: gradients *= threshold / (g + 1e-6)

    The history lives on the device as a sorted buffer (an insertion per call costs one
    pass over it, no sort); with ``history=None`` it grows by doubling. On a GPU no call
    waits for the device (the gradients are multiplied by the coefficient even when it is
    1); on the CPU, where nothing waits, the multiply is skipped on unclipped steps.
    Non-finite norms are not added, and leave the gradients untouched (the step is for the
    loss scaler or :class:`~finite.SpikeGuard` to skip).

    The reference clips with ``torch.nn.utils.clip_grad_norm_(threshold)``, which also
    scales a norm equal to the threshold by ``1 - 1e-6 / g``; here a step is clipped only
    when ``g > threshold``.

    **Distributed**: the norm is the global norm of :func:`~finite.clipping.total_norm`, so
    every rank adds the same value to the same history and takes the same decision.

    Parameters
    ----------
    percentile : float, default 10.0
        The percentile of the history to clip at, in (0, 100]. The paper's experiments use
        values around 10: most steps are clipped, to the scale of a typical small norm.
    history : int or None, default None
        Keep only the last ``history`` finite norms; ``None`` keeps all of them.
    process_group : ProcessGroup, optional
        Ranks holding different parameters whose gradient norms combine into one (see
        :func:`~finite.clipping.total_norm`). Not a data-parallel group.

    Raises
    ------
    TypeError, ValueError
        For ``percentile`` outside (0, 100], ``history < 1``, or arguments of the wrong type.

    Examples
    --------
    >>> w = torch.zeros(2, requires_grad=True)
    >>> autoclip = AutoClip(percentile=50.0)
    >>> for g in ([3.0, 4.0], [0.6, 0.8]):
    ...     w.grad = torch.tensor(g)
    ...     result = autoclip([w])
    >>> result.threshold  # the median of the norms 5 and 1
    tensor(3., dtype=torch.float64)
    >>> result.clipped
    tensor(False)

    References
    ----------
    P. Seetharaman, G. Wichern, B. Pardo, J. Le Roux, "AutoClip: Adaptive Gradient Clipping
    for Source Separation Networks", IEEE MLSP 2020, arXiv:2007.14469; reference code
    github.com/pseeth/autoclip.
    """

    def __init__(
        self,
        percentile: float = 10.0,
        history: int | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self._config = AutoClipConfig(percentile=percentile, history=history)
        check_process_group(process_group)
        self._process_group = process_group
        self._state: dict[str, torch.Tensor] | None = None
        self._count_bound = 0  # >= the number of norms in the history, known on the host

    @property
    def config(self) -> AutoClipConfig:
        """The validated, immutable configuration."""
        return self._config

    def _state_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        history = self._config.history
        if self._state is None:
            dtype = statistics_dtype(device)
            capacity = _INITIAL_CAPACITY if history is None else history
            self._state = {
                # +inf pads the unused tail: no finite norm sorts after it.
                "sorted_norms": torch.full((capacity,), math.inf, dtype=dtype, device=device),
                "count": torch.zeros((), dtype=torch.int64, device=device),
            }
            if history is not None:
                self._state["recent_norms"] = torch.zeros(history, dtype=dtype, device=device)
                self._state["inserted"] = torch.zeros((), dtype=torch.int64, device=device)
        self._state = state_on(self._state, device)
        return self._state

    @torch.no_grad()
    def __call__(self, parameters: Any) -> ClipResult:
        """Add the global gradient norm to the history and clip at its percentile.

        Parameters
        ----------
        parameters : Module, Tensor or iterable of Tensor
            The parameters whose ``.grad`` is clipped (those without one are skipped). Every
            rank of a DTensor mesh and of ``process_group`` must call this.

        Returns
        -------
        ClipResult
            ``norm`` (before clipping), ``threshold`` (the percentile, float64) and
            ``clipped``, all device tensors.
        """
        return clip_by_global_norm_(parameters, self._decide, self._process_group)

    def _decide(self, norm: torch.Tensor, record: bool) -> tuple[ClipResult, torch.Tensor]:
        state = self._state_on(norm.device)
        g = norm.to(state["sorted_norms"].dtype)
        finite = g.isfinite()
        if record:
            self._insert(state, g, finite)
        threshold = _linear_percentile(
            state["sorted_norms"], state["count"], self._config.percentile
        )
        clipped = finite & (g > threshold)
        coefficient = torch.where(clipped, threshold / (g + _NORM_EPS), 1.0).to(torch.float32)
        return ClipResult(norm, threshold, clipped), coefficient

    def _insert(self, state: dict[str, torch.Tensor], g: torch.Tensor, finite: torch.Tensor):
        history = self._config.history
        count = state["count"]
        if history is None:
            self._reserve(state)
            values = state["sorted_norms"]
        else:
            # A full window first drops its oldest norm (one copy of that value).
            recent, inserted = state["recent_norms"], state["inserted"]
            slot = (inserted % history).reshape(1)
            oldest = recent.index_select(0, slot)
            drop = finite & (count == history)
            values = _remove_sorted(state["sorted_norms"], oldest, drop)
            count -= drop.to(count.dtype)
            recent.index_copy_(0, slot, torch.where(finite, g.reshape(1), oldest))
            inserted += finite.to(inserted.dtype)
        state["sorted_norms"].copy_(_insert_sorted(values, g, finite))
        count += finite.to(count.dtype)

    def _reserve(self, state: dict[str, torch.Tensor]) -> None:
        """Make room for one more norm in the growing buffer, doubling it when it may be full.

        The host does not know ``count`` (non-finite norms are not added) but knows an upper
        bound, the number of recorded calls, and grows on that: no synchronisation.
        """
        self._count_bound += 1
        buffer = state["sorted_norms"]
        if self._count_bound > buffer.numel():
            state["sorted_norms"] = torch.cat((buffer, torch.full_like(buffer, math.inf)))

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The configuration and copies of the device state (no synchronisation)."""
        state = None if self._state is None else {k: t.clone() for k, t in self._state.items()}
        return {"config": asdict(self._config), "state": state, "count_bound": self._count_bound}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history saved by :meth:`state_dict`.

        Raises
        ------
        TypeError, ValueError
            If ``state_dict`` is not from :meth:`state_dict`, or was saved with a different
            ``history`` (the buffers would not fit).
        """
        keys = _STATE_KEYS if self._config.history is None else _STATE_KEYS + _WINDOW_KEYS
        state = saved_state(state_dict, "AutoClip", asdict(self._config), keys)
        if state is not None and self._config.history is not None:
            if state["sorted_norms"].shape != (self._config.history,):
                raise ValueError(
                    f"the saved history holds {state['sorted_norms'].numel()} norms; this "
                    f"AutoClip has history={self._config.history}"
                )
        # Without a saved bound, the buffer's size is one (the history cannot exceed it).
        default = 0 if state is None else state["sorted_norms"].numel()
        bound = state_dict.get("count_bound", default)
        self._count_bound = require_int(bound, "state_dict['count_bound']", 0)
        self._state = state

    def __repr__(self) -> str:
        cfg = self._config
        return f"AutoClip(percentile={cfg.percentile!r}, history={cfg.history!r})"


def _insert_sorted(values: torch.Tensor, g: torch.Tensor, insert: torch.Tensor) -> torch.Tensor:
    """``values`` (ascending, +inf padded) with ``g`` inserted in order when ``insert``."""
    position = torch.searchsorted(values, g.reshape(1), right=True)
    index = torch.arange(values.numel(), device=values.device)
    shifted = torch.cat((values[:1], values[:-1]))  # shifted[i] = values[i - 1]
    merged = torch.where(index < position, values, torch.where(index == position, g, shifted))
    return torch.where(insert, merged, values)


def _remove_sorted(values: torch.Tensor, g: torch.Tensor, remove: torch.Tensor) -> torch.Tensor:
    """``values`` (ascending, +inf padded) without one entry equal to ``g`` when ``remove``."""
    position = torch.searchsorted(values, g.reshape(1), right=False)
    index = torch.arange(values.numel(), device=values.device)
    shifted = torch.cat((values[1:], values[-1:].new_full((1,), math.inf)))  # values[i + 1]
    return torch.where(remove & (index >= position), shifted, values)
