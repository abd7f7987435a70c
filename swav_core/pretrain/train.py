"""The pretraining loop: one :class:`Run` built once (options, device, data, model, optimizer, loss, paths,
progress), then steps, log rows and checkpoints until the schedule ends, a signal or a fault stops it."""
import argparse
import copy
import gc
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import MultiCrop, SwaV, SwaVLoss, __version__, training_health
from . import backbone as nets
from . import checkpoint, errors, options, parallel, plot, report
from .data import Data, Order, batches, derive_seed, load_data, manifest, next_batch
from .errors import DataFault, JobError, UsageError
from .evaluate import evaluate
from .parallel import any_rank, rank, say, world_size
from .report import Progress
from .signals import StopRequest
from .synthetic import SYNTHETIC

__all__ = ["run", "lr_at", "Run"]


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    """Linear warm-up over ``min(warmup, steps // 2)`` steps, then cosine decay towards 0 at ``steps``.

    The cap keeps a short run (``steps < 2 * warmup``) from ending at the peak rate; longer runs
    warm up for exactly ``warmup`` steps.
    """
    warmup = min(warmup, steps // 2)
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@dataclass
class Run:
    """What one session of the job holds, built once by :func:`_start`: the final options, where it runs,
    what it trains, where it writes, how far it is."""

    args: argparse.Namespace  # final: resumed, data defaults filled in
    device: torch.device
    data: Data
    crops: MultiCrop
    model: SwaV  # sharded in place under --fsdp
    net: nn.Module  # what a step calls: DDP(model), or model
    optimizer: torch.optim.Optimizer
    loss_fn: SwaVLoss
    init_backbone: nn.Module  # the random-initialisation baseline, on the CPU
    paths: Dict[str, str]  # checkpoint.pt, log.csv, metrics.json
    config: Dict  # the options as the checkpoint stores them
    data_files: Optional[list]  # a --data folder's manifest, compared on --resume
    progress: Progress
    stop: StopRequest
    end: int  # the last step of this session (--stop-at)


def run(args: argparse.Namespace, given: Optional[Dict] = None) -> int:
    """Run the job of parsed ``args`` (``given``: :func:`~.options.resolve`); return the exit code (130 after an
    interruption). A run that cannot go on raises :class:`JobError`; a signal stopping it at once KeyboardInterrupt."""
    args, ckpt = options.resolve(args, given)
    device, owns_group = parallel.setup(args.device, args.dist_timeout)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    path = os.path.join(args.out, "checkpoint.pt")
    stop = StopRequest(path, ckpt["step"] if ckpt else None, forwarded=world_size() > 1)
    try:  # the job seeds torch's global RNG for itself; the caller's is restored afterwards
        with stop, torch.random.fork_rng(devices=cuda_devices):
            return _session(args, device, stop, ckpt)
    except RuntimeError as e:  # gloo: "Timed out waiting 10000ms for recv ...", "Connection closed by peer"
        lost = parallel.PEER_LOST.search(str(e)) if world_size() > 1 else None
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


def _session(args: argparse.Namespace, device: torch.device, stop: StopRequest, ckpt: Optional[Dict]) -> int:
    """Load the data, make ``--out`` and hold its lock (rank 0), then train; a worker that died or memory that
    ran out ends in one line."""
    data = load_data(args.data, args.seed, n_train=args.n_train, n_test=args.n_test)
    args = options.with_data_defaults(args, data)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out!r}: cannot create the folder ({e.strerror})") from e
    with checkpoint.locked(args.out, device):
        try:
            return _train(_start(args, device, data, stop, ckpt))
        except RuntimeError as e:
            if isinstance(e, JobError):
                raise
            raise errors.resource_error(e, args, data.train.shape, stop.last_saved()) or e


def _start(args: argparse.Namespace, device: torch.device, data: Data, stop: StopRequest,
           ckpt: Optional[Dict]) -> Run:
    """The :class:`Run` of this session: the model built, seeded and resumed, wrapped, its optimizer; the
    folder's files made ready (rank 0)."""
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
    # The job's own steps do not draw from the global RNG (data order and crops have seeded generators
    # of their own), a user's backbone may (dropout). Seeded per rank after the seeded initialisation,
    # which resets the CUDA generators; --resume then restores the saved states.
    torch.manual_seed(derive_seed("global", args.seed, rank()))
    init_backbone = copy.deepcopy(model.backbone).cpu()
    paths = {name: os.path.join(args.out, name) for name in ("checkpoint.pt", "log.csv", "metrics.json")}
    if ckpt:
        options.check_resume(args, ckpt)
        checkpoint.load_model(ckpt, paths["checkpoint.pt"], model)  # into the unsharded model
    net = parallel.wrap(model, args.fsdp)
    if args.optimizer == "sgd":  # after wrapping: over the parameters the wrapper trains
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    config = {**vars(args), "data": options.normalised("data", args.data)}
    data_files = None if args.data in SYNTHETIC else manifest(args.data)  # what --resume compares
    run = Run(args, device, data, crops, model, net, optimizer, loss_fn, init_backbone, paths, config, data_files,
              Progress(), stop, min(args.steps, args.stop_at or args.steps))
    if ckpt:
        checkpoint.restore(run, ckpt)
    if rank() == 0:
        report.start_log(args.out, paths["log.csv"], run.progress.step, args.overwrite)
    return run


def _train(run: Run) -> int:
    """Steps ``progress.step`` … ``end - 1``: a log row every --log-every steps, a checkpoint every --ckpt-every,
    at the end, at --stop-at, on a signal and before a data fault or a collapse ends the run."""
    args, progress, stop, path = run.args, run.progress, run.stop, run.paths["checkpoint.pt"]
    say(f"SwAV on {args.data} {tuple(run.data.train.shape)} | {world_size()} process(es) on {run.device} | B="
        f"{args.batch_size}/process, {report.crops_text(run.crops)} | steps {progress.step}->{run.end} of {args.steps}")
    if args.queue_length:
        say(report.queue_line(args.queue_length, args.batch_size, len(run.data.train), world_size(), args.steps))
    progress.window_start = progress.session_start = time.perf_counter()  # this session's clocks
    progress.window_from = progress.session_from = progress.step
    order = Order(args.batch_size, args.seed, rank(), world_size())
    loader = batches(run.data.train, order, range(progress.step, run.end), args.workers, run.device.type == "cuda")
    for step in range(progress.step, run.end):
        try:
            _train_step(run, step, loader)
        except DataFault as e:  # before the step changed anything: the state after the last one is saved
            _save(run)
            raise JobError(f"{e}; saved {path} at step {progress.step}: fix --data, then --resume") from None
        # Not at --stop-at: a stopped and resumed run logs the same rows as an uninterrupted one.
        if progress.step % args.log_every == 0 or progress.step == args.steps:
            try:
                _log(run)
            except JobError as e:  # log.csv could not be written (a full disk): say what is on disk
                raise JobError(f"{e}; {stop.last_saved()}") from None
            except report.Collapsed as e:
                _save(run)
                raise JobError(f"{e}: stopped (--stop-on-collapse); saved {path} at step {progress.step}") from None
        interrupted = stop.requested_anywhere(run.device)
        if interrupted or progress.step == run.end or progress.step % args.ckpt_every == 0:
            _save(run)
        if interrupted:
            say(f"interrupted after step {progress.step}: saved {path}; continue with --resume")
            return 130
    if run.end < args.steps:
        say(f"stopped after step {run.end} (--stop-at): saved {path}; continue with --resume")
        return 0
    stop.training_done = True
    if stop.requested_anywhere(run.device):  # a signal during the last save: that checkpoint holds every step
        say(f"interrupted after the last step: saved {path}; --resume runs the final evaluation")
        return 130
    _finish(run)
    return 0


def _train_step(run: Run, step: int, loader: Iterator[torch.Tensor]) -> None:
    """One optimisation step on the next batch of ``loader`` (:func:`~.data.batches`, from ``step``); its data
    and crops depend only on (seed, step, rank)."""
    args, progress, device = run.args, run.progress, run.device
    t0 = time.perf_counter()
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, args.steps, args.lr, args.warmup_steps)
    x, fault = next_batch(loader)
    if any_rank(fault is not None, device):  # every rank stops before the step, to save the same state
        raise DataFault(fault or "another rank could not read its batch of --data")
    x = x.to(device, non_blocking=True)
    high, low = run.crops(x, generator=torch.Generator().manual_seed(derive_seed("crops", args.seed, step, rank())))
    # A bad batch (crops not finite) is skipped before the forward, on every rank alike: the BatchNorm
    # statistics and queues never see it, so nothing needs restoring (the step a GradScaler would skip).
    if any_rank(not all(bool(torch.isfinite(c).all()) for c in high + low), device):
        _skip(step, progress)
        progress.seconds += time.perf_counter() - t0
        return
    progress.skipped_in_a_row = 0
    epoch = step * args.batch_size * world_size() // len(run.data.train)
    model = run.net.module if isinstance(run.net, DistributedDataParallel) else run.net
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp), report.FirstEmbedding(model, len(x)) as z:
        loss, scores = _loss(run, (high, low), epoch, step)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    value = loss.detach().item()
    if not math.isfinite(value):
        raise JobError(f"loss is {value} at step {step + 1}: {_DIVERGED}")
    health = training_health(z.value, scores, args.temperature)  # of the first crop: figures for the log
    progress.step = step + 1
    progress.seconds += time.perf_counter() - t0
    progress.window.append(value)
    progress.health.append(torch.stack(list(health.values())).tolist())  # after loss.item(): no extra wait


_DIVERGED = "stopped, the last checkpoint is kept (lower --lr or raise --epsilon, then --resume)"
_SKIPS_IN_A_ROW = 3  # more bad batches in a row than this: the data keeps failing, stop


def _loss(run: Run, crops, epoch: int, step: int):
    """The loss of one step's finite ``crops`` (high, low) and the first crop's scores (detached). Scores
    that are not finite (a diverged model, which the loss refuses) end the run with one line."""
    high, low, queue = run.net(crops, epoch=epoch, step=step)
    try:
        return run.loss_fn(high, low, queue), high[0].detach()
    except ValueError:
        if all(bool(torch.isfinite(s).all()) for s in high + low):
            raise
    raise JobError(f"the scores are not finite at step {step + 1}: {_DIVERGED}")


def _skip(step: int, progress: Progress) -> None:
    """Skip step ``step``, whose crops are not finite: one line, counted (log.csv column ``skipped``); more
    than :data:`_SKIPS_IN_A_ROW` in a row stop the run."""
    progress.step, progress.skipped = step + 1, progress.skipped + 1
    progress.skipped_in_a_row += 1
    if progress.skipped_in_a_row > _SKIPS_IN_A_ROW:
        raise JobError(f"the crops are not finite at steps {step + 2 - progress.skipped_in_a_row}-{step + 1} (NaN or "
                       f"inf in the data): stopped; check the data, then --resume")
    say(f"step {step + 1}: the crops are not finite (a bad batch): step skipped before the forward "
        f"({progress.skipped} skipped so far, log.csv column 'skipped')")


def _log(run: Run) -> None:
    """A progress line and a log.csv row: the mean loss over all ranks since the last line; crops/s
    from the steps run in this session since then, the ETA from all of this session's steps."""
    args, progress = run.args, run.progress
    if not progress.window:  # every step since the last row was skipped (the same on every rank)
        return
    means = torch.tensor([[v, *h] for v, h in zip(progress.window, progress.health)], device=run.device).mean(dim=0)
    mean, *health = (parallel.sum_over_ranks(means) / world_size()).tolist()  # loss, then the three figures
    health = dict(zip(report.HEALTH_FIELDS, health))
    progress.loss_first = mean if progress.loss_first is None else progress.loss_first
    progress.loss_last = mean
    now, lr = time.perf_counter(), run.optimizer.param_groups[0]["lr"]
    elapsed, ran = now - progress.window_start, progress.step - progress.window_from
    cps = ran * args.batch_size * (run.crops.n_high + run.crops.n_low) * world_size() / elapsed
    per_step = (now - progress.session_start) / (progress.step - progress.session_from)
    if rank() == 0:
        row = dict(loss=mean, lr=lr, crops_per_s=cps, **health)
        say(report.progress_line(progress.step, args.steps, row, (run.end - progress.step) * per_step))
        report.append_log(run.paths["log.csv"], dict(step=progress.step, loss=f"{mean:.6f}", lr=f"{lr:.6e}",
                          crops_per_s=f"{cps:.1f}", elapsed=f"{progress.seconds:.2f}", skipped=progress.skipped,
                          **{k: f"{v:.4f}" for k, v in health.items()}))
    progress.window, progress.health = [], []
    progress.window_start, progress.window_from = time.perf_counter(), progress.step
    report.watch(run.progress, run.args, health)


def _save(run: Run) -> None:
    checkpoint.save_run(run)
    run.stop.saved = run.progress.step


def _finish(run: Run) -> None:
    """k-NN and linear probe, metrics.json, backbone.pt, loss.png and the summary on rank 0; the others wait."""
    args, progress = run.args, run.progress
    backbone = copy.deepcopy(run.init_backbone).to(run.device)  # the trained one, unsharded
    state = parallel.cpu_state(run.model)
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    if rank() == 0:
        if progress.step == 0:
            raise ValueError("no training step was run")
        metrics = evaluate(backbone, run.init_backbone, run.data, run.device, args.knn_k)
        n_crops = run.crops.n_high + run.crops.n_low
        metrics.update(
            steps=args.steps, loss_first=progress.loss_first, loss_last=progress.loss_last,
            seconds=round(progress.seconds, 3),
            crops_per_s=round(args.batch_size * n_crops * world_size() * args.steps / max(progress.seconds, 1e-9), 1),
            device=str(run.device), world_size=world_size(), n_train=len(run.data.train), swav_core=__version__,
            config={k: list(v) if isinstance(v, tuple) else v for k, v in run.config.items()},
            backbone=nets.describe(args.backbone, backbone, run.data.train.shape[1]),  # what rebuilds it
        )
        checkpoint.write_atomic(run.paths["metrics.json"], lambda f: f.write(report.metrics_text(metrics).encode()))
        checkpoint.save_backbone(os.path.join(args.out, "backbone.pt"), backbone)
        drawn = plot.write(args.out)
        say(report.summary(metrics, args.knn_k, args.out, None if drawn else plot.hint(args.out)))
    if world_size() > 1:
        dist.barrier()
