"""Agreement between data-parallel ranks on whether a step is skipped.

Each rank sees only its own gradients. If one rank finds an inf and skips while
another steps, the replicas diverge silently; a MAX all-reduce of the found-inf
flag makes every rank take the same decision.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def check_process_group(process_group: object) -> None:
    """Raise unless ``process_group`` is ``None``, ``"default"`` or a ``ProcessGroup``."""
    if process_group is None:
        return
    if isinstance(process_group, str):
        if process_group != "default":
            raise ValueError(
                f"process_group must be None, 'default' or a ProcessGroup; got {process_group!r}"
            )
        return
    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be None, 'default' or a torch.distributed.ProcessGroup; "
            f"got {type(process_group).__name__}"
        )


def all_reduce_max_(flags: torch.Tensor, process_group: dist.ProcessGroup | str) -> None:
    """Replace ``flags`` in place by its elementwise maximum over the ranks of the group."""
    if not dist.is_initialized():
        raise RuntimeError(
            "LossScaler was given a process_group but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group() first"
        )
    group = process_group if isinstance(process_group, dist.ProcessGroup) else None
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)


def ranks_may_disagree() -> bool:
    """Whether a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
