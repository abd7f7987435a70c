"""Checkpoints of the job: what they hold, how they are written, and the checks made on resume.

``checkpoint.pt`` is a dict:

- ``model``: the SwaV state_dict of rank 0 (queues and their counters included);
- ``model_per_rank``: every rank's SwaV state_dict, in rank order (each rank has its own queues);
- ``optimizer``: the AdamW state_dict; ``step``: optimisation steps completed;
- ``rng``: the torch CPU (and CUDA) generator states of every rank. The data order and the crops
  are pure functions of (seed, step, rank), so ``step`` is their whole state;
- ``config``, ``world_size``, ``loss_first``, ``seconds`` (training time so far).
"""
import os
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from .. import distributed as D

__all__ = ["save", "load", "gather", "check_config", "rng_state", "set_rng_state"]

# Options that may differ between a run and its resumption; any other difference is an error.
RUN_ONLY = {"out", "steps", "stop_at", "resume", "device", "amp", "log_every", "ckpt_every", "knn_k"}


def gather(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (a CPU state, picklable) in rank order; ``[obj]`` without a group."""
    if D.world_size() == 1:
        return [obj]
    out: List[Any] = [None] * D.world_size()
    dist.all_gather_object(out, obj)
    return out


def rng_state() -> Dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str, ckpt: Dict[str, Any]) -> None:
    """Write atomically: a crash mid-write never leaves a truncated ``checkpoint.pt``."""
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run once without --resume first")
    return torch.load(path, map_location="cpu", weights_only=False)


def check_config(saved: Dict[str, Any], current: Dict[str, Any], saved_world: int, world: int) -> None:
    """Raise ValueError when the resumed run would not continue the saved one."""
    diff = {k: (saved.get(k), v) for k, v in current.items() if k not in RUN_ONLY and saved.get(k) != v}
    if diff:
        lines = ", ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"--resume with different options than the checkpoint: {lines}; pass the original options")
    if saved_world != world:
        raise ValueError(f"--resume: the checkpoint was written by {saved_world} process(es), this run has {world}")
