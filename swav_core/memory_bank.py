"""A FIFO ring buffer of feature vectors: SwAV's queue (Caron et al., 2020, §4 "small batches")."""
import math
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["MemoryBankModule"]


class MemoryBankModule(nn.Module):
    """FIFO queue of the last ``length`` feature vectors (B, D) (``size``: an int length, or ``(length, D)``; 0
    disables it), stored as a ring buffer: a push writes at the pointer in O(B) whatever the length, a batch longer
    than the queue leaves its last rows, a row with NaN or ±inf is skipped without a host sync (its slot keeps its
    row). lightly's ``bank`` (length, D) and ``bank_ptr`` are not buffers, so DDP cannot broadcast rank 0's queue;
    ``state_dict()`` holds them and ``bank_filled`` (lightly's state loads empty), under a process group as tensors
    that DCP saves per rank (:class:`_RankRow`). ``gather_distributed``: push every rank's batch (B may differ);
    ``feature_dim_first``: ``forward`` returns the bank as (D, length).

    >>> queue = MemoryBankModule(size=(3840, 128))
    >>> queue.push(torch.randn(256, 128))
    >>> queue.num_filled, queue.is_full, queue.bank_ptr, queue.features().shape
    (256, False, tensor([256]), torch.Size([256, 128]))
    """

    def __init__(self, size: Union[int, Sequence[int]] = 65536, gather_distributed: bool = False,
                 feature_dim_first: bool = True):
        super().__init__()
        self.length, dim = _size(size)  # lightly's (length, D), or fmcib's int length (D from the first batch)
        self.size = (self.length, dim) if isinstance(size, (tuple, list)) else self.length  # as given
        self.gather_distributed = _flag("gather_distributed", gather_distributed)
        self.feature_dim_first = _flag("feature_dim_first", feature_dim_first)
        with torch.inference_mode(False):  # no inference tensors: they refuse in-place pushes outside it
            self.bank, self._bank_ptr = torch.zeros(self.length, dim), torch.zeros(1, dtype=torch.long)  # not buffers
        self._ptr, self._filled = 0, 0  # next slot, real rows stored: ints, no host sync (_bank_ptr: lightly's)

    # Read-only: lightly's bank_ptr ((1,) long, refilled by each push), rows stored, D, and bank_filled (for DCP).
    bank_ptr, num_filled = property(lambda self: self._bank_ptr), property(lambda self: self._filled)
    dim, bank_filled = property(lambda self: self.bank.shape[1] or None), property(lambda s: torch.tensor(s._filled))
    is_full = property(lambda self: self.length > 0 and self._filled == self.length)

    def features(self, ordered: bool = True) -> torch.Tensor:
        """The stored rows (num_filled, D), oldest first (a copy), or ``ordered=False`` as stored (a view, no copy)."""
        stored = self.bank[: self._filled]  # (n, D), slot order
        return stored.roll(-self._ptr, 0) if ordered else stored  # the oldest row is at the pointer

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        """Append a batch (B, D), overwriting the oldest rows once full; all-gathered if requested."""
        if torch.compiler.is_compiling():  # eagerly: its int counters would be guarded on, a recompilation a step
            return torch.compiler.disable(self.push)(x)
        self._resize(_checked(self, x, "push").shape[1])
        x = _all_gather(x.detach()) if self.gather_distributed else x.detach()
        length, b = self.length, x.shape[0]
        n = min(b, length)  # the last n rows survive, where they land had the B rows been pushed one by one
        start = (self._ptr + b - n) % length
        first = min(n, length - start)  # rows before the wrap-around
        old = torch.cat([self.bank[start : start + first], self.bank[: n - first]])  # (n, D) what the slots hold
        rows = x[b - n :].to(device=self.bank.device, dtype=self.bank.dtype)  # (n, D)
        finite = rows.abs().amax(dim=1, keepdim=True) < math.inf  # (n, 1); NaN compares False
        rows = torch.where(finite, rows, old)  # a new tensor: it may alias the bank no more
        self.bank[start : start + first], self.bank[: n - first] = rows[:first], rows[first:]
        self._set_counters((self._ptr + b) % length, min(self._filled + b, length))

    def forward(self, output: torch.Tensor, labels: Optional[torch.Tensor] = None,
                update: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """lightly's ``(output, bank)``: a copy of the storage before ``update=True`` pushes; ``labels`` unused."""
        if self.length == 0:
            return output, None
        self._resize(_checked(self, output, "forward").shape[1])
        bank = (self.bank.T if self.feature_dim_first else self.bank).clone(memory_format=torch.contiguous_format)
        if update:
            self.push(output)
        return output, bank

    def _set_counters(self, ptr: int, filled: int) -> None:
        self._ptr, self._filled = ptr, filled
        self._bank_ptr.fill_(ptr)  # a kernel argument, no host sync

    def _resize(self, dim: int) -> None:  # a new (length, dim) storage unless it has D = dim already
        if dim != self.bank.shape[1]:
            with torch.inference_mode(False):  # see __init__
                self.bank = self.bank.new_zeros(self.length, dim)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(), ... move and cast the storage too
        super()._apply(fn, recurse)
        with torch.inference_mode(False):  # see __init__
            self.bank, self._bank_ptr = fn(self.bank), fn(self._bank_ptr)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # and get_extra_state's rank marker
        state = {"bank": self.bank.clone(), "bank_ptr": torch.tensor(self._ptr), "bank_filled": self.bank_filled}
        destination.update({prefix + k: v.as_subclass(_RankRow) if _world() > 1 else v for k, v in state.items()})

    def get_extra_state(self) -> torch.Tensor:  # whose queue the state holds: broadcast_from_rank0 sends only this
        return torch.tensor(dist.get_rank() if _world() > 1 else 0)

    set_extra_state = lambda self, state: None  # noqa: E731  (read by _load_from_state_dict)

    def _load_from_state_dict(self, state_dict, prefix, metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(state_dict, prefix, metadata, strict, missing, unexpected, errors)
        keys = [prefix + k for k in ("bank", "bank_ptr", "bank_filled")]
        absent = [k for k in keys if k not in state_dict]  # all: lightly / fmcib save no queue state (empty queue)
        unexpected[:] = [k for k in unexpected if k not in keys]  # next: no marker (older, lightly's) is not missing
        missing[:] = [k for k in missing if k != prefix + "_extra_state"] + (absent if len(absent) < len(keys) else [])
        if absent:
            marker = state_dict.get(prefix + "_extra_state")
            if len(absent) == len(keys) and torch.is_tensor(marker) and int(marker) != int(self.get_extra_state()):
                errors.append(_BROADCAST.format(prefix, int(marker)))
            self.bank.zero_()
            return self._set_counters(0, 0)
        bank, ptr, filled = (state_dict[k] for k in keys)
        problems = _state_errors(self, prefix, bank, ptr, filled)
        errors.extend(problems)
        if not problems:
            self._resize(bank.shape[1])
            self.bank.copy_(bank)
            self._set_counters(int(ptr), int(filled))

    def extra_repr(self) -> str:
        return (f"size={self.size}, gather_distributed={self.gather_distributed}, "
                f"feature_dim_first={self.feature_dim_first}")


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (B_r, D) concatenated in rank order; ``x`` itself without a process group."""
    if _world() == 1:
        return x
    counts = [x.new_zeros(1, dtype=torch.long) for _ in range(_world())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    counts = torch.cat(counts).tolist()  # ranks may differ in B: pad to the largest, then trim
    padded = torch.cat([x, x.new_zeros(max(counts) - x.shape[0], x.shape[1])])  # (max B_r, D)
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[:n] for rows, n in zip(gathered, counts)])


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _RankRow(torch.Tensor):
    """This rank's queue state, which DCP saves as its row of a (W, *shape) tensor; ``torch.save`` as a plain one."""

    def __reduce_ex__(self, protocol):
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)

    def size(self, dim=None):  # what DCP compares with the saved (W, *shape); .shape stays this rank's
        return torch.Size((_world(), *self.shape))[slice(None) if dim is None else dim]

    def __create_chunk_list__(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        offsets = torch.Size((dist.get_rank(),) + (0,) * self.ndim)
        return [ChunkStorageMetadata(offsets=offsets, sizes=torch.Size((1, *self.shape)))]

    def __create_write_items__(self, fqn: str, obj):
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
        chunk, properties = self.__create_chunk_list__()[0], TensorProperties.create_from_tensor(self)
        data = TensorWriteData(chunk=chunk, properties=properties, size=self.size())
        return [WriteItem(index=MetadataIndex(fqn, chunk.offsets), type=WriteItemType.SHARD, tensor_data=data)]

    def __get_tensor_shard__(self, index):
        return self.as_subclass(torch.Tensor)[None]  # (1, *shape), a view: DCP copies the row into it


# --- argument checks --------------------------------------------------------------------------------

_BROADCAST = ("{}: no queue state but rank {}'s marker: set_model_state_dict(..., broadcast_from_rank0=True) sends "
              "rank 0's state only, not each rank's queues; load each rank's own state (DCP, or torch.save per rank)")

def _flag(name: str, value) -> bool:
    """True / False or 1 / 0 (also NumPy's, or a 0-dim tensor); a truthy "no" is refused."""
    try:  # NumPy's bool (class bool_, or bool in NumPy 2) has no __index__
        if type(value).__name__ in ("bool", "bool_") or operator.index(value) in (0, 1):
            return bool(value)
    except TypeError:
        pass
    raise ValueError(f"{name} must be a bool, got {value!r}")


def _size(size) -> Tuple[int, int]:
    values = list(size) if isinstance(size, (tuple, list)) else [size, None]
    try:
        length, dim = (None if isinstance(v, bool) or v is None else operator.index(v) for v in values)
    except (TypeError, ValueError):
        length = dim = None
    if length is None or length < 0 or (dim is None) != (values[1] is None) or (dim is not None and dim < 1):
        raise ValueError("size must be a non-negative int (length) or a pair (length >= 0, dim > 0) of "
                         f"ints, got {size!r}")
    return length, dim or 0


def _checked(queue: MemoryBankModule, x, what: str):
    """``x``, a batch (B, D) for ``queue``: D that of the bank (any D > 0 before an int size's first batch)."""
    if what == "push" and queue.length == 0:
        raise ValueError("MemoryBankModule(size=0) is disabled: it stores nothing, push is not allowed")
    dim = queue.dim
    if not (torch.is_tensor(x) and x.ndim == 2 and x.shape[1] > 0 and x.shape[1] == (dim or x.shape[1])):
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        want = f"(B, {dim}) to match the bank {tuple(queue.bank.shape)}" if dim else "(B, D) with D > 0"
        raise ValueError(f"MemoryBankModule.{what} expects features of shape {want}, got {shape}")
    return x


def _state_errors(queue: MemoryBankModule, prefix: str, bank, ptr, filled) -> List[str]:
    length, dim = queue.length, queue.dim if isinstance(queue.size, tuple) else "D"
    got = tuple(bank.shape) if torch.is_tensor(bank) else type(bank).__name__
    if not (torch.is_tensor(bank) and bank.ndim == 2 and got[0] == length and dim in ("D", got[1])):
        return [f"size mismatch for {prefix}bank: copying a queue of shape {got}, "
                f"the queue in the current model has shape {(length, dim)}"]
    problems = []
    if bank.is_floating_point() and not bool(torch.isfinite(bank).all()):  # as a pushed row would not
        rows = (~torch.isfinite(bank).all(dim=1)).nonzero()[:, 0].tolist()
        problems.append(f"{prefix}bank holds rows that are not finite (NaN or ±inf), e.g. {rows[:5]}: "
                        "a queue takes finite rows only")
    for name, v, top in (("bank_ptr", ptr, max(length, 1) - 1), ("bank_filled", filled, length)):
        tensor = torch.is_tensor(v)
        if not tensor or v.ndim or v.dtype == torch.bool or v.is_floating_point() or v.is_complex():
            what = f"shape {tuple(v.shape)}, dtype {v.dtype}" if tensor else type(v).__name__
            problems.append(f"{prefix}{name} must be a 0-dim integer tensor, got {v!r} ({what})")
        elif not 0 <= int(v) <= top:
            problems.append(f"{prefix}{name}={int(v)} is out of range: expected 0..{top} (queue length {length})")
    if not problems and int(filled) < length and int(ptr) != int(filled):
        problems.append(f"inconsistent queue state at '{prefix}': bank_ptr={int(ptr)}, bank_filled="
                        f"{int(filled)}, length={length}: a queue not full has bank_ptr == bank_filled")
    return problems

