"""The job's two kinds of failure, in the leaf module every other part of the job imports: bad input
(:class:`UsageError`) and a run that cannot go on (:class:`JobError`, :class:`DataFault`)."""

__all__ = ["UsageError", "JobError", "DataFault"]


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
