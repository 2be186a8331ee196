"""Numerically stable primitives with a measured accuracy.

Rules shared by every op here:

* float16/bfloat16 inputs are computed with float32 accumulation and the
  result is rounded once to the input dtype; float64 stays float64.
* integer, bool and complex inputs raise ``TypeError``; shapes and ``dim``
  are validated and errors name the argument.
* a finite input never produces NaN where the mathematical function is
  defined, and gradients stay finite where the derivative is.

``finite audit`` measures every op against an mpmath reference; the table
is in ``docs/accuracy.md``.
"""

from finite.ops.activations import log_sigmoid, sigmoid, softcap, softplus
from finite.ops.logspace import (
    log1mexp,
    log1pexp,
    logaddexp,
    logmeanexp,
    logsubexp,
    logsumexp,
)
from finite.ops.losses import binary_cross_entropy_with_logits, cross_entropy
from finite.ops.reductions import compensated_sum, l2_norm, mean_var
from finite.ops.safe import safe_div, safe_log, safe_sqrt
from finite.ops.softmax import log_softmax, softmax

__all__ = [
    "binary_cross_entropy_with_logits",
    "compensated_sum",
    "cross_entropy",
    "l2_norm",
    "log1mexp",
    "log1pexp",
    "log_sigmoid",
    "log_softmax",
    "logaddexp",
    "logmeanexp",
    "logsubexp",
    "logsumexp",
    "mean_var",
    "safe_div",
    "safe_log",
    "safe_sqrt",
    "sigmoid",
    "softcap",
    "softmax",
    "softplus",
]
