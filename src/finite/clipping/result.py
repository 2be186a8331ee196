"""What a stateful clipper returns, and the pieces the stateful clippers share.

Every stateful clipper (:class:`~finite.clipping.zclip.ZClip`,
:class:`~finite.clipping.autoclip.AutoClip`, :class:`~finite.clipping.agc.AGC`) is called
as ``clipper(parameters)`` after ``backward()`` and returns a :class:`ClipResult` of device
tensors: reading them is the caller's choice (and the caller's synchronisation).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch

from finite.clipping.norms import (
    as_tensor_list,
    domains_norm,
    gradients_of,
    scale_,
    split_domains,
)


class ClipResult(NamedTuple):
    """The outcome of one clipping call, as 0-d device tensors (nothing is read on the host).

    Attributes
    ----------
    norm : Tensor
        The quantity the rule judged, before clipping: the global gradient norm for
        :class:`ZClip` and :class:`AutoClip`, the largest unit-wise ratio
        ``||G_i|| / max(||W_i||, eps)`` for :class:`AGC`.
    threshold : Tensor
        The bound ``norm`` was held to this step: for :class:`ZClip` and :class:`AutoClip`
        the norm the gradients were scaled to when ``clipped`` (in the statistics' dtype,
        float64 where the device has it), for :class:`AGC` the ratio bound ``clipping``.
    clipped : Tensor
        bool: whether the gradients (for AGC: any unit's) were scaled down this step.
    """

    norm: torch.Tensor
    threshold: torch.Tensor
    clipped: torch.Tensor


# ----------------------------------------------------------------------------- arguments
def require_real(value: object, name: str) -> float:
    """``value`` as a float; ``TypeError`` for a non-number (bools included), ``ValueError``
    for NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{name} must not be NaN; got {value!r}")
    return number


def require_positive(value: object, name: str) -> float:
    """``value`` as a finite float > 0."""
    number = require_real(value, name)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return number


def require_int(value: object, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def require_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def parameter_list(parameters: object) -> list[torch.Tensor]:
    """``parameters`` (a module, a tensor or an iterable of tensors) as a list of tensors."""
    if isinstance(parameters, torch.nn.Module):
        return list(parameters.parameters())
    return as_tensor_list(parameters, "parameters", "a module, a tensor or an iterable of tensors")


def clip_by_global_norm_(
    parameters: Any,
    decide: Callable[[torch.Tensor, bool], tuple[ClipResult, torch.Tensor]],
    process_group: Any,
) -> ClipResult:
    """Clip ``parameters``' gradients by the coefficient ``decide`` derives from their norm.

    ``decide(norm, record)`` returns the result and the coefficient; ``record`` is False on
    a rank with no gradients and no ``process_group``, whose norm carries no information.
    """
    grads = gradients_of(parameter_list(parameters))
    domains = split_domains(grads, "gradients")
    norm = domains_norm(domains, 2.0, process_group=process_group)
    result, coefficient = decide(norm, bool(grads) or process_group is not None)
    tensors = [t for d in domains for t in d.tensors]
    # On a device the coefficient multiplies every gradient, even when it is 1: deciding
    # otherwise would wait for the device. On the CPU nothing waits, and reading the
    # flag saves an unclipped step a pass that writes every gradient.
    unchanged = host_reads_are_free(tensors, result.clipped) and not bool(result.clipped)
    if tensors and not unchanged:
        scale_(domains, coefficient)
    return result


def host_reads_are_free(tensors: Iterable[torch.Tensor], flag: torch.Tensor) -> bool:
    """Whether ``flag`` and every tensor live on the CPU, where there is no device to wait
    for: reading ``flag`` there costs nothing, and can save a pass over the gradients."""
    return flag.device.type == "cpu" and all(t.device.type == "cpu" for t in tensors)


# ----------------------------------------------------------------------------- state
def state_on(state: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``state`` with every tensor on ``device`` (tensors already there are kept as they are)."""
    if all(t.device == device for t in state.values()):
        return state
    return {k: t.to(device) for k, t in state.items()}


def saved_state(
    state_dict: object, owner: str, config: Mapping[str, Any], keys: Iterable[str]
) -> dict[str, torch.Tensor] | None:
    """The tensors of a ``state_dict`` of ``owner``, checked; warns when its config differs.

    Returns ``None`` for a state dict saved before the first call (no state yet).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    if "config" not in state_dict or "state" not in state_dict:
        raise ValueError(
            f"state_dict must come from {owner}.state_dict(); it lacks 'config' or 'state' "
            f"(keys: {sorted(state_dict)})"
        )
    saved_config = state_dict["config"]
    differences = [
        f"{k}={saved_config.get(k)!r} (this {owner}: {v!r})"
        for k, v in config.items()
        if saved_config.get(k) != v
    ]
    if differences:
        warnings.warn(
            f"{owner}.load_state_dict: the saved configuration differs; keeping this "
            f"{owner}'s own: " + ", ".join(differences),
            stacklevel=3,
        )
    state = state_dict["state"]
    if state is None:
        return None
    if not isinstance(state, Mapping):
        raise TypeError(f"state_dict['state'] must be a mapping, got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"state_dict['state'] lacks {missing} for {owner}")
    for key in keys:
        if not isinstance(state[key], torch.Tensor):
            raise TypeError(
                f"state_dict['state'][{key!r}] must be a tensor, got {type(state[key]).__name__}"
            )
    return {k: state[k].detach().clone() for k in keys}
