"""The job's processes: the torchrun group (gloo on the CPU, NCCL on CUDA), collectives that are no-ops in one
process, the model under DDP or sharded by FSDP2 (``--fsdp``), and its state as one process would hold it."""
import os
import re
import warnings
from datetime import timedelta
from typing import Dict, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import MemoryBankModule

__all__ = ["world_size", "rank", "say", "sum_over_ranks", "any_rank", "PEER_LOST", "setup", "has_fsdp2", "wrap",
           "cpu_state", "optimizer_state", "set_optimizer_state"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()  # checked at each call, never cached


def world_size() -> int:
    """Processes in the default group, 1 without one."""
    return dist.get_world_size() if _distributed() else 1


def rank() -> int:
    """This process's rank in the default group, 0 without one."""
    return dist.get_rank() if _distributed() else 0


def say(*args) -> None:
    """print on rank 0 only, flushed (progress is read live, also through pipes)."""
    if rank() == 0:
        print(*args, flush=True)


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over all ranks in place; unchanged without a group."""
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def any_rank(flag: bool, device) -> bool:
    """True when ``flag`` is True on any rank (a collective: every rank calls it; NCCL reduces CUDA tensors only)."""
    return bool(sum_over_ranks(torch.tensor([float(flag)], device=device)).item() > 0)


# What gloo raises when a peer does not answer within the group's timeout, or is gone.
PEER_LOST = re.compile(r"timed out[^\n]*|timeout caused pair closure|connection (closed|reset) by peer", re.IGNORECASE)


def setup(device_name: str, timeout_s: float) -> Tuple[torch.device, bool]:
    """Join the torchrun group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA), with collectives that
    fail after ``timeout_s`` seconds without an answer; return (device, owns_group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if device_name == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = world > 1 and not _distributed()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return device, owns_group


def has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def wrap(model: nn.Module, fsdp: bool) -> nn.Module:
    """``model`` under DDP, or sharded in place by FSDP2 (``fsdp``: backbone, head and prototypes units under the
    root), or as it is in one process. Build the optimizer afterwards: FSDP2 replaces the parameters."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        # FSDP2 warns once per module that returns a view (SwaV's per-crop scores; SmallCNN's flatten):
        # an in-place change of one would skip a hook. Nothing here changes them in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for unit in (model.backbone, model.projection_head, model.prototypes, model):
            fully_shard(unit)
        return model
    return DistributedDataParallel(model) if world_size() > 1 else model


def cpu_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state as plain CPU tensors: sharded parameters gathered (a collective under FSDP2),
    each queue this rank's own."""
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    for name, module in model.named_modules():  # alone, a queue saves plain tensors
        if isinstance(module, MemoryBankModule):
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def optimizer_state(model: nn.Module, optimizer, fsdp: bool) -> Dict:
    """``optimizer.state_dict()``, as one process holds it (parameters numbered in ``model`` order);
    under FSDP2 gathered from the shards, on rank 0 (elsewhere {})."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return _renamed(full, index) if full else {}


def set_optimizer_state(model: nn.Module, optimizer, state: Dict, fsdp: bool) -> None:
    """Load an :func:`optimizer_state` (written under DDP or FSDP2 alike)."""
    if not fsdp:
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = dict(enumerate(name for name, _ in model.named_parameters()))
    options = StateDictOptions(full_state_dict=True, strict=False)  # strict: every parameter needs a state
    set_optimizer_state_dict(model, optimizer, _renamed(state, names), options=options)
    for i, p in enumerate(model.parameters()):  # none saved (frozen prototypes): none now (DCP made one)
        if i not in state["state"]:
            optimizer.state.pop(p, None)


def _renamed(state: Dict, key: Dict) -> Dict:
    """An optimizer state_dict with its parameters renamed by ``key`` (index <-> name)."""
    return {"state": {key[k]: v for k, v in state["state"].items()},
            "param_groups": [dict(g, params=[key[k] for k in g["params"]]) for g in state["param_groups"]]}
