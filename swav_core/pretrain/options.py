"""The job's options become final here: the command line's, merged with a resumed checkpoint's (only the
run-only ones may change), then the defaults that depend on the data; each check names the option."""
import argparse
import os
from typing import Any, Dict, Optional, Tuple

import torch

from . import checkpoint
from .data import Data, manifest, manifest_change
from .errors import UsageError
from .parallel import has_fsdp2, world_size
from .synthetic import SYNTHETIC

__all__ = ["RUN_ONLY", "resolve", "with_data_defaults", "normalised", "resumed_options", "check_stored",
           "check_data", "check_resume"]


def resolve(args: argparse.Namespace, given: Optional[Dict]) -> Tuple[argparse.Namespace, Optional[Dict]]:
    """The options of this run and, with ``--resume``, its checkpoint (checked, read before anything is written).

    ``given``: the options written on the command line (default: those of ``args`` that are not None); with
    ``--resume`` the others come from the checkpoint (:func:`resumed_options`).
    """
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite deletes it: pass one of them")
    path = os.path.join(args.out, "checkpoint.pt")
    ckpt = checkpoint.load(path) if args.resume else None
    if ckpt is not None:
        given = {k: v for k, v in vars(args).items() if v is not None} if given is None else given
        check_stored(ckpt["config"], path)
        check_data(ckpt, given)
        args = resumed_options(ckpt["config"], args, given)
    _check(args)
    return args, ckpt


def with_data_defaults(args: argparse.Namespace, data: Data) -> argparse.Namespace:
    """The final options: those whose default depends on 2D or 3D data filled in (3D volumes cost ~13x more
    per crop), the k-NN bank checked against the data."""
    if data.train_labels is not None and args.knn_k > len(data.train):
        raise UsageError(f"--knn-k {args.knn_k} but the k-NN bank holds only the {len(data.train)} training samples "
                         f"(--n-train); lower --knn-k or raise --n-train")
    two_d = data.dims == 2
    return argparse.Namespace(**{
        **vars(args),
        "batch_size": args.batch_size or (64 if two_d else 32),
        "widths": None if args.backbone else tuple(args.widths or ((16, 32, 64, 128) if two_d else (8, 16, 32, 64))),
        "n_train": len(data.train) if args.data in SYNTHETIC else args.n_train,
    })


# Options that may differ between a run and its resumption; any other difference is an error.
RUN_ONLY = {"out", "steps", "stop_at", "resume", "overwrite", "device", "amp", "log_every", "ckpt_every", "knn_k",
            "workers", "plot", "dist_timeout", "fsdp", "stop_on_collapse"}


def check_resume(args, ckpt: Dict) -> None:
    if ckpt["world_size"] != world_size():
        raise UsageError(f"--resume: the checkpoint was written by {ckpt['world_size']} process(es), "
                         f"this run has {world_size()}")
    if args.steps < ckpt["step"]:
        raise UsageError(f"--steps {args.steps} but the checkpoint is already at step {ckpt['step']}; "
                         f"pass --steps {ckpt['step']} or more")
    if args.stop_at is not None and args.stop_at <= ckpt["step"]:
        raise UsageError(f"--stop-at {args.stop_at} but the checkpoint is already at step {ckpt['step']}")


def check_data(ckpt: Dict[str, Any], given: Dict[str, Any]) -> None:
    """A ``--data`` folder resumed must hold the files the checkpoint recorded (names, sizes); a folder
    moved elsewhere with the same files is accepted at its new place (given as ``--data``)."""
    saved = ckpt.get("data_files")
    if saved is None:  # synthetic data, or a checkpoint from before the record
        return
    folder = given.get("data", ckpt["config"]["data"])
    if not os.path.isdir(folder):
        raise UsageError(f"--resume: the --data folder {folder!r} is gone; give its new place with --data")
    change = manifest_change(saved, manifest(folder))
    if change:
        raise UsageError(f"--resume: --data {folder!r} changed since the checkpoint: {change}; restore it, or "
                         f"start a new run with --overwrite")
    ckpt["config"]["data"] = normalised("data", folder)


def normalised(option: str, value: Any) -> Any:
    """``value`` of ``option`` in the form runs are compared in: a ``--data`` folder as its real absolute
    path (``../data/`` and ``/home/me/data`` are the same data), lists as tuples."""
    if option == "data" and isinstance(value, str) and value not in SYNTHETIC:
        return os.path.realpath(value)
    return tuple(value) if isinstance(value, list) else value


def resumed_options(saved: Dict[str, Any], args: argparse.Namespace, given: Dict[str, Any]) -> argparse.Namespace:
    """The options of a resumed run: the checkpoint's ``saved`` ones, then the run-only options in
    ``given`` (those written on the command line: ``--steps``, ``--device``, …; see :data:`RUN_ONLY`).

    ``--stop-at`` and ``--fsdp`` are never inherited (a run may change between DDP and FSDP2). Any other
    option given is compared after :func:`normalised`, and a real change is a :class:`UsageError` naming the
    option, the old and the new value.
    """
    diff = {k: (saved.get(k), v) for k, v in given.items()
            if k not in RUN_ONLY and normalised(k, saved.get(k)) != normalised(k, v)}
    if diff:
        lines = ", ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise UsageError(f"--resume with different options than the checkpoint: {lines}; leave them out to "
                         f"continue with the checkpoint's own")
    run_only = {k: v for k, v in given.items() if k in RUN_ONLY}
    fixed = {"out": args.out, "resume": True, "overwrite": False, "stop_at": None, "fsdp": args.fsdp}
    return argparse.Namespace(**{**vars(args), **saved, **fixed, **run_only})


def check_stored(options: dict, path: str) -> None:
    """Every option stored in a checkpoint (``path``) as the command line would take it: an edited value
    is a :class:`UsageError` naming it, not a traceback later."""
    from .cli import build_parser  # (cli imports the job, which imports this module)
    for action in build_parser()._actions:
        if action.dest not in options or action.dest in ("help", "version"):
            continue
        value, error = options[action.dest], None
        if action.nargs == 0:  # a flag
            error = None if isinstance(value, bool) else "expected True or False"
        elif value is not None or action.default is not None:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            try:
                parsed = action.type(text) if action.type else text
                error = None if not action.choices or parsed in action.choices else f"expected one of {action.choices}"
            except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                error = str(e)
        if error:
            raise UsageError(f"--resume: {path} holds an invalid option {action.option_strings[0]} {value!r}: {error}")


def _check(args: argparse.Namespace) -> None:
    """The checks that need neither the data nor the checkpoint; raise :class:`UsageError`."""
    if args.stop_at is not None and args.stop_at > args.steps:
        raise UsageError(f"--stop-at {args.stop_at} is beyond --steps {args.steps}")
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UsageError("--fsdp shards the model over processes: run it under torchrun --nproc_per_node N (N >= 2)")
    if args.fsdp and not has_fsdp2():
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
