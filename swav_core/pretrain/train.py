"""The pretraining loop: the backbone, set-up (single process or torchrun), steps, checkpoints, the
learning-rate schedule, stop on a signal and resume."""
import argparse
import contextlib
import copy
import gc
import math
import os
import re
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import MemoryBankModule, MultiCrop, SwaV, SwaVLoss, __version__, training_health
from ..health import COLLAPSED
from . import backbone as nets
from . import checkpoint, plot, report
from .data import Data, batches, derive_seed, load_data, manifest
from .errors import DataFault, JobError, UsageError
from .synthetic import SYNTHETIC
from .evaluate import evaluate

__all__ = ["run", "lr_at", "StopRequest", "rank", "world_size"]


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    """Linear warm-up over ``min(warmup, steps // 2)`` steps, then cosine decay towards 0 at ``steps``.

    The cap keeps a short run (``steps < 2 * warmup``) from ending at the peak rate; longer runs
    warm up for exactly ``warmup`` steps.
    """
    warmup = min(warmup, steps // 2)
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()  # checked at each call, never cached


def world_size() -> int:
    """Processes in the default group, 1 without one."""
    return dist.get_world_size() if _distributed() else 1


def rank() -> int:
    """This process's rank in the default group, 0 without one."""
    return dist.get_rank() if _distributed() else 0


def _say(*args) -> None:
    """print on rank 0 only, flushed (progress is read live, also through pipes)."""
    if rank() == 0:
        print(*args, flush=True)


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over all ranks in place; unchanged without a group."""
    if world_size() > 1:
        dist.all_reduce(x)
    return x


class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM ask the loop to stop after the current step and save a checkpoint.

    A context manager installing the handlers (main thread only) and restoring the previous ones.
    The first signal sets a flag the loop reads at the end of each step; under torchrun the flag is
    OR-reduced over ranks every step, so all ranks stop after the same step and save one consistent
    checkpoint. A second signal stops the job at once (a ``KeyboardInterrupt`` whose message names
    ``saved``, the last step saved) — except with several processes: torchrun passes each signal it
    receives on to the ranks, so a rank sees a terminal's Ctrl-C twice, and torchrun's own SIGKILL
    (30 s later) is the abort. Once ``training_done`` is set, a signal stops the job at once: the
    checkpoint holds every step, and ``--resume`` runs the final evaluation.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, path: str, saved: Optional[int], forwarded: bool = False):
        self.path, self.saved, self.forwarded = path, saved, forwarded
        self.requested = self.training_done = False
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind, *exc) -> None:
        for sig, handler in self._previous.items():
            # Under torchrun a run ending in an error ignores the agent's SIGTERM, which it sends the ranks
            # still running as soon as one ends: this rank's error line must reach the terminal first.
            signal.signal(sig, signal.SIG_IGN if kind is not None and self.forwarded else handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.training_done:
            raise KeyboardInterrupt(f"{name} during the final evaluation: stopped; {self.path} holds all "
                                    f"{self.saved} steps, --resume runs the evaluation")
        if self.requested and not self.forwarded:
            raise KeyboardInterrupt(f"{name} again: stopped at once; {self.last_saved()}")
        if not self.requested:
            self.requested = True
            again = "" if self.forwarded else " (again to stop at once)"
            _say(f"{name}: saving a checkpoint after this step{again}")

    def last_saved(self) -> str:
        return f"the last checkpoint is {self.path} at step {self.saved}" if self.saved else "no checkpoint saved"

    def requested_anywhere(self, device: torch.device) -> bool:
        """True when any rank received a signal (a collective: every rank must call it each step).

        ``device`` is the training device: NCCL reduces CUDA tensors only.
        """
        if world_size() == 1:
            return self.requested
        return bool(_sum_over_ranks(torch.tensor([float(self.requested)], device=device)).item() > 0)


# What gloo raises when a peer does not answer within the group's timeout, or is gone.
_PEER_LOST = re.compile(r"timed out[^\n]*|timeout caused pair closure|connection (closed|reset) by peer", re.IGNORECASE)


def _setup_distributed(device_name: str, timeout_s: float):
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


def _build(args: argparse.Namespace, data: Data, device: torch.device):
    spatial = data.train.shape[2:]
    high = args.high_size or min(spatial)
    low = args.low_size or max(1, high // 2)
    if min(high, low) < 2:  # a 1-pixel crop carries no structure to learn from
        raise UsageError(f"crops of {min(high, low)} pixel per side (--high-size {high}, --low-size {low}; the data is "
                         f"{tuple(spatial)}, the low-resolution size defaults to half the high one): expected >= 2")
    crops = MultiCrop(high, low, n_high=2, n_low=args.n_low,
                      high_scale=args.high_scale, low_scale=args.low_scale, intensity=args.intensity)
    sample = data.train.shape[1:]
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, the caller's RNG left as it was
        torch.manual_seed(args.seed)  # the same initialisation on every rank and on resume
        backbone = nets.build(args.backbone, sample[0], data.dims, args.widths)
        shapes = [(sample[0],) + (size,) * data.dims for size in (high, low)]
        model = SwaV(backbone, nets.feature_size(backbone, args.backbone, shapes), args.out_dim, args.prototypes,
                     n_queues=2 if args.queue_length else 0, queue_length=args.queue_length,
                     n_steps_frozen_prototypes=args.freeze_prototypes_steps,
                     group_crops_by_resolution=args.group_crops_by_resolution).to(device)
    loss_fn = SwaVLoss(args.temperature, args.sinkhorn_iterations, args.epsilon,
                       sinkhorn_gather_distributed=world_size() > 1)
    return crops, model, loss_fn


def _parallel(args: argparse.Namespace, model: SwaV):
    """``model`` under DDP, or sharded in place by FSDP2 (``--fsdp``: backbone, head and prototypes
    units under the root), or as it is in one process; then its optimizer, over the parameters that
    the wrapper trains (FSDP2 replaces them by sharded ones)."""
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        # FSDP2 warns once per module that returns a view (SwaV's per-crop scores; SmallCNN's flatten):
        # an in-place change of one would skip a hook. Nothing here changes them in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for unit in (model.backbone, model.projection_head, model.prototypes, model):
            fully_shard(unit)
        net = model
    else:
        net = DistributedDataParallel(model) if world_size() > 1 else model
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    return net, optimizer


def _cpu_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state as plain CPU tensors: sharded parameters gathered (a collective under FSDP2),
    each queue this rank's own."""
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    for name, module in model.named_modules():  # alone, a queue saves plain tensors
        if isinstance(module, MemoryBankModule):
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _optimizer_state(model: nn.Module, optimizer, fsdp: bool) -> Dict:
    """``optimizer.state_dict()``, as one process holds it (parameters numbered in ``model`` order);
    under FSDP2 gathered from the shards, on rank 0 (elsewhere {})."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return _renamed(full, index) if full else {}


def _set_optimizer_state(model: nn.Module, optimizer, state: Dict, fsdp: bool) -> None:
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


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _check_args(args: argparse.Namespace) -> None:
    """The checks that need neither the data nor the checkpoint; raise :class:`UsageError`."""
    if args.stop_at is not None and args.stop_at > args.steps:
        raise UsageError(f"--stop-at {args.stop_at} is beyond --steps {args.steps}")
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UsageError("--fsdp shards the model over processes: run it under torchrun --nproc_per_node N (N >= 2)")
    if args.fsdp and not _has_fsdp2():
        raise UsageError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard), which torch {torch.__version__} "
                         "lacks: drop --fsdp to use DistributedDataParallel")
    if args.backbone and args.widths:
        raise UsageError(f"--widths sets the built-in SmallCNN's stages; with --backbone {args.backbone}, set them "
                         f"in your own function")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but torch.cuda.is_available() is False (use --device cpu)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a file, expected a folder (or a path to create one)")
    held = [name for name in checkpoint.RUN_FILES if os.path.exists(os.path.join(args.out, name))]
    if held and not (args.resume or args.overwrite):
        raise UsageError(f"--out {args.out!r} holds a run ({', '.join(held)}): continue it with --resume, or "
                         f"start afresh with another --out or with --overwrite (deletes it)")


def run(args: argparse.Namespace, given: Optional[Dict] = None) -> int:
    """Run the job described by parsed CLI ``args``; return the exit code (130 after an interruption).

    ``given``: the options written on the command line (default: those of ``args`` that are not None).
    With ``--resume`` the others come from the checkpoint (:func:`~.checkpoint.resumed_options`).
    A failure that ends the run is a :class:`JobError`; a signal that stops it at once a ``KeyboardInterrupt``.
    """
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite deletes it: pass one of them")
    path = os.path.join(args.out, "checkpoint.pt")
    ckpt = checkpoint.load(path) if args.resume else None
    if ckpt is not None:
        given = {k: v for k, v in vars(args).items() if v is not None} if given is None else given
        from .cli import check_options  # (cli imports this module)
        check_options(ckpt["config"], path)
        checkpoint.check_data(ckpt, given)
        args = checkpoint.resumed_options(ckpt["config"], args, given)
    _check_args(args)
    device, owns_group = _setup_distributed(args.device, args.dist_timeout)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    stop = StopRequest(path, ckpt["step"] if ckpt else None, forwarded=world_size() > 1)
    try:  # the job seeds torch's global RNG for itself; the caller's is restored afterwards
        with stop, torch.random.fork_rng(devices=cuda_devices):
            return _run(args, device, stop, ckpt)
    except RuntimeError as e:  # gloo: "Timed out waiting 10000ms for recv ...", "Connection closed by peer"
        lost = _PEER_LOST.search(str(e)) if world_size() > 1 else None
        if lost is None and not (world_size() > 1 and isinstance(e, dist.DistError)):
            raise
        other = f"rank {1 - rank()}" if world_size() == 2 else "another rank"
        raise JobError(f"rank {rank()}: {lost[0] if lost else type(e).__name__} (--dist-timeout "
                       f"{args.dist_timeout:g} s): {other} stalled or died; {stop.last_saved()}") from None
    finally:
        if owns_group:
            # Free DDP's reducer (held in reference cycles) and its pending gloo work while the
            # interpreter is whole: collected at exit instead, it can abort the process (SIGABRT).
            gc.collect()
            dist.destroy_process_group()


@dataclass
class _Progress:
    """What the loop carries from step to step and saves with the checkpoint."""

    step: int = 0
    loss_first: Optional[float] = None  # the first and last log.csv rows' loss (window means)
    loss_last: Optional[float] = None
    seconds: float = 0.0  # time spent in training steps, over all sessions of the run
    skipped: int = 0  # steps skipped for scores that were not finite (a bad batch), over the run
    skipped_in_a_row: int = 0
    window: List[float] = field(default_factory=list)  # losses since the last progress line
    health: List[List[float]] = field(default_factory=list)  # (pred_entropy, prototype_usage, embedding_std)
    collapsed_rows: int = 0  # logged rows in a row that look collapsed (see _watch)
    # When, and after which step, this session and its current window began: crops/s counts the
    # window's steps, the ETA all of this session's (after a resume, ``window`` also holds losses
    # from before the interruption).
    window_start: float = field(default_factory=time.perf_counter)
    window_from: int = 0
    session_start: float = field(default_factory=time.perf_counter)
    session_from: int = 0


def _with_data_defaults(args: argparse.Namespace, data: Data) -> argparse.Namespace:
    """Fill the options whose default depends on 2D or 3D data (3D volumes cost ~13x more per crop)."""
    two_d = data.dims == 2
    return argparse.Namespace(**{
        **vars(args),
        "batch_size": args.batch_size or (64 if two_d else 32),
        "widths": None if args.backbone else tuple(args.widths or ((16, 32, 64, 128) if two_d else (8, 16, 32, 64))),
        "n_train": len(data.train) if args.data in SYNTHETIC else args.n_train,
    })


def _check_data(args: argparse.Namespace, data: Data) -> None:
    if data.train_labels is not None and args.knn_k > len(data.train):
        raise UsageError(f"--knn-k {args.knn_k} but the k-NN bank holds only the {len(data.train)} training samples "
                         f"(--n-train); lower --knn-k or raise --n-train")


def _run(args: argparse.Namespace, device: torch.device, stop: StopRequest, ckpt: Optional[Dict]) -> int:
    """Load the data, make ``--out`` and hold its lock (rank 0), then train."""
    data = load_data(args.data, args.seed, n_train=args.n_train, n_test=args.n_test)
    args = _with_data_defaults(args, data)
    _check_data(args, data)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out!r}: cannot create the folder ({e.strerror})") from e
    with _locked(args.out, device):
        try:
            return _train(args, data, device, stop, ckpt)
        except JobError:
            raise
        except RuntimeError as e:
            if "DataLoader worker" in str(e):  # its SIGCHLD handler, anywhere in a step: not saved
                raise JobError(f"a process reading --data died during a step ({str(e).strip()}); "
                               f"{stop.last_saved()}") from None
            if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                raise  # torch.OutOfMemoryError on CUDA; "can't allocate memory" on the CPU
            spatial = data.train.shape[2:]
            size = re.search(r"allocate (\d+) bytes|Tried to allocate ([\d.]+ \w+)", str(e))
            size = f"{int(size[1]) / 2**30:.2f} GiB" if size and size[1] else size[2] if size else "memory"
            raise JobError(f"out of memory (one allocation of {size} failed): samples {tuple(data.train.shape[1:])}, "
                           f"--batch-size {args.batch_size} per process, --high-size {args.high_size or min(spatial)}"
                           f": lower them (and --low-size); {stop.last_saved()}") from None


@contextlib.contextmanager
def _locked(out: str, device: torch.device):
    """Rank 0 holds ``out``'s lock (:func:`~.checkpoint.lock`); every rank learns whether it got it, so that
    a refusal ends every rank alike (rank 0 says why; the others' usage error is not printed twice)."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if rank() == 0:
            try:
                stack.enter_context(checkpoint.lock(out))
            except (UsageError, JobError) as e:
                refusal = e
        if _any_rank(refusal is not None, device):
            raise refusal or UsageError(f"rank 0 could not take the lock of --out {out!r}")
        yield


def _train(args: argparse.Namespace, data: Data, device: torch.device, stop: StopRequest, ckpt: Optional[Dict]) -> int:
    paths = {name: os.path.join(args.out, name) for name in ("checkpoint.pt", "log.csv", "metrics.json")}
    config = {**vars(args), "data": checkpoint.normalised("data", args.data)}
    data_files = None if args.data in SYNTHETIC else manifest(args.data)  # what --resume compares
    crops, model, loss_fn = _build(args, data, device)
    # The job's own steps do not draw from the global RNG (data order and crops have seeded generators
    # of their own), a user's backbone may (dropout). Seeded per rank after _build, whose seeded
    # initialisation resets the CUDA generators; --resume then restores the saved states.
    torch.manual_seed(derive_seed("global", args.seed, rank()))
    init_backbone = copy.deepcopy(model.backbone).cpu()  # the random-initialisation baseline
    if ckpt:
        _check_resume(args, ckpt)
        _load_states(ckpt, paths["checkpoint.pt"], model)  # into the unsharded model
    net, optimizer = _parallel(args, model)
    progress = _resume(args, ckpt, paths["checkpoint.pt"], model, optimizer) if ckpt else _Progress()
    if rank() == 0:
        _first_writes(args, paths["log.csv"], progress.step)
    end = min(args.steps, args.stop_at or args.steps)
    _say(f"SwAV on {args.data} {tuple(data.train.shape)} | {world_size()} process(es) on {device} | "
         f"B={args.batch_size}/process, {report.crops_text(crops)} | steps {progress.step}->{end} of {args.steps}")
    if args.queue_length:
        _say(report.queue_line(args.queue_length, args.batch_size, len(data.train), world_size(), args.steps))
    loader = _start_session(args, data, progress, end, device)
    for step in range(progress.step, end):
        try:
            _train_step(args, step, loader, len(data.train), crops, net, loss_fn, optimizer, device, progress)
        except DataFault as e:  # before the step changed anything: the state after the last one is saved
            _save(paths["checkpoint.pt"], model, optimizer, config, progress, device, args.fsdp, data_files)
            raise JobError(f"{e}; saved {paths['checkpoint.pt']} at step {progress.step}: fix --data, then "
                           f"--resume") from None
        # Not at --stop-at: a stopped and resumed run logs the same rows as an uninterrupted one.
        if progress.step % args.log_every == 0 or progress.step == args.steps:
            try:
                _log(args, progress, optimizer.param_groups[0]["lr"], crops, end, paths["log.csv"], device)
            except JobError as e:  # log.csv could not be written (a full disk): say what is on disk
                raise JobError(f"{e}; {stop.last_saved()}") from None
            except _Collapsed as e:
                _save(paths["checkpoint.pt"], model, optimizer, config, progress, device, args.fsdp, data_files)
                raise JobError(f"{e}: stopped (--stop-on-collapse); saved {paths['checkpoint.pt']} at step "
                               f"{progress.step}") from None
        interrupted = stop.requested_anywhere(device)
        if interrupted or progress.step == end or progress.step % args.ckpt_every == 0:
            _save(paths["checkpoint.pt"], model, optimizer, config, progress, device, args.fsdp, data_files)
            stop.saved = progress.step
        if interrupted:
            _say(f"interrupted after step {progress.step}: saved {paths['checkpoint.pt']}; continue with --resume")
            return 130
    if end < args.steps:
        _say(f"stopped after step {end} (--stop-at): saved {paths['checkpoint.pt']}; continue with --resume")
        return 0
    stop.training_done = True
    if stop.requested_anywhere(device):  # a signal during the last save: that checkpoint holds every step
        _say(f"interrupted after the last step: saved {paths['checkpoint.pt']}; --resume runs the final evaluation")
        return 130
    _finish(args, config, data, model, init_backbone, crops, device, progress, paths["metrics.json"])
    return 0


def _first_writes(args, log_path: str, step: int) -> None:
    """With everything checked: remove what a killed job left (and the old run with ``--overwrite``),
    then rewrite log.csv atomically, keeping a resumed run's rows up to ``step``."""
    checkpoint.clear(args.out, old_run=args.overwrite)
    text, damaged = report.kept_log(log_path, step)
    if damaged:  # the rows that could be read go on; the file as it was stays beside them
        with open(log_path, "rb") as f:
            original = f.read()
        checkpoint.write_atomic(log_path + ".damaged", lambda f: f.write(original))
        _say(f"{log_path}: {damaged} damaged line(s) dropped, the readable rows kept; the file as it was "
             f"is {log_path}.damaged")
    checkpoint.write_atomic(log_path, lambda f: f.write(text.encode()))


def _start_session(args, data: Data, progress: _Progress, end: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Start this session's clocks (crops/s, ETA); return the batches of steps ``progress.step`` … ``end - 1``."""
    progress.window_start = progress.session_start = time.perf_counter()
    progress.window_from = progress.session_from = progress.step
    return batches(data.train, args.batch_size, args.seed, progress.step, end, rank(), world_size(),
                   args.workers, pin_memory=device.type == "cuda")


def _check_resume(args, ckpt: Dict) -> None:
    if ckpt["world_size"] != world_size():
        raise UsageError(f"--resume: the checkpoint was written by {ckpt['world_size']} process(es), "
                         f"this run has {world_size()}")
    if args.steps < ckpt["step"]:
        raise UsageError(f"--steps {args.steps} but the checkpoint is already at step {ckpt['step']}; "
                         f"pass --steps {ckpt['step']} or more")
    if args.stop_at is not None and args.stop_at <= ckpt["step"]:
        raise UsageError(f"--stop-at {args.stop_at} but the checkpoint is already at step {ckpt['step']}")


def _resume(args, ckpt: Dict, path: str, model, optimizer) -> _Progress:
    _load_optimizer(ckpt, path, model, optimizer, args.fsdp)
    checkpoint.set_rng_state(ckpt["rng"][rank()])
    _say(f"resumed {path} at step {ckpt['step']}/{args.steps}")
    window = ckpt["loss_window_per_rank"][rank()].tolist()  # so the next log row averages the same steps
    health = ckpt["health_window_per_rank"][rank()].tolist() if "health_window_per_rank" in ckpt else []
    return _Progress(ckpt["step"], ckpt["loss_first"], ckpt["loss_last"], ckpt["seconds"], ckpt.get("skipped", 0),
                     ckpt.get("skipped_in_a_row", 0), window, health, ckpt.get("collapsed_rows", 0))


def _load_states(ckpt: Dict, path: str, model: nn.Module) -> None:
    """This rank's model from ``ckpt``; a state that does not fit (a queue pointer out of range, a missing
    key, a tensor of another shape) is a :class:`UsageError` naming it."""
    with _not_fitting(path):
        model.load_state_dict(ckpt["model_per_rank"][rank()], strict=True)


def _load_optimizer(ckpt: Dict, path: str, model: nn.Module, optimizer, fsdp: bool) -> None:
    """The optimizer state from ``ckpt`` (written under DDP or FSDP2 alike); checked like the model's."""
    with _not_fitting(path):
        params = list(model.parameters())  # a sharded one's shape is the whole parameter's
        for i, state in ckpt["optimizer"]["state"].items():  # checked first: FSDP2 would shard a bad one
            for key, value in state.items():
                if torch.is_tensor(value) and value.ndim > 0 and value.shape != params[i].shape:
                    raise ValueError(f"optimizer state {key} is {tuple(value.shape)}, its parameter "
                                     f"{tuple(params[i].shape)}")
        _set_optimizer_state(model, optimizer, ckpt["optimizer"], fsdp)


@contextlib.contextmanager
def _not_fitting(path: str):
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UsageError(f"--resume: {path} does not fit this run: {' '.join(str(e).split())}") from None


def _train_step(args, step: int, loader, n: int, crops: MultiCrop, net, loss_fn, optimizer, device, progress) -> None:
    """One optimisation step on the next batch of ``loader`` (:func:`~.data.batches`, from ``step``,
    of ``n`` samples); its data and crops depend only on (seed, step, rank)."""
    t0 = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, args.steps, args.lr, args.warmup_steps)
    x, fault = _next_batch(loader)
    if _any_rank(fault is not None, device):  # every rank stops before the step, to save the same state
        raise DataFault(fault or "another rank could not read its batch of --data")
    x = x.to(device, non_blocking=True)
    generator = torch.Generator().manual_seed(derive_seed("crops", args.seed, step, rank()))
    high, low = crops(x, generator=generator)
    # A bad batch (crops not finite) is skipped before the forward, on every rank alike: the BatchNorm
    # statistics and queues never see it, so nothing needs restoring (the step a GradScaler would skip).
    if _any_rank(not all(bool(torch.isfinite(c).all()) for c in high + low), device):
        _skip(step, progress)
        progress.seconds += time.perf_counter() - t0
        return
    progress.skipped_in_a_row = 0
    epoch = step * args.batch_size * world_size() // n
    model = net.module if isinstance(net, DistributedDataParallel) else net
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp), _FirstEmbedding(model, len(x)) as z:
        loss, scores = _loss(net, loss_fn, (high, low), epoch, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    value = loss.detach().item()
    if not math.isfinite(value):
        raise JobError(f"loss is {value} at step {step + 1}: {_DIVERGED}")
    health = training_health(z.value, scores, args.temperature)  # of the first crop: figures for the log
    progress.step = step + 1
    progress.seconds += time.perf_counter() - t0
    progress.window.append(value)
    progress.health.append(torch.stack(list(health.values())).tolist())  # after loss.item(): no extra wait


class _FirstEmbedding:
    """``value``: the unit embeddings z (B, D) of a step's first crop: the first B rows of the projection
    head's first output in the ``with`` block (all crops at once with --group-crops-by-resolution)."""

    def __init__(self, model: SwaV, batch: int):
        self.model, self.batch, self.value = model, batch, None

    def __enter__(self) -> "_FirstEmbedding":
        self.handle = self.model.projection_head.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _keep(self, module, args, out: torch.Tensor) -> None:
        if self.value is None:
            self.value = out.detach()[: self.batch]


def _next_batch(loader):
    """The next batch, or (None, one line) when a ``--data`` file changed (deleted, made NaN) or a process
    reading it died; the DataLoader wraps a worker's error in its traceback: its last line is kept."""
    try:
        return next(loader), None
    except DataFault as e:
        return None, str(e).strip().splitlines()[-1].split("DataFault: ")[-1]
    except (RuntimeError, OSError) as e:  # OSError: a worker killed while handing over a batch
        if isinstance(e, RuntimeError) and "DataLoader worker" not in str(e):
            raise
        return None, f"a process reading --data died ({type(e).__name__}: {str(e).splitlines()[0]})"


_DIVERGED = "stopped, the last checkpoint is kept (lower --lr or raise --epsilon, then --resume)"
_SKIPS_IN_A_ROW = 3  # more bad batches in a row than this: the data keeps failing, stop


def _loss(net, loss_fn: SwaVLoss, crops, epoch: int, step: int):
    """The loss of one step's finite ``crops`` (high, low) and the first crop's scores (detached). Scores
    that are not finite (a diverged model, which the loss refuses) end the run with one line."""
    high, low, queue = net(crops, epoch=epoch, step=step)
    try:
        return loss_fn(high, low, queue), high[0].detach()
    except ValueError:
        if all(bool(torch.isfinite(s).all()) for s in high + low):
            raise
    raise JobError(f"the scores are not finite at step {step + 1}: {_DIVERGED}")


def _skip(step: int, progress: _Progress) -> None:
    """Skip step ``step``, whose crops are not finite: one line, counted (log.csv column ``skipped``); more
    than :data:`_SKIPS_IN_A_ROW` in a row stop the run."""
    progress.step, progress.skipped = step + 1, progress.skipped + 1
    progress.skipped_in_a_row += 1
    if progress.skipped_in_a_row > _SKIPS_IN_A_ROW:
        raise JobError(f"the crops are not finite at steps {step + 2 - progress.skipped_in_a_row}-{step + 1} (NaN or "
                       f"inf in the data): stopped; check the data, then --resume")
    _say(f"step {step + 1}: the crops are not finite (a bad batch): step skipped before the forward "
         f"({progress.skipped} skipped so far, log.csv column 'skipped')")


def _any_rank(flag: bool, device) -> bool:
    """True when ``flag`` is True on any rank (a collective: every rank calls it)."""
    return bool(_sum_over_ranks(torch.tensor([float(flag)], device=device)).item() > 0)


def _log(args, progress: _Progress, lr: float, crops: MultiCrop, end: int, path: str, device) -> None:
    """A progress line and a log.csv row: the mean loss over all ranks since the last line; crops/s
    from the steps run in this session since then, the ETA from all of this session's steps."""
    if not progress.window:  # every step since the last row was skipped (the same on every rank)
        return
    means = torch.tensor([[v, *h] for v, h in zip(progress.window, progress.health)], device=device).mean(dim=0)
    mean, *health = (_sum_over_ranks(means) / world_size()).tolist()  # loss, then the three figures
    health = dict(zip(report.HEALTH_FIELDS, health))
    progress.loss_first = mean if progress.loss_first is None else progress.loss_first
    progress.loss_last = mean
    now = time.perf_counter()
    elapsed, ran = now - progress.window_start, progress.step - progress.window_from
    cps = ran * args.batch_size * (crops.n_high + crops.n_low) * world_size() / elapsed
    per_step = (now - progress.session_start) / (progress.step - progress.session_from)
    if rank() == 0:
        _say(report.progress_line(progress.step, args.steps, mean, lr, cps, (end - progress.step) * per_step, health))
        report.append_log(path, dict(step=progress.step, loss=f"{mean:.6f}", lr=f"{lr:.6e}",
                                     crops_per_s=f"{cps:.1f}", elapsed=f"{progress.seconds:.2f}",
                                     skipped=progress.skipped, **{k: f"{v:.4f}" for k, v in health.items()}))
    progress.window, progress.health = [], []
    progress.window_start, progress.window_from = time.perf_counter(), progress.step
    _watch(args, progress, health)


_ROWS_TO_WARN = 3  # logged rows in a row that look collapsed before the warning


def _watch(args, progress: _Progress, health: Dict[str, float]) -> None:
    """After the warm-up and the frozen prototype steps, say once (in one line) when the last logged rows all
    look collapsed, naming the figure and the knobs; with --stop-on-collapse, stop (a :class:`_Collapsed`)."""
    if progress.step <= max(args.warmup_steps, args.freeze_prototypes_steps):
        return
    why = _collapse(health, args.prototypes)
    progress.collapsed_rows = progress.collapsed_rows + 1 if why else 0
    if progress.collapsed_rows == _ROWS_TO_WARN:  # once per stretch of collapsed rows
        line = f"step {progress.step}: the run looks collapsed for {_ROWS_TO_WARN} logged rows: {why}"
        if args.stop_on_collapse:
            raise _Collapsed(line)
        _say(line + " (going on; --stop-on-collapse stops instead)")


def _collapse(health: Dict[str, float], k: int) -> Optional[str]:
    """What in ``health`` (one logged row's figures) looks collapsed, with the knobs to turn; None if nothing."""
    if health["pred_entropy"] >= COLLAPSED["pred_entropy"]:
        return (f"pred_entropy {health['pred_entropy']:.3f}: the predictions are near uniform (the loss sits "
                f"at ln K); lower --temperature, raise --lr or lower --freeze-prototypes-steps")
    if health["prototype_usage"] * k <= COLLAPSED["prototype_usage_k"]:
        return (f"prototype_usage {health['prototype_usage']:.3f}: a handful of the {k} prototypes take every "
                f"sample; raise --epsilon, start the queue later or freeze the prototypes longer")
    if health["embedding_std"] < COLLAPSED["embedding_std"]:
        return (f"embedding_std {health['embedding_std']:.3f}: the embeddings sit near one point; lower --lr "
                f"or strengthen the augmentations (--high-scale, --low-scale, --intensity)")
    return None


class _Collapsed(Exception):
    """--stop-on-collapse: the run looks collapsed (the message says how); it stops after a checkpoint."""


def _save(path: str, model, optimizer, config, progress: _Progress, device, fsdp: bool, data_files) -> None:
    """Every rank's state is gathered (its own queues), rank 0 checks and writes it, all wait for the
    outcome: a state rank 0 refuses to save (non-finite) or cannot write stops every rank."""
    states, rngs = checkpoint.gather(_cpu_state(model)), checkpoint.gather(checkpoint.rng_state())
    optimizer_state = _optimizer_state(model, optimizer, fsdp)
    windows = checkpoint.gather(torch.tensor(progress.window, dtype=torch.float64))  # unlogged losses
    healths = checkpoint.gather(torch.tensor(progress.health, dtype=torch.float64).reshape(-1, 3))  # their figures
    error = None
    if rank() == 0:
        try:
            checkpoint.save(path, {
                "model": states[0], "model_per_rank": states, "optimizer": optimizer_state,
                "step": progress.step, "rng": rngs, "loss_window_per_rank": windows,
                "health_window_per_rank": healths, "collapsed_rows": progress.collapsed_rows,
                "config": config, "world_size": world_size(),
                "loss_first": progress.loss_first, "loss_last": progress.loss_last, "seconds": progress.seconds,
                "skipped": progress.skipped, "skipped_in_a_row": progress.skipped_in_a_row, "data_files": data_files,
                "torch": str(torch.__version__), "swav_core": __version__,
            })
        except JobError as e:
            error = e
    failed = _sum_over_ranks(torch.tensor([float(error is not None)], device=device)).item() > 0  # a barrier too
    if failed:
        raise error or JobError(f"rank 0 could not save {path} after step {progress.step} (see its error)")


def _finish(args, config, data, model, init_backbone, crops, device, progress: _Progress, path: str) -> None:
    """k-NN evaluation, metrics.json and the summary, on rank 0; the other ranks wait."""
    backbone = copy.deepcopy(init_backbone).to(device)  # the trained one, unsharded
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in _cpu_state(model).items() if k.startswith("backbone.")})
    if rank() == 0:
        if progress.step == 0:
            raise ValueError("no training step was run")
        metrics = evaluate(backbone, init_backbone, data, device, args.knn_k)
        n_crops = crops.n_high + crops.n_low
        metrics.update(
            steps=args.steps, loss_first=progress.loss_first, loss_last=progress.loss_last,
            seconds=round(progress.seconds, 3),
            crops_per_s=round(args.batch_size * n_crops * world_size() * args.steps / max(progress.seconds, 1e-9), 1),
            device=str(device), world_size=world_size(), n_train=len(data.train), swav_core=__version__,
            config={k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
            backbone=nets.describe(args.backbone, backbone, data.train.shape[1]),  # what rebuilds it
        )
        checkpoint.write_atomic(path, lambda f: f.write(report.metrics_text(metrics).encode()))
        checkpoint.save_backbone(os.path.join(args.out, "backbone.pt"), backbone)
        drawn = plot.write(args.out)
        _say(report.summary(metrics, args.knn_k, args.out, None if drawn else plot.hint(args.out)))
    if world_size() > 1:
        dist.barrier()
