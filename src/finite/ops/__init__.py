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

# OPS-LOGSPACE
# OPS-ACTIVATIONS
# OPS-SOFTMAX
# OPS-LOSSES
# OPS-REDUCTIONS
# OPS-SAFE
