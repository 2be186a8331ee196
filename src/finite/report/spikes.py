"""Which steps of a recorded loss curve are spikes: the rule of ``SpikeGuard``, offline."""

from __future__ import annotations

import math
from collections import deque

import numpy as np

__all__ = ["loss_spikes"]


def loss_spikes(
    loss: np.ndarray, *, sigma: float = 6.0, window: int = 128, min_history: int = 16
) -> np.ndarray:
    """A boolean mask of the finite values that leap above their recent history.

    The rule of :class:`finite.clipping.SpikeGuard` applied to a whole recorded series,
    so that the report marks what the guard would have flagged::

        history: the last `window` finite values that were not spikes
        spike <- len(history) >= min_history and v > mean(history) + sigma * std(history)
        if v is finite and not spike: history <- history + [v]

    Non-finite values are never spikes here (the plots mark them on their own) and stay
    out of the history; so do spikes, so a run of them cannot raise the bar for the next.
    ``std`` divides by ``n - 1``. ``min_history`` is smaller than the guard's default
    because reports often cover short runs.

    Parameters
    ----------
    loss : array_like
        One value per step, in step order.
    sigma : float, default 6.0
        Standard deviations above the mean at which a value is a spike (> 0).
    window : int, default 128
        How many recent accepted values form the history (>= 2).
    min_history : int, default 16
        Accepted values needed before anything is flagged (2 <= min_history <= window).

    Returns
    -------
    numpy.ndarray
        ``bool`` mask, same length as ``loss``.

    Examples
    --------
    >>> loss_spikes(np.array([1.0, 1.1, 0.9, 1.0, 1.05, 9.0, 1.0]), min_history=4).tolist()
    [False, False, False, False, False, True, False]

    References
    ----------
    Team OLMo, "2 OLMo 2 Furious", arXiv:2501.00656, 2024 (skipping steps whose loss or
    gradient norm is more than 6 standard deviations above the recent mean).
    """
    values = np.asarray(loss, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"loss must be 1-d, got shape {values.shape}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"sigma must be a number, got {type(sigma).__name__}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be finite and > 0, got {sigma!r}")
    for name, value in (("window", window), ("min_history", min_history)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if not 2 <= min_history <= window:
        raise ValueError(f"min_history must be in [2, window={window}], got {min_history}")

    spikes = np.zeros(values.shape, dtype=bool)
    history: deque[float] = deque(maxlen=window)
    for i, value in enumerate(values.tolist()):
        if not math.isfinite(value):
            continue
        if len(history) >= min_history:
            recent = np.fromiter(history, dtype=np.float64, count=len(history))
            if value > recent.mean() + sigma * recent.std(ddof=1):
                spikes[i] = True
                continue
        history.append(value)
    return spikes
