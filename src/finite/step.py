"""StableStep: the stable order of one training step, in one object.

A training step has a correct order (scale, backward, accumulate, unscale, check, clip,
guard, step or skip, update the scale, advance the schedule, zero the gradients, record),
and most numerical failures of a mixed-precision run come from getting one link of it
wrong: clipping scaled gradients, stepping on inf, advancing the learning-rate schedule
on a skipped step. :class:`StableStep` composes the pieces of ``finite`` in that order.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from finite._checks import require_float_tensor
from finite.clipping.agc import AGC
from finite.clipping.autoclip import AutoClip
from finite.clipping.norms import check_max, clip_coefficient, clip_grad_norm_, total_norm
from finite.clipping.spike_guard import SpikeGuard
from finite.clipping.zclip import ZClip
from finite.monitor.monitor import Monitor
from finite.precision.master_weights import MasterWeights
from finite.scaling.loss_scaler import LossScaler

__all__ = ["StableStep", "StepResult"]

_STATE_VERSION = 1
_CLIPPERS = (ZClip, AutoClip, AGC)


class StepResult(NamedTuple):
    """What one call of :class:`StableStep` did.

    ``stepped`` and ``skip_reason`` are host values (the skip decision is read on the host
    anyway); everything else stays a device tensor so that reading it is the caller's
    choice and the caller's synchronisation.

    Attributes
    ----------
    stepped : bool
        Whether the optimizer stepped. False on a skipped step and on every micro-batch
        that is not the last of its accumulation window.
    skip_reason : {"nonfinite", "spike"} or None
        Why the step was skipped: inf/NaN gradients (or loss), or a veto of the spike
        guard (an overflow takes precedence). None when the optimizer stepped and on
        micro-batches that are not the last of their window.
    loss : Tensor
        0-d, detached: on the last micro-batch the mean loss of the window (the loss of the
        one big batch), on the others this micro-batch's loss.
    grad_norm : Tensor or None
        0-d: the total 2-norm of the unscaled gradients before clipping (for :class:`AGC`
        too, which judges unit-wise ratios). None on micro-batches that are not the last,
        and with a scaler but no clipping and no ``"grad_norm"`` guard (the scaler's fused
        inf/NaN check needs no norm; computing one would cost a pass over the gradients).
    clipped : Tensor or None
        0-d bool: whether clipping scaled the gradients down. None without ``clip`` and on
        micro-batches that are not the last.
    scale : Tensor or None
        0-d float32: the loss scale this step's backward pass used (a copy, unaffected by
        the scaler's update). None without a scaler.
    """

    stepped: bool
    skip_reason: str | None
    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    clipped: torch.Tensor | None
    scale: torch.Tensor | None


def _require_instance(value: object, kinds: type | tuple[type, ...], name: str, what: str) -> None:
    if value is not None and not isinstance(value, kinds):
        raise TypeError(f"{name} must be {what} or None, got {type(value).__name__}")


class StableStep:
    r"""One numerically stable training step: ``result = step(loss)`` after the forward pass.

    The order, one call per micro-batch (``N = accumulation_steps``; every component is
    optional)::

        L <- loss / N                                   # N > 1: the window's mean loss
        scaler.scale(L).backward()                      # or L.backward() without a scaler
        master_weights.accumulate_grads_()              # fp32 sum of the micro-batch grads
        if this is not the N-th micro-batch: return (stepped=False, skip_reason=None)
        # unscale, check, clip (on the optimizer's parameters: the masters, if any)
        clip float, scaler:   norm <- scaler.unscale_(optimizer, clip_norm=clip)  # fused
        clip float, none:     norm <- finite.clip_grad_norm_(params, clip)
        clipper, scaler:      scaler.unscale_(optimizer); result <- clipper(params)
        clipper, none:        result <- clipper(params)
        no clip, none:        norm <- finite.total_norm(grads)        # the inf/NaN check
        nonfinite <- norm (or the scaler's found-inf flag) is not finite
        spike <- guard(mean loss of the window, or norm for metric="grad_norm")
        stepped <- scaler.step(optimizer, veto=spike, veto_reason="spike")   # host read
                   or, without a scaler: one host read of (nonfinite | spike), then
                   optimizer.step() unless it is set
        scaler.update()                                 # a vetoed step keeps the scale
        if stepped: scheduler.step()                    # a skipped step is no step
        if stepped: master_weights.copy_to_model_()
        master_weights.zero_grad(); optimizer.zero_grad(); model.zero_grad()
        monitor.step(mean loss of the window)

    A skipped step leaves the parameters, the optimizer state and the schedule bit for bit
    as they were (the optimizer is not called at all).

    **Host synchronisation.** Exactly one read per optimizer step, on the last micro-batch:
    with a scaler, :meth:`LossScaler.step`'s read of its found-inf flag, the spike flag and
    the scale (a single device-to-host copy); without one, a single read of the combined
    skip flag (two flags in one copy when a guard is present). The other micro-batches
    read nothing. The components keep their own documented behaviour beyond that: on the
    CPU, :class:`ZClip` and :class:`AutoClip` read their flag (free there), a
    :class:`~finite.monitor.Monitor` reads its statistics every ``sync_every`` steps, and
    a skipped overflow makes the scaler count inf/NaN per parameter.

    **Accumulation.** Each micro-batch's loss is divided by ``N`` before the backward
    pass, so that ``N`` micro-batches of a mean loss give the gradient of one batch ``N``
    times as large. Micro-batches that are not the last return ``stepped=False`` and
    ``skip_reason=None``: nothing was skipped, the window is not complete yet. With
    ``master_weights`` the half-precision gradients of every micro-batch are added into
    float32 master gradients at once, so the sum is never rounded to 8 or 11 bits.

    Parameters
    ----------
    model : torch.nn.Module
        The model (its gradients are zeroed after each step; it is not saved by
        :meth:`state_dict`: save ``model.state_dict()`` beside it).
    optimizer : torch.optim.Optimizer
        Built over ``model.parameters()``, or over ``master_weights.parameters()``.
    scaler : LossScaler, optional
        Dynamic loss scaling for float16.
    clip : float or ZClip or AutoClip or AGC, optional
        A float clips the total 2-norm of the unscaled gradients to it (fused with the
        unscaling when there is a scaler); a clipper from :mod:`finite.clipping` is called
        on the optimizer's parameters (with their module names for :class:`AGC` when the
        optimizer holds the model's parameters).
    guard : SpikeGuard, optional
        Skips steps whose window loss (or pre-clip gradient norm, ``metric="grad_norm"``)
        spikes.
    monitor : Monitor, optional
        ``monitor.step(loss)`` ends each optimizer step with the window's mean loss.
    master_weights : MasterWeights, optional
        float32 master weights; ``optimizer`` must hold its :meth:`~MasterWeights.parameters`.
    accumulation_steps : int, default 1
        Micro-batches per optimizer step (>= 1).
    scheduler : optional
        A learning-rate scheduler (anything with ``step()``), advanced only when the
        optimizer stepped.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``clip`` is negative or NaN, ``accumulation_steps < 1``, or the optimizer does
        not hold the master weights.

    Examples
    --------
    >>> model = torch.nn.Linear(4, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> step = StableStep(model, optimizer, clip=1.0)
    >>> result = step(model(torch.randn(8, 4)).square().mean())
    >>> result.stepped, result.skip_reason
    (True, None)

    References
    ----------
    P. Micikevicius et al., "Mixed Precision Training", ICLR 2018 (loss scaling, float32
    master weights). R. Pascanu, T. Mikolov, Y. Bengio, "On the difficulty of training
    recurrent neural networks", ICML 2013 (gradient-norm clipping). Team OLMo, "2 OLMo 2
    Furious", arXiv:2501.00656, 2024 (skipping loss spikes).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        scaler: LossScaler | None = None,
        clip: float | ZClip | AutoClip | AGC | None = None,
        guard: SpikeGuard | None = None,
        monitor: Monitor | None = None,
        master_weights: MasterWeights | None = None,
        accumulation_steps: int = 1,
        scheduler: Any = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (hasattr(optimizer, "param_groups") and callable(getattr(optimizer, "step", None))):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        _require_instance(scaler, LossScaler, "scaler", "a finite.LossScaler")
        _require_instance(guard, SpikeGuard, "guard", "a finite.SpikeGuard")
        _require_instance(monitor, Monitor, "monitor", "a finite.Monitor")
        _require_instance(master_weights, MasterWeights, "master_weights", "finite.MasterWeights")
        if clip is not None and not isinstance(clip, _CLIPPERS):
            # int/float listed too: mypy does not count them as numbers.Real.
            if isinstance(clip, bool) or not isinstance(clip, (int, float, numbers.Real)):
                raise TypeError(
                    "clip must be a float, a ZClip, an AutoClip, an AGC or None, "
                    f"got {type(clip).__name__}"
                )
            clip = check_max(clip, "clip")
        if isinstance(accumulation_steps, bool) or not isinstance(
            accumulation_steps, (int, numbers.Integral)
        ):
            raise TypeError(
                f"accumulation_steps must be an int, got {type(accumulation_steps).__name__}"
            )
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1; got {accumulation_steps}")
        if scheduler is not None and not callable(getattr(scheduler, "step", None)):
            raise TypeError(f"scheduler must have a step() method, got {type(scheduler).__name__}")
        if master_weights is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if not all(id(p) in held for p in master_weights.parameters()):
                raise ValueError(
                    "optimizer must be built over master_weights.parameters(): some master "
                    "weights are not among its parameters"
                )
        if monitor is not None and monitor.scaler is not scaler:
            # A monitor that does not know the scaler reads scaled gradient norms and
            # counts a step the scaler skipped as one the optimizer took.
            raise ValueError(
                "monitor must be built with the same scaler as the step "
                "(finite.Monitor(model, scaler=scaler)); its scaler is "
                f"{type(monitor.scaler).__name__ if monitor.scaler is not None else None}, "
                f"the step's is {type(scaler).__name__ if scaler is not None else None}"
            )
        self._model = model
        self._optimizer = optimizer
        self._scaler = scaler
        self._clip = clip
        self._guard = guard
        self._monitor = monitor
        self._master_weights = master_weights
        self._accumulation_steps = int(accumulation_steps)
        self._scheduler = scheduler
        # Host counters: all known without waiting for the device.
        self._micro_batch = 0  # micro-batches of the current window seen so far
        self._window_loss: torch.Tensor | None = None
        self._window_scale: torch.Tensor | None = None
        self._iterations = 0  # completed windows
        self._optimizer_steps = 0
        self._skipped_steps = 0

    # ----------------------------------------------------------------- configuration
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    @property
    def accumulation_steps(self) -> int:
        return self._accumulation_steps

    @property
    def iterations(self) -> int:
        """Completed accumulation windows (optimizer steps taken or skipped)."""
        return self._iterations

    @property
    def optimizer_steps(self) -> int:
        """Windows in which the optimizer stepped."""
        return self._optimizer_steps

    @property
    def skipped_steps(self) -> int:
        """Windows in which the step was skipped (inf/NaN or spike)."""
        return self._skipped_steps

    # ----------------------------------------------------------------- the step
    def __call__(self, loss: torch.Tensor) -> StepResult:
        """Run the backward pass for ``loss`` and, on the last micro-batch of the window,
        the rest of the step.

        Parameters
        ----------
        loss : Tensor
            This micro-batch's loss: a floating-point tensor holding one value, attached to
            the autograd graph.

        Returns
        -------
        StepResult

        Raises
        ------
        TypeError
            If ``loss`` is not a floating-point tensor.
        ValueError
            If ``loss`` holds more than one value.
        """
        require_float_tensor(loss, "loss")
        if loss.numel() != 1:
            raise ValueError(f"loss must hold one value, got shape {tuple(loss.shape)}")
        n = self._accumulation_steps
        micro_loss = loss / n if n > 1 else loss
        if self._scaler is not None:
            self._scaler.scale(micro_loss).backward()
            if self._micro_batch == 0:
                scale = self._scaler.scale_tensor
                self._window_scale = None if scale is None else scale.detach().clone()
        else:
            micro_loss.backward()
        if self._master_weights is not None:
            self._master_weights.accumulate_grads_()
        detached = micro_loss.detach().reshape(()).float()
        self._window_loss = detached if self._window_loss is None else self._window_loss + detached
        self._micro_batch += 1
        if self._micro_batch < n:
            return StepResult(
                False, None, loss.detach().reshape(()), None, None, self._window_scale
            )
        window_loss, scale = self._window_loss, self._window_scale
        self._micro_batch, self._window_loss, self._window_scale = 0, None, None
        return self._finish(window_loss, scale)

    def _parameters(self) -> list[torch.Tensor]:
        return [p for group in self._optimizer.param_groups for p in group["params"]]

    def _clipper_input(self) -> Any:
        """The optimizer's parameters, named by module path for AGC where possible."""
        params = self._parameters()
        if isinstance(self._clip, AGC) and self._master_weights is None:
            names = {id(p): name for name, p in self._model.named_parameters()}
            if all(id(p) in names for p in params):
                return [(names[id(p)], p) for p in params]
        return params

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self._parameters() if p.grad is not None]

    def _unscale_and_clip(
        self,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(pre-clip norm, clipped, non-finite flag); the flag is None with a scaler,
        which keeps its own."""
        scaler, clip = self._scaler, self._clip
        norm: torch.Tensor | None = None
        clipped: torch.Tensor | None = None
        if isinstance(clip, float):
            if scaler is not None:
                norm = scaler.unscale_(self._optimizer, clip_norm=clip)
            else:
                norm = clip_grad_norm_(self._parameters(), clip)
            assert norm is not None
            clipped = norm.isfinite() & (clip_coefficient(norm, clip) < 1)
        elif clip is not None:
            if scaler is not None:
                scaler.unscale_(self._optimizer)
            if isinstance(clip, AGC):
                # AGC judges unit-wise ratios; the global norm is measured before it clips.
                norm = total_norm(self._grads())
            result = clip(self._clipper_input())
            norm = result.norm if norm is None else norm
            clipped = result.clipped
        else:
            needs_norm = scaler is None or (
                self._guard is not None and self._guard.config.metric == "grad_norm"
            )
            if scaler is not None and needs_norm:
                scaler.unscale_(self._optimizer)
            if needs_norm:
                norm = total_norm(self._grads())
        nonfinite = None if scaler is not None else ~norm.isfinite()  # type: ignore[union-attr]
        return norm, clipped, nonfinite

    def _finish(self, window_loss: torch.Tensor, scale: torch.Tensor | None) -> StepResult:
        norm, clipped, nonfinite = self._unscale_and_clip()
        spike: torch.Tensor | None = None
        if self._guard is not None:
            if self._guard.config.metric == "grad_norm":
                assert norm is not None
                spike = self._guard(norm)
            else:
                spike = self._guard(window_loss)
        if self._scaler is not None:
            vetoed_before = self._scaler.vetoed_steps
            stepped = self._scaler.step(self._optimizer, veto=spike, veto_reason="spike")
            reason = None
            if not stepped:
                reason = "spike" if self._scaler.vetoed_steps > vetoed_before else "nonfinite"
            self._scaler.update()
        else:
            assert nonfinite is not None
            # A non-finite loss with finite gradients (e.g. an inf that did not reach any
            # parameter) is still a broken step.
            nonfinite = nonfinite | ~window_loss.isfinite().to(nonfinite.device)
            if spike is None:
                bad_values, spiked = bool(nonfinite), False  # the one host read
            else:
                flags = torch.stack((nonfinite, spike.to(nonfinite.device)))
                bad_values, spiked = (bool(v) for v in flags.tolist())  # the one host read
            stepped = not (bad_values or spiked)
            reason = "nonfinite" if bad_values else "spike" if spiked else None
            if stepped:
                self._optimizer.step()
        if stepped and self._scheduler is not None:
            self._scheduler.step()
        if self._master_weights is not None:
            if stepped:
                self._master_weights.copy_to_model_()
            self._master_weights.zero_grad()
        self._optimizer.zero_grad(set_to_none=True)
        self._model.zero_grad(set_to_none=True)
        if self._monitor is not None:
            self._monitor.step(window_loss)
        self._iterations += 1
        self._optimizer_steps += stepped
        self._skipped_steps += not stepped
        return StepResult(stepped, reason, window_loss, norm, clipped, scale)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The state of every component and the step counters.

        Holds ``optimizer``, ``scaler``, ``clipper`` (ZClip/AutoClip; AGC has no state),
        ``guard``, ``scheduler``, ``master_weights`` and ``monitor`` (None where absent),
        and ``counters``. The model is not included: save ``model.state_dict()`` beside it.
        As with ``Optimizer.state_dict``, tensors may be references: save the result
        (``torch.save``) or deep-copy it before training on.

        Raises
        ------
        RuntimeError
            Inside an accumulation window (the summed gradients would be lost).
        """
        self._require_window_boundary("state_dict")

        def of(component: Any) -> Any:
            return None if component is None else component.state_dict()

        clipper = self._clip if isinstance(self._clip, (ZClip, AutoClip)) else None
        return {
            "version": _STATE_VERSION,
            "counters": {
                "iterations": self._iterations,
                "optimizer_steps": self._optimizer_steps,
                "skipped_steps": self._skipped_steps,
            },
            "optimizer": self._optimizer.state_dict(),
            "scaler": of(self._scaler),
            "clipper": of(clipper),
            "guard": of(self._guard),
            "scheduler": of(self._scheduler),
            "master_weights": of(self._master_weights),
            "monitor": of(self._monitor),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore every component from :meth:`state_dict`.

        The model is not restored (load its own state dict); with ``master_weights`` the
        loaded masters are copied into the model's half-precision weights.

        Raises
        ------
        TypeError
            If ``state_dict`` is not a mapping.
        ValueError
            If it is not from :meth:`state_dict`, or it holds a component this object has
            not (or lacks one it has).
        RuntimeError
            Inside an accumulation window.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        if state_dict.get("version") != _STATE_VERSION or "counters" not in state_dict:
            raise ValueError(
                "state_dict must come from StableStep.state_dict() "
                f"(version {_STATE_VERSION}); got keys {sorted(state_dict)}"
            )
        self._require_window_boundary("load_state_dict")
        clipper = self._clip if isinstance(self._clip, (ZClip, AutoClip)) else None
        components = {
            "scaler": self._scaler,
            "clipper": clipper,
            "guard": self._guard,
            "scheduler": self._scheduler,
            "master_weights": self._master_weights,
            "monitor": self._monitor,
        }
        for key, component in components.items():
            saved = state_dict.get(key)
            if (saved is None) != (component is None):
                has = "has" if component is not None else "has no"
                raise ValueError(
                    f"state_dict[{key!r}] is {'missing' if saved is None else 'present'} but "
                    f"this StableStep {has} {key}"
                )
        counters = state_dict["counters"]
        for key in ("iterations", "optimizer_steps", "skipped_steps"):
            value = counters.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state_dict['counters'][{key!r}] must be an int >= 0: {value!r}")
        self._optimizer.load_state_dict(state_dict["optimizer"])
        for key, component in components.items():
            if component is not None:
                component.load_state_dict(state_dict[key])
        if self._master_weights is not None:
            self._master_weights.copy_to_model_()
        self._iterations = counters["iterations"]
        self._optimizer_steps = counters["optimizer_steps"]
        self._skipped_steps = counters["skipped_steps"]

    def _require_window_boundary(self, method: str) -> None:
        if self._micro_batch:
            raise RuntimeError(
                f"{method}() was called after {self._micro_batch} of "
                f"{self._accumulation_steps} micro-batches; call it after the last one"
            )

    def __repr__(self) -> str:
        parts = [f"accumulation_steps={self._accumulation_steps}"]
        for name in ("scaler", "clip", "guard", "monitor", "master_weights", "scheduler"):
            value = getattr(self, f"_{name}")
            if value is not None:
                parts.append(
                    f"{name}={value if isinstance(value, float) else type(value).__name__}"
                )
        return f"StableStep({', '.join(parts)})"
