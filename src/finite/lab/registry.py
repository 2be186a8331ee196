"""All lab scenarios by name, in the order ``finite lab`` runs them."""

from __future__ import annotations

from finite.lab import (
    attention_overflow,
    bf16_swamping,
    cancellation,
    exploding_rnn,
    fp16_gradient_accumulation,
    fp16_underflow,
    log_of_probabilities,
    lr_too_high,
    softmax_overflow,
    sqrt_at_zero,
    vanishing_sigmoid,
    zero_variance_norm,
)
from finite.lab._scenario import Scenario

SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in map(
        Scenario.from_module,
        (
            softmax_overflow,
            log_of_probabilities,
            fp16_underflow,
            exploding_rnn,
            vanishing_sigmoid,
            lr_too_high,
            bf16_swamping,
            attention_overflow,
            zero_variance_norm,
            cancellation,
            sqrt_at_zero,
            fp16_gradient_accumulation,
        ),
    )
}


def get_scenario(name: str) -> Scenario:
    """The scenario called ``name``; ValueError listing the known names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}: {name!r}")
    try:
        return SCENARIOS[name]
    except KeyError:
        known = ", ".join(SCENARIOS)
        raise ValueError(f"unknown lab scenario {name!r}; known: {known}") from None
