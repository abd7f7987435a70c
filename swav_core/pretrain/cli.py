"""Command line of ``python -m swav_core.pretrain``: options, their defaults and help."""
import argparse
import math
import os
import sys
import textwrap
from typing import List, Optional, Tuple

from .. import __version__
from . import plot
from .data import INPUT_RANGE
from .errors import JobError, UsageError
from .train import run

__all__ = ["build_parser", "main"]

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
  torchrun --nproc_per_node 2 -m swav_core.pretrain              # DDP, gloo on CPU (NCCL with --device cuda)
  torchrun --nproc_per_node 2 -m swav_core.pretrain --fsdp       # the same, sharded with FSDP2
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


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the job, return the process exit code.

    Bad input (:class:`UsageError`) exits with argparse's ``error:`` line and code 2; a run that cannot
    go on (:class:`JobError`) or is stopped at once by a second signal prints one ``error:`` line too
    and returns 1, or 130 after a signal.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.plot is not None:
            return _plot_only(args.plot)
        return run(args, given=_given(parser, argv, vars(args)))
    except UsageError as e:
        parser.error(str(e))
    except JobError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return e.code
    except KeyboardInterrupt as e:  # a second Ctrl-C, or one before the job's handlers were installed
        print(f"{parser.prog}: error: {e.args[0] if e.args else 'interrupted'}", file=sys.stderr, flush=True)
        return 130


def _given(parser: argparse.ArgumentParser, argv: Optional[List[str]], dests) -> dict:
    """The options written on the command line: ``argv`` parsed again into a namespace that already
    holds a marker for every option, so argparse fills in no default."""
    unset = object()
    written = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(dests, unset)))
    return {k: v for k, v in vars(written).items() if v is not unset}


def _plot_only(folder: str) -> int:
    path = plot.write(folder)
    if path is None:
        raise UsageError(plot.hint(folder))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
