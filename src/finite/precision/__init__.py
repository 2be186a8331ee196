"""Low-precision weight updates that are not rounded away.

* :class:`MasterWeights`: float32 master copies of a float16/bfloat16 model, with
  gradients summed in float32 (classic mixed precision, for any optimizer).
* :func:`compensated`: pure float16/bfloat16 training with Kahan-compensated or
  stochastically rounded updates around any optimizer, plus a swamping meter.

``docs/precision.md`` compares their memory per parameter.
"""

from finite.precision.compensated import CompensatedOptimizer, compensated
from finite.precision.master_weights import MasterWeights

__all__ = ["CompensatedOptimizer", "MasterWeights", "compensated"]
