"""Checkpoints of the job: what they hold, how they are written, and the checks made on resume.

``checkpoint.pt`` is a dict:

- ``model``: the SwaV state_dict of rank 0 (queues and their counters included);
- ``model_per_rank``: every rank's SwaV state_dict, in rank order (each rank has its own queues);
- ``optimizer``: the optimizer's state_dict (AdamW, or SGD with ``--optimizer sgd``);
- ``step``: optimisation steps completed;
- ``rng``: every rank's global torch CPU (and CUDA) generator state, seeded from ``--seed`` at the
  start of a run and restored on resume. The data order and the crops are pure functions of
  (seed, step, rank), so ``step`` is their whole state;
- ``loss_window_per_rank``: each rank's losses since the last log row, so that a resumed run logs
  the same rows as an uninterrupted one;
- ``config`` (the options, data defaults filled in), ``world_size``, ``loss_first``, ``loss_last``,
  ``seconds`` (training time so far), ``torch`` and ``swav_core`` (the versions that wrote it).

At the end of a run, ``backbone.pt`` holds the backbone's state_dict alone (:func:`save_backbone`).

It holds only tensors, containers and plain values, so :func:`load` reads it with ``weights_only=True``.
"""
import argparse
import contextlib
import os
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from torch.torch_version import TorchVersion

from .data import SYNTHETIC, UsageError

__all__ = ["save", "load", "gather", "normalised", "resumed_options", "save_backbone", "rng_state",
           "set_rng_state"]

# Options that may differ between a run and its resumption; any other difference is an error.
RUN_ONLY = {"out", "steps", "stop_at", "resume", "device", "amp", "log_every", "ckpt_every", "knn_k", "workers", "plot"}


def gather(obj: Any) -> List[Any]:
    """Every rank's ``obj`` in rank order; ``[obj]`` without a group.

    ``obj`` is a nest of dicts, lists and tuples of CPU tensors (a state_dict, RNG states) or None,
    with the same structure and shapes on every rank. Gathered tensor by tensor: torch's
    ``all_gather_object`` needs numpy, which the job does not require.
    """
    n = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if n == 1:
        return [obj]
    if isinstance(obj, dict):
        parts = {k: gather(v) for k, v in sorted(obj.items())}
        return [{k: parts[k][r] for k in obj} for r in range(n)]
    if isinstance(obj, (list, tuple)):
        parts = [gather(v) for v in obj]
        return [type(obj)(p[r] for p in parts) for r in range(n)]
    if obj is None:
        return [None] * n
    # NCCL gathers only CUDA tensors; gloo takes CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else obj.device
    t = obj.to(device)
    out = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(out, t.contiguous())
    return [o.to(obj.device) for o in out]


def rng_state() -> Dict[str, Any]:
    """The global torch CPU (and CUDA) generator states, for :func:`set_rng_state`."""
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
    """Read ``path`` on the CPU; a missing or unreadable file is a :class:`UsageError` naming it."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint at {path}; run once without --resume first")
    # Older checkpoints hold the torch version as a TorchVersion, not a str (safe_globals: torch >= 2.5).
    allow = getattr(torch.serialization, "safe_globals", lambda _: contextlib.nullcontext())([TorchVersion])
    try:
        with allow:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--resume: cannot read the checkpoint {path} ({type(e).__name__}); "
                         f"expected a checkpoint.pt written by this job") from e
    keys = {"model_per_rank", "optimizer", "step", "rng", "config", "world_size"}
    if not isinstance(ckpt, dict) or not keys <= ckpt.keys():
        raise UsageError(f"--resume: {path} is not a checkpoint of this job (expected a dict with {sorted(keys)})")
    return ckpt


def normalised(option: str, value: Any) -> Any:
    """``value`` of ``option`` in the form runs are compared in: a ``--data`` folder as its real absolute
    path (``../data/`` and ``/home/me/data`` are the same data), lists as tuples."""
    if option == "data" and isinstance(value, str) and value not in SYNTHETIC:
        return os.path.realpath(value)
    return tuple(value) if isinstance(value, list) else value


def resumed_options(saved: Dict[str, Any], args: argparse.Namespace, given: Dict[str, Any]) -> argparse.Namespace:
    """The options of a resumed run: the checkpoint's ``saved`` ones, then the run-only options in
    ``given`` (those written on the command line: ``--steps``, ``--device``, …; see :data:`RUN_ONLY`).

    ``--stop-at`` is never inherited. Any other option given is compared after :func:`normalised`,
    and a real change is a :class:`UsageError` naming the option, the old and the new value.
    """
    diff = {k: (saved.get(k), v) for k, v in given.items()
            if k not in RUN_ONLY and normalised(k, saved.get(k)) != normalised(k, v)}
    if diff:
        lines = ", ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise UsageError(f"--resume with different options than the checkpoint: {lines}; leave them out to "
                         f"continue with the checkpoint's own")
    run_only = {k: v for k, v in given.items() if k in RUN_ONLY}
    return argparse.Namespace(**{**vars(args), **saved, "out": args.out, "resume": True, "stop_at": None, **run_only})


def save_backbone(path: str, backbone: torch.nn.Module) -> None:
    """Write ``backbone``'s state_dict (CPU tensors, keys without a ``backbone.`` prefix) atomically."""
    save(path, {k: v.detach().cpu() for k, v in backbone.state_dict().items()})
