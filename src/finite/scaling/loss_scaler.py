"""Dynamic loss scaling for float16 training that says what went wrong."""

from __future__ import annotations

import enum
import numbers
import warnings
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from finite._checks import require_float_tensor
from finite.clipping.norms import (
    check_max,
    check_norm_type,
    clip_coefficient,
    clip_grad_norm_,
    domains_norm,
    scale_,
    split_domains,
)
from finite.clipping.norms import check_process_group as check_norm_process_group
from finite.scaling._distributed import all_reduce_max_, check_process_group, ranks_may_disagree
from finite.scaling._gradients import (
    group_gradients,
    largest_magnitude,
    unscale_and_find_nonfinite_,
)
from finite.scaling.config import ScalerConfig
from finite.scaling.overflow import (
    FLOAT16_MAX,
    OverflowCapture,
    OverflowReport,
    ScaleRecord,
    capture_nonfinite,
    min_scale_message,
)

Losses = TypeVar("Losses", torch.Tensor, list, tuple)

# float16's largest value is 0.99951171875 * 2**16: the mantissa and exponent used to place
# max|g| * scale exactly below it with integer arithmetic (no rounding in log2).
_FLOAT16_MAX_MANTISSA = FLOAT16_MAX / 2.0**16
_FLOAT16_MAX_EXPONENT = 16

# Keys of torch.amp.GradScaler.state_dict(); ours carries them too, so either can load the other.
_GRAD_SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval")
_CONFIG_KEYS_COMPARED_ON_LOAD = (
    "growth_factor",
    "backoff_factor",
    "growth_interval",
    "hysteresis",
    "min_scale",
    "max_scale",
    "strategy",
    "margin_bits",
    "on_min_scale",
    "patience",
    "dynamic",
)


class _Stage(enum.Enum):
    READY = "ready"
    UNSCALED = "unscaled"
    STEPPED = "stepped"


@dataclass
class _OptimizerIteration:
    """What one optimizer contributed to the current iteration."""

    stage: _Stage = _Stage.READY
    found_inf: torch.Tensor | None = None  # float32 0-d on the scale's device, > 0 on overflow
    largest_grad: torch.Tensor | None = None  # float64 0-d, headroom strategy only
    agreed: bool = False  # found_inf (and largest_grad) all-reduced over the process group
    outcome: _Outcome | None = None  # set by step()


@dataclass(frozen=True)
class _Outcome:
    """What step() decided for one optimizer."""

    skipped: bool
    scale: float  # the scale in use
    overflowed: bool  # skipped for inf/NaN gradients (on some rank)
    veto_reason: str | None  # skipped by a veto with finite gradients: its reason


def _power_of_two_exponent_below_float16_max(largest: torch.Tensor) -> torch.Tensor:
    """The largest integer ``k`` with ``largest * 2**k <= 65504``, for ``largest > 0``.

    Computed from ``frexp`` with integer arithmetic: ``floor(log2(65504 / largest))`` in
    floating point can round across an integer and overshoot.
    """
    # largest = mantissa * 2**exponent with mantissa in [0.5, 1).
    mantissa, exponent = torch.frexp(largest)
    return _FLOAT16_MAX_EXPONENT - exponent - (mantissa > _FLOAT16_MAX_MANTISSA).to(exponent.dtype)


def _exact_power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """``2.0**exponent`` as float64, exact, for integer exponents (clamped to float32's range)."""
    # Writing the biased exponent into the float64 bit pattern avoids pow/exp2, whose
    # accuracy for integer arguments is not guaranteed on every device.
    biased = (exponent.to(torch.int64).clamp(-130, 130) + 1023) << 52
    return biased.view(torch.float64)


class LossScaler:
    r"""Dynamic loss scaling for float16 training that says what went wrong.

    Multiplies the loss by a scale ``S`` so that small float16 gradients do not flush to
    zero in the backward pass, divides the gradients by ``S`` before the optimizer sees
    them, skips the step when they hold inf/NaN, and adapts ``S``. Defaults in brackets::

        S <- init_scale [2**16];  growth_tracker <- 0;  hysteresis_left <- hysteresis [1]
        every iteration:
            (S * loss).backward()                                      # scale(loss)
            for each optimizer:
                g <- g / S;  found_inf <- any(g is inf or NaN)          # unscale_, fused, no sync
                  or, with clip_norm c (one read, one write):          # unscale_(opt, c)
                N <- ||g||/S;  found_inf <- N not finite;  g <- g/S * min(c/(N+1e-6), 1)
                found_inf, veto <- max over the ranks of process_group  # if given
                if found_inf or veto: skip optimizer.step()            # step: the one host sync
                else:                 optimizer.step()
            update():                                                  # no sync
                if every optimizer was vetoed (finite gradients): keep S and the counters
                elif any optimizer found_inf:
                    growth_tracker <- 0
                    if hysteresis_left > 1: hysteresis_left -= 1       # hold S
                    else:                   S <- S * backoff_factor [0.5]
                else:
                    hysteresis_left <- hysteresis
                    growth_tracker += 1
                    grow <- growth_tracker == growth_interval [2000]
                    if grow: growth_tracker <- 0
                    if strategy == "headroom" and max|g| > 0:
                        S <- 2**(floor(log2(65504 / max|g|)) - margin_bits [4])
                    elif grow:
                        S <- S * growth_factor [2.0]
                S <- clamp(S, min_scale [1.0], max_scale [2**24])

    With ``hysteresis=1`` and a scale that stays inside ``[min_scale, max_scale]`` the
    sequence of scales is exactly ``torch.amp.GradScaler``'s. ``dynamic=False`` keeps ``S``
    constant and still skips steps with non-finite gradients.

    **Hysteresis** (DeepSpeed's ``delayed_shift``): of a run of consecutive overflows, the
    first ``hysteresis - 1`` skip the step without shrinking the scale; every further one
    shrinks it. The counter resets to ``hysteresis`` at every iteration with finite
    gradients, so with ``hysteresis >= 2`` isolated overflows never shrink the scale (DeepSpeed's
    ``consecutive_hysteresis=True``; Megatron/Apex's ``update_scale_hysteresis``). DeepSpeed's
    default resets it only when the scale grows, so there, overflows separated by good
    steps accumulate.

    **Headroom strategy**: the parameter gradients' largest magnitude says how far the scale
    can go: ``S`` is set to the largest power of two that keeps ``max|g| * S`` at least
    ``margin_bits`` binades below float16's maximum 65504. Activation gradients are not
    seen and may be larger than parameter gradients; ``margin_bits`` is the room left for
    them. An actual overflow falls back to the backoff rule; all-zero gradients carry no
    information and follow the growth rule. Powers of two keep scaling and unscaling exact.

    **Minimum scale**: when the scale sits at ``min_scale`` (or at its constant value with
    ``dynamic=False``) and gradients overflow in ``patience`` consecutive iterations,
    lowering the scale cannot help: the forward pass itself overflows.
    ``on_min_scale="raise"`` raises :class:`FloatingPointError` naming the parameters;
    ``"warn"`` warns once and keeps skipping.

    **Host synchronisation**: :meth:`scale`, :meth:`unscale_` and :meth:`update` never wait
    for the device. :meth:`step` synchronises once, to read the found-inf flag (after the
    all-reduce) together with the current scale: the skip decision has to be made on the
    host. Only on a skipped step, a second synchronisation counts inf/NaN per parameter for
    :meth:`overflow_report`. :meth:`get_scale` and :meth:`state_dict` read device values.

    Parameters
    ----------
    init_scale : float, default 2**16
        Initial scale.
    growth_factor : float, default 2.0
        Factor (> 1) applied after ``growth_interval`` consecutive finite iterations.
    backoff_factor : float, default 0.5
        Factor in (0, 1) applied on overflow.
    growth_interval : int, default 2000
        Consecutive finite iterations before the scale grows.
    hysteresis : int, default 1
        Consecutive overflows up to and including the first that shrinks the scale.
    min_scale, max_scale : float, default 1.0 and 2**24
        Bounds of the scale. Unlike ``GradScaler``, the scale cannot collapse to zero.
    strategy : {"backoff", "headroom"}, default "backoff"
        How the scale grows; see above.
    margin_bits : int, default 4
        Headroom strategy: binades kept free below float16's maximum.
    on_min_scale : {"raise", "warn"}, default "raise"
        What to do when steps keep overflowing at the minimum scale.
    patience : int, default 10
        Consecutive overflowing iterations at the minimum scale before ``on_min_scale``.
    dynamic : bool, default True
        ``False`` keeps the scale at ``init_scale`` (steps are still skipped on overflow).
    enabled : bool, default True
        ``False`` makes every method a pass-through: :meth:`scale` returns the loss,
        :meth:`step` calls ``optimizer.step`` and returns True.
    process_group : ProcessGroup or "default" or None, default None
        Group over which found-inf is all-reduced (MAX) so every rank skips together;
        ``"default"`` uses the default group. Without one, a scaler used under an
        initialised process group of several ranks warns once that ranks may disagree.
    history_size : int, default 1000
        How many iterations :attr:`history` keeps (0 keeps none).

    Raises
    ------
    TypeError, ValueError
        For an argument of the wrong type or out of range (see :class:`ScalerConfig`).

    Examples
    --------
    >>> model = torch.nn.Linear(4, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> scaler = LossScaler(init_scale=2.0**10)
    >>> loss = model(torch.randn(8, 4)).square().mean()
    >>> scaler.scale(loss).backward()
    >>> scaler.step(optimizer)  # False when the step was skipped
    True
    >>> scaler.update()
    >>> scaler.get_scale()
    1024.0

    With gradient clipping, let :meth:`unscale_` clip in the same pass:
    ``scaler.unscale_(optimizer, clip_norm=1.0)`` (it returns the unscaled pre-clip norm),
    then ``scaler.step(optimizer)``, ``scaler.update()``. To skip a step for another reason
    (a loss spike), pass ``scaler.step(optimizer, veto=flag)``.
    Call ``scheduler.step()`` only when :meth:`step` returned True so that skipped steps do
    not advance the learning-rate schedule.

    References
    ----------
    P. Micikevicius et al., "Mixed Precision Training", ICLR 2018 (loss scaling).
    Microsoft DeepSpeed, ``deepspeed/runtime/fp16/loss_scaler.py`` (hysteresis).
    ``torch.amp.GradScaler`` (the fused unscale/check and update kernels).
    R. Pascanu, T. Mikolov, Y. Bengio, "On the difficulty of training recurrent neural
    networks", ICML 2013 (gradient-norm clipping).
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        *,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 1,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
        strategy: str = "backoff",
        margin_bits: int = 4,
        on_min_scale: str = "raise",
        patience: int = 10,
        dynamic: bool = True,
        enabled: bool = True,
        process_group: dist.ProcessGroup | str | None = None,
        history_size: int = 1000,
    ) -> None:
        self._config = ScalerConfig(
            init_scale=init_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            hysteresis=hysteresis,
            min_scale=min_scale,
            max_scale=max_scale,
            strategy=strategy,
            margin_bits=margin_bits,
            on_min_scale=on_min_scale,
            patience=patience,
            dynamic=dynamic,
            enabled=enabled,
            history_size=history_size,
        )
        check_process_group(process_group)
        self._process_group = process_group
        # Device state, created on the device of the first loss or gradient. Until then
        # (and after load_state_dict on a fresh scaler) the host values wait here.
        self._scale: torch.Tensor | None = None
        self._growth_tracker: torch.Tensor | None = None
        self._hysteresis_left: torch.Tensor | None = None
        self._pending = {
            "scale": self._config.init_scale,
            "growth_tracker": 0,
            "hysteresis_left": self._config.hysteresis,
        }
        self._iterations: dict[int, _OptimizerIteration] = {}
        # Host bookkeeping: every value here is known without waiting for the device.
        self._step = 0
        self._skipped_steps = 0
        self._vetoed_steps = 0
        self._last_step_skipped = False
        self._history: deque[ScaleRecord] = deque(maxlen=self._config.history_size)
        self._last_overflow: OverflowCapture | None = None
        self._overflow_streak_at_min_scale = 0
        self._streak_counted_at_step = -1
        self._warned_min_scale = False
        self._warned_disagreement = False

    # ----------------------------------------------------------------- configuration
    @property
    def config(self) -> ScalerConfig:
        """The validated, immutable configuration."""
        return self._config

    @property
    def process_group(self) -> dist.ProcessGroup | str | None:
        """The group found-inf is all-reduced over, as given to the constructor."""
        return self._process_group

    def is_enabled(self) -> bool:
        """Whether scaling is enabled (as ``GradScaler.is_enabled``)."""
        return self._config.enabled

    # ----------------------------------------------------------------- device state
    def _materialise(self, device: torch.device) -> None:
        # torch.full launches a fill kernel; torch.tensor(value, device=...) would copy from
        # the host and synchronise.
        pending = self._pending
        self._scale = torch.full((), pending["scale"], dtype=torch.float32, device=device)
        self._growth_tracker = torch.full(
            (), pending["growth_tracker"], dtype=torch.int32, device=device
        )
        self._hysteresis_left = torch.full(
            (), pending["hysteresis_left"], dtype=torch.int32, device=device
        )

    def _scale_on(self, device: torch.device) -> torch.Tensor:
        if self._scale is None:
            self._materialise(device)
        assert self._scale is not None
        return self._scale.to(device, non_blocking=True)

    # ----------------------------------------------------------------- the training step
    def scale(self, loss: Losses) -> Losses:
        """Return ``loss * scale``; lists and tuples (nested) are scaled elementwise.

        The product follows PyTorch's type promotion with the float32 0-d scale tensor, as
        with ``GradScaler``. The scaler's state is created on the device of the first loss.

        Raises
        ------
        TypeError
            If ``loss`` is not a floating-point tensor or a list/tuple of them.
        """
        if not self._config.enabled:
            return loss
        if isinstance(loss, torch.Tensor):
            require_float_tensor(loss, "loss")
            return loss * self._scale_on(loss.device)
        if isinstance(loss, (list, tuple)):
            return type(loss)(self.scale(item) for item in loss)
        raise TypeError(
            f"loss must be a tensor or a list/tuple of tensors, got {type(loss).__name__}"
        )

    def _iteration_of(self, optimizer: torch.optim.Optimizer) -> _OptimizerIteration:
        """The optimizer's record for this iteration; a new one is registered by unscale_."""
        if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "step"):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        return self._iterations.get(id(optimizer), _OptimizerIteration())

    def unscale_(
        self,
        optimizer: torch.optim.Optimizer,
        clip_norm: float | None = None,
        *,
        norm_type: float = 2.0,
        norm_process_group: dist.ProcessGroup | None = None,
    ) -> torch.Tensor | None:
        """Divide the optimizer's gradients by the scale in place and check them for inf/NaN;
        with ``clip_norm``, clip their total norm in the same pass.

        Call it explicitly only to work on unscaled gradients before :meth:`step`;
        :meth:`step` calls it otherwise. No host synchronisation. Sparse COO gradients are
        coalesced (``.grad`` is replaced) so that duplicate indices are summed before the
        check. With ``strategy="headroom"`` it also records ``max|g|``.

        **Fused clipping.** ``unscale_(optimizer, clip_norm=c)`` replaces ``unscale_``
        followed by ``clip_grad_norm_(params, c)``, which read and write every gradient
        twice more. Here one reduction reads the scaled gradients ``G`` for their norm, and
        one multiply writes them::

            N <- ||G||_p / S                          # the unscaled pre-clip norm
            found_inf <- N is inf or NaN              # an inf/NaN in G makes ||G|| non-finite
            G <- G * (1/S) * min(c / (N + 1e-6), 1)   # (1/S only when found_inf)

        For a power-of-two scale (the default) the results equal torch's two-step path
        bit for bit, barring subnormal gradients; otherwise within float32 rounding. Two
        edges differ: the found-inf flag is also raised when ``||G||`` overflows float32
        although every element is finite (``||G|| > 3.4e38``; lowering the scale is the
        right answer then too), and ``norm_type`` must be positive (an inf contributes
        nothing to a 0- or negative-order "norm", so it would go unnoticed). On a
        found-inf step the gradients are only unscaled (not clipped), so that
        :meth:`overflow_report` still sees which were inf and which NaN.

        DTensor gradients (FSDP2) are reduced over their mesh, so every rank clips with
        the norm of the full gradients. ``norm_process_group`` is ``clip_grad_norm_``'s
        ``process_group``: ranks that hold *different* parameters (pipeline stages). The
        found-inf flag is agreed over the scaler's ``process_group`` at :meth:`step`, as
        without clipping.

        Parameters
        ----------
        optimizer : torch.optim.Optimizer
            The optimizer whose gradients are unscaled.
        clip_norm : float, optional
            Largest allowed total norm of the unscaled gradients (>= 0); None to only
            unscale.
        norm_type : float, default 2.0
            ``p`` of the p-norm (> 0 or inf); used only with ``clip_norm``.
        norm_process_group : ProcessGroup, optional
            Used only with ``clip_norm``; see above.

        Returns
        -------
        Tensor or None
            With ``clip_norm``: the total norm of the unscaled gradients before clipping
            (0-d, float32 or float64 as the gradients, on the device of the first
            gradient; inf/NaN on a found-inf step). None without ``clip_norm``.

        Raises
        ------
        RuntimeError
            If called twice for the same optimizer in one iteration, after :meth:`step`, or
            before any loss was scaled when the optimizer has no gradients.
        TypeError
            If a gradient is float16/bfloat16 (use :class:`finite.MasterWeights`) or has an
            unsupported layout, or a clipping argument has the wrong type.
        ValueError
            If ``clip_norm`` is negative or NaN, or ``norm_type`` is not positive.
        """
        if clip_norm is not None:
            clip_norm = check_max(clip_norm, "clip_norm")
            norm_type = check_norm_type(norm_type)
            if not norm_type > 0:
                raise ValueError(
                    "unscale_(clip_norm=...) needs norm_type > 0 (or inf) so that an inf "
                    f"gradient makes the norm non-finite; got {norm_type!r}"
                )
            check_norm_process_group(norm_process_group)
        if not self._config.enabled:
            if clip_norm is None:
                return None
            params = [p for group in optimizer.param_groups for p in group["params"]]
            return clip_grad_norm_(params, clip_norm, norm_type, process_group=norm_process_group)
        iteration = self._iteration_of(optimizer)
        if iteration.stage is _Stage.UNSCALED:
            raise RuntimeError(
                "unscale_() was already called for this optimizer in this iteration; "
                "call update() before unscaling it again"
            )
        if iteration.stage is _Stage.STEPPED:
            raise RuntimeError("unscale_() was called after step() for this optimizer")
        norm = None
        with torch.no_grad():
            groups = group_gradients(optimizer)
            if self._scale is None:
                if not groups:
                    raise RuntimeError(
                        "unscale_(): the optimizer has no gradients and no loss has been "
                        "scaled yet; call scaler.scale(loss).backward() first"
                    )
                self._materialise(next(iter(groups))[0])
            assert self._scale is not None
            # The reciprocal in float64 is correctly rounded to float32 (exact for powers of two).
            inv_scale = self._scale.double().reciprocal().float()
            device = self._scale.device
            if clip_norm is None:
                iteration.found_inf = unscale_and_find_nonfinite_(groups, inv_scale, device)
                if self._config.strategy == "headroom":
                    iteration.largest_grad = largest_magnitude(groups, device)
            else:
                if self._config.strategy == "headroom":
                    # Read before the multiply below; exact for a power-of-two scale.
                    largest = largest_magnitude(groups, device)
                    iteration.largest_grad = largest * inv_scale.double()
                norm, iteration.found_inf = self._unscale_and_clip_(
                    optimizer, inv_scale, clip_norm, norm_type, norm_process_group
                )
        iteration.stage = _Stage.UNSCALED
        self._iterations[id(optimizer)] = iteration
        return norm

    def _unscale_and_clip_(
        self,
        optimizer: torch.optim.Optimizer,
        inv_scale: torch.Tensor,
        clip_norm: float,
        norm_type: float,
        norm_process_group: dist.ProcessGroup | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused pass: (unscaled pre-clip norm, found-inf flag on the scale's device)."""
        assert self._scale is not None
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        # group_gradients has coalesced sparse gradients: their values are scaled in place.
        domains = split_domains(grads, "gradients", allow_sparse=True)
        scaled_norm = domains_norm(
            domains,
            norm_type,
            process_group=norm_process_group,
            device=None if grads else self._scale.device,
        )
        inv_scale_here = inv_scale.to(scaled_norm.device, scaled_norm.dtype, non_blocking=True)
        norm = scaled_norm * inv_scale_here
        finite = norm.isfinite()
        # With inf/NaN present the step is skipped; unscaling alone keeps inf and NaN
        # apart for overflow_report (a zero coefficient would turn every inf into NaN).
        clip = torch.where(finite, clip_coefficient(norm, clip_norm), 1.0)
        scale_(domains, inv_scale_here * clip)
        found_inf = (~finite).to(self._scale.device, torch.float32, non_blocking=True)
        return norm, found_inf

    def _agree(
        self, iteration: _OptimizerIteration, veto: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """All-reduce the optimizer's flags (and ``veto``) over the process group, once per
        iteration; returns the agreed veto (``veto`` itself without a process group)."""
        if self._process_group is None or iteration.agreed:
            return veto
        assert iteration.found_inf is not None
        flags = [iteration.found_inf.double()]
        if iteration.largest_grad is not None:
            # Every rank must compute the same next scale, so it sees the global max|g|.
            flags.append(iteration.largest_grad)
        if veto is not None:
            # A veto computed from a rank's own loss differs between ranks; one rank's veto
            # skips the step everywhere, or the replicas would diverge.
            flags.append(veto.double())
        stacked = torch.stack(flags)
        all_reduce_max_(stacked, self._process_group)
        iteration.found_inf = stacked[0].float()
        if iteration.largest_grad is not None:
            iteration.largest_grad = stacked[1]
        iteration.agreed = True
        return None if veto is None else stacked[-1]

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        *args: Any,
        veto: bool | torch.Tensor | None = None,
        veto_reason: str = "veto",
        **kwargs: Any,
    ) -> bool:
        """Unscale (if not yet done), then call ``optimizer.step(*args, **kwargs)`` unless
        the gradients hold inf/NaN or ``veto`` is true.

        Parameters
        ----------
        optimizer : torch.optim.Optimizer
            The optimizer to step.
        *args, **kwargs
            Passed to ``optimizer.step``.
        veto : bool or Tensor, optional
            Skip this step although the gradients are finite: a Python bool, or a
            one-element device tensor (e.g. from :class:`finite.SpikeGuard`) read in the
            same host synchronisation as the found-inf flag. A vetoed step is not an
            overflow: :meth:`update` leaves the scale, its growth counter and the
            hysteresis untouched when every stepped optimizer was vetoed. With a
            ``process_group`` the veto is agreed like the found-inf flag (one rank's veto
            skips the step on every rank), in the same all-reduce.
        veto_reason : str, default "veto"
            The ``reason`` :attr:`history` records for a vetoed step (``"spike"`` for a
            loss-spike guard). An overflow in the same step takes precedence.

        Returns
        -------
        bool
            True when the optimizer stepped; False when the step was skipped, in which case
            the parameters and the optimizer state are left bit-for-bit untouched and, for
            an overflow, the per-parameter inf/NaN counts are recorded for
            :meth:`overflow_report`.

        Raises
        ------
        RuntimeError
            If called twice for one optimizer in an iteration, or with a closure (the
            closure would recompute unscaled gradients).
        TypeError, ValueError
            If ``veto`` is not a bool or a one-element tensor, or ``veto_reason`` is not a
            non-empty string.
        FloatingPointError
            With ``on_min_scale="raise"``, when ``patience`` consecutive iterations
            overflowed at the minimum scale.

        Notes
        -----
        This is the scaler's one host synchronisation per optimizer: the skip decision
        needs the found-inf flag on the host. The flag, the veto and the current scale are
        read with a single device-to-host copy, after the all-reduce over
        ``process_group``. With ``enabled=False`` a tensor ``veto`` is still honoured (one
        synchronisation to read it).
        """
        veto_flag = _check_veto(veto, veto_reason)
        if not self._config.enabled:
            vetoed = bool(veto_flag) if veto_flag is not None else False
            if not vetoed:
                optimizer.step(*args, **kwargs)
            self._skipped_steps += vetoed
            self._vetoed_steps += vetoed
            self._last_step_skipped = vetoed
            return not vetoed
        if "closure" in kwargs or any(callable(arg) for arg in args):
            raise RuntimeError(
                "LossScaler.step() does not support closures: the closure would recompute "
                "unscaled gradients; call scale(loss).backward() yourself"
            )
        iteration = self._iteration_of(optimizer)
        if iteration.stage is _Stage.STEPPED:
            raise RuntimeError(
                "step() was already called for this optimizer in this iteration; "
                "call update() first"
            )
        if iteration.stage is _Stage.READY:
            self.unscale_(optimizer)
            iteration = self._iterations[id(optimizer)]
        self._warn_if_ranks_may_disagree()
        assert self._scale is not None
        veto_tensor = None
        if isinstance(veto_flag, torch.Tensor):
            veto_tensor = veto_flag.reshape(()).to(
                self._scale.device, torch.float32, non_blocking=True
            )
        elif veto_flag is not None and self._process_group is not None:
            # A Python bool may differ between ranks too: agree on it in the same all-reduce.
            veto_tensor = torch.full((), float(veto_flag), device=self._scale.device)
        agreed_veto = self._agree(iteration, veto_tensor)
        assert iteration.found_inf is not None
        if agreed_veto is None:
            found_inf, scale = torch.stack((iteration.found_inf, self._scale)).tolist()
            vetoed = bool(veto_flag)
        else:
            flags = (iteration.found_inf, self._scale, agreed_veto.float())
            found_inf, scale, vetoed_value = torch.stack(flags).tolist()
            vetoed = vetoed_value != 0
        overflowed = found_inf > 0
        skipped = overflowed or vetoed
        if overflowed:
            self._record_overflow(optimizer, scale)
        elif not vetoed:
            optimizer.step(*args, **kwargs)
        iteration.stage = _Stage.STEPPED
        iteration.outcome = _Outcome(
            skipped, scale, overflowed, veto_reason if vetoed and not overflowed else None
        )
        self._skipped_steps += skipped
        self._vetoed_steps += vetoed and not overflowed
        self._last_step_skipped = skipped
        return not skipped

    def _warn_if_ranks_may_disagree(self) -> None:
        if self._process_group is None and not self._warned_disagreement and ranks_may_disagree():
            self._warned_disagreement = True
            warnings.warn(
                "LossScaler is used under an initialised process group of "
                f"{dist.get_world_size()} ranks without process_group: each rank decides "
                "on its own gradients whether to skip, so ranks may disagree and their "
                "weights diverge. Pass process_group='default' (or a group) to agree.",
                UserWarning,
                stacklevel=3,
            )

    def _record_overflow(self, optimizer: torch.optim.Optimizer, scale: float) -> None:
        capture = capture_nonfinite(optimizer, self._step, scale)
        previous = self._last_overflow
        if previous is not None and previous.step == self._step:
            capture = previous.merged(capture)
        self._last_overflow = capture
        at_floor = scale <= self._config.min_scale or not self._config.dynamic
        if not at_floor:
            self._overflow_streak_at_min_scale = 0
        elif self._streak_counted_at_step != self._step:
            self._streak_counted_at_step = self._step
            self._overflow_streak_at_min_scale += 1
        if self._overflow_streak_at_min_scale < self._config.patience:
            return
        message = min_scale_message(capture, self._config.patience)
        if self._config.on_min_scale == "raise":
            raise FloatingPointError(message)
        if not self._warned_min_scale:
            self._warned_min_scale = True
            warnings.warn(message + " Steps keep being skipped.", RuntimeWarning, stacklevel=3)

    def update(self) -> None:
        """Adapt the scale from this iteration's overflows; call once per iteration,
        after :meth:`step` for every optimizer. No host synchronisation.

        An optimizer that was unscaled but not stepped still counts toward the scale update
        (as in ``GradScaler``); :attr:`history` records iterations with at least one step.

        Raises
        ------
        RuntimeError
            If no optimizer was unscaled or stepped since the last update.
        """
        if not self._config.enabled:
            return
        if not self._iterations:
            raise RuntimeError(
                "update() found no step() or unscale_() since the last update(); "
                "call scaler.step(optimizer) for each optimizer first"
            )
        iterations = list(self._iterations.values())
        for iteration in iterations:
            self._agree(iteration)
        # A vetoed step says nothing about the scale: with every optimizer vetoed (and
        # none overflowed, or it would not count as vetoed) the scale state stays as is.
        all_vetoed = all(
            it.outcome is not None and it.outcome.veto_reason is not None for it in iterations
        )
        if self._config.dynamic and not all_vetoed:
            self._update_scale(iterations)
        self._close_iteration(iterations)

    def _update_scale(self, iterations: list[_OptimizerIteration]) -> None:
        scale, tracker, hysteresis_left = self._scale, self._growth_tracker, self._hysteresis_left
        assert scale is not None and tracker is not None and hysteresis_left is not None
        config = self._config
        found_inf = torch.stack([it.found_inf for it in iterations if it.found_inf is not None])
        overflow = found_inf.sum() > 0
        shrink = overflow & (hysteresis_left <= 1)
        hysteresis_left.copy_(
            torch.where(overflow, (hysteresis_left - 1).clamp(min=1), config.hysteresis)
        )
        counted = torch.where(overflow, 0, tracker + 1)
        grow = counted >= config.growth_interval
        tracker.copy_(torch.where(grow, 0, counted))
        # float64 products rounded once to float32, as GradScaler's update kernel does.
        current = scale.double()
        candidate = torch.where(
            shrink,
            current * config.backoff_factor,
            torch.where(grow, current * config.growth_factor, current),
        )
        if config.strategy == "headroom":
            largest = torch.stack(
                [it.largest_grad for it in iterations if it.largest_grad is not None]
            ).max()
            exponent = _power_of_two_exponent_below_float16_max(largest) - config.margin_bits
            informative = ~overflow & (largest > 0)
            candidate = torch.where(informative, _exact_power_of_two(exponent), candidate)
        scale.copy_(candidate.clamp(config.min_scale, config.max_scale).float())

    def _close_iteration(self, iterations: list[_OptimizerIteration]) -> None:
        outcomes = [it.outcome for it in iterations if it.outcome is not None]
        skipped = any(outcome.skipped for outcome in outcomes)
        overflowed = any(outcome.overflowed for outcome in outcomes)
        if outcomes:
            capture, reason = self._last_overflow, None
            if overflowed and capture is not None and capture.step == self._step:
                reason = capture.reason
            elif skipped:
                reason = next(o.veto_reason for o in outcomes if o.veto_reason is not None)
            self._history.append(ScaleRecord(self._step, outcomes[0].scale, skipped, reason))
        if not overflowed:
            self._overflow_streak_at_min_scale = 0
        self._iterations = {}
        self._step += 1

    # ----------------------------------------------------------------- observability
    @property
    def skipped_steps(self) -> int:
        """Number of :meth:`step` calls that skipped their optimizer (no sync)."""
        return self._skipped_steps

    @property
    def vetoed_steps(self) -> int:
        """Number of :meth:`step` calls skipped by ``veto`` with finite gradients (no sync);
        they are included in :attr:`skipped_steps`."""
        return self._vetoed_steps

    @property
    def last_step_skipped(self) -> bool:
        """Whether the most recent :meth:`step` call skipped its optimizer (no sync)."""
        return self._last_step_skipped

    @property
    def scale_tensor(self) -> torch.Tensor | None:
        """The scale as a float32 0-d device tensor (no sync); None before the first
        :meth:`scale` or :meth:`unscale_`, or when disabled. Do not modify it."""
        return self._scale if self._config.enabled else None

    def get_scale(self) -> float:
        """The current scale as a Python float (synchronises); 1.0 when disabled."""
        if not self._config.enabled:
            return 1.0
        if self._scale is None:
            return float(self._pending["scale"])
        return self._scale.item()

    @property
    def history(self) -> list[ScaleRecord]:
        """The last ``history_size`` iterations (those with a :meth:`step`), oldest first."""
        return list(self._history)

    def overflow_report(self, model: torch.nn.Module | None = None) -> OverflowReport | None:
        """The parameters whose gradients held inf/NaN at the last skipped step, with counts.

        The counts are taken inside :meth:`step` when the skip is detected, so the report
        survives ``zero_grad()``. With ``model``, parameters are named by module path
        (``model.named_parameters()``); otherwise by the optimizer's ``param_names`` when
        it was built from named parameters, else by their position in ``param_groups``.
        Returns None if no step has been skipped.
        """
        if self._last_overflow is None:
            return None
        names = {}
        if model is not None:
            names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        return self._last_overflow.report(names)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-for-bit (synchronises to read the device state).

        Carries ``torch.amp.GradScaler``'s keys (``scale``, ``growth_factor``,
        ``backoff_factor``, ``growth_interval``, ``_growth_tracker``) so a GradScaler can
        load it too. Empty when disabled.

        Raises
        ------
        RuntimeError
            Between :meth:`step` and :meth:`update`, where this iteration's flags would be lost.
        """
        if not self._config.enabled:
            return {}
        self._require_iteration_boundary("state_dict")
        if self._scale is None:
            scale = self._pending["scale"]
            tracker = self._pending["growth_tracker"]
            hysteresis_left = self._pending["hysteresis_left"]
        else:
            assert self._growth_tracker is not None and self._hysteresis_left is not None
            state = (self._scale, self._growth_tracker, self._hysteresis_left)
            scale, tracker, hysteresis_left = torch.stack([t.double() for t in state]).tolist()
        return {
            "scale": float(scale),
            "growth_factor": self._config.growth_factor,
            "backoff_factor": self._config.backoff_factor,
            "growth_interval": self._config.growth_interval,
            "_growth_tracker": int(tracker),
            "hysteresis_left": int(hysteresis_left),
            "step": self._step,
            "skipped_steps": self._skipped_steps,
            "vetoed_steps": self._vetoed_steps,
            "last_step_skipped": self._last_step_skipped,
            "overflow_streak_at_min_scale": self._overflow_streak_at_min_scale,
            "history": [tuple(record) for record in self._history],
            "config": asdict(self._config),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state from :meth:`state_dict` or from ``torch.amp.GradScaler.state_dict()``.

        The configuration stays this scaler's own (it is immutable): where the saved one
        differs, a warning lists the differences. A loaded scale outside
        ``[min_scale, max_scale]`` is clamped, with a warning. From a GradScaler dict, the
        hysteresis counter restarts at ``hysteresis`` and the counters and history are kept.
        No-op when disabled.

        Raises
        ------
        TypeError
            If ``state_dict`` is not a mapping or a value has the wrong type.
        ValueError
            If it is empty (saved from a disabled scaler), lacks ``scale`` or
            ``_growth_tracker``, or holds a non-finite or non-positive scale.
        RuntimeError
            Between :meth:`step` and :meth:`update`.
        """
        if not self._config.enabled:
            return
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        if not state_dict:
            raise ValueError("state_dict is empty: it was saved from a disabled scaler")
        self._require_iteration_boundary("load_state_dict")
        required: tuple[str, ...] = ("scale", "_growth_tracker")
        if "config" in state_dict:
            required += ("step", "skipped_steps", "last_step_skipped", "history")
            required += ("overflow_streak_at_min_scale",)
        for key in required:
            if key not in state_dict:
                raise ValueError(f"state_dict lacks the key {key!r}")
        saved_config = state_dict.get("config", {k: state_dict.get(k) for k in _GRAD_SCALER_KEYS})
        self._warn_config_mismatch(saved_config)
        scale = self._loaded_scale(state_dict["scale"])
        tracker = _loaded_int(state_dict["_growth_tracker"], "_growth_tracker")
        saved_hysteresis = state_dict.get("hysteresis_left", self._config.hysteresis)
        hysteresis_left = _loaded_int(saved_hysteresis, "hysteresis_left")
        self._pending = {
            "scale": scale,
            "growth_tracker": tracker,
            "hysteresis_left": min(max(hysteresis_left, 1), self._config.hysteresis),
        }
        if self._scale is not None:
            self._materialise(self._scale.device)
        if "config" in state_dict:
            self._step = _loaded_int(state_dict["step"], "step")
            self._skipped_steps = _loaded_int(state_dict["skipped_steps"], "skipped_steps")
            # Absent from checkpoints written before vetoes existed.
            self._vetoed_steps = _loaded_int(state_dict.get("vetoed_steps", 0), "vetoed_steps")
            self._last_step_skipped = bool(state_dict["last_step_skipped"])
            self._overflow_streak_at_min_scale = _loaded_int(
                state_dict["overflow_streak_at_min_scale"], "overflow_streak_at_min_scale"
            )
            self._history = deque(
                (ScaleRecord(*record) for record in state_dict["history"]),
                maxlen=self._config.history_size,
            )

    def _require_iteration_boundary(self, method: str) -> None:
        if self._iterations:
            raise RuntimeError(
                f"{method}() was called between step()/unscale_() and update(); "
                "call it after update()"
            )

    def _warn_config_mismatch(self, saved: Mapping[str, Any]) -> None:
        ours = asdict(self._config)
        differences = [
            f"{key}: saved {saved[key]!r}, this scaler {ours[key]!r}"
            for key in _CONFIG_KEYS_COMPARED_ON_LOAD
            if key in saved and saved[key] != ours[key]
        ]
        if differences:
            warnings.warn(
                "load_state_dict: the saved configuration differs from this scaler's, which is "
                "kept (configuration is immutable): " + "; ".join(differences),
                UserWarning,
                stacklevel=3,
            )

    def _loaded_scale(self, value: object) -> float:
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"state_dict['scale'] must be a float, got {type(value).__name__}")
        if not (value > 0 and value < float("inf")):
            raise ValueError(f"state_dict['scale'] must be positive and finite; got {value!r}")
        clamped = min(max(float(value), self._config.min_scale), self._config.max_scale)
        if clamped != value:
            warnings.warn(
                f"load_state_dict: the saved scale {value!r} lies outside [min_scale, "
                f"max_scale] = [{self._config.min_scale:g}, {self._config.max_scale:g}]; "
                f"clamped to {clamped:g}",
                UserWarning,
                stacklevel=3,
            )
        return clamped


def _check_veto(veto: object, veto_reason: object) -> bool | torch.Tensor | None:
    """``veto`` checked to be None, a bool or a one-element tensor (shape only: no sync)."""
    if not isinstance(veto_reason, str) or not veto_reason:
        raise TypeError(f"veto_reason must be a non-empty str, got {veto_reason!r}")
    if veto is None or isinstance(veto, bool):
        return veto
    if isinstance(veto, torch.Tensor):
        if veto.numel() != 1:
            raise ValueError(
                f"veto must be a bool or a one-element tensor; got a tensor of shape "
                f"{tuple(veto.shape)}"
            )
        if veto.is_complex():
            raise TypeError(f"veto must be a bool or real tensor, got dtype {veto.dtype}")
        return veto.detach()
    if isinstance(veto, numbers.Integral):
        return bool(veto)
    raise TypeError(f"veto must be None, a bool or a one-element tensor, got {type(veto).__name__}")


def _loaded_int(value: object, key: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"state_dict[{key!r}] must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"state_dict[{key!r}] must be >= 0; got {value}")
    return value
