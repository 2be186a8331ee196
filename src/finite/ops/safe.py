"""``sqrt``, ``log`` and division with finite gradients where the naive ones blow up.

``torch.sqrt`` has gradient inf at 0 (NaN after a ``0 * inf`` in the chain rule),
``torch.log`` gives -inf at 0 and NaN below, ``a / b`` gives inf or NaN at ``b = 0``.
Each function here clamps its argument at a documented, dtype-derived threshold and
gives the clamped region a zero gradient, so a finite input always yields a finite value
and a finite gradient. float16/bfloat16 inputs are computed in float32 and rounded once;
float64 stays float64.
"""

from __future__ import annotations

import math

import torch

from finite._checks import compute_dtype, require_float_tensor

__all__ = ["safe_div", "safe_log", "safe_sqrt"]


def _threshold(value: object, dtype: torch.dtype, name: str) -> float:
    """``value`` as a float that is a positive normal number of ``dtype``, else raise.

    Below the smallest normal number a reciprocal can overflow, and the value itself may
    round to 0 in ``dtype``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive finite float, got {type(value).__name__}")
    info = torch.finfo(dtype)
    if not (math.isfinite(value) and info.tiny <= value <= info.max):
        raise ValueError(
            f"{name} must be a finite number in [{info.tiny:g}, {info.max:g}] (the positive "
            f"normal range of {dtype}), got {value!r}"
        )
    return float(value)


# --------------------------------------------------------------------------------------
# safe_sqrt
# --------------------------------------------------------------------------------------


class _SafeSqrt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        xc = x.to(compute_dtype(x.dtype))
        root = xc.clamp(min=0).sqrt()
        ctx.save_for_backward(xc, root)
        return root.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        xc, root = ctx.saved_tensors
        # x > 0 has sqrt(x) >= sqrt(smallest subnormal), so 1 / (2 sqrt(x)) is finite
        # (at most 2**73 in float32). NaN fails `x <= 0` and keeps its NaN.
        slope = torch.where(xc <= 0, 0, 0.5 / root)
        return (grad.to(xc.dtype) * slope).to(grad.dtype)


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(x, 0))`` with a finite gradient everywhere.

    Parameters
    ----------
    x : Tensor
        Real floating-point tensor.

    Returns
    -------
    Tensor
        In the dtype of ``x``; 0 for ``x <= 0``, NaN for NaN, inf for +inf.

    Notes
    -----
    The gradient is ``1 / (2 sqrt(x))`` for ``x > 0``, which is finite for every
    positive float (the smallest subnormal gives about 1.3e22 in float32), 0 at
    ``+inf``, and 0 for ``x <= 0``: the function is constant below 0, and at exactly 0 we
    take the left derivative rather than the infinite right one, so that a ``sqrt`` of a
    quantity that reaches 0 (a distance, a variance) never puts inf or NaN into the
    gradients. NaN gives NaN.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating-point tensor.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import safe_sqrt
    >>> x = torch.tensor([-1.0, 0.0, 4.0], requires_grad=True)
    >>> safe_sqrt(x).sum().backward()
    >>> x.grad  # torch.sqrt: [nan, inf, 0.25]
    tensor([0.0000, 0.0000, 0.2500])
    """
    return _SafeSqrt.apply(require_float_tensor(x, "x"))


# --------------------------------------------------------------------------------------
# safe_log
# --------------------------------------------------------------------------------------


class _SafeLog(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, floor):
        xc = x.to(compute_dtype(x.dtype))
        ctx.floor = floor
        ctx.save_for_backward(xc)
        return xc.clamp(min=floor).log().to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (xc,) = ctx.saved_tensors
        # 1/x <= 1/floor, finite since floor is a normal number. NaN fails `x < floor`.
        slope = torch.where(xc < ctx.floor, 0, 1 / xc)
        return (grad.to(xc.dtype) * slope).to(grad.dtype), None


def safe_log(x: torch.Tensor, *, floor: float | None = None) -> torch.Tensor:
    """``log(max(x, floor))``: finite for every finite ``x``, with a finite gradient.

    Parameters
    ----------
    x : Tensor
        Real floating-point tensor.
    floor : float, optional
        Smallest argument passed to ``log``. Defaults to the smallest positive normal
        number of ``x``'s dtype, ``torch.finfo(x.dtype).tiny`` (1.2e-38 for float32 and
        bfloat16, 6.1e-5 for float16, 2.2e-308 for float64): the largest floor that
        changes no value a normal-range computation produces, and the smallest one whose
        reciprocal (the gradient) is still finite.

    Returns
    -------
    Tensor
        In the dtype of ``x``; ``log(floor)`` for ``x <= floor`` (-87.3 for float32 with
        the default), inf for +inf, NaN for NaN.

    Notes
    -----
    The gradient is ``1 / x`` for ``x >= floor`` (at most ``1 / floor``, finite) and 0
    below the floor, where the result is constant; at ``x == floor`` it is ``1 /
    floor``, as :func:`torch.clamp` passes the gradient at its bound. NaN gives NaN.

    Raises
    ------
    TypeError
        If ``x`` is not a real floating-point tensor or ``floor`` is not a real number.
    ValueError
        If ``floor`` is not in the positive normal range of ``x``'s dtype (a smaller
        floor would round to a subnormal or 0 and its reciprocal could overflow).

    Examples
    --------
    >>> import torch
    >>> from finite.ops import safe_log
    >>> safe_log(torch.tensor([0.0, 1.0]))  # torch.log: [-inf, 0]
    tensor([-87.3365,   0.0000])
    >>> safe_log(torch.tensor([1e-9, 0.5]), floor=1e-6)
    tensor([-13.8155,  -0.6931])
    """
    x = require_float_tensor(x, "x")
    floor = torch.finfo(x.dtype).tiny if floor is None else _threshold(floor, x.dtype, "floor")
    return _SafeLog.apply(x, floor)


# --------------------------------------------------------------------------------------
# safe_div
# --------------------------------------------------------------------------------------


def _result_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """:func:`torch.result_type` for two float tensors, in a form torch.compile traces: a
    0-d tensor does not promote a tensor with dimensions."""
    if a.ndim == 0 and b.ndim > 0:
        return b.dtype
    if b.ndim == 0 and a.ndim > 0:
        return a.dtype
    return torch.promote_types(a.dtype, b.dtype)


def _default_eps(dtype: torch.dtype) -> float:
    """``sqrt(finfo.tiny)``: 2**-63 for float32 and bfloat16, 2**-7 for float16.

    With ``|b| >= eps`` the gradient factor ``1 / b**2`` is at most ``1 / tiny``, which is
    finite in every IEEE format, so ``d(a/b)/db = -a / b**2`` stays finite for ``|a|``
    up to about 4.
    """
    return math.sqrt(torch.finfo(dtype).tiny)


class _SafeDiv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, eps, dtype):
        cdtype = compute_dtype(dtype)
        ac, bc = a.to(cdtype), b.to(cdtype)
        clamped = bc.abs() < eps
        # copysign keeps the sign bit of b, so -0.0 becomes -eps (a / -0.0 is -inf too).
        denominator = torch.where(clamped, torch.full_like(bc, eps).copysign(bc), bc)
        quotient = ac / denominator
        ctx.a_meta, ctx.b_meta = (a.shape, a.dtype), (b.shape, b.dtype)
        ctx.save_for_backward(denominator, quotient, clamped)
        return quotient.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        denominator, quotient, clamped = ctx.saved_tensors
        g = grad.to(denominator.dtype)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            shape, dtype = ctx.a_meta
            grad_a = (g / denominator).sum_to_size(shape).to(dtype)
        if ctx.needs_input_grad[1]:
            shape, dtype = ctx.b_meta
            # -a / b**2 as -(a / b) / b: b**2 could overflow or underflow on its own.
            slope = torch.where(clamped, 0, -quotient / denominator)
            grad_b = (g * slope).sum_to_size(shape).to(dtype)
        return grad_a, grad_b, None, None


def safe_div(a: torch.Tensor, b: torch.Tensor, *, eps: float | None = None) -> torch.Tensor:
    """``a / b`` with ``|b|`` kept at least ``eps``, and finite gradients for both.

    Where ``|b| < eps`` the denominator is replaced by ``eps`` with the sign of ``b``
    (its sign bit, so ``+0.0 -> +eps`` and ``-0.0 -> -eps``). Elsewhere the result is
    exactly ``a / b``.

    Parameters
    ----------
    a, b : Tensor
        Real floating-point tensors that broadcast together. The result has PyTorch's
        promoted dtype (:func:`torch.result_type`: float16 with bfloat16 gives float32,
        anything with float64 gives float64).
    eps : float, optional
        Smallest denominator magnitude. Defaults to ``sqrt(torch.finfo(dtype).tiny)`` of
        the result dtype: 2**-63 (1.1e-19) for float32 and bfloat16, 2**-7 for float16,
        2**-511 for float64 -- the smallest value for which the gradient with respect to
        ``b``, ``-a / b**2``, cannot overflow for ``|a| <= 1``.

    Returns
    -------
    Tensor
        The quotient, in the promoted dtype. NaN in either argument gives NaN;
        ``b = +-inf`` gives ``+-0`` for finite ``a``.

    Notes
    -----
    Gradients: ``1 / b'`` for ``a`` and ``-a / b'**2`` for ``b`` where ``|b| >= eps``
    (``b'`` the denominator used), 0 for ``b`` where it was clamped (the result does not
    depend on ``b`` there). Both are summed over broadcast dimensions and returned in
    the dtype of their argument.

    Raises
    ------
    TypeError
        If ``a`` or ``b`` is not a real floating-point tensor, or ``eps`` is not a real
        number.
    ValueError
        If ``a`` and ``b`` do not broadcast, or ``eps`` is not in the positive normal
        range of the result dtype.

    Examples
    --------
    >>> import torch
    >>> from finite.ops import safe_div
    >>> safe_div(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 2.0]))  # a / b: [nan, 0.5]
    tensor([0.0000, 0.5000])
    >>> safe_div(torch.tensor(1.0), torch.tensor(0.0), eps=1e-2)
    tensor(100.)
    """
    a = require_float_tensor(a, "a")
    b = require_float_tensor(b, "b")
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(
            f"a of shape {tuple(a.shape)} and b of shape {tuple(b.shape)} do not broadcast"
        ) from None
    dtype = _result_dtype(a, b)
    eps = _default_eps(dtype) if eps is None else _threshold(eps, dtype, "eps")
    return _SafeDiv.apply(a, b, eps, dtype)
