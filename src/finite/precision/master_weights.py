"""float32 master weights for a float16/bfloat16 model, with gradients summed in float32.

The model runs its forward and backward passes in half precision; the optimizer sees
float32 copies of the weights and float32 gradients, so neither the update nor the sum of
micro-batch gradients is rounded to 8 (bfloat16) or 11 (float16) significant bits.

References
----------
.. [1] P. Micikevicius et al., "Mixed Precision Training", ICLR 2018.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from finite._checks import require_choice, require_float_tensor
from finite.formats.rounding import stochastic_round
from finite.precision._grouping import LOW_PRECISION, group_by_device_and_dtype

__all__ = ["MasterWeights"]

_PASS_THROUGH = (torch.float32, torch.float64)
_ROUNDINGS = ("nearest", "stochastic")


class MasterWeights:
    """float32 master copies of a model's float16/bfloat16 parameters.

    One training iteration, with ``N >= 1`` micro-batches::

        for micro_batch in batches:                  # N times
            scaler.scale(loss(micro_batch)).backward()   # half-precision grads on the model
            mw.accumulate_grads_()      # master.grad += float32(model.grad); model.grad = None
        scaler.step(opt)                # unscales the float32 master grads, may skip
        scaler.update()
        mw.copy_to_model_()             # model weight = round(master weight)
        mw.zero_grad()

    ``opt`` is any optimizer built over :meth:`parameters`. The scaler (``LossScaler`` or
    ``torch.amp.GradScaler``) sees float32 gradients, so it can unscale them; with
    bfloat16 no scaler is needed (call ``opt.step()``).

    float16 and bfloat16 parameters get a float32 master (a new leaf tensor with the
    parameter's ``requires_grad``). float32 and float64 parameters are passed through:
    the "master" *is* the model parameter, its gradient is left in place and nothing is
    copied, so a model that keeps a few layers in float32 works unchanged.

    Parameters
    ----------
    params : Tensor or iterable of Tensor
        The model's parameters, e.g. ``model.parameters()``. Leaf tensors, each once.

    Raises
    ------
    TypeError
        If a parameter is not a tensor, or its dtype is not float16, bfloat16, float32
        or float64.
    ValueError
        If ``params`` is empty, holds the same tensor twice, or holds a non-leaf tensor.

    Examples
    --------
    >>> model = torch.nn.Linear(4, 2).to(torch.bfloat16)
    >>> mw = MasterWeights(model.parameters())
    >>> opt = torch.optim.AdamW(mw.parameters(), lr=1e-3)
    >>> model(torch.randn(8, 4, dtype=torch.bfloat16)).square().mean().backward()
    >>> mw.accumulate_grads_()
    >>> opt.step()
    >>> mw.copy_to_model_()
    >>> mw.zero_grad()

    References
    ----------
    .. [1] P. Micikevicius et al., "Mixed Precision Training", ICLR 2018.
    """

    def __init__(self, params: torch.Tensor | Iterable[torch.Tensor]) -> None:
        model_params = [params] if isinstance(params, torch.Tensor) else list(params)
        if not model_params:
            raise ValueError("params is empty: MasterWeights needs at least one parameter")
        seen: set[int] = set()
        for i, p in enumerate(model_params):
            require_float_tensor(p, f"params[{i}]")
            if p.dtype not in LOW_PRECISION + _PASS_THROUGH:
                raise TypeError(
                    f"params[{i}] has dtype {p.dtype}; MasterWeights supports float16 and "
                    "bfloat16 (given float32 masters) and float32/float64 (passed through)"
                )
            if not p.is_leaf:
                raise ValueError(f"params[{i}] is not a leaf tensor, so it never gets a .grad")
            if id(p) in seen:
                raise ValueError(f"params[{i}] appears more than once in params")
            seen.add(id(p))
        self._model_params = model_params
        self._low_precision = [i for i, p in enumerate(model_params) if p.dtype in LOW_PRECISION]
        self._masters: list[torch.Tensor] = list(model_params)
        for i in self._low_precision:
            p = model_params[i]
            self._masters[i] = torch.nn.Parameter(
                p.detach().to(torch.float32), requires_grad=p.requires_grad
            )

    def parameters(self) -> list[torch.Tensor]:
        """The tensors to give the optimizer, in the order of ``params``.

        float32 masters for float16/bfloat16 parameters, the parameter itself otherwise;
        ``dict(zip(model_params, mw.parameters()))`` maps a model parameter to its master
        (e.g. to build parameter groups).
        """
        return list(self._masters)

    @torch.no_grad()
    def accumulate_grads_(self) -> None:
        """Add the model's half-precision gradients into the float32 master gradients.

        The first call after :meth:`zero_grad` creates the master gradients; later calls
        (one per micro-batch) add to them in float32. The model's half-precision
        gradients are then set to ``None``, freeing their memory before the next
        backward pass. Parameters without a gradient are skipped. No host sync.
        """
        grads = {
            i: grad for i in self._low_precision if (grad := self._model_params[i].grad) is not None
        }
        summed = [i for i in grads if self._masters[i].grad is not None]
        for i, grad in grads.items():
            if self._masters[i].grad is None:
                self._masters[i].grad = grad.to(torch.float32)
        model_grads = [grads[i] for i in summed]
        master_grads = [self._masters[i].grad for i in summed]
        for group in group_by_device_and_dtype(model_grads):
            torch._foreach_add_(
                [master_grads[k] for k in group],  # type: ignore[misc]
                [model_grads[k] for k in group],  # type: ignore[misc]
            )
        for i in grads:
            self._model_params[i].grad = None

    @torch.no_grad()
    def copy_to_model_(
        self, rounding: str = "nearest", generator: torch.Generator | None = None
    ) -> None:
        """Write the master weights into the model's float16/bfloat16 parameters.

        Parameters
        ----------
        rounding : {"nearest", "stochastic"}
            ``"nearest"`` gives exactly ``master.to(dtype)``; copying masters that did not
            change since the last nearest copy (e.g. after a skipped step) leaves the
            model bit-for-bit unchanged. ``"stochastic"`` rounds up or down with
            probability given by the distance to each neighbour (unbiased); it draws new
            random bits on every call, so call it only after steps that were taken
            (``LossScaler.step`` returns whether it stepped).
        generator : torch.Generator, optional
            Random source for ``"stochastic"`` (on the parameters' device), for
            reproducible runs; ignored for ``"nearest"``.

        Raises
        ------
        ValueError
            If ``rounding`` is not one of the two names.
        TypeError
            If ``generator`` is not a ``torch.Generator``.
        """
        require_choice(rounding, _ROUNDINGS, "rounding")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        models = [self._model_params[i] for i in self._low_precision]
        masters = [self._masters[i] for i in self._low_precision]
        for group in group_by_device_and_dtype(models):
            targets = [models[k] for k in group]
            sources = [masters[k] for k in group]
            if rounding == "stochastic":
                # One flat pass instead of a handful of kernels per parameter.
                flat = _flatten_dense_tensors(sources)
                rounded = stochastic_round(flat, targets[0].dtype, generator)
                sources = _unflatten_dense_tensors(rounded, sources)
            torch._foreach_copy_(targets, sources)

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the master gradients and any model gradients left behind.

        ``set_to_none=True`` (the default, as in PyTorch) drops the gradients and frees
        their memory; ``False`` fills them with zeros.
        """
        tensors = self._masters + [self._model_params[i] for i in self._low_precision]
        grads = [t.grad for t in tensors if t.grad is not None]
        if set_to_none:
            for t in tensors:
                t.grad = None
            return
        for group in group_by_device_and_dtype(grads):
            torch._foreach_zero_([grads[k] for k in group])

    def state_dict(self) -> dict[str, Any]:
        """The master weights, keyed by their index in ``params``.

        As with ``torch.optim.Optimizer.state_dict``, the tensors are references, not
        copies: save them (``torch.save``) or clone them before training on. Passed-through
        float32/float64 parameters are not included; they are in the model's state dict.
        """
        return {"master_weights": {i: self._masters[i] for i in self._low_precision}}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Copy saved master weights into the masters (the optimizer keeps its references).

        Everything is validated before anything is copied. The model's weights are not
        touched: restore the model's own state dict too, or call :meth:`copy_to_model_`.

        Raises
        ------
        ValueError
            If ``state_dict`` lacks ``"master_weights"``, its indices differ from this
            object's float16/bfloat16 parameters, or a tensor has the wrong shape.
        TypeError
            If a saved master is not a real floating-point tensor.
        """
        if "master_weights" not in state_dict:
            raise ValueError("state_dict has no 'master_weights' entry")
        saved = state_dict["master_weights"]
        if set(saved) != set(self._low_precision):
            raise ValueError(
                "state_dict holds master weights for parameter indices "
                f"{sorted(saved)}, but these parameters need them: {self._low_precision}"
            )
        for i in self._low_precision:
            tensor = require_float_tensor(saved[i], f"state_dict['master_weights'][{i}]")
            if tensor.shape != self._masters[i].shape:
                raise ValueError(
                    f"state_dict['master_weights'][{i}] has shape {tuple(tensor.shape)}, "
                    f"but parameter {i} has shape {tuple(self._masters[i].shape)}"
                )
        for i in self._low_precision:
            self._masters[i].copy_(saved[i])
