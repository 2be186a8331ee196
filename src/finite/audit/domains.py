"""Seeded inputs for the audit: the hard cases of each op, in each dtype.

Every generator returns :class:`Batch` es whose floating-point arguments are already
rounded to the audited dtype (the reference is evaluated on those exact values). They
cover several scales (1, 1e2, 1e4), ties and near-ties, huge spreads, subnormals, the
neighbourhood of every switch point an implementation is likely to have (``-log 2`` for
``log1mexp``, the softplus thresholds of each dtype, the saturation of ``sigmoid``), and
``-inf`` entries where the op defines a finite result for them. Inputs are finite
otherwise; the specified behaviour at ``±inf`` is checked by :mod:`finite.audit.specials`.

Each generator takes ``(dtype, samples, generator)``; ``samples`` is the approximate
number of input elements. The same seed gives the same inputs on every machine: values
are drawn in float64 on the CPU from a :class:`torch.Generator`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from finite.formats import FloatFormat, get_format

__all__ = ["Batch"]

_SCALES = (1.0, 1e2, 1e4)
_ROW_LENGTHS = (2, 5, 32, 256)
# Cap of Gemma 2's final logits, a typical softcap.
SOFTCAP = 30.0
# A softplus sharpness other than 1, so that beta * x and the division by beta are audited.
SOFTPLUS_BETA = 2.0


@dataclass(frozen=True)
class Batch:
    """One call of an op under audit.

    Attributes
    ----------
    args : tuple of Tensor
        Positional arguments, floating-point ones in the audited dtype.
    cotangent : Tensor
        Gradient of a scalar loss with respect to the op's output (the ``grad_outputs``
        of the backward pass), exactly representable in the audited dtype.
    """

    args: tuple[torch.Tensor, ...]
    cotangent: torch.Tensor


# --------------------------------------------------------------------------------------
# Building blocks (float64 values, rounded at the end by _fit)
# --------------------------------------------------------------------------------------


def _parts(samples: int, count: int) -> list[int]:
    """``samples`` split into ``count`` near-equal parts that add up to it."""
    return [samples // count + (1 if i < samples % count else 0) for i in range(count)]


def _normal(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.randn(n, generator=gen, dtype=torch.float64)


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def _signs(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1


def _log_uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    """Magnitudes spread evenly over the decades from ``low`` to ``high``."""
    return torch.exp(_uniform(gen, n, math.log(low), math.log(high)))


def _scaled(gen: torch.Generator, n: int) -> torch.Tensor:
    """Standard normal values times 1, 1e2 and 1e4."""
    return torch.cat(
        [_normal(gen, n_part) * s for n_part, s in zip(_parts(n, 3), _SCALES, strict=True)]
    )


def _subnormals(gen: torch.Generator, n: int, fmt: FloatFormat) -> torch.Tensor:
    """Positive subnormal values of ``fmt``, spread over its subnormal binades."""
    return torch.exp2(_uniform(gen, n, 0.0, fmt.mantissa_bits)).floor() * fmt.min_subnormal


def _near(gen: torch.Generator, n: int, points: Sequence[float], fmt: FloatFormat) -> torch.Tensor:
    """Values within a few ULPs, and within a relative 1e-3, of each of ``points``."""
    dtype = fmt.torch_dtype
    per_point = max(n // (2 * len(points)), 1)
    values = []
    for point in points:
        center = torch.full((per_point,), point, dtype=torch.float64).to(dtype)
        steps = torch.randint(-8, 9, (per_point,), generator=gen)
        stepped = center.clone()
        for _ in range(8):
            # Step one ULP at a time towards +-inf, as many times as each entry asks.
            up = torch.nextafter(stepped, torch.full_like(stepped, math.inf))
            down = torch.nextafter(stepped, torch.full_like(stepped, -math.inf))
            stepped = torch.where(steps > 0, up, torch.where(steps < 0, down, stepped))
            steps = steps - steps.sign()
        values.append(stepped.to(torch.float64))
        values.append(point * (1 + 1e-3 * _uniform(gen, per_point, -1.0, 1.0)))
    return torch.cat(values)


def _fit(values: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """``values`` rounded to ``fmt``, finite ones kept finite (clamped to +-max first)."""
    finite = values.isfinite()
    clamped = torch.where(finite, values.clamp(-fmt.max, fmt.max), values)
    rounded = clamped.to(fmt.torch_dtype)
    # Rounding a value just below max can still give inf in round-to-nearest.
    return torch.where(finite & rounded.isinf(), torch.finfo(rounded.dtype).max, rounded)


def _saturation(fmt: FloatFormat) -> float:
    """Where exp(-x) underflows in ``fmt`` (~ -log(smallest subnormal)): past this the
    logistic family is constant to the last bit, so the domain stops a little beyond."""
    return -math.log(fmt.min_subnormal) + 5


def _switch_points(fmt: FloatFormat) -> list[float]:
    """Thresholds where log1pexp/softplus/sigmoid implementations change formula: 0,
    PyTorch's softplus threshold 20, and log(eps) of the dtype, of float32 (its compute
    dtype when narrower) and of float64, where exp(x) drops below an ULP of 1."""
    eps = {fmt.eps, get_format(torch.float32).eps, get_format(torch.float64).eps}
    logs = sorted({math.log(e) for e in eps} | {math.log(e / 4) for e in eps})
    return [0.0, 20.0, -20.0, *logs, *(-v for v in logs)]


def _elementwise(values: torch.Tensor, fmt: FloatFormat) -> list[Batch]:
    x = _fit(values, fmt)
    return [Batch((x,), torch.ones_like(x))]


def _real_line(dtype: torch.dtype, samples: int, gen: torch.Generator) -> torch.Tensor:
    """The whole real line for the logistic family: scales, switch points, subnormals of
    both signs and both tails up to where the functions saturate."""
    fmt = get_format(dtype)
    n_scaled, n_near, n_sub, n_tail = _parts(samples, 4)
    tail = _saturation(fmt)
    return torch.cat(
        [
            _scaled(gen, n_scaled),
            _near(gen, n_near, _switch_points(fmt), fmt),
            _subnormals(gen, n_sub, fmt) * _signs(gen, n_sub),
            _log_uniform(gen, n_tail, 1e-3, tail) * _signs(gen, n_tail),
        ]
    )


# --------------------------------------------------------------------------------------
# Elementwise ops
# --------------------------------------------------------------------------------------


def real_line(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[Batch]:
    """sigmoid, log_sigmoid, log1pexp: every real number that matters."""
    return _elementwise(_real_line(dtype, samples, gen), get_format(dtype))


def softplus_inputs(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[Batch]:
    """softplus with ``beta = SOFTPLUS_BETA``: the real line, switch points scaled by
    ``1 / beta`` so that ``beta * x`` lands on them."""
    fmt = get_format(dtype)
    line = _real_line(dtype, samples // 2, gen)
    switched = _near(gen, samples - samples // 2, _switch_points(fmt), fmt) / SOFTPLUS_BETA
    return _elementwise(torch.cat([line, switched]), fmt)


def log1mexp_inputs(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[Batch]:
    """``x < 0``: scales, Mächler's switch at -log 2, the cancelling region next to 0
    (down to the smallest subnormal) and the far tail where the result underflows."""
    fmt = get_format(dtype)
    n_scaled, n_switch, n_small, n_sub, n_tail = _parts(samples, 5)
    values = torch.cat(
        [
            -_scaled(gen, n_scaled).abs(),
            _near(gen, n_switch, [-math.log(2.0)], fmt),
            -_log_uniform(gen, n_small, fmt.min_normal, 1.0),
            -_subnormals(gen, n_sub, fmt),
            -_log_uniform(gen, n_tail, 1.0, _saturation(fmt)),
        ]
    )
    x = _fit(values, fmt)
    # Rounding can reach 0 (where the result is -inf); keep the domain strictly negative.
    x = torch.where(x == 0, -fmt.min_subnormal, x.to(torch.float64)).to(dtype)
    return [Batch((x,), torch.ones_like(x))]


def softcap_inputs(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[Batch]:
    """Scales, subnormals, and the bend of ``tanh`` around ``±cap`` and ``±2 cap``."""
    fmt = get_format(dtype)
    n_scaled, n_near, n_sub = _parts(samples, 3)
    points = [SOFTCAP * k for k in (-2, -1, 1, 2)]
    values = torch.cat(
        [
            _scaled(gen, n_scaled),
            _near(gen, n_near, points, fmt),
            _subnormals(gen, n_sub, fmt) * _signs(gen, n_sub),
        ]
    )
    return _elementwise(values, fmt)


def positive_inputs(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[Batch]:
    """safe_sqrt: ``x > 0`` over the whole range of the dtype, subnormals included.

    The clamped region (``x <= 0``) is a definition, not an accuracy question: it is in
    :mod:`finite.audit.specials`."""
    fmt = get_format(dtype)
    n_scaled, n_range, n_sub = _parts(samples, 3)
    values = torch.cat(
        [
            _scaled(gen, n_scaled).abs(),
            _log_uniform(gen, n_range, fmt.min_normal, fmt.max),
            _subnormals(gen, n_sub, fmt),
        ]
    )
    x = _fit(values, fmt)
    x = torch.where(x == 0, fmt.min_subnormal, x.to(torch.float64)).to(dtype)
    return [Batch((x,), torch.ones_like(x))]


def normal_positive_inputs(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[Batch]:
    """safe_log: ``x`` at or above its default floor (the smallest normal number)."""
    fmt = get_format(dtype)
    n_scaled, n_range, n_floor = _parts(samples, 3)
    values = torch.cat(
        [
            _scaled(gen, n_scaled).abs(),
            _log_uniform(gen, n_range, fmt.min_normal, fmt.max),
            fmt.min_normal * _uniform(gen, n_floor, 1.0, 4.0),
        ]
    )
    x = _fit(values, fmt).to(torch.float64).clamp(min=fmt.min_normal).to(dtype)
    return [Batch((x,), torch.ones_like(x))]


def division_inputs(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[Batch]:
    """safe_div: numerators and denominators over many scales, ``|b|`` at or above the
    default clamp ``sqrt(smallest normal)`` (below it the result is a definition), and
    quotients that stay finite."""
    fmt = get_format(dtype)
    eps = math.sqrt(fmt.min_normal)
    n = samples // 2
    a = _log_uniform(gen, n, eps, 1 / eps) * _signs(gen, n)
    b = _log_uniform(gen, n, eps, 1 / eps) * _signs(gen, n)
    # Keep |a / b| well inside the range of the dtype.
    a = torch.where((a / b).abs() > fmt.max / 4, a * (fmt.max / 4) / (a / b).abs(), a)
    a, b = _fit(a, fmt), _fit(b, fmt)
    b64 = b.to(torch.float64)
    b = torch.where(b64.abs() < eps, b64.sign() * eps * 2, b64).to(dtype)
    return [Batch((a, b), torch.ones_like(a))]


def logaddexp_inputs(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[Batch]:
    """Pairs at several scales, near-ties, exact ties, opposite values and huge gaps,
    both far below zero (where exp underflows) and far above (where it overflows)."""
    fmt = get_format(dtype)
    n_scaled, n_tie, n_gap, n_offset = _parts(samples // 2, 4)
    a = torch.cat(
        [
            _scaled(gen, n_scaled),
            _scaled(gen, n_tie),
            _scaled(gen, n_gap),
            _uniform(gen, n_offset, -1e4, 1e4),
        ]
    )
    tie_offsets = torch.randint(-3, 4, (n_tie,), generator=gen).to(torch.float64)
    b = torch.cat(
        [
            _scaled(gen, n_scaled),
            _tie_partners(a[n_scaled : n_scaled + n_tie], tie_offsets, fmt),
            a[n_scaled + n_tie : n_scaled + n_tie + n_gap]
            - _log_uniform(gen, n_gap, 1e-3, 1e4) * _signs(gen, n_gap),
            a[-n_offset:] + _normal(gen, n_offset) * 3,
        ]
    )
    a, b = _fit(a, fmt), _fit(b, fmt)
    return [Batch((a, b), torch.ones_like(a))]


def _tie_partners(a: torch.Tensor, offsets: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """``a`` moved by ``offsets`` ULPs of ``fmt`` (0 is an exact tie); every fifth is
    ``-a``, a tie of magnitudes."""
    rounded = a.to(fmt.torch_dtype).to(torch.float64)
    spacing = torch.exp2(torch.floor(torch.log2(rounded.abs().clamp(min=fmt.min_normal))))
    partner = rounded + offsets * spacing * fmt.eps
    flip = torch.arange(a.numel()) % 5 == 0
    return torch.where(flip, -rounded, partner)


def logsubexp_inputs(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[Batch]:
    """``a > b``: gaps from one ULP (the cancelling region of ``log1mexp``) through
    ``log 2`` to far beyond the underflow of ``exp(b - a)``, at every scale of ``a``."""
    fmt = get_format(dtype)
    n = samples // 2
    n_ulp, n_switch, n_gap = _parts(n, 3)
    a = _fit(torch.cat([_scaled(gen, n_ulp), _scaled(gen, n_switch), _scaled(gen, n_gap)]), fmt)
    a64 = a.to(torch.float64)
    gaps = torch.cat(
        [
            torch.zeros(n_ulp, dtype=torch.float64),
            math.log(2.0) * (1 + 1e-2 * _uniform(gen, n_switch, -1.0, 1.0)),
            _log_uniform(gen, n_gap, 1e-3, _saturation(fmt)),
        ]
    )
    b = _fit(a64 - gaps, fmt)
    # Where the gap is "0", one to eight ULPs below a; and never b >= a after rounding.
    steps = torch.randint(1, 9, (a.numel(),), generator=gen)
    ulp_gap = torch.arange(a.numel()) < n_ulp
    for _ in range(8):
        lower = torch.nextafter(b, torch.full_like(b, -math.inf))
        b = torch.where((ulp_gap & (steps > 0)) | (b >= a), lower, b)
        steps = steps - 1
    return [Batch((a, b), torch.ones_like(a))]


# --------------------------------------------------------------------------------------
# Row ops (reductions over the last dimension)
# --------------------------------------------------------------------------------------


def _rows(
    gen: torch.Generator,
    samples: int,
    make: Callable[[int, int], torch.Tensor],
    lengths: Sequence[int] = _ROW_LENGTHS,
) -> list[torch.Tensor]:
    """Float64 matrices, one per row length, of about ``samples`` elements in all;
    ``make(rows, length)`` draws one."""
    per_length = max(samples // len(lengths), 1)
    return [make(max(per_length // length, 1), length) for length in lengths]


def _logit_rows(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Rows for the log-sum-exp family, rounded to ``dtype``: three scales, near-ties,
    exact ties, huge spreads, far-negative and far-positive offsets (where ``exp``
    under- or overflows) and rows with some ``-inf`` entries."""
    fmt = get_format(dtype)
    n = _parts(samples, 7)

    def scaled(rows: int, length: int) -> torch.Tensor:
        scale = torch.tensor(_SCALES, dtype=torch.float64)[torch.arange(rows) % 3]
        return _normal(gen, rows * length).reshape(rows, length) * scale[:, None]

    def near_ties(rows: int, length: int) -> torch.Tensor:
        center = _scaled(gen, rows)[:, None].to(dtype).to(torch.float64)
        spacing = torch.exp2(torch.floor(torch.log2(center.abs().clamp(min=1.0)))) * fmt.eps
        offsets = torch.randint(-2, 3, (rows, length), generator=gen).to(torch.float64)
        # Every third row is an exact tie.
        offsets[torch.arange(rows) % 3 == 0] = 0
        return center + offsets * spacing

    def spread(rows: int, length: int) -> torch.Tensor:
        top = _scaled(gen, rows)[:, None]
        drops = _log_uniform(gen, rows * length, 1.0, 1e4).reshape(rows, length)
        drops[:, 0] = 0
        return top - drops

    def offset(sign: float) -> Callable[[int, int], torch.Tensor]:
        def make(rows: int, length: int) -> torch.Tensor:
            base = sign * _log_uniform(gen, rows, 1e2, 1e4)[:, None]
            return base + _normal(gen, rows * length).reshape(rows, length) * 3

        return make

    def with_neg_inf(rows: int, length: int) -> torch.Tensor:
        x = scaled(rows, length)
        holes = torch.rand(rows, length, generator=gen) < 0.3
        holes[:, 0] = False  # at least one finite entry: the result is finite
        return torch.where(holes, -math.inf, x)

    makers = (scaled, near_ties, spread, offset(-1.0), offset(1.0), with_neg_inf, scaled)
    return [
        _fit(m, fmt) for make, size in zip(makers, n, strict=True) for m in _rows(gen, size, make)
    ]


def _pick_classes(x: torch.Tensor, gen: torch.Generator, *, allow_max: bool) -> torch.Tensor:
    """One class per row, uniformly at random; with ``allow_max=False`` never one whose
    probability exceeds 1/2 (the largest of a dominated row), which keeps ``1 - p`` in
    the softmax Jacobian well conditioned; with ``allow_max=True`` every other row takes
    the row's argmax, the confident case of a trained classifier."""
    probs = torch.softmax(x.to(torch.float64), dim=-1)
    # Never a -inf entry: its loss is inf, its Jacobian column 0.
    finite = (x > -math.inf).to(torch.float64)
    weights = finite
    if not allow_max:
        weights = torch.where(probs > 0.5, 0.0, finite)
        fallback = weights.sum(-1) == 0  # one finite entry: it is the only choice
        weights[fallback] = finite[fallback]
    classes = torch.multinomial(weights, 1, generator=gen).squeeze(-1)
    if allow_max:
        argmax = probs.argmax(-1)
        classes = torch.where(torch.arange(x.shape[0]) % 2 == 0, argmax, classes)
    return classes


def reduction_rows(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[Batch]:
    """logsumexp and logmeanexp: logit rows, cotangent 1 per row (gradient = softmax)."""
    return [
        Batch((x,), torch.ones(x.shape[0], dtype=dtype)) for x in _logit_rows(dtype, samples, gen)
    ]


def softmax_rows(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[Batch]:
    """softmax and log_softmax: logit rows; the cotangent is one-hot at a random class of
    probability at most 1/2, so the gradient is one well-conditioned column of the
    Jacobian (``p_t (delta_it - p_i)`` and ``delta_it - p_i``)."""
    batches = []
    for x in _logit_rows(dtype, samples, gen):
        classes = _pick_classes(x, gen, allow_max=False)
        cotangent = torch.nn.functional.one_hot(classes, x.shape[1]).to(dtype)
        batches.append(Batch((x,), cotangent))
    return batches


def cross_entropy_rows(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[Batch]:
    """cross_entropy (reduction ``"none"``): logit rows (``-inf`` entries as masked
    classes, never the target), targets at the argmax in every other row (``p_t`` near 1
    in dominated rows), cotangent 1 per row."""
    batches = []
    for x in _logit_rows(dtype, samples, gen):
        classes = _pick_classes(x, gen, allow_max=True)
        batches.append(Batch((x, classes), torch.ones(x.shape[0], dtype=dtype)))
    return batches


def binary_targets(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[Batch]:
    """binary_cross_entropy_with_logits: the real line against hard targets 0 and 1."""
    fmt = get_format(dtype)
    x = _fit(_real_line(dtype, samples // 2, gen), fmt)
    target = torch.randint(0, 2, x.shape, generator=gen).to(dtype)
    return [Batch((x, target), torch.ones_like(x))]


def sum_rows(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[Batch]:
    """compensated_sum: scales, terms spanning eight decades, rows that cancel to a small
    remainder, and partial sums that overflow though the total does not."""
    fmt = get_format(dtype)
    n_scaled, n_spread, n_cancel, n_big = _parts(samples, 4)

    def scaled(rows: int, length: int) -> torch.Tensor:
        scale = torch.tensor(_SCALES, dtype=torch.float64)[torch.arange(rows) % 3]
        return _normal(gen, rows * length).reshape(rows, length) * scale[:, None]

    def spread(rows: int, length: int) -> torch.Tensor:
        magnitudes = _log_uniform(gen, rows * length, 1e-4, 1e4)
        return (magnitudes * _signs(gen, rows * length)).reshape(rows, length)

    def cancelling(rows: int, length: int) -> torch.Tensor:
        # Pairs v, -v (exact in every dtype once v is rounded) and a small remainder.
        half = max(length // 2, 1)
        v = _fit(_normal(gen, rows * half) * 1e3, fmt).to(torch.float64).reshape(rows, half)
        rest = _normal(gen, rows * (length - 2 * half)).reshape(rows, -1)
        x = torch.cat([v, -v, rest], dim=1)
        x[:, -1] += _normal(gen, rows)  # the remainder when length is even
        order = torch.argsort(torch.rand(rows, length, generator=gen), dim=1)
        return x.gather(1, order)

    def near_overflow(rows: int, length: int) -> torch.Tensor:
        x = cancelling(rows, length)
        return x / x.abs().amax(dim=1, keepdim=True) * fmt.max * 0.75

    makers = (
        (scaled, n_scaled),
        (spread, n_spread),
        (cancelling, n_cancel),
        (near_overflow, n_big),
    )
    return [
        Batch((x,), torch.ones(x.shape[0], dtype=dtype))
        for make, size in makers
        for x in (_fit(m, fmt) for m in _rows(gen, size, make))
    ]


def statistics_rows(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[Batch]:
    """mean_var: scales, a large offset plus small noise (where ``E[x^2] - E[x]^2``
    cancels), constant rows (variance exactly 0). The cotangent selects the variance."""
    fmt = get_format(dtype)
    n_scaled, n_offset, n_constant = _parts(samples, 3)

    def scaled(rows: int, length: int) -> torch.Tensor:
        scale = torch.tensor(_SCALES, dtype=torch.float64)[torch.arange(rows) % 3]
        return _normal(gen, rows * length).reshape(rows, length) * scale[:, None]

    def offset(rows: int, length: int) -> torch.Tensor:
        base = _log_uniform(gen, rows, 1e2, 1e4)[:, None] * _signs(gen, rows)[:, None]
        return base * (1 + 1e-3 * _normal(gen, rows * length).reshape(rows, length))

    def constant(rows: int, length: int) -> torch.Tensor:
        return _scaled(gen, rows)[:, None].expand(rows, length).clone()

    batches = []
    for make, size in ((scaled, n_scaled), (offset, n_offset), (constant, n_constant)):
        for m in _rows(gen, size, make):
            x = _fit(m, fmt)
            # (mean, var) are concatenated; only the variance's gradient is audited.
            cotangent = torch.cat([torch.zeros(x.shape[0]), torch.ones(x.shape[0])]).to(dtype)
            batches.append(Batch((x,), cotangent))
    return batches


def norm_rows(dtype: torch.dtype, samples: int, gen: torch.Generator) -> list[Batch]:
    """l2_norm: scales, entries near the largest finite value (whose squares overflow)
    and tiny or subnormal entries (whose squares underflow); never an all-zero row."""
    fmt = get_format(dtype)
    n_scaled, n_huge, n_tiny = _parts(samples, 3)

    def scaled(rows: int, length: int) -> torch.Tensor:
        scale = torch.tensor(_SCALES, dtype=torch.float64)[torch.arange(rows) % 3]
        return _normal(gen, rows * length).reshape(rows, length) * scale[:, None]

    def huge(rows: int, length: int) -> torch.Tensor:
        # The norm stays below max: entries up to max / sqrt(length) / 2.
        top = fmt.max / math.sqrt(length) / 2
        return _uniform(gen, rows * length, -top, top).reshape(rows, length)

    def tiny(rows: int, length: int) -> torch.Tensor:
        magnitudes = _log_uniform(gen, rows * length, fmt.min_subnormal, math.sqrt(fmt.min_normal))
        return (magnitudes * _signs(gen, rows * length)).reshape(rows, length)

    batches = []
    for make, size in ((scaled, n_scaled), (huge, n_huge), (tiny, n_tiny)):
        for m in _rows(gen, size, make):
            x = _fit(m, fmt)
            zero_rows = (x == 0).all(dim=1)
            x[zero_rows, 0] = fmt.min_subnormal
            batches.append(Batch((x,), torch.ones(x.shape[0], dtype=dtype)))
    return batches
