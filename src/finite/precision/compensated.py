"""Compensated updates for float16/bfloat16 weights, around any PyTorch optimizer.

A bfloat16 weight keeps 8 significant bits: adding an update smaller than half the gap to
its neighbour (half an ulp) rounds back to the old weight, and training silently stalls
("swamping"). :func:`compensated` wraps an optimizer so that its updates survive:

* ``"kahan"`` keeps, per weight, a compensation term ``c`` in the weight's dtype that
  holds what rounding removed. ``w + c`` carries about 16 significant bits and the
  optimizer updates that sum (Kahan summation applied to the weight).
* ``"stochastic"`` rounds the updated weight up or down at random with probabilities
  that make it exact on average, so small updates add up in expectation.

References
----------
.. [1] P. Zamirai, J. Zhang, C. R. Aberger, C. De Sa, "Revisiting BFloat16 Training",
   arXiv:2010.06192, 2020.
.. [2] W. Kahan, "Further remarks on reducing truncation errors", Communications of the
   ACM 8(1), 1965.
.. [3] S. Gupta, A. Agrawal, K. Gopalakrishnan, P. Narayanan, "Deep Learning with Limited
   Numerical Precision", ICML 2015.
.. [4] B. Warner, optimi: Kahan summation in low-precision optimizers,
   https://optimi.benjaminwarner.dev/kahan_summation
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from finite._checks import require_choice
from finite.precision._float32_view import Float32View
from finite.precision._grouping import LOW_PRECISION, group_by_device_and_dtype

__all__ = ["CompensatedOptimizer", "compensated"]

_METHODS = ("kahan", "stochastic")
_SUPPORTED = (*LOW_PRECISION, torch.float32, torch.float64)


def compensated(
    optimizer: torch.optim.Optimizer,
    method: str = "kahan",
    generator: torch.Generator | None = None,
    *,
    meter_every: int = 1,
) -> CompensatedOptimizer:
    """Wrap ``optimizer`` so that updates to its float16/bfloat16 weights are not rounded away.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Any optimizer, built over the model's (low-precision) parameters. Its
        float32/float64 parameters are passed through untouched.
    method : {"kahan", "stochastic"}
        How the updated high-precision weight is stored back in the weight's dtype; see
        :class:`CompensatedOptimizer`.
    generator : torch.Generator, optional
        Random source of ``"stochastic"`` (on the parameters' device), for reproducible
        runs; ignored by ``"kahan"``.
    meter_every : int, default 1
        Run the swamping meter at the first step and every ``meter_every`` steps after
        (steps 1, 1 + n, 1 + 2n, ...); ``0`` never runs it. The meter is about half of
        the time the wrapper adds to a step and does not change the updates.

    Returns
    -------
    CompensatedOptimizer
        A ``torch.optim.Optimizer`` sharing ``optimizer``'s parameter groups and state:
        LR schedulers, ``zero_grad`` and checkpointing work as with ``optimizer``.

    Raises
    ------
    TypeError
        If ``optimizer`` is not a ``torch.optim.Optimizer``, ``generator`` is not a
        ``torch.Generator``, ``meter_every`` is not an int, or a parameter is not
        float16/bfloat16/float32/float64.
    ValueError
        If ``method`` is unknown, ``meter_every`` is negative, or ``optimizer`` is
        already compensated.

    Examples
    --------
    >>> model = torch.nn.Linear(4, 2).to(torch.bfloat16)
    >>> opt = compensated(torch.optim.AdamW(model.parameters(), lr=1e-4), "kahan")
    >>> model(torch.randn(8, 4, dtype=torch.bfloat16)).square().mean().backward()
    >>> opt.step()
    >>> opt.zero_grad()
    >>> 0.0 <= opt.stats()["lost_update_fraction"] <= 1.0
    True
    """
    return CompensatedOptimizer(optimizer, method, generator, meter_every=meter_every)


class CompensatedOptimizer(torch.optim.Optimizer):
    """An optimizer whose float16/bfloat16 weights are updated as if in float32.

    Each :meth:`step`, for every float16/bfloat16 parameter ``p`` with a gradient::

        w32 = float32(p) + float32(c)        # c = 0 for "stochastic"
        run the wrapped optimizer on w32 with gradient float32(p.grad)
        u = w32_new - w32                    # the update it made
        "kahan":      p = round_nearest(w32_new); c = round_nearest(w32_new - float32(p))
        "stochastic": p = round_stochastic(w32_new)

    The wrapped optimizer therefore keeps its state (``exp_avg``, momentum, ...) in
    float32, created on the first step; a state it already held is converted to float32
    when wrapped. float32 state costs memory (see ``docs/precision.md``) but a bfloat16
    ``exp_avg_sq`` with ``beta2 = 0.999`` would itself swamp: its per-step change, 0.1%,
    is below half a bfloat16 ulp (0.2-0.4%).

    The swamping meter counts the elements whose update plain round-to-nearest would have
    discarded: ``u != 0`` and ``round_nearest(p + u) == p``. It runs at step 1 and every
    ``meter_every`` steps after (every step by default; ``meter_every=0``: never). The
    count stays on the device; :meth:`stats` reads it and says at which step it was taken.

    Memory: ``"kahan"`` keeps one buffer of the weight's dtype per parameter. While the
    wrapped optimizer runs, each stepped element also has a float32 weight and gradient
    (8 bytes) beside that optimizer's own temporaries; counting lost updates and rounding
    back take at most 12 bytes (kahan) or 13 (stochastic) per element. Each (device,
    dtype) group is processed as one flat buffer, so the added kernels do not grow with
    the number of parameters.

    A ``closure`` is evaluated once, before the step, on the low-precision model (like
    SGD or Adam do); optimizers that re-evaluate it inside their step (LBFGS) are not
    supported. The step runs eagerly under ``torch.compile`` (it swaps ``.data``).
    """

    # Set through __setstate__ in __init__ (see there); declared for type checkers.
    optimizer: torch.optim.Optimizer
    method: str
    generator: torch.Generator | None
    meter_every: int
    _compensation: dict[torch.Tensor, torch.Tensor]
    _steps: int
    _lost_counts: list[torch.Tensor]
    _measured_elements: int
    _measured_at_step: int | None

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        method: str = "kahan",
        generator: torch.Generator | None = None,
        *,
        meter_every: int = 1,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, CompensatedOptimizer):
            raise ValueError("optimizer is already compensated; wrap the inner optimizer once")
        require_choice(method, _METHODS, "method")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        if isinstance(meter_every, bool) or not isinstance(meter_every, int):
            raise TypeError(f"meter_every must be an int, got {type(meter_every).__name__}")
        if meter_every < 0:
            raise ValueError(f"meter_every must be >= 0 (0 disables the meter), got {meter_every}")
        _check_param_dtypes(optimizer.param_groups)
        if not any(p.dtype in LOW_PRECISION for g in optimizer.param_groups for p in g["params"]):
            warnings.warn(
                "compensated(): the optimizer has no float16/bfloat16 parameters, so "
                "compensation changes nothing",
                stacklevel=3,
            )
        # Optimizer.__init__ would build param groups of its own; the wrapper shares the
        # inner optimizer's and only needs the hook tables that __setstate__ creates.
        super().__setstate__(
            {
                "optimizer": optimizer,
                "method": method,
                "generator": generator,
                "meter_every": meter_every,
                "_compensation": {},
                "_steps": 0,
                "_lost_counts": [],
                "_measured_elements": 0,
                "_measured_at_step": None,
            }
        )
        if optimizer.state:
            self._load_inner_state_dict(optimizer.state_dict())

    # The wrapper has no parameter groups or state of its own: schedulers, gradient
    # scalers and checkpoint code that read or assign these reach the inner optimizer.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __repr__(self) -> str:
        return (
            f"CompensatedOptimizer(method={self.method!r}, meter_every={self.meter_every}, "
            f"optimizer={self.optimizer!r})"
        )

    @torch.compiler.disable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run one step of the wrapped optimizer on high-precision weights.

        Returns the closure's loss, or ``None``. No host sync.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [
            p
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None and p.dtype in LOW_PRECISION
        ]
        with torch.no_grad():
            views = []
            for group in group_by_device_and_dtype(params):
                members = [params[k] for k in group]
                kahan = self.method == "kahan"
                compensation = [self._compensation_of(p) for p in members] if kahan else None
                views.append(Float32View(members, compensation))
            try:
                for view in views:
                    view.swap_in()
                self.optimizer.step()
            finally:
                for view in views:
                    view.swap_out()
            self._steps += 1
            if self.meter_every and (self._steps - 1) % self.meter_every == 0:
                self._lost_counts = [view.count_lost_updates() for view in views]
                self._measured_elements = sum(p.numel() for p in params)
                self._measured_at_step = self._steps
            for view in views:
                if self.method == "kahan":
                    view.write_back_kahan()
                else:
                    view.write_back_stochastic(self.generator)
        return loss

    def _compensation_of(self, p: torch.Tensor) -> torch.Tensor:
        if p not in self._compensation:
            self._compensation[p] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return self._compensation[p]

    def stats(self) -> dict[str, float | int | None]:
        """What the swamping meter saw when it last ran; reading it synchronises.

        Returns
        -------
        dict
            ``"lost_update_fraction"``: at step ``"measured_at_step"``, the fraction of
            the elements of the stepped float16/bfloat16 parameters whose update
            (``u != 0``) plain round-to-nearest would have discarded
            (``round_nearest(w + u) == w``). NaN before the meter first ran or when no
            such parameter had a gradient then.
            ``"measured_at_step"``: the step (counting :meth:`step` calls from 1) at which
            the meter last ran; ``None`` if it has not run.
            ``"step"``: the number of :meth:`step` calls so far.
        """
        fraction = math.nan
        if self._measured_elements > 0:
            lost = sum(int(count.item()) for count in self._lost_counts)
            fraction = lost / self._measured_elements
        return {
            "lost_update_fraction": fraction,
            "measured_at_step": self._measured_at_step,
            "step": self._steps,
        }

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, as the wrapped optimizer's ``zero_grad`` does."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer (dtypes checked first)."""
        _check_param_dtypes([param_group])
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict, plus a ``"compensated"`` entry.

        ``"compensated"`` holds the method, the compensation buffers (``"kahan"``; keyed
        by the parameter index used in ``"state"``), the generator's state (when a
        generator was given) and the step count, which the meter's schedule follows. A
        plain optimizer of the same type can load the result and ignores the extra entry.
        Tensors are references, as in PyTorch.
        """
        state_dict = self.optimizer.state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        state_dict["compensated"] = {
            "method": self.method,
            "compensation": {
                i: self._compensation[p] for i, p in enumerate(params) if p in self._compensation
            },
            "generator_state": None if self.generator is None else self.generator.get_state(),
            "step": self._steps,
        }
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, or from a plain optimizer.

        Optimizer state is loaded in float32. Without a ``"compensated"`` entry (a plain
        optimizer's state dict) the compensation restarts from zero, which is exact for
        weights that were stored without one, and the step count restarts from 0. The
        generator's state is restored when both the saved dict and this optimizer have a
        generator. The meter's last reading is not saved: :meth:`stats` has none until
        the meter runs again.

        Raises
        ------
        ValueError
            If the saved method differs, a compensation buffer's index or shape does not
            match a float16/bfloat16 parameter, or the saved step count is not an int
            >= 0 (all checked before anything is loaded).
        """
        saved = state_dict.get("compensated")
        params = [p for group in self.param_groups for p in group["params"]]
        buffers = {} if saved is None else self._check_saved_compensation(saved, params)
        steps = 0 if saved is None else _saved_step_count(saved)
        inner = {k: v for k, v in state_dict.items() if k != "compensated"}
        self._load_inner_state_dict(inner)
        with torch.no_grad():
            self._compensation = {
                params[i]: buffer.to(params[i].dtype).clone() for i, buffer in buffers.items()
            }
        generator_state = None if saved is None else saved["generator_state"]
        if generator_state is not None and self.generator is not None:
            self.generator.set_state(generator_state)
        self._steps = steps
        self._lost_counts, self._measured_elements, self._measured_at_step = [], 0, None

    def _check_saved_compensation(
        self, saved: Mapping[str, Any], params: list[torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        if saved["method"] != self.method:
            raise ValueError(
                f"state_dict was saved with method={saved['method']!r}, "
                f"this optimizer uses method={self.method!r}"
            )
        buffers = dict(saved["compensation"])
        for i, buffer in buffers.items():
            if not 0 <= i < len(params) or params[i].dtype not in LOW_PRECISION:
                raise ValueError(
                    f"state_dict has a compensation buffer for parameter {i}, which is not "
                    "a float16/bfloat16 parameter of this optimizer"
                )
            if buffer.shape != params[i].shape:
                raise ValueError(
                    f"compensation buffer {i} has shape {tuple(buffer.shape)}, "
                    f"but parameter {i} has shape {tuple(params[i].shape)}"
                )
        return buffers

    def _load_inner_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        # Optimizer.load_state_dict casts floating-point state to each parameter's dtype;
        # presenting float32 parameters makes it keep (or convert to) float32 state.
        params = [
            p for group in self.param_groups for p in group["params"] if p.dtype in LOW_PRECISION
        ]
        originals = [p.data for p in params]
        try:
            for p in params:
                p.data = torch.empty_like(p, dtype=torch.float32)
            self.optimizer.load_state_dict(dict(state_dict))
        finally:
            for p, original in zip(params, originals, strict=True):
                p.data = original


def _saved_step_count(saved: Mapping[str, Any]) -> int:
    steps = saved.get("step", 0)  # absent from state dicts saved before it was kept
    if isinstance(steps, torch.Tensor) and steps.numel() == 1:
        steps = steps.item()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"state_dict['compensated']['step'] must be an int >= 0, got {steps!r}")
    return steps


def _check_param_dtypes(param_groups: list[dict[str, Any]]) -> None:
    for g, group in enumerate(param_groups):
        params = group["params"]
        for i, p in enumerate([params] if isinstance(params, torch.Tensor) else params):
            if not isinstance(p, torch.Tensor) or p.dtype not in _SUPPORTED:
                kind = p.dtype if isinstance(p, torch.Tensor) else type(p).__name__
                raise TypeError(
                    f"param_groups[{g}]['params'][{i}] is {kind}; compensated optimizers "
                    "take float16/bfloat16 parameters (float32/float64 are passed through)"
                )
