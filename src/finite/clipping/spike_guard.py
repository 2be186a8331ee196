"""SpikeGuard: flag a step whose loss or gradient norm leaps above its recent history."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from finite._checks import require_choice
from finite.clipping.norms import check_process_group
from finite.clipping.result import (
    require_int,
    require_positive,
    saved_state,
    state_on,
)
from finite.clipping.zclip import statistics_dtype

METRICS = ("loss", "grad_norm")

_STATE_KEYS = (
    "window_values",
    "count",
    "position",
    "step",
    "spike_count",
    "record_steps",
    "record_values",
    "record_thresholds",
    "last_threshold",
)


class SpikeRecord(NamedTuple):
    """One flagged step: its index (0 for the first call), the value and the threshold."""

    step: int
    value: float
    threshold: float


@dataclass(frozen=True)
class SpikeGuardConfig:
    """Validated settings of :class:`SpikeGuard` (see its docstring).

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``metric`` is unknown, ``sigma`` is not a finite positive number, ``window < 2``,
        ``min_history`` is outside ``[2, window]`` or ``max_records < 1``.
    """

    metric: str = "loss"
    sigma: float = 6.0
    window: int = 128
    min_history: int = 64
    max_records: int = 1024

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str):
            raise TypeError(f"metric must be a str, got {type(self.metric).__name__}")
        require_choice(self.metric, METRICS, "metric")
        window = require_int(self.window, "window", 2)
        min_history = require_int(self.min_history, "min_history", 2)
        if min_history > window:
            raise ValueError(
                f"min_history must be <= window; got min_history={min_history}, window={window}"
            )
        object.__setattr__(self, "sigma", require_positive(self.sigma, "sigma"))
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "min_history", min_history)
        object.__setattr__(self, "max_records", require_int(self.max_records, "max_records", 1))


class SpikeGuard:
    r"""Decide on the device whether this step's loss (or gradient norm) is a spike.

    The rule of OLMo's skipped steps (6 sigma over a rolling window of 128; PaLM similarly
    skipped the batches around loss spikes), as a reusable object. With ``v`` this step's
    value and defaults in brackets::

        history: the last `window` [128] finite values that were not spikes
        if v is not finite:                   spike                # NaN/inf: never step
        elif len(history) < min_history [64]: not a spike          # too little to judge
        else: spike <- v > mean(history) + sigma [6.0] * std(history)   # std: n - 1
        if not spike: history <- history + [v]

    Spikes stay out of the history, so a run of them cannot raise the bar for the next.
    Each spike is recorded (step, value, threshold) in device tensors (the last
    ``max_records``); :attr:`spikes` reads them. Nothing in a call waits for the host.

    To act on the flag without a synchronisation of its own, pass it to the loss scaler,
    which folds it into its single found-inf sync and skips the step without counting an
    overflow: ``scaler.step(optimizer, veto=guard(loss))``.

    **Distributed**: every rank must judge the same value. A gradient norm from
    :func:`~finite.clipping.total_norm` (or a clipper's ``result.norm``) is already global.
    A loss is usually per rank: reduce it first, or give ``process_group`` and the guard
    averages ``v`` over that group itself (one all-reduce per call; ``metric="loss"`` only).
    A NaN loss on one rank then makes every rank see a non-finite mean.

    Parameters
    ----------
    metric : {"loss", "grad_norm"}, default "loss"
        What ``v`` is; ``process_group`` applies to losses only.
    sigma : float, default 6.0
        Standard deviations above the mean at which a value is a spike (> 0).
    window : int, default 128
        How many recent accepted values form the history (>= 2).
    min_history : int, default 64
        Accepted values needed before anything finite is flagged (2 <= min_history <=
        window).
    max_records : int, default 1024
        How many of the most recent spikes are kept for :attr:`spikes`.
    process_group : ProcessGroup, optional
        Average the loss over this group before judging it.

    Raises
    ------
    TypeError, ValueError
        For arguments of the wrong type or out of range (see :class:`SpikeGuardConfig`), or
        ``process_group`` with ``metric="grad_norm"``.

    Examples
    --------
    >>> guard = SpikeGuard(window=8, min_history=4)
    >>> flags = [bool(guard(torch.tensor(v))) for v in [1.0, 1.1, 0.9, 1.0, 1.05, 9.0, 1.0]]
    >>> flags
    [False, False, False, False, False, True, False]
    >>> guard.spikes  # reads the device: one synchronisation
    [SpikeRecord(step=5, value=9.0, threshold=1.45497...)]

    References
    ----------
    Team OLMo, "2 OLMo 2 Furious", arXiv:2501.00656, 2024 (skipping steps whose loss or
    gradient norm is 6 standard deviations above the last 128; OLMo-core's
    ``SkipStepOptimizer``). A. Chowdhery et al., "PaLM: Scaling Language Modeling with
    Pathways", JMLR 2023, section 5.1 (skipping batches around loss spikes).
    """

    def __init__(
        self,
        metric: str = "loss",
        sigma: float = 6.0,
        window: int = 128,
        min_history: int = 64,
        *,
        max_records: int = 1024,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self._config = SpikeGuardConfig(
            metric=metric,
            sigma=sigma,
            window=window,
            min_history=min_history,
            max_records=max_records,
        )
        check_process_group(process_group)
        if process_group is not None and metric != "loss":
            raise ValueError(
                f"process_group averages a per-rank loss; metric={metric!r} is already "
                "global when it comes from finite.total_norm or a clipper's result.norm"
            )
        self._process_group = process_group
        self._state: dict[str, torch.Tensor] | None = None

    @property
    def config(self) -> SpikeGuardConfig:
        """The validated, immutable configuration."""
        return self._config

    def _state_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._state is None:
            cfg = self._config
            dtype = statistics_dtype(device)

            def zero(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
                return torch.zeros(shape, dtype=dtype, device=device)

            self._state = {
                "window_values": zero(cfg.window, dtype=dtype),
                "count": zero(),
                "position": zero(),
                "step": zero(),
                "spike_count": zero(),
                "record_steps": zero(cfg.max_records),
                "record_values": zero(cfg.max_records, dtype=dtype),
                "record_thresholds": zero(cfg.max_records, dtype=dtype),
                "last_threshold": torch.full((), math.inf, dtype=dtype, device=device),
            }
        self._state = state_on(self._state, device)
        return self._state

    def _as_tensor(self, value: object) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            if not (value.dtype.is_floating_point or value.dtype in (torch.int32, torch.int64)):
                raise TypeError(f"value must be a real tensor, got dtype {value.dtype}")
            if value.numel() != 1:
                raise ValueError(
                    f"value must hold one number (a 0-d tensor), got shape {tuple(value.shape)}"
                )
            return value.detach().reshape(())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"value must be a tensor or a real number, got {type(value).__name__}")
        device = torch.device("cpu") if self._state is None else self._state["count"].device
        return torch.full((), float(value), dtype=torch.float64, device=device)

    @torch.no_grad()
    def __call__(self, value: torch.Tensor | float) -> torch.Tensor:
        """Judge this step's value and add it to the history if it is finite and not a spike.

        Parameters
        ----------
        value : Tensor or float
            This step's loss or gradient norm (one number). A tensor keeps everything on
            its device; a Python float is placed on the guard's device.

        Returns
        -------
        Tensor
            0-d bool on the value's device: True when this step is a spike (or not finite).
        """
        cfg = self._config
        value = self._as_tensor(value)
        state = self._state_on(value.device)
        v = value.to(state["window_values"].dtype)
        if self._process_group is not None:
            v = v.clone()
            dist.all_reduce(v, op=dist.ReduceOp.SUM, group=self._process_group)
            v = v / dist.get_world_size(self._process_group)

        history, count, position = state["window_values"], state["count"], state["position"]
        filled = torch.arange(cfg.window, device=v.device) < count
        n = count.to(v.dtype)
        mean = torch.where(filled, history, 0.0).sum() / n.clamp(min=1)
        variance = torch.where(filled, (history - mean).square(), 0.0).sum() / (n - 1).clamp(min=1)
        threshold = torch.where(
            count >= cfg.min_history, mean + cfg.sigma * variance.sqrt(), math.inf
        )
        finite = v.isfinite()
        spike = ~finite | (v > threshold)

        accept = ~spike
        slot = position.reshape(1)
        history.index_copy_(0, slot, torch.where(accept, v, history.index_select(0, slot)))
        position.copy_(torch.where(accept, (position + 1) % cfg.window, position))
        count.copy_(torch.where(accept, (count + 1).clamp(max=cfg.window), count))

        record = (state["spike_count"] % cfg.max_records).reshape(1)
        for key, new in (
            ("record_steps", state["step"]),
            ("record_values", v),
            ("record_thresholds", threshold),
        ):
            old = state[key].index_select(0, record)
            state[key].index_copy_(0, record, torch.where(spike, new, old))
        state["spike_count"] += spike.to(torch.int64)
        state["step"] += 1
        state["last_threshold"].copy_(threshold)
        return spike

    # ----------------------------------------------------------------- reading
    @property
    def spike_count(self) -> torch.Tensor:
        """How many steps were flagged so far, a device tensor (no synchronisation)."""
        if self._state is None:
            return torch.zeros((), dtype=torch.int64)
        return self._state["spike_count"].clone()

    @property
    def last_threshold(self) -> torch.Tensor:
        """The threshold the last value was judged against (``inf`` while the history is
        shorter than ``min_history``), a device tensor."""
        if self._state is None:
            return torch.full((), math.inf, dtype=torch.float64)
        return self._state["last_threshold"].clone()

    @property
    def spikes(self) -> list[SpikeRecord]:
        """The recorded spikes, oldest first (the last ``max_records``).

        Reads the device state: **one host synchronisation**. Call it for reports, not on
        every step.
        """
        if self._state is None:
            return []
        state = self._state
        total = int(state["spike_count"].item())
        kept = min(total, self._config.max_records)
        first = total - kept
        slots = [(first + i) % self._config.max_records for i in range(kept)]
        steps = state["record_steps"].tolist()
        values = state["record_values"].tolist()
        thresholds = state["record_thresholds"].tolist()
        return [SpikeRecord(int(steps[s]), values[s], thresholds[s]) for s in slots]

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The configuration and copies of the device state, spike records included (no
        synchronisation). Resuming from it continues bit for bit."""
        state = None if self._state is None else {k: t.clone() for k, t in self._state.items()}
        return {"config": asdict(self._config), "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history and spike records saved by :meth:`state_dict`.

        Raises
        ------
        TypeError, ValueError
            If ``state_dict`` is not from :meth:`state_dict`, or was saved with another
            ``window`` or ``max_records`` (the buffers would not fit).
        """
        cfg = self._config
        state = saved_state(state_dict, "SpikeGuard", asdict(cfg), _STATE_KEYS)
        if state is not None:
            for key, size, name in (
                ("window_values", cfg.window, "window"),
                ("record_steps", cfg.max_records, "max_records"),
            ):
                if state[key].shape != (size,):
                    raise ValueError(
                        f"the saved state has {name}={state[key].numel()}; this SpikeGuard "
                        f"has {name}={size}"
                    )
        self._state = state

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in asdict(self._config).items())
        return f"SpikeGuard({fields})"
