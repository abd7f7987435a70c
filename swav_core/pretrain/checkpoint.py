"""Checkpoints of the job: what they hold, how they are written, and the checks made on resume.

Every file of a run is written by :func:`write_atomic` (a temporary file, fsynced, renamed, the folder
fsynced): a kill or a full disk leaves the previous file whole. :func:`save` never writes a NaN or inf;
:func:`load` checks every field before the job touches the folder; :func:`lock` keeps a second job out.

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
import contextlib
import io
import math
import os
import zipfile
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.torch_version import TorchVersion

from .. import __version__
from .errors import JobError, UsageError
from .parallel import any_rank, cpu_state, optimizer_state, rank, say, set_optimizer_state, world_size

__all__ = ["save_run", "load_model", "restore", "save", "load", "problem", "first_non_finite", "write_atomic", "lock",
           "locked", "clear", "RUN_FILES", "gather", "save_backbone", "rng_state", "set_rng_state"]


def save_run(run) -> None:
    """Save ``run`` (a :class:`~.train.Run`) to its checkpoint.pt: every rank's state is gathered (its own queues),
    rank 0 checks and writes it, all wait for the outcome: a state rank 0 refuses to save (non-finite) or cannot
    write stops every rank."""
    progress, path = run.progress, run.paths["checkpoint.pt"]
    states, rngs = gather(cpu_state(run.model)), gather(rng_state())
    optimizer = optimizer_state(run.model, run.optimizer, run.args.fsdp)
    windows = gather(torch.tensor(progress.window, dtype=torch.float64))  # unlogged losses
    healths = gather(torch.tensor(progress.health, dtype=torch.float64).reshape(-1, 3))  # their figures
    error = None
    if rank() == 0:
        try:
            save(path, {
                "model": states[0], "model_per_rank": states, "optimizer": optimizer,
                "step": progress.step, "rng": rngs, "loss_window_per_rank": windows,
                "health_window_per_rank": healths, "collapsed_rows": progress.collapsed_rows,
                "config": run.config, "world_size": world_size(),
                "loss_first": progress.loss_first, "loss_last": progress.loss_last, "seconds": progress.seconds,
                "skipped": progress.skipped, "skipped_in_a_row": progress.skipped_in_a_row,
                "data_files": run.data_files, "torch": str(torch.__version__), "swav_core": __version__,
            })
        except JobError as e:
            error = e
    if any_rank(error is not None, run.device):  # a barrier too
        raise error or JobError(f"rank 0 could not save {path} after step {progress.step} (see its error)")


def load_model(ckpt: Dict, path: str, model: torch.nn.Module) -> None:
    """This rank's model from ``ckpt``; a state that does not fit (a queue pointer out of range, a missing
    key, a tensor of another shape) is a :class:`UsageError` naming it."""
    with _not_fitting(path):
        model.load_state_dict(ckpt["model_per_rank"][rank()], strict=True)


def restore(run, ckpt: Dict) -> None:
    """Into a resumed ``run``: the optimizer state (checked like the model's, written under DDP or FSDP2 alike),
    this rank's RNG state and the progress (the loss window too: the next log row averages the same steps)."""
    path, model = run.paths["checkpoint.pt"], run.model
    with _not_fitting(path):
        params = list(model.parameters())  # a sharded one's shape is the whole parameter's
        for i, state in ckpt["optimizer"]["state"].items():  # checked first: FSDP2 would shard a bad one
            for key, value in state.items():
                if torch.is_tensor(value) and value.ndim > 0 and value.shape != params[i].shape:
                    raise ValueError(f"optimizer state {key} is {tuple(value.shape)}, its parameter "
                                     f"{tuple(params[i].shape)}")
        set_optimizer_state(model, run.optimizer, ckpt["optimizer"], run.args.fsdp)
    set_rng_state(ckpt["rng"][rank()])
    say(f"resumed {path} at step {ckpt['step']}/{run.args.steps}")
    window = ckpt["loss_window_per_rank"][rank()].tolist()  # so the next log row averages the same steps
    health = ckpt["health_window_per_rank"][rank()].tolist() if "health_window_per_rank" in ckpt else []
    progress = run.progress
    progress.step, progress.loss_first, progress.loss_last = ckpt["step"], ckpt["loss_first"], ckpt["loss_last"]
    progress.seconds, progress.skipped = ckpt["seconds"], ckpt.get("skipped", 0)
    progress.skipped_in_a_row, progress.collapsed_rows = ckpt.get("skipped_in_a_row", 0), ckpt.get("collapsed_rows", 0)
    progress.window, progress.health = window, health


@contextlib.contextmanager
def _not_fitting(path: str):
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UsageError(f"--resume: {path} does not fit this run: {' '.join(str(e).split())}") from None


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


def first_non_finite(obj: Any, name: str = "") -> Optional[str]:
    """The dotted name of the first float tensor (or float) in the nest ``obj`` holding NaN or ±inf,
    e.g. ``model.backbone.features.1.running_var``; None when all are finite. One pass over the values."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif isinstance(obj, torch.Tensor) and (obj.is_floating_point() or obj.is_complex()):
        return None if bool(torch.isfinite(obj).all()) else name
    else:
        return name if isinstance(obj, float) and not math.isfinite(obj) else None
    for key, value in items:
        bad = first_non_finite(value, f"{name}.{key}" if name else str(key))
        if bad is not None:
            return bad
    return None


def write_atomic(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """Durably replace ``path`` by what ``write(file)`` writes: a temporary ``path.tmp``, flushed and
    fsynced, renamed over ``path``, then the folder fsynced. A crash or kill at any point leaves the old
    or the new file whole; on any error the temporary file is removed. An ``OSError`` (a full disk) is
    a :class:`JobError` naming the path."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise JobError(f"cannot write {path}: {e.strerror or e}; the file there is unchanged") from e
        raise
    _fsync_folder(os.path.dirname(path) or ".")


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (where folders can be opened: not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path: str, ckpt: Dict[str, Any]) -> None:
    """Write ``ckpt`` with :func:`write_atomic`, after checking that it holds no NaN or ±inf: a
    non-finite state is a :class:`JobError` naming the first such tensor, and the file is not touched."""
    bad = first_non_finite(ckpt)
    if bad is not None:
        at = f"after step {ckpt['step']}: " if "step" in ckpt else ""
        raise JobError(f"{at}{bad} holds NaN or inf; {path} not written, the last good one is kept "
                       f"(lower --lr or raise --epsilon, then --resume)")
    data = io.BytesIO()  # serialised first: torch.save into the file wraps a full disk in a RuntimeError
    torch.save(ckpt, data)
    write_atomic(path, lambda f: f.write(data.getbuffer()))


def load(path: str) -> Dict[str, Any]:
    """Read ``path`` on the CPU and check every field this job reads (:func:`problem`): a missing,
    unreadable or invalid checkpoint is a :class:`UsageError` naming it, raised before anything is written."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint at {path}; start a run without --resume (with --overwrite "
                         f"if the folder holds an unfinished one)")
    # Older checkpoints hold the torch version as a TorchVersion, not a str (safe_globals: torch >= 2.5).
    allow = getattr(torch.serialization, "safe_globals", lambda _: contextlib.nullcontext())([TorchVersion])
    try:
        with zipfile.ZipFile(path) as records:  # torch.load does not check the records' CRC-32
            damaged = records.testzip()
        if damaged is not None:
            raise UsageError(f"--resume: {path} is damaged: its record {damaged} fails its CRC-32 check (changed "
                             "bytes); resume from a copy, or start afresh with --overwrite")
        with allow:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"--resume: cannot read the checkpoint {path} ({type(e).__name__}); "
                         f"expected a checkpoint.pt written by this job") from e
    if not isinstance(ckpt, dict) or not KEYS <= ckpt.keys():
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UsageError(f"--resume: {path} is not a checkpoint of this job (expected a dict with {sorted(KEYS)}, "
                         f"found {found})")
    error = problem(ckpt)
    if error is not None:
        raise UsageError(f"--resume: {path} is damaged: {error}")
    return ckpt


KEYS = {"model_per_rank", "optimizer", "step", "rng", "config", "world_size", "loss_window_per_rank",
        "loss_first", "loss_last", "seconds"}


def problem(ckpt: Dict[str, Any]) -> Optional[str]:
    """What is wrong with the fields of ``ckpt`` that do not need the model to check, or None. The model
    and optimizer states are checked when loaded (queue pointers by ``MemoryBankModule``)."""
    step, world = ckpt["step"], ckpt["world_size"]
    if type(step) is not int or step < 0:
        return f"step = {step!r}, expected an int >= 0"
    if type(world) is not int or world < 1:
        return f"world_size = {world!r}, expected an int >= 1"
    for key in ("model_per_rank", "rng", "loss_window_per_rank"):
        if not isinstance(ckpt[key], (list, tuple)) or len(ckpt[key]) != world:
            return f"{key} is not a list of world_size = {world} entries"
    if not isinstance(ckpt["config"], dict) or not all(isinstance(s, dict) for s in ckpt["model_per_rank"]):
        return "config and model_per_rank must hold dicts"
    for r, state in enumerate(ckpt["rng"]):
        try:
            torch.Generator().set_state(state["torch"])
        except Exception:
            return f"rng.{r}.torch is not a torch generator state"
    bad = first_non_finite(ckpt)
    return None if bad is None else f"{bad} holds NaN or inf"


@contextlib.contextmanager
def lock(folder: str) -> Iterator[None]:
    """Hold ``folder/.lock`` (``fcntl.flock``, POSIX) for the duration: a second job on the folder is a
    :class:`UsageError` naming the holder's pid. The holder removes the file as it ends; the kernel releases
    the lock of a holder that dies (even by ``kill -9``), so a lock left by a dead process is taken over. A
    folder where the file cannot be made (read-only, no space) is a :class:`JobError` naming it."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    path = os.path.join(folder, ".lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise JobError(f"cannot create {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(f"--out {folder!r} is in use by another run (pid {holder}); wait for it to end, "
                             f"or use another --out") from None
        try:  # the file may have been removed by a holder that ended between our open and flock: again
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # the pid is only for the message of a second job
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)  # still holding the lock: a job that opened the old file sees it gone
        os.close(fd)


@contextlib.contextmanager
def locked(out: str, device: torch.device):
    """Rank 0 holds ``out``'s lock (:func:`lock`); every rank learns whether it got it, so that
    a refusal ends every rank alike (rank 0 says why; the others' usage error is not printed twice)."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if rank() == 0:
            try:
                stack.enter_context(lock(out))
            except (UsageError, JobError) as e:
                refusal = e
        if any_rank(refusal is not None, device):
            raise refusal or UsageError(f"rank 0 could not take the lock of --out {out!r}")
        yield


RUN_FILES = ("checkpoint.pt", "log.csv", "metrics.json", "backbone.pt")


def clear(folder: str, old_run: bool) -> None:
    """Remove the temporary files a killed job left in ``folder``, and with ``old_run`` the files of
    the run it held (:data:`RUN_FILES` and ``loss.png``: ``--overwrite``). Call it holding :func:`lock`."""
    ours = RUN_FILES + ("loss.png",)  # only the names this job writes, never a user's own *.tmp
    names = [n + ".tmp" for n in ours] + [n for n in ours if old_run]
    for path in (os.path.join(folder, n) for n in names):
        if os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)


def save_backbone(path: str, backbone: torch.nn.Module) -> None:
    """Write ``backbone``'s state_dict (CPU tensors, keys without a ``backbone.`` prefix) atomically."""
    save(path, {k: v.detach().cpu() for k, v in backbone.state_dict().items()})
