"""A FIFO ring buffer of feature vectors: SwAV's queue (Caron et al., 2020, §4 "small batches")."""
from typing import Optional, Sequence, Tuple, Union

import torch
from einops import rearrange
from torch import nn

from ._checks import _counter_error, _flag, _parse_size
from .distributed import all_gather_cat

__all__ = ["MemoryBankModule"]

_STATE_KEYS = ("bank", "bank_ptr", "bank_filled")


class MemoryBankModule(nn.Module):
    """FIFO queue of the last ``length`` feature vectors, stored as a ring buffer.

    A batch is written at the pointer and wraps around the end, so a push costs O(B) whatever the
    length; only the oldest rows are ever overwritten, and a batch longer than the queue leaves its
    last ``length`` rows. Empty slots hold zeros. ``num_filled`` counts real rows.

    The storage, pointer and fill count are plain attributes, not registered buffers, so
    DistributedDataParallel's buffer broadcast (``broadcast_buffers=True``) does not copy rank 0's queue
    onto every rank; they are still written to and read from ``state_dict()`` (keys ``bank``,
    ``bank_ptr``, ``bank_filled``), and ``.to()`` / ``.half()`` / ``.cuda()`` move and cast them. A
    state_dict without these keys (lightly saves no queue state) loads with ``strict=True`` and
    leaves the queue empty; one with only some of them lists the others in ``missing_keys`` (an
    error under ``strict=True``) and also leaves the queue empty.

    Args:
        size: queue length, or ``(length, D)``. With an int, D is taken from the first batch.
            0 disables the queue. Default: 65536
        gather_distributed: push the batch all-gathered from every rank (all ranks then hold the
            same queue). Default: False
        feature_dim_first: ``forward`` returns the bank as (D, length) rather than (length, D).
            Default: True

    Shape:
        push(x): x (B, D).
        features(): (num_filled, D).
        forward(output): output (B, D) → (output, bank), bank (D, length) or (length, D).

    Example:
        >>> queue = MemoryBankModule(size=(3840, 128))
        >>> queue.push(torch.randn(256, 128))
        >>> queue.num_filled, queue.is_full
        (256, False)
    """

    def __init__(
        self,
        size: Union[int, Sequence[int]] = 65536,
        gather_distributed: bool = False,
        feature_dim_first: bool = True,
    ):
        super().__init__()
        length, dim = _parse_size(size)
        self.size = size if isinstance(size, int) else (length, dim)
        self.gather_distributed = _flag("gather_distributed", gather_distributed)
        self.feature_dim_first = _flag("feature_dim_first", feature_dim_first)
        self._fixed_dim = dim is not None
        with torch.inference_mode(False):  # see _new_bank
            self._bank = torch.zeros(length, dim or 0)  # (length, D); (length, 0) until D is known
        self._ptr = 0  # next slot to write
        self._filled = 0  # real rows stored, ≤ length

    # ---- state ---------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self._bank.shape[0]

    @property
    def dim(self) -> Optional[int]:
        return self._bank.shape[1] if (self._fixed_dim or self._bank.shape[1] > 0) else None

    @property
    def num_filled(self) -> int:
        return self._filled

    @property
    def is_full(self) -> bool:
        return self.length > 0 and self._filled == self.length

    def features(self, ordered: bool = True) -> torch.Tensor:
        """The ``num_filled`` stored rows (num_filled, D).

        ``ordered=True``: oldest → newest, a new tensor. ``ordered=False``: slot order, a view of the
        storage without a copy (it changes with later pushes); the order does not matter for scoring.
        """
        stored = self._bank[: self._filled]  # (n, D), slot order
        if not ordered:
            return stored
        if self._filled < self.length:  # not yet wrapped: slot order is arrival order
            return stored.clone()
        return torch.cat((self._bank[self._ptr :], self._bank[: self._ptr]))  # (length, D)

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        """Append a batch (B, D), overwriting the oldest rows once full; all-gathered if requested."""
        if self.length == 0:
            raise ValueError("MemoryBankModule(size=0) is disabled: it stores nothing, push is not allowed")
        self._check_batch(x, "push")
        if self.gather_distributed:
            x = all_gather_cat(x)
        x = x.detach().to(device=self._bank.device, dtype=self._bank.dtype)
        if _overlap(x, self._bank):
            x = x.clone()  # e.g. push(features(ordered=False)): the write would overwrite rows it reads
        self._write(x)

    def _new_bank(self, dim: int) -> None:
        """Replace the storage by zeros (length, D), same device and dtype.

        Made with inference mode off, so a queue first filled (or loaded) under
        ``torch.inference_mode()``, e.g. by a validation pass, still takes in-place pushes afterwards.
        """
        with torch.inference_mode(False):
            self._bank = self._bank.new_zeros(self.length, dim)

    def _write(self, x: torch.Tensor) -> None:
        length, b = self.length, x.shape[0]
        if self.dim is None:
            self._new_bank(x.shape[1])
        n = min(b, length)
        rows = x[b - n :]  # (n, D): the rows that survive this push
        start = (self._ptr + b - n) % length  # where they land had the B rows been pushed one by one
        first = min(n, length - start)
        self._bank[start : start + first] = rows[:first]
        self._bank[: n - first] = rows[first:]  # wrap around the end
        self._ptr = (self._ptr + b) % length
        self._filled = min(self._filled + b, length)

    def _check_batch(self, x: torch.Tensor, what: str) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"MemoryBankModule.{what} expects features of shape (B, {self.dim or 'D'}), got {shape}"
            )
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(
                f"MemoryBankModule.{what} expects features of shape (B, {self.dim}) to match the "
                f"bank {tuple(self._bank.shape)}, got {tuple(x.shape)}"
            )

    # ---- lightly's interface -------------------------------------------------------------------
    def forward(
        self, output: torch.Tensor, labels: Optional[torch.Tensor] = None, update: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return ``(output, bank)``, the whole storage before this call's push; ``labels`` is ignored.

        ``bank`` is a detached copy, (D, length) if ``feature_dim_first`` else (length, D), in slot
        order, zeros where empty. ``update=True`` then pushes ``output``.
        """
        if self.length == 0:
            return output, None
        self._check_batch(output, "forward")
        if self.dim is None:
            self._new_bank(output.shape[1])
        if self.feature_dim_first:
            bank = rearrange(self._bank, "l d -> d l").clone(memory_format=torch.contiguous_format)
        else:
            bank = self._bank.clone()  # (length, D)
        if update:
            self.push(output)
        return output, bank

    # ---- device / dtype and checkpoints ----------------------------------------------------------
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        with torch.inference_mode(False):  # see _new_bank
            self._bank = fn(self._bank)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # A snapshot: the counters below are copies, so the contents must be one too, or a state_dict
        # kept while training goes on would pair newer rows with older counters.
        destination[prefix + "bank"] = self._bank.clone()
        destination[prefix + "bank_ptr"] = torch.tensor(self._ptr)
        destination[prefix + "bank_filled"] = torch.tensor(self._filled)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        keys = [prefix + k for k in _STATE_KEYS]
        for k in keys:
            if k in unexpected_keys:
                unexpected_keys.remove(k)
        absent = [k for k in keys if k not in state_dict]
        if absent:  # start empty; lightly / fmcib save no queue state, which is not an incompatibility
            if len(absent) < len(keys):  # part of it: PyTorch's convention, strict=True raises on these
                missing_keys.extend(absent)
            self._bank.zero_()
            self._ptr = self._filled = 0
            return
        bank, ptr, filled = (state_dict[k] for k in keys)
        want = (self.length, self.dim) if self._fixed_dim else (self.length, "D")
        if not isinstance(bank, torch.Tensor) or bank.ndim != 2 or bank.shape[0] != self.length or (
            self._fixed_dim and bank.shape[1] != self.dim
        ):
            got = tuple(bank.shape) if isinstance(bank, torch.Tensor) else type(bank).__name__
            error_msgs.append(
                f"size mismatch for {prefix}bank: copying a queue of shape {got}, "
                f"the queue in the current model has shape {want}"
            )
            return
        errors = [
            _counter_error(prefix, "bank_ptr", ptr, max(self.length, 1) - 1, self.length),
            _counter_error(prefix, "bank_filled", filled, self.length, self.length),
        ]
        if any(errors):
            error_msgs.extend(e for e in errors if e)
            return
        ptr, filled = int(ptr), int(filled)
        if filled < self.length and ptr != filled:
            error_msgs.append(
                f"inconsistent queue state at '{prefix}': bank_ptr={ptr}, bank_filled={filled}, "
                f"length={self.length}: a queue that is not full must have bank_ptr == bank_filled"
            )
            return
        if bank.shape != self._bank.shape:
            self._new_bank(bank.shape[1])
        self._bank.copy_(bank)
        self._ptr, self._filled = ptr, filled

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, gather_distributed={self.gather_distributed}, "
            f"feature_dim_first={self.feature_dim_first}"
        )


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory of ``a``'s and ``b``'s storages overlaps (views, or aliases via NumPy/DLPack)."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    return sa.data_ptr() < sb.data_ptr() + sb.nbytes() and sb.data_ptr() < sa.data_ptr() + sa.nbytes()
