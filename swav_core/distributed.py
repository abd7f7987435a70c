"""Collectives that are no-ops without a process group.

Whether a process group exists is checked at every call, never cached at import or construction,
so the same module runs in a plain single-process script, under ``torchrun`` and inside tests that
initialise a group after building the model.
"""
from typing import List

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "rank", "all_reduce_sum_", "all_reduce_max_", "all_gather_cat"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group, 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group, 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def _all_reduce_(tensor: torch.Tensor, op) -> torch.Tensor:
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it; unchanged without a group."""
    return _all_reduce_(tensor, dist.ReduceOp.SUM)


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all ranks, in place; unchanged without a group."""
    return _all_reduce_(tensor, dist.ReduceOp.MAX)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order; ranks may differ in length.

    Shape:
        tensor: (B_r, *) on rank r, the trailing dims equal on all ranks.
        output: (Σ_r B_r, *), detached (all_gather carries no gradient).
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return tensor.detach()
    n = dist.get_world_size()
    length = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    lengths: List[torch.Tensor] = [torch.empty_like(length) for _ in range(n)]
    dist.all_gather(lengths, length)
    sizes = [int(x.item()) for x in lengths]
    padded = tensor.detach().new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    gathered = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:s] for g, s in zip(gathered, sizes)], dim=0)
