"""Ctrl-C and SIGTERM: save after the current step (on every rank alike), or stop at once."""
import signal
import threading
from typing import Optional

import torch

from .parallel import say, sum_over_ranks, world_size

__all__ = ["StopRequest"]


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
            say(f"{name}: saving a checkpoint after this step{again}")

    def last_saved(self) -> str:
        return f"the last checkpoint is {self.path} at step {self.saved}" if self.saved else "no checkpoint saved"

    def requested_anywhere(self, device: torch.device) -> bool:
        """True when any rank received a signal (a collective: every rank must call it each step).

        ``device`` is the training device: NCCL reduces CUDA tensors only.
        """
        if world_size() == 1:
            return self.requested
        return bool(sum_over_ranks(torch.tensor([float(self.requested)], device=device)).item() > 0)
