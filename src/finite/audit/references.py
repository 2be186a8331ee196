"""Reference values and gradients, from the mathematical definitions, in high precision.

Nothing here calls the code under audit. Transcendental functions are evaluated with
mpmath at 50 significant digits; sums, means, variances and sums of squares exactly, in
rational arithmetic (:class:`fractions.Fraction`), which needs no precision argument.
Inputs arrive as the exact values of the rounded tensors (Python floats from float64,
which holds every value of every narrower format exactly).

Every formula is written without cancellation that 50 digits could not absorb, e.g.
``sigmoid'(x) = e / (1 + e)**2`` with ``e = exp(-|x|)`` rather than ``s (1 - s)``,
``1 - p_t`` as the sum of the other probabilities, and ``log(sum(exp(x - m)))`` as
``log(k) + log1p(r / k)`` with ``k`` the count of maximal entries and ``r`` the rest:
a result like ``-exp(-120)`` keeps all its digits although ``1 + exp(-120)`` would
round to 1 at 50 digits.

Each function takes ``(args, cotangent, fmt)``: the batch's arguments and cotangent as
(nested) lists of exact numbers and the audited format, and returns ``(values,
gradients)``: flat lists of the op's outputs and of the cotangent-weighted gradient with
respect to each differentiable argument, concatenated in argument order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import TypeAlias

import mpmath
import torch
from mpmath import mpf

from finite.audit.domains import SOFTCAP, SOFTPLUS_BETA
from finite.formats import FloatFormat

__all__ = ["DIGITS", "evaluate", "to_hi_lo"]

DIGITS = 50
"""Decimal digits of the mpmath working precision."""

Number: TypeAlias = "mpf | Fraction | float | int"
Reference = Callable[[Sequence, Sequence, FloatFormat], tuple[list[Number], list[Number]]]

_mp = mpmath.mp


def evaluate(
    reference: Reference, args: Sequence[torch.Tensor], cotangent: torch.Tensor, fmt: FloatFormat
) -> tuple[list[Number], list[Number]]:
    """Run ``reference`` on the exact values of ``args`` and ``cotangent`` at 50 digits."""
    exact = [
        a.to(torch.float64).tolist() if a.dtype.is_floating_point else a.tolist() for a in args
    ]
    with _mp.workdps(DIGITS):
        return reference(exact, cotangent.to(torch.float64).tolist(), fmt)


def to_hi_lo(values: Sequence[Number]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact values as float64 pairs ``(hi, lo)``: ``hi`` the rounded value, ``lo`` the
    rounded remainder (0 for infinities and NaN)."""
    pairs = [_split(v) for v in values]
    hi = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    lo = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    return hi, lo


def _split(value: Number) -> tuple[float, float]:
    if isinstance(value, Fraction):
        try:
            hi = float(value)
        except OverflowError:
            return (math.inf if value > 0 else -math.inf), 0.0
        return hi, float(value - Fraction(hi))
    if isinstance(value, mpf):
        with _mp.workdps(DIGITS):
            hi = float(value)
            return hi, (float(value - hi) if math.isfinite(hi) else 0.0)
    return float(value), 0.0


# --------------------------------------------------------------------------------------
# Elementwise functions: (value, derivative) of one exact argument
# --------------------------------------------------------------------------------------


def _logistic(x: mpf) -> mpf:
    """``1 / (1 + exp(-x))``."""
    return 1 / (1 + _mp.exp(-x))


def _logistic_slope(x: mpf) -> mpf:
    """``sigmoid'(x) = e / (1 + e)**2``, ``e = exp(-|x|)``: no ``1 - s`` to cancel."""
    e = _mp.exp(-abs(x))
    return e / (1 + e) ** 2


def _log1mexp(x: mpf) -> mpf:
    """``log(1 - exp(x))`` for ``x < 0``; below -log 2, ``log1p`` keeps ``-exp(x)``
    when it is beyond the 50 digits of ``1 - exp(x)``."""
    if x > -_mp.log(2):
        return _mp.log(-_mp.expm1(x))
    return _mp.log1p(-_mp.exp(x))


def _elementwise(value: Callable[[mpf], mpf], slope: Callable[[mpf], mpf]) -> Reference:
    def reference(args, cotangent, fmt):
        xs = [mpf(v) for v in args[0]]
        return [value(x) for x in xs], [c * slope(x) for x, c in zip(xs, cotangent, strict=True)]

    return reference


sigmoid = _elementwise(_logistic, _logistic_slope)
log_sigmoid = _elementwise(lambda x: -_mp.log1p(_mp.exp(-x)), lambda x: _logistic(-x))
log1pexp = _elementwise(lambda x: _mp.log1p(_mp.exp(x)), _logistic)
softplus = _elementwise(
    lambda x: _mp.log1p(_mp.exp(SOFTPLUS_BETA * x)) / SOFTPLUS_BETA,
    lambda x: _logistic(SOFTPLUS_BETA * x),
)
log1mexp = _elementwise(_log1mexp, lambda x: _mp.exp(x) / _mp.expm1(x))
softcap = _elementwise(
    lambda x: SOFTCAP * _mp.tanh(x / SOFTCAP), lambda x: _mp.sech(x / SOFTCAP) ** 2
)
safe_sqrt = _elementwise(_mp.sqrt, lambda x: 1 / (2 * _mp.sqrt(x)))


def safe_log(args, cotangent, fmt):
    """``log(max(x, floor))`` with the default floor, the smallest normal number; the
    derivative is ``1 / x`` from the floor up and 0 below it."""
    floor = mpf(fmt.min_normal)
    xs = [mpf(v) for v in args[0]]
    values = [_mp.log(max(x, floor)) for x in xs]
    return values, [c / x if x >= floor else mpf(0) for x, c in zip(xs, cotangent, strict=True)]


def safe_div(args, cotangent, fmt):
    """``a / b'`` with ``b'`` = ``b`` moved out to ``±sqrt(smallest normal)`` (the default
    clamp) when smaller; gradients ``1 / b'`` and ``-a / b'**2`` (0 where clamped)."""
    eps = _mp.sqrt(mpf(fmt.min_normal))
    values, grad_a, grad_b = [], [], []
    for a, b, c in zip(args[0], args[1], cotangent, strict=True):
        a, b = mpf(a), mpf(b)
        clamped = abs(b) < eps
        denominator = _mp.sign(b) * eps if clamped else b
        values.append(a / denominator)
        grad_a.append(c / denominator)
        grad_b.append(mpf(0) if clamped else -c * a / denominator**2)
    return values, grad_a + grad_b


def logaddexp(args, cotangent, fmt):
    """``max + log1p(exp(-|a - b|))``; gradients ``sigmoid(a - b)`` and ``sigmoid(b - a)``."""
    values, grad_a, grad_b = [], [], []
    for a, b, c in zip(args[0], args[1], cotangent, strict=True):
        a, b = mpf(a), mpf(b)
        values.append(max(a, b) + _mp.log1p(_mp.exp(-abs(a - b))))
        grad_a.append(c * _logistic(a - b))
        grad_b.append(c * _logistic(b - a))
    return values, grad_a + grad_b


def logsubexp(args, cotangent, fmt):
    """``a + log1mexp(b - a)`` for ``a > b``; gradients ``1 / (1 - exp(b - a))`` and
    ``-exp(b - a) / (1 - exp(b - a))``, with ``1 - exp(d)`` as ``-expm1(d)``."""
    values, grad_a, grad_b = [], [], []
    for a, b, c in zip(args[0], args[1], cotangent, strict=True):
        a, b = mpf(a), mpf(b)
        gap = b - a
        values.append(a + _log1mexp(gap))
        grad_a.append(-c / _mp.expm1(gap))
        grad_b.append(c * _mp.exp(gap) / _mp.expm1(gap))
    return values, grad_a + grad_b


def binary_cross_entropy_with_logits(args, cotangent, fmt):
    """``y log(1 + exp(-x)) + (1 - y) log(1 + exp(x))``; gradient
    ``(1 - y) sigmoid(x) - y sigmoid(-x)`` (= ``sigmoid(x) - y``, without cancelling)."""
    values, grads = [], []
    for x, y, c in zip(args[0], args[1], cotangent, strict=True):
        x, y = mpf(x), mpf(y)
        values.append(y * _mp.log1p(_mp.exp(-x)) + (1 - y) * _mp.log1p(_mp.exp(x)))
        grads.append(c * ((1 - y) * _logistic(x) - y * _logistic(-x)))
    return values, grads


# --------------------------------------------------------------------------------------
# Row functions (reductions over the last dimension)
# --------------------------------------------------------------------------------------


class _LogPartition:
    """``log(sum(exp(row)))`` as ``m + log(k) + log1p(r / k)``: ``m`` the max, ``k`` how
    many entries equal it, ``r`` the sum of ``exp(x - m)`` over the others."""

    def __init__(self, row: Sequence[float]) -> None:
        self.row = [mpf(v) for v in row]
        self.max = max(self.row)
        top = sum(1 for x in self.row if x == self.max)
        rest = _mp.fsum(_mp.exp(x - self.max) for x in self.row if x < self.max)
        # log(sum(exp(x - m))), accurate even when rest is far below 10**-50.
        self.log_sum = _mp.log(top) + _mp.log1p(rest / top)

    @property
    def value(self) -> mpf:
        return self.max + self.log_sum

    def log_prob(self, i: int) -> mpf:
        return (self.row[i] - self.max) - self.log_sum

    def prob(self, i: int) -> mpf:
        return _mp.exp(self.log_prob(i))


def logsumexp(args, cotangent, fmt):
    """Value ``log(sum(exp(x)))``, gradient ``c * softmax(x)``."""
    values, grads = [], []
    for row, c in zip(args[0], cotangent, strict=True):
        part = _LogPartition(row)
        values.append(part.value)
        grads.extend(c * part.prob(i) for i in range(len(row)))
    return values, grads


def logmeanexp(args, cotangent, fmt):
    """Value ``log(sum(exp(x))) - log(n)``, gradient ``c * softmax(x)``."""
    values, grads = [], []
    for row, c in zip(args[0], cotangent, strict=True):
        part = _LogPartition(row)
        values.append(part.value - _mp.log(len(row)))
        grads.extend(c * part.prob(i) for i in range(len(row)))
    return values, grads


def softmax(args, cotangent, fmt):
    """Values ``p_i``, gradient ``p_i (c_i - sum_j c_j p_j)``."""
    values, grads = [], []
    for row, c in zip(args[0], cotangent, strict=True):
        part = _LogPartition(row)
        probs = [part.prob(i) for i in range(len(row))]
        weighted = _mp.fsum(cj * pj for cj, pj in zip(c, probs, strict=True))
        values.extend(probs)
        grads.extend(p * (ci - weighted) for p, ci in zip(probs, c, strict=True))
    return values, grads


def log_softmax(args, cotangent, fmt):
    """Values ``x_i - logsumexp(x)``, gradient ``c_i - p_i sum_j c_j``."""
    values, grads = [], []
    for row, c in zip(args[0], cotangent, strict=True):
        part = _LogPartition(row)
        total = _mp.fsum(c)
        values.extend(part.log_prob(i) for i in range(len(row)))
        grads.extend(ci - part.prob(i) * total for i, ci in enumerate(c))
    return values, grads


def cross_entropy(args, cotangent, fmt):
    """Value ``-log p_t``; gradient ``p_i`` off the target and ``-(sum of the other
    p_j)`` (= ``p_t - 1``) at it, times the row's cotangent."""
    values, grads = [], []
    for row, target, c in zip(args[0], args[1], cotangent, strict=True):
        part = _LogPartition(row)
        probs = [part.prob(i) for i in range(len(row))]
        values.append(-part.log_prob(target))
        others = _mp.fsum(p for i, p in enumerate(probs) if i != target)
        grads.extend(c * (-others if i == target else p) for i, p in enumerate(probs))
    return values, grads


def compensated_sum(args, cotangent, fmt):
    """The exact sum; gradient ``c`` for every entry."""
    values, grads = [], []
    for row, c in zip(args[0], cotangent, strict=True):
        values.append(sum(map(Fraction, row), Fraction(0)))
        grads.extend(Fraction(c) for _ in row)
    return values, grads


def mean_var(args, cotangent, fmt):
    """Values ``(means..., variances...)`` (population variance, exact); gradient
    ``c_mean / n + c_var * 2 (x_i - mean) / n``."""
    rows = args[0]
    c_mean, c_var = cotangent[: len(rows)], cotangent[len(rows) :]
    means, variances, grads = [], [], []
    for row, cm, cv in zip(rows, c_mean, c_var, strict=True):
        xs = [Fraction(v) for v in row]
        n = len(xs)
        mean = sum(xs, Fraction(0)) / n
        means.append(mean)
        variances.append(sum(((x - mean) ** 2 for x in xs), Fraction(0)) / n)
        grads.extend(Fraction(cm) / n + Fraction(cv) * 2 * (x - mean) / n for x in xs)
    return means + variances, grads


def l2_norm(args, cotangent, fmt):
    """Value ``sqrt(sum(x**2))`` (the sum exact), gradient ``c * x_i / norm``."""
    values, grads = [], []
    for row, c in zip(args[0], cotangent, strict=True):
        squares = sum((Fraction(v) ** 2 for v in row), Fraction(0))
        norm = _mp.sqrt(mpf(squares.numerator) / squares.denominator)
        values.append(norm)
        grads.extend(c * mpf(v) / norm for v in row)
    return values, grads
