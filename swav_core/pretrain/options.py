"""The job's options: the command line (:func:`build_parser`: defaults, help, one ``error:`` line per bad value),
merged with a resumed checkpoint's (only the run-only ones may change), then the defaults that depend on the data
(:func:`with_data_defaults`): the options become final here, each check naming the option."""
import argparse
import math
import os
import textwrap
from typing import Any, Dict, Optional, Tuple

import torch

from .. import __version__

from . import checkpoint
from .data import INPUT_RANGE, Data, manifest, manifest_change
from .errors import UsageError
from .parallel import has_fsdp2, world_size
from .synthetic import SYNTHETIC

__all__ = ["build_parser", "RUN_ONLY", "resolve", "with_data_defaults", "normalised", "resumed_options", "check_stored",
           "check_data", "check_resume"]


DESCRIPTION = """\
Pretrain a small CNN (or --backbone) with SwAV (swav_core.SwaV + SwaVLoss + MultiCrop), then evaluate
its frozen features by k-NN and a linear probe against the same network at random initialisation.

Writes to --out (one job at a time; a folder holding a run needs --resume or --overwrite):
checkpoint.pt (every --ckpt-every steps, at the end, at --stop-at and on Ctrl-C or SIGTERM;
never with a NaN or inf in it), log.csv (one row per logged step: the mean loss since the
previous row), and at the end metrics.json, backbone.pt (the backbone's state_dict) and loss.png
(with matplotlib: pip install -e ".[plot]"). --resume continues with the checkpoint's own options. Run it under
`torchrun --nproc_per_node N -m swav_core.pretrain ...` for DistributedDataParallel.

{input_range}
""".format(input_range=textwrap.fill(f"Input range: {INPUT_RANGE}.", 100))


EPILOG = """\
examples:
  python -m swav_core.pretrain                                   # the default run, ~1-2 min on 2 CPU cores
  python -m swav_core.pretrain --data synthetic3d --out runs/3d  # lesion-like 3D volumes
  python -m swav_core.pretrain --data my_images/ --steps 5000    # your own PNG/JPEG or .pt/.npy samples
  python -m swav_core.pretrain --backbone mynets:resnet          # your own network, from mynets.py
  python -m swav_core.pretrain --resume                          # continue runs/pretrain/checkpoint.pt
  python -m swav_core.pretrain --plot runs/pretrain              # draw loss.png for a run folder
  torchrun --nproc_per_node 2 -m swav_core.pretrain --out runs/ddp          # DDP, gloo on CPU (NCCL: --device cuda)
  torchrun --nproc_per_node 2 -m swav_core.pretrain --out runs/fsdp --fsdp  # the same, sharded with FSDP2
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; appends real defaults (not None / False) to the help."""

    def _get_help_string(self, action):
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not hidden and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _int_at_least(lo: int, why: str = ""):
    """An argparse type: an int ≥ ``lo``; the error names the bound (argparse adds the option)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo:
            raise argparse.ArgumentTypeError(f"expected an int >= {lo}{why}, got {text!r}")
        return value
    parse.__name__ = f"int >= {lo}"
    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def _finite_float(accept, expected: str):
    """An argparse type: a finite float for which ``accept(value)`` holds; the error says ``expected``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"expected a finite number {expected}, got {text!r}")
        return value
    parse.__name__ = "float"
    return parse


_positive_float = _finite_float(lambda v: v > 0, "> 0")
_learning_rate = _finite_float(lambda v: 0 < v <= 1e30, "in (0, 1e30]")  # AdamW's lr/(1 - beta1) must fit float32
_non_negative_float = _finite_float(lambda v: v >= 0, ">= 0")
_unit_interval = _finite_float(lambda v: 0 <= v < 1, "in [0, 1)")


def _scale(text: str) -> Tuple[float, float]:
    try:
        lo, hi = (float(t) for t in text.split(","))
    except ValueError:
        lo = hi = math.nan
    if not 0 < lo <= hi <= 1:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 0 < LO <= HI <= 1 (e.g. 0.3,1), got {text!r}")
    return lo, hi


def _widths(text: str) -> Tuple[int, ...]:
    try:
        return tuple(_positive(w) for w in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected positive ints separated by commas (e.g. 16,32,64), got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, exit code 2: no usage text (26 lines) before it; under torchrun from rank 0 only (every
        rank has the same)."""
        self.exit(2, f"{self.prog}: error: {message} {HELP_POINTER}\n" if os.environ.get("RANK", "0") == "0" else None)


HELP_POINTER = "(--help lists the options)"


def build_parser() -> argparse.ArgumentParser:
    """The job's options, in three groups: the run, SwAV, crops and optimisation."""
    p = _Parser(prog="python -m swav_core.pretrain", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"swav-core {__version__}")
    p.add_argument("--plot", metavar="DIR", default=None, help="only draw DIR/loss.png from DIR/log.csv, then exit")
    _run_options(p.add_argument_group("run"))
    _swav_options(p.add_argument_group("SwAV"))
    _crop_options(p.add_argument_group("crops and optimisation"))
    return p


def _run_options(group) -> None:
    group.add_argument("--out", default="runs/pretrain", help="output folder for checkpoint.pt, log.csv, metrics.json, backbone.pt, loss.png")
    group.add_argument("--data", default="synthetic2d",
                       help="synthetic2d (8 shape classes, 32x32), synthetic3d (5 lesion classes, 24^3) or a "
                            "folder of PNG/JPEG images (8-bit) or .pt/.npy arrays, one sample (C,H,W) or (C,D,H,W) "
                            "per file, all one shape, read lazily (see Input range above); files in two or more "
                            "subfolders are classes: labels for the evaluation, which holds out 20%% of each")
    group.add_argument("--workers", type=_non_negative, default=0,
                       help="processes reading a --data folder (0: the training process)")
    group.add_argument("--steps", type=_positive, default=1000,
                       help="length of the whole schedule in optimisation steps (--resume: the checkpoint's unless given)")
    group.add_argument("--batch-size", type=_int_at_least(2, " (BatchNorm needs 2 samples per step)"), default=None,
                       help="samples per step and process, B >= 2 (default: 64 for 2D data, 32 for 3D)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of the data, the initialisation, every crop and torch's global RNG (per rank)")
    group.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train")
    group.add_argument("--amp", action="store_true", help="bf16 autocast for the forward pass and loss")
    group.add_argument("--overwrite", action="store_true",
                       help="start afresh in an --out that holds a run, deleting its checkpoint.pt, log.csv, "
                            "metrics.json, backbone.pt and loss.png (without it, and without --resume, such a "
                            "folder is refused)")
    group.add_argument("--resume", action="store_true",
                       help="continue from OUT/checkpoint.pt with its options; only --steps, --device, --amp, "
                            "--stop-at, --workers, --log-every, --ckpt-every and --knn-k may change")
    group.add_argument("--stop-at", type=_positive, default=None, metavar="K",
                       help="stop after step K and save a checkpoint, exactly as an interruption would")
    group.add_argument("--log-every", type=_positive, default=25, help="steps between progress lines / log rows")
    group.add_argument("--ckpt-every", type=_positive, default=100, help="steps between checkpoints")
    group.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard the model with FSDP2 (fully_shard) instead of DistributedDataParallel; "
                            "checkpoints are the same either way, so a run may change with --resume")
    group.add_argument("--dist-timeout", type=_positive_float, default=300.0, metavar="SECONDS",
                       help="under torchrun: a process that waits this long for another (stalled or dead) stops "
                            "with an error, keeping the last checkpoint")


def _swav_options(group) -> None:
    group.add_argument("--prototypes", type=_int_at_least(2, " (one prototype makes the loss 0)"), default=48,
                       help="number of prototypes K")
    group.add_argument("--out-dim", type=_positive, default=32, help="projection dimension D")
    group.add_argument("--queue-length", type=_non_negative, default=256,
                       help="rows of each high-resolution crop's feature queue; 0 disables the queue")
    group.add_argument("--freeze-prototypes-steps", type=_non_negative, default=20,
                       help="optimisation steps during which the prototypes do not train")
    group.add_argument("--epsilon", type=_positive_float, default=0.05, help="Sinkhorn entropy ε")
    group.add_argument("--sinkhorn-iterations", type=_non_negative, default=3, help="Sinkhorn iterations")
    group.add_argument("--temperature", type=_positive_float, default=0.2,
                       help="softmax temperature τ of the loss (paper: 0.1; 0.2 suits this job's small K and D)")
    group.add_argument("--stop-on-collapse", action="store_true",
                       help="stop (with a checkpoint) instead of going on when the run looks collapsed: 3 logged rows "
                            "in a row with pred_entropy >= 0.97, prototype_usage <= 4/K or embedding_std < 0.05")
    group.add_argument("--group-crops-by-resolution", action="store_true",
                       help="FAIR's multi-crop forward: one backbone call per resolution instead of per crop")


def _crop_options(group) -> None:
    group.add_argument("--high-size", type=_positive, default=None,
                       help="high-res crop size (default: the data's size)")
    group.add_argument("--low-size", type=_positive, default=None,
                       help="low-res crop size (default: half the high size)")
    group.add_argument("--n-low", type=_non_negative, default=4, help="number of low-res crops (2 high-res crops)")
    group.add_argument("--high-scale", type=_scale, default=(0.3, 1.0),
                       help="area/volume fraction LO,HI of high-res crops")
    group.add_argument("--low-scale", type=_scale, default=(0.08, 0.3),
                       help="area/volume fraction LO,HI of low-res crops")
    group.add_argument("--intensity", type=_unit_interval, default=0.2,
                       help="intensity jitter a*x+b, a in 1±i, b in ±i, for inputs on a unit scale (see Input range)")
    group.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="AdamW, or SGD with momentum 0.9")
    group.add_argument("--lr", type=_learning_rate, default=2e-3, help="peak learning rate (linear warm-up, cosine decay)")
    group.add_argument("--weight-decay", type=_non_negative_float, default=1e-4, help="weight decay")
    group.add_argument("--warmup-steps", type=_non_negative, default=20,
                       help="linear warm-up steps, at most half of --steps (a shorter run warms up for "
                            "steps // 2, so its lr still decays)")
    group.add_argument("--widths", type=_widths, default=None,
                       help="channels of the CNN's stages, comma-separated (default: 16,32,64,128 for 2D, 8,16,32,64 for 3D)")
    group.add_argument("--backbone", default=None, metavar="MODULE:CALLABLE",
                       help="your own network instead of the built-in CNN: a function or class in MODULE (imported "
                            "from the current folder) returning an nn.Module that maps (B,C,H,W) or (B,C,D,H,W) to "
                            "features (B,F); called with in_channels=C when it takes that keyword. F is found by a "
                            "dry run; backbone.pt loads into it with strict=True")
    group.add_argument("--n-train", type=_positive, default=None,
                       help="synthetic training samples (default: 4096 for 2D, 1536 for 3D)")
    group.add_argument("--n-test", type=_positive, default=1024,
                       help="held-out synthetic samples for the k-NN evaluation")
    group.add_argument("--knn-k", type=_positive, default=20,
                       help="neighbours of the k-NN evaluation, at most the number of training samples")


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
