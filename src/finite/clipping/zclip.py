"""ZClip: clip the gradient norm when it jumps far above its exponential moving average."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from finite._checks import require_choice
from finite.clipping.norms import (
    check_process_group,
)
from finite.clipping.result import (
    ClipResult,
    clip_by_global_norm_,
    require_bool,
    require_int,
    require_positive,
    require_real,
    saved_state,
    state_on,
)

MODES = ("zscore", "percentile")
CLIP_OPTIONS = ("adaptive_scaling", "mean")

# torch.nn.utils.clip_grad_norm_'s guard against a zero norm, kept so the scaled norm
# matches the reference implementation's.
_NORM_EPS = 1e-6

_STATE_KEYS = ("warmup_norms", "warmup_count", "mean", "var")


def statistics_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it: the reference keeps its statistics in Python floats."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass(frozen=True)
class ZClipConfig:
    """Validated settings of :class:`ZClip` (see its docstring for each).

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``alpha`` is outside (0, 1), ``z_thresh``, ``eps``, ``clip_factor`` or
        ``max_grad_norm`` is not a finite positive number, ``warmup_steps < 1``, or ``mode``
        or ``clip_option`` is not one of the choices.
    """

    alpha: float = 0.97
    z_thresh: float = 2.5
    max_grad_norm: float | None = 1.0
    eps: float = 1e-6
    warmup_steps: int = 25
    mode: str = "zscore"
    clip_option: str = "adaptive_scaling"
    clip_factor: float = 1.0
    skip_update_on_spike: bool = False

    def __post_init__(self) -> None:
        alpha = require_real(self.alpha, "alpha")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must lie strictly between 0 and 1; got {self.alpha!r}")
        fields: dict[str, Any] = {
            "alpha": alpha,
            "z_thresh": require_positive(self.z_thresh, "z_thresh"),
            "eps": require_positive(self.eps, "eps"),
            "clip_factor": require_positive(self.clip_factor, "clip_factor"),
            "warmup_steps": require_int(self.warmup_steps, "warmup_steps", 1),
            "skip_update_on_spike": require_bool(self.skip_update_on_spike, "skip_update_on_spike"),
        }
        if self.max_grad_norm is not None:
            fields["max_grad_norm"] = require_positive(self.max_grad_norm, "max_grad_norm")
        for name, choices in (("mode", MODES), ("clip_option", CLIP_OPTIONS)):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
            require_choice(getattr(self, name), choices, name)
        for name, value in fields.items():
            object.__setattr__(self, name, value)


class ZClip:
    r"""Adaptive gradient-norm clipping against an EMA of past norms (Kumar et al. 2025).

    Takes the same decisions as the reference implementation (the ``zclip`` package) on the
    same sequence of norms, but keeps every statistic and decision on the device: on a GPU
    a call never waits for it (the reference reads the norm with ``.item()`` every step),
    and the gradients are multiplied by the coefficient even when it is 1. On the CPU,
    where reading a value waits for nothing, that multiply is skipped on unclipped steps.
    With ``g`` the global 2-norm of the gradients and defaults in brackets::

        warmup (the first warmup_steps [25] finite norms):
            collect g;  clip to max_grad_norm [1.0] as torch.nn.utils.clip_grad_norm_ would
            after the last one: mean <- average of the collected norms
                                var  <- their (population) variance
        afterwards, with std = sqrt(var):
            mode "zscore" [default]:
                z <- (g - mean) / (std + eps [1e-6]);  spike <- z > z_thresh [2.5]
                target <- (mean + z_thresh * std / (z / z_thresh)) * clip_factor [1.0]
                                               # clip_option "adaptive_scaling" [default]
                target <- mean                 # clip_option "mean"
            mode "percentile":
                target <- mean + z_thresh * std;  spike <- g > target
            limit <- min(target if spike else g, max_grad_norm)
            if g > limit: gradients *= limit / (g + 1e-6)
            unless spike and skip_update_on_spike [False], with v = target if spike else g:
                mean <- alpha [0.97] * mean + (1 - alpha) * v
                var  <- alpha * var + (1 - alpha) * (v - mean)**2      # the updated mean

    The adaptive target shrinks as the outlier grows (a norm at ``z = 2 z_thresh`` is
    clipped to ``mean + z_thresh * std / 2``), which is what damps loss spikes.

    **Differences from the reference**, all outside its well-defined behaviour:

    * a non-finite norm leaves the gradients (the step will be skipped by the loss scaler
      or :class:`~finite.SpikeGuard`) and every statistic untouched; the reference lets a
      NaN into its mean, which then never clips again;
    * a step is clipped when ``g > limit``, also during warmup, where the reference uses
      torch's ``min(1, max_grad_norm / (g + 1e-6))`` and so also scales norms within
      ``1e-6`` below ``max_grad_norm`` by a factor above ``1 - 1e-6 / max_grad_norm``;
    * the statistics are float64 tensors, summed in torch's order: thresholds agree with
      the reference to float64 rounding, not bit for bit;
    * ``warmup_steps`` must be >= 1 (the reference treats 0 as 1).

    **Distributed**: the norm is the global norm of :func:`~finite.clipping.total_norm`
    (DTensor gradients of FSDP2 are reduced over their mesh; ``process_group`` adds ranks
    holding different parameters, as for pipeline stages). Every rank computes the same
    norm and applies the same arithmetic to the same state, so every rank takes the same
    decision; under DDP the gradients are already identical on every rank.

    Parameters
    ----------
    alpha : float, default 0.97
        EMA smoothing factor, in (0, 1).
    z_thresh : float, default 2.5
        Z-score above which a norm is a spike (``"zscore"``), or the number of standard
        deviations above the mean at which norms are clipped (``"percentile"``).
    max_grad_norm : float or None, default 1.0
        Hard bound on the norm, applied on top of the adaptive one (and alone during
        warmup); ``None`` for none.
    eps : float, default 1e-6
        Added to the standard deviation in the z-score.
    warmup_steps : int, default 25
        Finite norms collected before the statistics are initialised.
    mode : {"zscore", "percentile"}, default "zscore"
        See above.
    clip_option : {"adaptive_scaling", "mean"}, default "adaptive_scaling"
        The target in ``"zscore"`` mode; ignored in ``"percentile"`` mode.
    clip_factor : float, default 1.0
        Multiplies the adaptive target (0.5-0.9 clips more aggressively).
    skip_update_on_spike : bool, default False
        Leave the statistics alone on a spike instead of feeding them the target.
    process_group : ProcessGroup, optional
        Ranks holding different parameters whose gradient norms combine into one (see
        :func:`~finite.clipping.total_norm`). Not a data-parallel group.

    Raises
    ------
    TypeError, ValueError
        For an argument of the wrong type or out of range (see :class:`ZClipConfig`).

    Examples
    --------
    >>> model = torch.nn.Linear(4, 1)
    >>> zclip = ZClip(warmup_steps=2)
    >>> for _ in range(3):
    ...     model.zero_grad()
    ...     model(torch.ones(2, 4)).sum().backward()
    ...     result = zclip(model.parameters())
    >>> result.clipped  # the norm is steady (2 * sqrt(5) > 1, clipped by max_grad_norm)
    tensor(True)

    References
    ----------
    A. Kumar, L. Owen, N. R. Chowdhury, F. Güra, "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training", arXiv:2504.02507, 2025; reference implementation
    github.com/bluorion-com/ZClip (package ``zclip``).
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_grad_norm: float | None = 1.0,
        eps: float = 1e-6,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
        *,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self._config = ZClipConfig(
            alpha=alpha,
            z_thresh=z_thresh,
            max_grad_norm=max_grad_norm,
            eps=eps,
            warmup_steps=warmup_steps,
            mode=mode,
            clip_option=clip_option,
            clip_factor=clip_factor,
            skip_update_on_spike=skip_update_on_spike,
        )
        check_process_group(process_group)
        self._process_group = process_group
        # Created on the device of the first norm (or loaded by load_state_dict).
        self._state: dict[str, torch.Tensor] | None = None

    @property
    def config(self) -> ZClipConfig:
        """The validated, immutable configuration."""
        return self._config

    def _state_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._state is None:
            dtype = statistics_dtype(device)
            self._state = {
                "warmup_norms": torch.zeros(self._config.warmup_steps, dtype=dtype, device=device),
                "warmup_count": torch.zeros((), dtype=torch.int64, device=device),
                "mean": torch.zeros((), dtype=dtype, device=device),
                "var": torch.zeros((), dtype=dtype, device=device),
            }
        self._state = state_on(self._state, device)
        return self._state

    @torch.no_grad()
    def __call__(self, parameters: Any) -> ClipResult:
        """Clip the gradients of ``parameters`` in place and update the statistics.

        Parameters
        ----------
        parameters : Module, Tensor or iterable of Tensor
            The parameters whose ``.grad`` is clipped (those without one are skipped). Every
            rank of a DTensor mesh and of ``process_group`` must call this.

        Returns
        -------
        ClipResult
            ``norm`` (the global norm before clipping), ``threshold`` (the norm the gradients
            were scaled to when ``clipped``, else the norm above which they would have been)
            and ``clipped``, all device tensors.
        """
        return clip_by_global_norm_(parameters, self._decide, self._process_group)

    def _decide(self, norm: torch.Tensor, record: bool) -> tuple[ClipResult, torch.Tensor]:
        """The clipping decision for ``norm``; updates the statistics when ``record``."""
        cfg = self._config
        state = self._state_on(norm.device)
        mean, var, count = state["mean"], state["var"], state["warmup_count"]
        g = norm.to(mean.dtype)
        finite = g.isfinite()
        ready = count >= cfg.warmup_steps
        cap = float("inf") if cfg.max_grad_norm is None else cfg.max_grad_norm
        std = var.sqrt()

        if cfg.mode == "zscore":
            z = (g - mean) / (std + cfg.eps)
            spike = z > cfg.z_thresh
            if cfg.clip_option == "adaptive_scaling":
                eta = z / cfg.z_thresh  # > 1 on a spike: the larger the outlier, the lower
                target = (mean + cfg.z_thresh * std / eta) * cfg.clip_factor
            else:
                target = mean
            # The norm at which z reaches z_thresh: what a norm had to exceed to be a spike.
            trigger = mean + cfg.z_thresh * (std + cfg.eps)
        else:
            trigger = mean + cfg.z_thresh * std
            spike = g > trigger
            target = trigger
        spike = spike & ready & finite
        limit = torch.where(spike, target, g).clamp(max=cap)
        clipped = finite & torch.where(ready, g > limit, g > cap)
        bound = torch.where(ready, trigger.clamp(max=cap), torch.full_like(mean, cap))
        threshold = torch.where(clipped, torch.where(ready, limit, cap), bound)
        coefficient = torch.where(clipped, threshold / (g + _NORM_EPS), 1.0).to(torch.float32)

        if record:
            self._update(state, g, finite, ready, spike, target)
        return ClipResult(norm, threshold, clipped), coefficient

    def _update(
        self,
        state: dict[str, torch.Tensor],
        g: torch.Tensor,
        finite: torch.Tensor,
        ready: torch.Tensor,
        spike: torch.Tensor,
        target: torch.Tensor,
    ) -> None:
        cfg = self._config
        norms, count, mean, var = (state[k] for k in _STATE_KEYS)
        collect = finite & ~ready
        slot = count.clamp(max=cfg.warmup_steps - 1).reshape(1)
        norms.index_copy_(0, slot, torch.where(collect, g, norms.index_select(0, slot)))
        count += collect.to(count.dtype)
        initialise = collect & (count == cfg.warmup_steps)
        warm_mean = norms.mean()
        warm_var = (norms - warm_mean).square().mean()

        update = finite & ready
        if cfg.skip_update_on_spike:
            update = update & ~spike
        value = torch.where(spike, target, g)
        new_mean = cfg.alpha * mean + (1 - cfg.alpha) * value
        new_var = cfg.alpha * var + (1 - cfg.alpha) * (value - new_mean).square()
        mean.copy_(torch.where(initialise, warm_mean, torch.where(update, new_mean, mean)))
        var.copy_(torch.where(initialise, warm_var, torch.where(update, new_var, var)))

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The configuration and copies of the device state (no synchronisation).

        ``state`` is ``None`` before the first call. Resuming from it continues bit for bit.
        """
        state = None if self._state is None else {k: t.clone() for k, t in self._state.items()}
        return {"config": asdict(self._config), "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the statistics saved by :meth:`state_dict`.

        The configuration stays this clipper's own; a warning lists where the saved one
        differs. The state moves to the device of the next norm.

        Raises
        ------
        TypeError, ValueError
            If ``state_dict`` is not from :meth:`state_dict`, or its warmup buffer does not
            have ``warmup_steps`` entries.
        """
        state = saved_state(state_dict, "ZClip", asdict(self._config), _STATE_KEYS)
        if state is not None and state["warmup_norms"].shape != (self._config.warmup_steps,):
            raise ValueError(
                f"the saved warmup buffer has shape {tuple(state['warmup_norms'].shape)}; "
                f"this ZClip has warmup_steps={self._config.warmup_steps}"
            )
        self._state = state

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in asdict(self._config).items())
        return f"ZClip({fields})"
