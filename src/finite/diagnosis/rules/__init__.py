"""The diagnosis rules: each a function ``(history, context) -> Finding | None``.

:data:`RULES` lists them in order of priority: when two findings have the same severity
and first step, the one whose rule comes first is reported first. Causes come before the
symptoms they produce (non-finite data before a non-finite loss, a loss scale that
collapsed before the gradients it lost), and symptoms of the loss curve come last.
"""

from finite.diagnosis.rules.accumulation import fp16_accumulation_overflow
from finite.diagnosis.rules.activations import (
    activation_overflow_risk,
    dead_units,
    saturated_activations,
)
from finite.diagnosis.rules.gradients import (
    exploding_gradients,
    fp16_gradient_underflow,
    vanishing_gradients,
)
from finite.diagnosis.rules.loss import divergence_after_progress, loss_oscillation, loss_plateau
from finite.diagnosis.rules.nonfinite import (
    nonfinite_gradients,
    nonfinite_input_data,
    nonfinite_loss,
    nonfinite_weights,
)
from finite.diagnosis.rules.precision import bf16_update_swamping, loss_scale_collapse

__all__ = [
    "RULES",
    "activation_overflow_risk",
    "bf16_update_swamping",
    "dead_units",
    "divergence_after_progress",
    "exploding_gradients",
    "fp16_accumulation_overflow",
    "fp16_gradient_underflow",
    "loss_oscillation",
    "loss_plateau",
    "loss_scale_collapse",
    "nonfinite_gradients",
    "nonfinite_input_data",
    "nonfinite_loss",
    "nonfinite_weights",
    "saturated_activations",
    "vanishing_gradients",
]

RULES = (
    nonfinite_input_data,
    nonfinite_loss,
    fp16_accumulation_overflow,
    nonfinite_gradients,
    nonfinite_weights,
    loss_scale_collapse,
    divergence_after_progress,
    loss_oscillation,
    exploding_gradients,
    fp16_gradient_underflow,
    bf16_update_swamping,
    vanishing_gradients,
    activation_overflow_risk,
    saturated_activations,
    dead_units,
    loss_plateau,
)
"""Every rule, in order of priority."""
