"""Command line of ``python -m swav_core.pretrain``: :func:`main` (the options: :mod:`.options`)."""
import argparse
import sys
from typing import List, Optional

from . import plot
from .errors import JobError, UsageError
from .options import build_parser
from .train import run

__all__ = ["build_parser", "main"]


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
