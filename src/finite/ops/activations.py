"""Saturating activations whose values and gradients stay accurate in both tails.

PyTorch's versions are stable in value but lose the small tail: ``torch.sigmoid``
underflows to 0 about 15 units before float32 does, its gradient ``y * (1 - y)`` is
exactly 0 once ``y`` rounds to 1, and ``softplus`` jumps to ``x`` at ``beta * x > 20``.
Here every tail is a quotient or sum of accurate terms. float16/bfloat16 inputs are
computed in float32 and rounded once; float64 stays float64.

References
----------
.. [1] M. Mächler, "Accurately Computing log(1 - exp(-|a|)) Assessed by the Rmpfr
   package", CRAN vignette, 2012.
.. [2] Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size",
   arXiv:2408.00118, 2024 (logit soft-capping).
"""

from __future__ import annotations

import math

import torch

from finite._checks import compute_dtype, require_float_tensor
from finite.ops.logspace import _sigmoid, _Softplus, log1pexp

__all__ = ["log_sigmoid", "sigmoid", "softcap", "softplus"]


def _positive_finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive finite float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


def _sigmoid_slope(x: torch.Tensor) -> torch.Tensor:
    """``sigmoid(x) * sigmoid(-x) = e / (1 + e)**2`` with ``e = exp(-|x|)``.

    The autograd formula ``y * (1 - y)`` is exactly 0 once ``y`` rounds to 1 (float32,
    x > 17); this form is a quotient of accurate terms in both tails.
    """
    small = torch.exp(-x.abs())
    return small / ((1 + small) * (1 + small))


class _Sigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _sigmoid(x.to(compute_dtype(x.dtype))).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        xc = x.to(compute_dtype(x.dtype))
        return (grad.to(xc.dtype) * _sigmoid_slope(xc)).to(x.dtype)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """The logistic function ``1 / (1 + exp(-x))``, accurate in both tails.

    With ``e = exp(-|x|)``: ``1 / (1 + e)`` for ``x >= 0`` and ``e / (1 + e)`` for
    ``x < 0``, so no ``exp`` overflows and the lower tail reaches float32's subnormals
    (``torch.sigmoid(-90.)`` is 0, the exact value 8.2e-40 is representable).

    Parameters
    ----------
    x : Tensor
        Real floating-point tensor.

    Returns
    -------
    Tensor
        In the dtype of ``x``. The gradient ``sigmoid(x) * sigmoid(-x)`` is computed as
        ``e / (1 + e)**2``: it is ~exp(-|x|) in the tails where PyTorch's ``y * (1 - y)``
        is exactly 0 (float32, ``x > 17``).

    Raises
    ------
    TypeError
        If ``x`` is not a real floating-point tensor.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import sigmoid
    >>> sigmoid(torch.tensor([-90.0, 0.0, 90.0]))
    tensor([8.1940e-40, 5.0000e-01, 1.0000e+00])
    """
    return _Sigmoid.apply(require_float_tensor(x, "x"))


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``log(sigmoid(x)) = -log1pexp(-x)``, accurate for every ``x``.

    Parameters
    ----------
    x : Tensor
        Real floating-point tensor.

    Returns
    -------
    Tensor
        In the dtype of ``x``; ``x`` itself far below 0, ``-exp(-x)`` far above, -inf at
        -inf, 0 at +inf. The gradient is ``sigmoid(-x)``, accurate in both tails.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating-point tensor.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import log_sigmoid
    >>> log_sigmoid(torch.tensor([-100.0, 0.0, 100.0]))
    tensor([-1.0000e+02, -6.9315e-01, -3.7835e-44])
    """
    return -log1pexp(-require_float_tensor(x, "x"))


def softplus(x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """``log(1 + exp(beta * x)) / beta`` with no threshold and therefore no jump.

    Evaluated as ``max(x, 0) + log1p(exp(-beta * |x|)) / beta`` (see
    :func:`~finite.ops.log1pexp`). :func:`torch.nn.functional.softplus` switches to
    ``x`` at ``beta * x > 20``; just above the switch its float64 value is short by
    ``exp(-20) / beta ≈ 2.1e-9``, a jump of about 5e5 ulp. Here ``beta * x`` is never
    formed for the large part, so it cannot overflow either.

    Parameters
    ----------
    x : Tensor
        Real floating-point tensor.
    beta : float, default 1.0
        Positive finite sharpness.

    Returns
    -------
    Tensor
        In the dtype of ``x``. The gradient is ``sigmoid(beta * x)``, accurate in both
        tails.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating-point tensor or ``beta`` is not a number.
    ValueError
        If ``beta`` is not positive and finite.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import softplus
    >>> x = torch.tensor(20.5, dtype=torch.float64)  # log(1 + e^x) = x + 1.25e-9
    >>> bool(softplus(x) > x), bool(torch.nn.functional.softplus(x) > x)
    (True, False)

    References
    ----------
    Mächler (2012).
    """
    x = require_float_tensor(x, "x")
    return _Softplus.apply(x, _positive_finite(beta, "beta"))


class _Softcap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cap):
        ctx.cap = cap
        ctx.save_for_backward(x)
        xc = x.to(compute_dtype(x.dtype))
        return (cap * torch.tanh(xc / cap)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        xc = x.to(compute_dtype(x.dtype))
        # 1 - tanh(u)**2 cancels once tanh(u) rounds to ±1; it equals 4 sigmoid'(2u).
        slope = 4 * _sigmoid_slope(xc / (ctx.cap / 2))
        return (grad.to(xc.dtype) * slope).to(x.dtype), None


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Soft-cap ``x`` to ``(-cap, cap)``: ``cap * tanh(x / cap)``.

    Gemma 2 caps attention logits at 50 and final logits at 30 this way, so that no
    logit grows without bound while small ones pass through almost unchanged
    (``softcap(x, cap) ≈ x - x**3 / (3 cap**2)``).

    Parameters
    ----------
    x : Tensor
        Real floating-point tensor.
    cap : float
        Positive finite bound.

    Returns
    -------
    Tensor
        In the dtype of ``x``; ``±cap`` at ``±inf``. The gradient
        ``1 - tanh(x / cap)**2`` is computed as ``4 e / (1 + e)**2`` with
        ``e = exp(-2 |x| / cap)``, so it decays like ``4 exp(-2 |x| / cap)`` instead of
        becoming exactly 0 once ``tanh`` rounds to ±1.

    Notes
    -----
    The rounding of ``x / cap`` (none when ``cap`` is a power of two) sets the accuracy:
    the value is within about 2 ulp, as PyTorch's ``cap * tanh(x / cap)``, and the
    gradient within 4 ulp for ``|x| <= 2 cap``, its error growing like ``|x| / cap`` ulp
    beyond (PyTorch's is 0 there). Removing it would take a double-word quotient, several
    more elementwise passes over what is often the largest tensor of the model.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating-point tensor or ``cap`` is not a number.
    ValueError
        If ``cap`` is not positive and finite.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import softcap
    >>> softcap(torch.tensor([1.0, 100.0, -1e6]), cap=30.0)
    tensor([  0.9996,  29.9237, -30.0000])

    References
    ----------
    Gemma Team (2024), "Gemma 2: Improving Open Language Models at a Practical Size".
    """
    x = require_float_tensor(x, "x")
    return _Softcap.apply(x, _positive_finite(cap, "cap"))
