"""Activation memory you can see and plan.

* :func:`activation_memory`: the bytes one forward saves for the backward, per module.
* :func:`apply_checkpointing`, :func:`checkpoint_sequential`: gradient checkpointing in
  place, bit-for-bit equal results; :func:`plan_checkpointing` chooses what to checkpoint
  for a memory budget.
* :func:`linear_cross_entropy` and :func:`attention`: the two largest activations of a
  language model, the logits and the attention scores, computed in blocks with float32
  online statistics, never materialised.

``docs/memory.md`` explains the measurements; ``benchmarks/memory.py`` measures them.
"""

from finite.memory.activations import ActivationReport, SavedStorage, activation_memory
from finite.memory.attention import attention
from finite.memory.checkpointing import (
    apply_checkpointing,
    checkpoint_sequential,
    is_checkpointed,
    remove_checkpointing,
    segment_bounds,
)
from finite.memory.linear_cross_entropy import linear_cross_entropy
from finite.memory.planner import CandidateCost, CheckpointPlan, plan_checkpointing
from finite.memory.report import activation_table, format_bytes, plan_table

__all__ = [
    "ActivationReport",
    "CandidateCost",
    "CheckpointPlan",
    "SavedStorage",
    "activation_memory",
    "activation_table",
    "apply_checkpointing",
    "attention",
    "checkpoint_sequential",
    "format_bytes",
    "is_checkpointed",
    "linear_cross_entropy",
    "plan_checkpointing",
    "plan_table",
    "remove_checkpointing",
    "segment_bounds",
]
