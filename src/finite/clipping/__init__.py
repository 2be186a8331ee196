"""Gradient control: norms and clipping that stay correct in half precision and under
DDP/FSDP2, adaptive clippers, and a loss-spike guard.

``clip_grad_norm_``, ``clip_grad_value_`` and ``total_norm`` are drop-ins for PyTorch's;
:class:`ZClip`, :class:`AutoClip` and :class:`AGC` adapt the threshold; :class:`SpikeGuard`
flags steps to skip (pass its flag to ``LossScaler.step(optimizer, veto=...)``).
"""

from finite.clipping.agc import AGC
from finite.clipping.autoclip import AutoClip
from finite.clipping.norms import clip_grad_norm_, clip_grad_value_, total_norm
from finite.clipping.result import ClipResult
from finite.clipping.spike_guard import SpikeGuard, SpikeRecord
from finite.clipping.zclip import ZClip

__all__ = [
    "AGC",
    "AutoClip",
    "ClipResult",
    "SpikeGuard",
    "SpikeRecord",
    "ZClip",
    "clip_grad_norm_",
    "clip_grad_value_",
    "total_norm",
]
