"""The job's two kinds of failure, in the leaf module every other part of the job imports: bad input
(:class:`UsageError`) and a run that cannot go on (:class:`JobError`, :class:`DataFault`)."""

import re
from typing import Optional

import torch

__all__ = ["UsageError", "JobError", "DataFault", "resource_error"]


class UsageError(ValueError):
    """Bad input to the job (an option, the data, the checkpoint): the command line reports it as
    argparse does, one ``error:`` line and exit code 2, instead of a traceback. Messages name the
    option and value."""


class JobError(RuntimeError):
    """A run that cannot go on (non-finite state, a full disk, a stalled process, an abort): the command
    line reports it as one ``error:`` line with exit code ``code`` (1; 130 after a signal). The
    checkpoint already on disk is kept."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class DataFault(JobError):
    """A ``--data`` file that changed during the run; ``str()`` is one line naming it."""


def resource_error(e: RuntimeError, args, shape, last_saved: str) -> Optional[JobError]:
    """One line for a run that a process reading --data (dying) or memory (running out) ended, naming the
    options to change and ``last_saved``; None for any other error (a bug: its traceback shows)."""
    if "DataLoader worker" in str(e):  # its SIGCHLD handler, anywhere in a step: not saved
        return JobError(f"a process reading --data died during a step ({str(e).strip()}); {last_saved}")
    if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
        return None  # torch.OutOfMemoryError on CUDA; "can't allocate memory" on the CPU
    size = re.search(r"allocate (\d+) bytes|Tried to allocate ([\d.]+ \w+)", str(e))
    size = f"{int(size[1]) / 2**30:.2f} GiB" if size and size[1] else size[2] if size else "memory"
    return JobError(f"out of memory (one allocation of {size} failed): samples {tuple(shape[1:])}, --batch-size "
                    f"{args.batch_size} per process, --high-size {args.high_size or min(shape[2:])}: lower them (and "
                    f"--low-size); {last_saved}")
