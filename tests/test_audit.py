"""The audit machinery: the ULP measure, the references, the input domains, the runner and
the ``finite audit`` command. The accuracy targets themselves are in test_accuracy.py."""

import json
import math
from fractions import Fraction

import mpmath
import pytest
import scipy.special
import torch

from finite.audit import (
    CASES,
    SPECIAL_CASES,
    ErrorStats,
    references,
    run_audit,
    run_special_cases,
    summarize,
    target_ulp,
    ulp,
    ulp_error,
)
from finite.audit.references import evaluate, to_hi_lo
from finite.audit.specials import _matches
from finite.cli import main
from finite.formats import get_format

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
F64 = torch.float64


def _t(*values):
    return torch.tensor(values, dtype=F64)


def _error(result, ref, dtype, ref_lo=0.0):
    """ulp_error of one result (in dtype) against one float64 reference."""
    errors, nonfinite = ulp_error(torch.tensor([result], dtype=dtype), _t(ref), _t(ref_lo), dtype)
    return float(errors[0]), bool(nonfinite[0])


# --------------------------------------------------------------------------------------
# ulp
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "mantissa_bits"),
    [(torch.float64, 52), (torch.float32, 23), (torch.bfloat16, 7), (torch.float16, 10)],
)
def test_ulp_of_one_is_two_to_minus_mantissa_bits(dtype, mantissa_bits):
    assert ulp(_t(1.0), _t(0.0), dtype).item() == 2.0**-mantissa_bits


@pytest.mark.parametrize("dtype", DTYPES)
def test_ulp_is_the_gap_to_the_next_representable_value(dtype):
    values = torch.tensor([1.0, 3.0, 1000.0, 1e-3, -7.5], dtype=dtype)
    gaps = torch.nextafter(values, torch.full_like(values, math.inf)) - values
    spacing = ulp(values.to(F64), torch.zeros(5, dtype=F64), dtype)
    assert torch.equal(spacing, gaps.abs().to(F64))


def test_ulp_just_below_a_power_of_two_is_that_of_the_binade_below():
    # 2 - 2**-80 rounds to 2.0 in float64; its float32 ULP is still 2**-23, not 2**-22.
    assert ulp(_t(2.0), _t(-(2.0**-80)), torch.float32).item() == 2.0**-23
    assert ulp(_t(2.0), _t(2.0**-80), torch.float32).item() == 2.0**-22


@pytest.mark.parametrize("dtype", DTYPES)
def test_ulp_at_zero_and_below_the_normal_range_is_the_smallest_subnormal(dtype):
    fmt = get_format(dtype)
    refs = _t(0.0, fmt.min_subnormal, fmt.min_normal / 3, fmt.min_normal)
    assert ulp(refs, torch.zeros(4, dtype=F64), dtype).tolist() == [fmt.min_subnormal] * 4


def test_ulp_of_float64_subnormals_is_exact():
    assert ulp(_t(5e-324, 1e-310), _t(0.0, 0.0), torch.float64).tolist() == [5e-324] * 2


# --------------------------------------------------------------------------------------
# ulp_error
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_neighbour_of_the_exact_value_is_one_ulp(dtype):
    one = torch.tensor([1.0], dtype=dtype)
    above = torch.nextafter(one, torch.tensor([2.0], dtype=dtype))
    assert _error(above.item(), 1.0, dtype) == (1.0, False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_correctly_rounded_third_is_at_most_half_an_ulp(dtype):
    third = Fraction(1, 3)
    hi, lo = to_hi_lo([third])
    rounded = torch.tensor([1 / 3], dtype=dtype)
    errors, _ = ulp_error(rounded, hi, lo, dtype)
    assert 0 < errors.item() <= 0.5


def test_reference_remainder_is_taken_into_account_in_float64():
    # 1 + 2**-53 exactly: 1.0 is half an ULP away, not 0.
    assert _error(1.0, 1.0, torch.float64, ref_lo=2.0**-53) == (0.5, False)


def test_exact_zero_scores_zero_and_the_smallest_subnormal_scores_one():
    assert _error(0.0, 0.0, torch.float32) == (0.0, False)
    assert _error(-0.0, 0.0, torch.float32) == (0.0, False)
    assert _error(2.0**-149, 0.0, torch.float32) == (1.0, False)


def test_same_infinity_scores_zero():
    assert _error(math.inf, math.inf, torch.float32) == (0.0, False)
    assert _error(-math.inf, -math.inf, torch.bfloat16) == (0.0, False)


def test_reference_beyond_the_largest_value_rounds_to_inf():
    assert _error(math.inf, 70000.0, torch.float16) == (0.0, False)


def test_wrong_special_value_scores_inf_without_counting_as_non_finite():
    assert _error(-math.inf, math.inf, torch.float32) == (math.inf, False)
    assert _error(math.nan, -math.inf, torch.float32) == (math.inf, False)
    assert _error(3.0, -math.inf, torch.float32) == (math.inf, False)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_result_where_the_reference_is_finite_is_counted(bad):
    assert _error(bad, 1.0, torch.float32)[1] is True


def test_nan_reference_is_skipped():
    errors, nonfinite = ulp_error(
        torch.tensor([1.0, 2.0]), _t(math.nan, 2.0), _t(0, 0), torch.float32
    )
    assert errors.tolist() == [0.0]
    assert nonfinite.tolist() == [False]


def test_errors_beyond_the_float64_range_saturate():
    assert _error(1e-10, 0.0, torch.float64) == (torch.finfo(F64).max, False)


def test_ulp_error_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="elements"):
        ulp_error(torch.ones(3), _t(1.0), _t(0.0), torch.float32)


# --------------------------------------------------------------------------------------
# summarize
# --------------------------------------------------------------------------------------


def test_summary_takes_max_and_nearest_rank_p99_over_finite_results():
    errors = torch.cat([torch.arange(200, dtype=F64) / 100, _t(math.inf)])
    nonfinite = torch.zeros(201, dtype=torch.bool)
    nonfinite[-1] = True
    # 200 numeric errors 0.00 .. 1.99: rank ceil(0.99 * 200) = 198 is 1.97.
    assert summarize(errors, nonfinite) == ErrorStats(1.99, 1.97, 1, 201)


def test_summary_of_only_non_finite_results():
    stats = summarize(_t(math.inf, math.inf), torch.tensor([True, True]))
    assert stats == ErrorStats(0.0, 0.0, 2, 2)


# --------------------------------------------------------------------------------------
# References: checked against SciPy and closed forms, independently of finite
# --------------------------------------------------------------------------------------


def _reference(name, *args, cotangent=None):
    case = CASES[name]
    tensors = tuple(a if isinstance(a, torch.Tensor) else _t(*a) for a in args)
    if cotangent is None:
        cotangent = torch.ones(tensors[0].shape[0], dtype=F64)
    values, grads = evaluate(case.reference, tensors, cotangent, get_format(F64))
    return [float(v) for v in values], [float(g) for g in grads]


def test_logsumexp_reference_matches_scipy_and_keeps_a_tiny_tail():
    rows = torch.tensor([[0.3, -1.2, 2.5], [0.0, -120.0, -math.inf]], dtype=F64)
    values, grads = _reference("logsumexp", rows)
    assert values[0] == pytest.approx(scipy.special.logsumexp(rows[0].numpy()), rel=1e-15)
    # log(1 + e**-120) = e**-120 to 50 digits; 1 + e**-120 rounds to 1 at 50 digits.
    assert values[1] == pytest.approx(math.exp(-120), rel=1e-15)
    assert grads[:3] == pytest.approx(scipy.special.softmax(rows[0].numpy()).tolist(), rel=1e-15)
    assert grads[5] == 0.0


def test_cross_entropy_reference_gradient_is_softmax_minus_onehot_without_cancelling():
    rows = torch.tensor([[40.0, 0.0]], dtype=F64)
    values, grads = _reference("cross_entropy", rows, torch.tensor([0]))
    tail = math.exp(-40.0)
    assert values[0] == pytest.approx(math.log1p(tail), rel=1e-15)
    assert grads == pytest.approx([-tail / (1 + tail), tail / (1 + tail)], rel=1e-15)


@pytest.mark.parametrize(
    ("name", "values_fn", "slope_fn"),
    [
        (
            "sigmoid",
            scipy.special.expit,
            lambda x: scipy.special.expit(x) * scipy.special.expit(-x),
        ),
        ("log_sigmoid", scipy.special.log_expit, lambda x: scipy.special.expit(-x)),
        ("log1pexp", lambda x: scipy.special.logsumexp([0.0, x]), scipy.special.expit),
    ],
)
def test_logistic_references_match_scipy(name, values_fn, slope_fn):
    points = [-700.0, -30.0, -1.5, 0.0, 2.0, 35.0]
    values, grads = _reference(name, points)
    for x, value, grad in zip(points, values, grads, strict=True):
        assert value == pytest.approx(float(values_fn(x)), rel=1e-14, abs=1e-300)
        assert grad == pytest.approx(float(slope_fn(x)), rel=1e-14, abs=1e-300)


def test_log1mexp_reference_on_both_sides_of_minus_log_2():
    values, grads = _reference("log1mexp", [-1e-20, -0.5, -1.0, -200.0])
    expected = [math.log(1e-20), math.log(-math.expm1(-0.5)), math.log1p(-math.exp(-1.0))]
    assert values[:3] == pytest.approx(expected, rel=1e-15)
    # log(1 - e**-200) = -e**-200: beyond 50 digits of 1 - e**-200.
    assert values[3] == pytest.approx(-math.exp(-200.0), rel=1e-15)
    assert grads[0] == pytest.approx(-1e20, rel=1e-15)


def test_mean_var_reference_is_exact_for_an_offset_with_small_noise():
    rows = torch.tensor([[1e8 + 1, 1e8 + 2, 1e8 + 3]], dtype=F64)
    values, grads = _reference("mean_var", rows, cotangent=_t(0.0, 1.0))
    assert values == [1e8 + 2, 2 / 3]
    assert grads == pytest.approx([-2 / 3, 0.0, 2 / 3], rel=1e-15)


def test_l2_norm_reference_does_not_overflow():
    values, grads = _reference("l2_norm", torch.tensor([[3e300, 4e300]], dtype=F64))
    assert values == [5e300]
    assert grads == pytest.approx([0.6, 0.8], rel=1e-15)


def test_compensated_sum_reference_is_the_exact_sum():
    values, _ = _reference("compensated_sum", torch.tensor([[1e16, 1.0, -1e16, 2.0**-60]]))
    hi, lo = to_hi_lo([Fraction(1) + Fraction(2) ** -60])
    assert values == [hi.item()]
    assert lo.item() == 2.0**-60


def test_references_run_at_fifty_digits_and_leave_mpmath_unchanged():
    before = mpmath.mp.dps
    _reference("sigmoid", [1.0])
    assert references.DIGITS == 50
    assert mpmath.mp.dps == before


# --------------------------------------------------------------------------------------
# Domains
# --------------------------------------------------------------------------------------


def _batches(name, dtype, seed=0, samples=512):
    return CASES[name].inputs(dtype, samples, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CASES))
def test_domains_are_seeded_and_in_the_audited_dtype(name):
    first, again, other = (_batches(name, torch.bfloat16, s) for s in (0, 0, 1))
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.args, b.args, strict=True))
        assert torch.equal(a.cotangent, b.cotangent)
    assert any(not torch.equal(a.args[0], b.args[0]) for a, b in zip(first, other, strict=True))
    for batch in first:
        assert batch.args[0].dtype == torch.bfloat16
        assert batch.cotangent.dtype == torch.bfloat16


@pytest.mark.parametrize("name", list(CASES))
def test_domain_inputs_are_finite_except_masked_logits(name):
    for batch in _batches(name, torch.float16):
        for arg in batch.args:
            if arg.dtype.is_floating_point:
                assert not arg.isnan().any() and not (arg == math.inf).any()
                if name not in (
                    "logsumexp",
                    "logmeanexp",
                    "softmax",
                    "log_softmax",
                    "cross_entropy",
                ):
                    assert arg.isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_real_line_covers_subnormals_switch_points_and_tails(dtype):
    fmt = get_format(dtype)
    x = _batches("sigmoid", dtype)[0].args[0].to(F64)
    assert ((x != 0) & (x.abs() < fmt.min_normal)).any()
    assert ((x - 20.0).abs() < 0.1).any()
    assert (x < math.log(fmt.min_subnormal) + 1).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_log1mexp_domain_is_negative_and_straddles_minus_log_2(dtype):
    x = _batches("log1mexp", dtype)[0].args[0].to(F64)
    assert (x < 0).all()
    near = (x + math.log(2.0)).abs() < 1e-2
    assert (near & (x > -math.log(2.0))).any() and (near & (x < -math.log(2.0))).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_logsubexp_domain_has_a_strictly_above_b_down_to_one_ulp(dtype):
    a, b = _batches("logsubexp", dtype)[0].args
    assert (a > b).all()
    assert (torch.nextafter(a, torch.full_like(a, -math.inf)) == b).any()


def test_softmax_cotangent_is_one_hot_at_a_class_of_probability_at_most_half():
    for batch in _batches("softmax", torch.float32):
        x, cotangent = batch.args[0], batch.cotangent
        assert torch.equal(cotangent.sum(-1), torch.ones(x.shape[0]))
        chosen = torch.softmax(x.to(F64), -1)[cotangent.bool()]
        assert (x[cotangent.bool()] > -math.inf).all()
        # A row with a single finite entry has no other choice (its Jacobian is 0).
        single = (x > -math.inf).sum(-1) == 1
        assert ((chosen <= 0.5) | single).all()


def test_cross_entropy_targets_include_the_argmax_and_never_a_masked_class():
    argmax_hits = 0
    for batch in _batches("cross_entropy", torch.float32):
        x, target = batch.args
        assert (x.gather(1, target[:, None]) > -math.inf).all()
        argmax_hits += int((x.argmax(-1) == target).sum())
    assert argmax_hits > 0


def test_logsumexp_domain_has_ties_huge_spreads_and_minus_inf_entries():
    rows = [b.args[0].to(F64) for b in _batches("logsumexp", torch.float32)]
    wide = [r for r in rows if r.shape[1] > 1]
    assert any(((r == r[:, :1]).all(-1)).any() for r in wide)
    finite_spread = [
        (r.nan_to_num(neginf=0).amax(-1) - r.nan_to_num(neginf=0).amin(-1)) for r in wide
    ]
    assert any((s > 1e3).any() for s in finite_spread)
    assert any((r == -math.inf).any() for r in rows)


# --------------------------------------------------------------------------------------
# run_audit
# --------------------------------------------------------------------------------------


def test_run_audit_returns_forward_and_gradient_rows_in_order():
    rows = run_audit(["log1mexp", "sigmoid"], ["float32", torch.bfloat16], samples=64)
    assert [(r.op, r.dtype, r.quantity) for r in rows] == [
        (op, dtype, quantity)
        for op in ("log1mexp", "sigmoid")
        for dtype in ("float32", "bfloat16")
        for quantity in ("forward", "gradient")
    ]
    assert all(r.torch is None for r in rows[:4])
    assert all(r.finite.count > 0 for r in rows)


def test_run_audit_is_deterministic():
    assert run_audit(["softcap"], ["float16"], samples=64) == run_audit(
        ["softcap"], ["fp16"], samples=64
    )


def test_audit_exposes_the_known_hole_of_torch_softplus_threshold():
    # F.softplus returns x above 20, dropping exp(-x) ~ 2e-9: about 5e5 ULP in float64.
    (forward, _) = run_audit(["log1pexp"], ["float64"], samples=256)
    assert forward.torch.max_ulp > 1e5


def test_audit_exposes_the_overflow_of_the_naive_formula():
    (forward, _) = run_audit(["logsumexp"], ["float32"], samples=256)
    assert forward.naive.nonfinite > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ops": ["logsumexpp"]}, "unknown op"),
        ({"dtypes": ["float8_e4m3fn"]}, "not audited"),
        ({"dtypes": ["float128"]}, "not audited"),
        ({"samples": 0}, "positive"),
    ],
)
def test_run_audit_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_audit(**kwargs)


def test_run_audit_rejects_a_non_integer_sample_count():
    with pytest.raises(TypeError, match="samples"):
        run_audit(samples=10.5)


def test_target_is_two_and_four_ulp_wide_and_one_ulp_narrow():
    assert target_ulp(torch.float32, "forward") == 2
    assert target_ulp("float64", "gradient") == 4
    assert target_ulp("bfloat16", "forward") == target_ulp(torch.float16, "gradient") == 1


# --------------------------------------------------------------------------------------
# Special cases
# --------------------------------------------------------------------------------------


def test_special_match_needs_the_same_infinity_and_nan_in_the_same_places():
    assert _matches(torch.tensor([-math.inf, 0.0]), _t(-math.inf, -0.0), torch.float32)
    assert not _matches(torch.tensor([math.inf]), _t(-math.inf), torch.float32)
    assert not _matches(torch.tensor([math.nan]), _t(0.0), torch.float32)
    assert _matches(torch.tensor([math.nan]), _t(math.nan), torch.float32)
    assert not _matches(torch.tensor([1.0, 2.0]), _t(1.0), torch.float32)


def test_special_cases_show_torch_nan_gradient_of_logsumexp_at_minus_inf():
    results = run_special_cases(["logsumexp"], ["float32"])
    all_neg_inf = next(r for r in results if r.description.startswith("all -inf"))
    assert all_neg_inf.torch is False
    assert math.isnan(all_neg_inf.torch_output[1])


def test_every_special_case_names_an_audited_op():
    assert {case.op for case in SPECIAL_CASES} <= set(CASES)


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def test_cli_json_has_rows_and_special_cases(capsys):
    code = main(["audit", "--ops", "log1mexp", "--dtypes", "float32", "--samples", "64", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code in (0, 1)
    assert report["samples"] == 64
    assert [(r["op"], r["dtype"], r["quantity"]) for r in report["rows"]] == [
        ("log1mexp", "float32", "forward"),
        ("log1mexp", "float32", "gradient"),
    ]
    assert set(report["rows"][0]["finite"]) == {"max_ulp", "p99_ulp", "nonfinite", "count"}
    assert report["rows"][0]["torch"] is None
    assert {s["description"] for s in report["special_cases"]} == {
        c.description for c in SPECIAL_CASES if c.op == "log1mexp"
    }
    assert code == (0 if report["meets_targets"] else 1)


def test_cli_table_names_the_columns_and_the_op(capsys):
    main(["audit", "--ops", "sigmoid", "--dtypes", "bf16", "--samples", "64"])
    out = capsys.readouterr().out
    for word in ("sigmoid", "bfloat16", "forward", "gradient", "finite", "torch", "naive"):
        assert word in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ops", "logsumexpp"], "unknown op 'logsumexpp'"),
        (["--dtypes", "float8_e5m2"], "not audited"),
        (["--dtypes", "quad"], "not audited"),
        (["--samples", "0"], "positive integer"),
    ],
)
def test_cli_rejects_bad_arguments_with_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_only_float64_values_of_the_log_space_ops_are_documented_exceptions():
    from finite.audit import is_documented_exception, meets_target

    assert is_documented_exception("logsumexp", torch.float64, "forward")
    assert not is_documented_exception("logsumexp", torch.float64, "gradient")
    assert not is_documented_exception("logsumexp", torch.float32, "forward")
    assert not is_documented_exception("softmax", torch.float64, "forward")
    # an exception is still judged on non-finite results
    assert meets_target(600.0, 0, "float64", "forward", op="logmeanexp")
    assert not meets_target(600.0, 1, "float64", "forward", op="logmeanexp")
    assert not meets_target(600.0, 0, "float64", "forward")
