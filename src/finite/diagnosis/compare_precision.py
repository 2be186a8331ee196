"""``compare_precision``: run one batch in several dtypes and find where precision is lost.

"Test with float64: if it works in float64 but fails in float16, it is a precision issue."
:func:`compare_precision` does that for one batch: forward and backward on a copy of the
model in each dtype, every module's output and every parameter's gradient compared with
the float64 run. Modules are ranked by the relative error of their output and by the
error they *add* over the error already in their input, which names the module that
loses precision rather than every module downstream of it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from finite.formats import get_format

__all__ = [
    "GRADIENT_TOLERANCE",
    "KEEP_BITS",
    "LOSS_TOLERANCE",
    "GradientError",
    "ModuleError",
    "PrecisionReport",
    "compare_precision",
]

#: A module is worth keeping in float32 when it adds more than ``2**KEEP_BITS`` unit
#: roundoffs (``eps / 2`` of the dtype) of relative error over its input's: it loses that
#: many bits more than a single rounding would.
KEEP_BITS = 4
#: A dtype fails when the relative error of its loss exceeds this ...
LOSS_TOLERANCE = 0.1
#: ... or that of the whole gradient (all parameters as one vector) exceeds this, or
#: either is non-finite.
GRADIENT_TOLERANCE = 0.5


@dataclass(frozen=True)
class ModuleError:
    """How far one module's output in one dtype is from the float64 run.

    Attributes
    ----------
    module : str
        Path as in ``model.named_modules()`` (``""`` is the model).
    type : str
        Class name.
    dtype : str
        The dtype of the run.
    error : float
        ``||y - y64|| / ||y64||`` over all the module's outputs and calls (inf when the
        output is non-finite where the reference is finite; NaN when the reference is not
        finite).
    input_error : float
        The largest such error among its floating-point inputs (0 when it has none).
    added_error : float
        ``error - input_error``: what the module itself added (inf when it made inf/NaN
        from finite inputs; NaN when its input was already non-finite).
    nonfinite : bool
        Whether its output held inf/NaN.
    """

    module: str
    type: str
    dtype: str
    error: float
    input_error: float
    added_error: float
    nonfinite: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "type": self.type,
            "dtype": self.dtype,
            "error": self.error,
            "input_error": self.input_error,
            "added_error": self.added_error,
            "nonfinite": self.nonfinite,
        }


@dataclass(frozen=True)
class GradientError:
    """How far one parameter's gradient in one dtype is from the float64 run."""

    param: str
    dtype: str
    error: float
    nonfinite: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "param": self.param,
            "dtype": self.dtype,
            "error": self.error,
            "nonfinite": self.nonfinite,
        }


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class PrecisionReport:
    """What :func:`compare_precision` measured.

    Attributes
    ----------
    reference : str
        The reference dtype (``"float64"``).
    dtypes : tuple of str
        The dtypes compared (the reference included).
    loss : mapping of str to float
        The loss in each dtype.
    loss_error : mapping of str to float
        ``|loss - loss64| / |loss64|`` per dtype.
    gradient_error : mapping of str to float
        Relative error of all gradients together (one vector) per dtype.
    modules : tuple of ModuleError
        Every module in every dtype.
    gradients : tuple of GradientError
        Every parameter with a gradient in every dtype.
    errors : mapping of str to str
        Dtypes the model could not run in (an op without a kernel for it), with the error.
    """

    reference: str
    dtypes: tuple[str, ...]
    loss: Mapping[str, float] = field(default_factory=dict)
    loss_error: Mapping[str, float] = field(default_factory=dict)
    gradient_error: Mapping[str, float] = field(default_factory=dict)
    modules: tuple[ModuleError, ...] = ()
    gradients: tuple[GradientError, ...] = ()
    errors: Mapping[str, str] = field(default_factory=dict)

    def _failed(self, dtype: str) -> bool:
        if dtype in self.errors or dtype not in self.loss:
            return False
        nonfinite = not math.isfinite(self.loss[dtype]) or any(
            g.nonfinite for g in self.gradients if g.dtype == dtype
        )
        if dtype == self.reference:
            return nonfinite
        return (
            nonfinite
            or not self.loss_error.get(dtype, 0.0) <= LOSS_TOLERANCE
            or not self.gradient_error.get(dtype, 0.0) <= GRADIENT_TOLERANCE
        )

    @property
    def reference_failed(self) -> bool:
        """Whether the float64 run itself has a non-finite loss or gradient."""
        return self._failed(self.reference)

    @property
    def failed(self) -> tuple[str, ...]:
        """The dtypes (not the reference) whose loss or gradients are non-finite, or off
        by more than :data:`LOSS_TOLERANCE` / :data:`GRADIENT_TOLERANCE`."""
        return tuple(d for d in self.dtypes if d != self.reference and self._failed(d))

    @property
    def precision_problem(self) -> bool:
        """True when some dtype fails and float64 does not: the failure is one of
        precision. False when nothing fails, or float64 fails too (then it is the math,
        the data or a bug, and more precision will not fix it)."""
        return bool(self.failed) and not self.reference_failed

    def ranking(self, dtype: str | None = None, by: str = "added") -> list[ModuleError]:
        """Modules of one dtype, worst first.

        Parameters
        ----------
        dtype : str, optional
            Default: the narrowest dtype compared (fewest bits, then fewest significand
            bits: bfloat16 before float16).
        by : {"added", "error"}
            ``"added"`` ranks by the error a module adds over its input's, leaving after
            the others a module whose largest-adding descendant explains at least half of
            what it adds; ``"error"`` ranks by the error of its output.
        """
        if by not in ("added", "error"):
            raise ValueError(f"by must be 'added' or 'error', got {by!r}")
        if dtype is None:
            others = [d for d in self.dtypes if d != self.reference and d not in self.errors]
            if not others:
                return []
            dtype = min(others, key=_narrowness)
        rows = [m for m in self.modules if m.dtype == dtype]
        if by == "error":
            return sorted(rows, key=lambda m: -_rank_value(m.error))
        explained = {m.module for m in rows if _explained(m, rows)}
        return sorted(
            rows, key=lambda m: (m.module in explained, -_rank_value(m.added_error), m.module)
        )

    @property
    def keep_in_float32(self) -> tuple[str, ...]:
        """Modules to keep in float32: in a dtype of 16 bits or fewer, they make inf/NaN
        from finite inputs or add more than ``2**KEEP_BITS`` unit roundoffs of relative
        error, and no descendant explains it. Worst first, over all such dtypes."""
        keep: dict[str, float] = {}
        for dtype in self.dtypes:
            if dtype == self.reference or dtype in self.errors or get_format(dtype).bits > 16:
                continue
            limit = 2.0**KEEP_BITS * get_format(dtype).eps / 2
            rows = [m for m in self.modules if m.dtype == dtype]
            for m in rows:
                if _rank_value(m.added_error) > limit and not _explained(m, rows):
                    keep[m.module] = max(keep.get(m.module, 0.0), _rank_value(m.added_error))
        return tuple(sorted(keep, key=lambda name: -keep[name]))

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The module table: for each compared dtype, narrowest first (bfloat16, float16,
        float32), its modules worst
        first (:meth:`ranking` by added error), as dicts (the reference's rows, all zero,
        are left out)."""
        dtypes = [d for d in self.dtypes if d != self.reference and d not in self.errors]
        dtypes.sort(key=_narrowness)
        return [m.to_dict() for d in dtypes for m in self.ranking(d)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the verdicts, the per-dtype loss and gradient errors,
        ``rows`` (the module table, see :attr:`rows`) and ``gradients`` (per parameter).
        Infinite and NaN errors stay floats (``json.dumps`` writes them as
        ``Infinity``/``NaN``)."""
        return {
            "reference": self.reference,
            "dtypes": list(self.dtypes),
            "loss": dict(self.loss),
            "loss_error": dict(self.loss_error),
            "gradient_error": dict(self.gradient_error),
            "failed": list(self.failed),
            "reference_failed": self.reference_failed,
            "precision_problem": self.precision_problem,
            "keep_in_float32": list(self.keep_in_float32),
            "errors": dict(self.errors),
            "rows": self.rows,
            "gradients": [g.to_dict() for g in self.gradients if g.dtype != self.reference],
        }

    def __str__(self) -> str:
        lines = [f"precision comparison against {self.reference}:"]
        for dtype in self.dtypes:
            if dtype in self.errors:
                lines.append(f"  {dtype:>9}: could not run ({self.errors[dtype]})")
                continue
            status = "FAILS" if self._failed(dtype) else "ok"
            lines.append(
                f"  {dtype:>9}: loss {self.loss[dtype]:.6g}, loss error "
                f"{self.loss_error[dtype]:.2e}, gradient error "
                f"{self.gradient_error[dtype]:.2e}  {status}"
            )
        for dtype in self.dtypes:
            if dtype == self.reference or dtype in self.errors:
                continue
            top = [m for m in self.ranking(dtype)[:3] if _rank_value(m.added_error) > 0]
            if top:
                shown = ", ".join(f"{m.module or '<model>'} (+{m.added_error:.2e})" for m in top)
                lines.append(f"  {dtype} adds most error in: {shown}")
        if self.keep_in_float32:
            lines.append("  keep in float32: " + ", ".join(self.keep_in_float32))
        if self.precision_problem:
            lines.append(
                f"  verdict: a precision problem (fails in {', '.join(self.failed)}, "
                f"fine in {self.reference})"
            )
        elif self.reference_failed:
            lines.append(
                f"  verdict: not a precision problem ({self.reference} fails too: the math, "
                "the data or a bug)"
            )
        else:
            lines.append("  verdict: no dtype fails on this batch")
        return "\n".join(lines)


def _narrowness(dtype: str) -> tuple[int, int]:
    fmt = get_format(dtype)
    return fmt.bits, fmt.mantissa_bits


def _rank_value(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def _is_descendant(child: str, parent: str) -> bool:
    return child != parent and (parent == "" or child.startswith(parent + "."))


def _explained(m: ModuleError, rows: Sequence[ModuleError]) -> bool:
    """Whether a descendant of ``m`` adds at least half of what ``m`` adds."""
    added = _rank_value(m.added_error)
    if added <= 0:
        return False
    return any(
        _is_descendant(other.module, m.module) and _rank_value(other.added_error) >= added / 2
        for other in rows
    )


# ---------------------------------------------------------------------- running


def _floating(value: Any, out: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            out.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _floating(item, out)
    elif isinstance(value, dict):
        for item in value.values():
            _floating(item, out)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _flat64(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().reshape(-1).to(torch.float64).cpu() for t in tensors])


def _relative_error(x: torch.Tensor, reference: torch.Tensor) -> tuple[float, bool]:
    """``(||x - ref|| / ||ref||, x has inf/NaN)`` in float64; inf where x is non-finite and
    the reference finite, NaN where the reference itself is not finite."""
    nonfinite = not bool(torch.isfinite(x).all())
    if x.shape != reference.shape:
        return math.nan, nonfinite
    if not bool(torch.isfinite(reference).all()):
        return math.nan, nonfinite
    if nonfinite:
        return math.inf, True
    scale = float(torch.linalg.vector_norm(reference))
    diff = float(torch.linalg.vector_norm(x - reference))
    if scale == 0.0:
        return (0.0 if diff == 0.0 else math.inf), False
    return diff / scale, False


def _copy_without_hooks(model: nn.Module) -> nn.Module:
    # Hooks (a Monitor's, for one) must not be copied with the model: deepcopy would copy
    # the objects they are bound to. Seeding the memo with empty dicts leaves them out.
    memo: dict[int, Any] = {}
    for module in model.modules():
        for name, value in vars(module).items():
            if "hook" in name and isinstance(value, dict):
                memo[id(value)] = type(value)()
    return copy.deepcopy(model, memo)


class _Recorder:
    """Forward hooks that keep every module's floating inputs and outputs (float64)."""

    def __init__(self, model: nn.Module) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.types: dict[str, str] = {}
        self.handles = []
        for path, module in model.named_modules():
            self.types[path] = type(module).__name__
            self.handles.append(module.register_forward_pre_hook(self._pre(path), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post(path)))

    def _pre(self, path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            found: list[torch.Tensor] = []
            _floating((args, kwargs), found)
            self.inputs.setdefault(path, []).append(_flat64(found))

        return hook

    def _post(self, path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            found: list[torch.Tensor] = []
            _floating(output, found)
            self.outputs.setdefault(path, []).append(_flat64(found))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class _Run:
    loss: float
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    types: dict[str, str]
    grads: dict[str, torch.Tensor]


def _forward(model: nn.Module, batch: Any, loss_fn: Callable[..., torch.Tensor]) -> torch.Tensor:
    if isinstance(batch, dict):
        return loss_fn(model(**batch))
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(
                f"batch must be a tensor, a dict, or an (inputs, target) pair; got a "
                f"{type(batch).__name__} of length {len(batch)}"
            )
        inputs, target = batch
        if isinstance(inputs, dict):
            output = model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            output = model(*inputs)
        else:
            output = model(inputs)
        return loss_fn(output, target)
    return loss_fn(model(batch))


def _run(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[..., torch.Tensor],
    dtype: torch.dtype,
    seed: int,
) -> _Run:
    replica = _copy_without_hooks(model).to(dtype)
    for p in replica.parameters():
        p.grad = None
    recorder = _Recorder(replica)
    try:
        # Seed every run alike, and leave the caller's generators as they were.
        cuda = sorted({p.device.index or 0 for p in replica.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            loss = _forward(replica, _cast(batch, dtype), loss_fn)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(
                    "loss_fn must return a tensor with one element, got "
                    f"{type(loss).__name__}"
                    + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
                )
            loss.backward()
    finally:
        recorder.remove()
    grads = {
        name: p.grad.detach().reshape(-1).to(torch.float64).cpu()
        for name, p in replica.named_parameters()
        if p.grad is not None
    }
    join = {
        k: torch.cat(v) if v else torch.zeros(0, dtype=torch.float64)
        for k, v in recorder.outputs.items()
    }
    joined_inputs = {
        k: torch.cat(v) if v else torch.zeros(0, dtype=torch.float64)
        for k, v in recorder.inputs.items()
    }
    return _Run(float(loss.detach().double()), joined_inputs, join, recorder.types, grads)


def compare_precision(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[..., torch.Tensor],
    dtypes: Sequence[str | torch.dtype] = ("float64", "float32", "bfloat16", "float16"),
    *,
    seed: int = 0,
) -> PrecisionReport:
    """Run one batch forward and backward in several dtypes and compare with float64.

    Each dtype runs on a copy of ``model`` (parameters and buffers cast, hooks left
    behind; ``model`` itself is not changed), with the floating-point tensors of ``batch``
    cast to it and the random generator seeded the same (``seed``). Every module's inputs
    and outputs and every parameter's gradient are compared with the float64 run by
    relative error ``||x - x64|| / ||x64||``; see :class:`PrecisionReport` for the ranking,
    the modules to keep in float32 and whether a failure is one of precision.

    Parameters
    ----------
    model : torch.nn.Module
        The model, in any dtype and on any device.
    batch : tensor, dict, or (inputs, target)
        A tensor ``x`` runs ``loss_fn(model(x))``; a dict runs ``loss_fn(model(**batch))``;
        a pair ``(inputs, target)`` runs ``loss_fn(model(inputs), target)``, with
        ``model(*inputs)`` for a tuple of inputs and ``model(**inputs)`` for a dict.
        Floating-point tensors (targets included) are cast to each dtype; integer ones
        (class labels, token ids) are not.
    loss_fn : callable
        Returns the loss, a one-element tensor.
    dtypes : sequence of str or torch.dtype
        Dtypes to compare; float64 is added as the reference when missing.
    seed : int
        Seed of the random generator for every run (dropout draws the same numbers; in
        different dtypes the masks may still differ, so prefer ``model.eval()`` or no
        dropout).

    Returns
    -------
    PrecisionReport

    Raises
    ------
    TypeError
        If ``model`` is not a module, ``loss_fn`` not callable, or the loss not a
        one-element tensor.
    ValueError
        If a dtype is not a floating-point format with a torch dtype, or ``batch`` is a
        sequence that is not a pair.

    Notes
    -----
    The copies keep every module's activations in float64 on the host: use one small
    batch. An op without a kernel for a dtype on the model's device (some float16 ops on
    CPU) leaves that dtype out, with the error in ``report.errors``.

    Examples
    --------
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
    >>> report = compare_precision(model, (x, y), torch.nn.functional.mse_loss)
    >>> report.precision_problem
    False
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(dtypes, (str, torch.dtype)):
        raise TypeError(f"dtypes must be a sequence of dtypes, got {dtypes!r}")
    names: list[str] = []
    torch_dtypes: dict[str, torch.dtype] = {}
    for d in ("float64", *dtypes):
        fmt = get_format(d)
        if fmt.torch_dtype is None or fmt.bits < 16:
            raise ValueError(f"dtypes must be float64, float32, bfloat16 or float16; got {d!r}")
        if fmt.name not in torch_dtypes:
            names.append(fmt.name)
            torch_dtypes[fmt.name] = fmt.torch_dtype
    reference = "float64"
    runs: dict[str, _Run] = {}
    errors: dict[str, str] = {}
    for name in names:
        try:
            runs[name] = _run(model, batch, loss_fn, torch_dtypes[name], seed)
        except (RuntimeError, NotImplementedError) as failure:
            if name == reference:
                raise
            errors[name] = f"{type(failure).__name__}: {str(failure).splitlines()[0]}"
    ref = runs[reference]
    loss, loss_error, gradient_error = {}, {}, {}
    modules: list[ModuleError] = []
    gradients: list[GradientError] = []
    for name, run in runs.items():
        loss[name] = run.loss
        if math.isfinite(ref.loss) and ref.loss != 0:
            loss_error[name] = abs(run.loss - ref.loss) / abs(ref.loss)
            if not math.isfinite(run.loss):
                loss_error[name] = math.inf
        else:
            loss_error[name] = 0.0 if run.loss == ref.loss else math.nan
        common = [p for p in ref.grads if p in run.grads]
        for param in common:
            error, nonfinite = _relative_error(run.grads[param], ref.grads[param])
            gradients.append(GradientError(param, name, error, nonfinite))
        gradient_error[name] = _relative_error(
            _flat64([run.grads[p] for p in common]), _flat64([ref.grads[p] for p in common])
        )[0]
        for path, output in run.outputs.items():
            if path not in ref.outputs:
                continue
            error, nonfinite = _relative_error(output, ref.outputs[path])
            inputs = run.inputs.get(path, torch.zeros(0, dtype=torch.float64))
            input_error, input_bad = _relative_error(
                inputs, ref.inputs.get(path, torch.zeros(0, dtype=torch.float64))
            )
            if inputs.numel() == 0:
                input_error = 0.0
            if math.isinf(error) and not input_bad:
                added = math.inf
            elif input_bad or math.isnan(error) or math.isnan(input_error):
                added = math.nan
            else:
                added = error - input_error
            modules.append(
                ModuleError(path, run.types[path], name, error, input_error, added, nonfinite)
            )
    return PrecisionReport(
        reference=reference,
        dtypes=tuple(names),
        loss=_frozen(loss),
        loss_error=_frozen(loss_error),
        gradient_error=_frozen(gradient_error),
        modules=tuple(modules),
        gradients=tuple(gradients),
        errors=_frozen(errors),
    )
