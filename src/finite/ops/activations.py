"""Saturating activations whose values and gradients stay accurate in both tails.

PyTorch's versions are stable in value but lose the small tail: ``torch.sigmoid``
underflows to 0 about 15 units before float32 does, its gradient ``y * (1 - y)`` is
exactly 0 once ``y`` rounds to 1, and ``softplus`` jumps to ``x`` at ``beta * x > 20``.
Here every tail is a quotient or sum of accurate terms. float16/bfloat16 inputs are
computed in float32 and rounded once; float64 stays float64. ``softcap`` computes
float32 input in float64, and carries the quotient ``x / cap`` of float64 input as an
unevaluated sum of two float64 numbers (Dekker's exact product), because the rounding
of ``x / cap`` is what limits PyTorch's ``cap * tanh(x / cap)``.

References
----------
.. [1] M. Mächler, "Accurately Computing log(1 - exp(-|a|)) Assessed by the Rmpfr
   package", CRAN vignette, 2012.
.. [2] Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size",
   arXiv:2408.00118, 2024 (logit soft-capping).
.. [3] T. J. Dekker, "A floating-point technique for extending the available
   precision", Numerische Mathematik 18, 1971 (exact products by splitting).
"""

from __future__ import annotations

import math

import torch

from finite._checks import compute_dtype, require_float_tensor

__all__ = ["log_sigmoid", "sigmoid", "softcap", "softplus"]


def _positive_finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive finite float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(-x))`` without overflow, accurate in both tails.

    With ``e = exp(-|x|) <= 1``: ``1 / (1 + e)`` for ``x >= 0`` and ``e / (1 + e)`` below,
    so the small tail is a quotient of accurate terms (down to subnormals) rather than
    the rounding residue ``1 - sigmoid(|x|)``.
    """
    small = torch.exp(-x.abs())
    return torch.where(x >= 0, 1, small) / (1 + small)


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


class _Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, beta):
        xc = x.to(compute_dtype(x.dtype))
        # Exact identity: log(1 + e^t) = max(t, 0) + log1p(exp(-|t|)). Dividing by beta
        # before adding max(x, 0) means beta * x never overflows.
        small = torch.exp(-beta * xc.abs())
        # log1p(e) = e * (1 - e / 2 + ...): below eps / 4 it is e to within 1/8 ulp, and
        # taking e avoids log1p's misrounding of subnormal arguments (Mächler's region
        # x < log(eps): -37.4 in float64, -17.3 in float32).
        tail = torch.where(small < torch.finfo(xc.dtype).eps / 4, small, torch.log1p(small))
        if beta != 1.0:
            tail = tail / beta
        ctx.beta = beta
        ctx.save_for_backward(x)
        return (xc.clamp_min(0) + tail).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        xc = x.to(compute_dtype(x.dtype))
        scaled = xc if ctx.beta == 1.0 else ctx.beta * xc
        return (grad.to(xc.dtype) * _sigmoid(scaled)).to(x.dtype), None


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
    return -_Softplus.apply(-require_float_tensor(x, "x"), 1.0)


def softplus(x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """``log(1 + exp(beta * x)) / beta`` with no threshold and therefore no jump.

    Evaluated as ``max(x, 0) + log1p(exp(-beta * |x|)) / beta`` (with ``beta = 1`` it is
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


# Veltkamp's splitting constant for float64: 2**27 + 1.
_SPLITTER = 134217729.0
# Below this |x / cap|, tanh(u) / u = 1 - u**2 / 3 + 2 u**4 / 15 to within 2**-62.
_SERIES_BOUND = 2.0**-10


def _split(a: torch.Tensor | float) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Veltkamp's split of float64 ``a`` into two halves of at most 26 bits, ``a = hi +
    lo`` exactly (NaN where ``|a| > 2**996``, whose products are not needed)."""
    scaled = a * _SPLITTER
    hi = scaled - (scaled - a)
    return hi, a - hi


def _quotient(x: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x / cap`` as ``hi + lo`` (float64), to about 2**-104 relative.

    ``hi`` is the rounded quotient; the remainder ``x - hi * cap`` is exact (Dekker's
    product of ``hi`` and the two halves of ``cap``, then a subtraction without error,
    ``hi * cap`` being within an ulp of ``x``), and ``lo = remainder / cap``. ``lo`` is
    0 where ``hi`` is not finite or too large to split (|x / cap| > 2**996, where tanh
    and its slope no longer depend on it).
    """
    hi = x / cap
    cap_hi, cap_lo = _split(cap)
    hi_hi, hi_lo = _split(hi)
    product = hi * cap
    product_error = ((hi_hi * cap_hi - product) + hi_hi * cap_lo + hi_lo * cap_hi) + (
        hi_lo * cap_lo
    )
    lo = ((x - product) - product_error) / cap
    return hi, lo.nan_to_num_(0.0, 0.0, 0.0)


def _softcap_wide(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)`` in place of a wide copy ``x`` (float64 for float32 input,
    float32 for float16/bfloat16): ``x / cap`` then errs by 2**-53 (2**-24), far below
    an ulp of the input dtype."""
    return x.div_(cap).tanh_().mul_(cap)


def _softcap_float64(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(hi + lo)`` with ``x / cap = hi + lo`` (:func:`_quotient`).

    ``tanh(hi + lo) = tanh(hi) + (1 - tanh(hi)**2) * lo`` to within ``lo**2``. For tiny
    ``|u|`` the result is ``x * tanh(u) / u`` by its series, which keeps every digit of
    a subnormal ``x`` (whose quotient ``x / cap`` is rounded to a subnormal spacing).
    """
    hi, lo = _quotient(x, cap)
    t = torch.tanh(hi)
    large = cap * (t + (1 - t * t) * lo)
    u2 = hi * hi
    small = x - x * (u2 * (1 / 3 - u2 * (2 / 15)))
    return torch.where(hi.abs() < _SERIES_BOUND, small, large)


def _softcap_slope(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``1 - tanh(x / cap)**2 = 4 e / (1 + e)**2`` with ``e = exp(-2 |x / cap|)``.

    ``1 - tanh**2`` cancels once tanh rounds to ±1; this form is a quotient of accurate
    terms. The argument of ``exp`` is large where the slope is small, so its rounding
    matters: float32 input is computed in float64 (``x / cap`` errs by 2**-53).

    float64 input: the slope at ``hi`` is ``4 e / s**2`` with ``s = 1 + e = s_hi + s_lo``
    (Fast2Sum, exact), and ``slope(hi + lo) = slope(hi) (1 - 2 tanh(hi) lo)``, so both
    corrections fold into one factor ``1 + c`` applied with one rounding: about four
    roundings in all, exp's included.
    """
    if x.dtype != torch.float64:
        # In place of the wide copy x: e = exp(-2 |x / cap|), then 4 e / (1 + e)**2.
        e = x.div_(cap).abs_().mul_(-2).exp_()
        s = e + 1
        return e.div_(s).div_(s).mul_(4)
    hi, lo = _quotient(x, cap)
    e = torch.exp(-2 * hi.abs())
    s_hi = 1 + e
    s_lo = (1 - s_hi) + e
    slope = 4 * (e / s_hi) / s_hi
    # tanh(|hi|) = (1 - e) / (1 + e); the terms of c are below 2**-50, so their own
    # rounding errors do not show.
    correction = -2 * ((1 - e) / s_hi * lo * hi.sign() + s_lo / s_hi)
    return slope.addcmul_(slope, correction)


def _softcap_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float32 and float64 input, float32 for float16/bfloat16."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


class _Softcap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cap):
        ctx.cap = cap
        ctx.save_for_backward(x)
        if x.dtype == torch.float64:
            return _softcap_float64(x, cap)
        wide = x.to(_softcap_dtype(x.dtype), copy=True)
        return _softcap_wide(wide, cap).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        dtype = _softcap_dtype(x.dtype)
        slope = _softcap_slope(x.to(dtype, copy=True), ctx.cap)
        return slope.mul_(grad).to(x.dtype), None


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
    The rounding of ``x / cap`` is what limits ``cap * tanh(x / cap)``: it costs up to
    half an ulp of the value and, since the slope decays like ``exp(-2 |x| / cap)``,
    about ``|x| / cap`` ulp of the gradient (PyTorch's gradient is 0 there). So float16
    and bfloat16 input is computed in float32 and float32 input in float64, where the
    quotient's error is far below an ulp of the result, and rounded once (within about
    half an ulp, value and gradient). float64 input carries the quotient as ``hi + lo``
    (Dekker's exact product gives the remainder ``x - hi * cap``): the value is within
    2 ulp and the gradient within 3 ulp, at the cost of about 20 more elementwise
    float64 operations. For ``|x / cap| < 2**-10`` the value is ``x * tanh(u) / u`` by
    its series, which keeps subnormal ``x`` exact (``x / cap`` would round it).

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
