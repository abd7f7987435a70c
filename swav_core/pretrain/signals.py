"""Ctrl-C (SIGINT) and SIGTERM ask the loop to stop after the current step and save a checkpoint."""
import signal
import threading

import torch

from .. import distributed as D

__all__ = ["StopRequest"]


class StopRequest:
    """Context manager installing the handlers (main thread only) and restoring the previous ones.

    The first signal sets a flag the loop reads at the end of each step; a second one raises
    ``KeyboardInterrupt`` at once. Under torchrun the flag is OR-reduced over ranks every step, so
    all ranks stop after the same step and save one consistent checkpoint.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if D.rank() == 0:
            print(f"{signal.Signals(signum).name}: saving a checkpoint after this step (again to abort now)", flush=True)

    def requested_anywhere(self, device: torch.device) -> bool:
        """True when any rank received a signal (a collective: every rank must call it each step).

        ``device`` is the training device: NCCL reduces CUDA tensors only.
        """
        if D.world_size() == 1:
            return self.requested
        return bool(D.all_reduce_sum_(torch.tensor([float(self.requested)], device=device)).item() > 0)
