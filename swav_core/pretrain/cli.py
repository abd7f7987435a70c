"""Command line of ``python -m swav_core.pretrain``: options, their defaults and help."""
import argparse
import sys
from typing import List, Optional

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Pretrain a small CNN with SwAV (swav_core.SwaV + SwaVLoss + MultiCrop), then evaluate its
frozen features by k-NN against the same network at random initialisation.

Writes to --out: checkpoint.pt (every --ckpt-every steps, at the end, at --stop-at and on
Ctrl-C), log.csv (one row per logged step) and metrics.json (at the end). Run it under
`torchrun --nproc_per_node N -m swav_core.pretrain ...` for DistributedDataParallel.
"""


EPILOG = """\
examples:
  python -m swav_core.pretrain                                   # the default run, ~1-2 min on 2 CPU cores
  python -m swav_core.pretrain --data synthetic3d --out runs/3d  # lesion-like 3D volumes
  python -m swav_core.pretrain --data my_arrays/ --steps 5000    # your own .pt/.npy samples
  python -m swav_core.pretrain --steps 1000 --resume             # continue runs/pretrain/checkpoint.pt
  torchrun --nproc_per_node 2 -m swav_core.pretrain              # DDP, gloo on CPU (NCCL with --device cuda)
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; appends real defaults (not None / False) to the help."""

    def _get_help_string(self, action):
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not hidden and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text}")
    return value


def _scale(text: str):
    try:
        lo, hi = (float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (e.g. 0.3,1), got {text!r}") from None
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m swav_core.pretrain", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=_Formatter)
    run = p.add_argument_group("run")
    run.add_argument("--out", default="runs/pretrain", help="output folder for checkpoint.pt, log.csv, metrics.json")
    run.add_argument("--data", default="synthetic2d",
                     help="synthetic2d (8 shape classes, 32x32), synthetic3d (5 lesion classes, 24^3) or a "
                          "folder of .pt/.npy files, one sample (C,H,W) or (C,D,H,W) per file, all one shape")
    run.add_argument("--steps", type=_positive, default=1000,
                     help="length of the whole schedule in optimisation steps (also when resuming)")
    run.add_argument("--batch-size", type=_positive, default=None,
                     help="samples per step and process, B (default: 64 for 2D data, 32 for 3D)")
    run.add_argument("--seed", type=int, default=0, help="seed of the data, the initialisation and every crop")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train")
    run.add_argument("--amp", action="store_true", help="bf16 autocast for the forward pass and loss")
    run.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt up to --steps")
    run.add_argument("--stop-at", type=_positive, default=None, metavar="K",
                     help="stop after step K and save a checkpoint, exactly as an interruption would")
    run.add_argument("--log-every", type=_positive, default=25, help="steps between progress lines / log rows")
    run.add_argument("--ckpt-every", type=_positive, default=100, help="steps between checkpoints")

    swav = p.add_argument_group("SwAV")
    swav.add_argument("--prototypes", type=_positive, default=48, help="number of prototypes K")
    swav.add_argument("--out-dim", type=_positive, default=32, help="projection dimension D")
    swav.add_argument("--queue-length", type=_non_negative, default=256,
                      help="rows of each high-resolution crop's feature queue; 0 disables the queue")
    swav.add_argument("--freeze-prototypes-steps", type=_non_negative, default=20,
                      help="optimisation steps during which the prototypes do not train")
    swav.add_argument("--epsilon", type=float, default=0.05, help="Sinkhorn entropy ε")
    swav.add_argument("--sinkhorn-iterations", type=_non_negative, default=3, help="Sinkhorn iterations")
    swav.add_argument("--temperature", type=float, default=0.2,
                      help="softmax temperature τ of the loss (paper: 0.1; 0.2 suits this job's small K and D)")
    swav.add_argument("--group-crops-by-resolution", action="store_true",
                      help="FAIR's multi-crop forward: one backbone call per resolution instead of per crop")

    crops = p.add_argument_group("crops and optimisation")
    crops.add_argument("--high-size", type=_positive, default=None, help="high-res crop size (default: the data's size)")
    crops.add_argument("--low-size", type=_positive, default=None, help="low-res crop size (default: half the high size)")
    crops.add_argument("--n-low", type=_non_negative, default=4, help="number of low-res crops (2 high-res crops)")
    crops.add_argument("--high-scale", type=_scale, default=(0.3, 1.0), help="area/volume fraction LO,HI of high-res crops")
    crops.add_argument("--low-scale", type=_scale, default=(0.08, 0.3), help="area/volume fraction LO,HI of low-res crops")
    crops.add_argument("--intensity", type=float, default=0.2, help="intensity jitter a*x+b, a in 1±i, b in ±i")
    crops.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="AdamW, or SGD with momentum 0.9")
    crops.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (linear warm-up, cosine decay)")
    crops.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    crops.add_argument("--warmup-steps", type=_non_negative, default=20, help="linear warm-up steps")
    crops.add_argument("--widths", type=lambda t: tuple(_positive(w) for w in t.split(",")), default=None,
                       help="channels of the CNN's stages, comma-separated (default: 16,32,64,128 for 2D, 8,16,32,64 for 3D)")
    crops.add_argument("--n-train", type=_positive, default=None,
                       help="synthetic training samples (default: 4096 for 2D, 1536 for 3D)")
    crops.add_argument("--n-test", type=_positive, default=1024, help="held-out synthetic samples for the k-NN evaluation")
    crops.add_argument("--knn-k", type=_positive, default=20, help="neighbours of the k-NN evaluation")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the job, return the process exit code."""
    from .train import run  # the heavy imports only once the arguments parse

    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
