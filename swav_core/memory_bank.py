"""A FIFO ring buffer of feature vectors: SwAV's queue (Caron et al., 2020, §4 "small batches")."""
import functools
import math
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["MemoryBankModule"]


def _eager(recursive: bool = True):
    """``torch.compiler.disable``, asked for only while compiling (importing torch._dynamo takes a second):
    under torch.compile the queue's Python counters and the checks run eagerly instead of being guarded
    on (a recompilation per step)."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if not torch.compiler.is_compiling():
                return fn(*args, **kwargs)
            return torch.compiler.disable(fn, recursive=recursive)(*args, **kwargs)
        return call
    return wrap


class MemoryBankModule(nn.Module):
    """FIFO queue of the last ``length`` feature vectors, stored as a ring buffer.

    A push writes at the pointer in O(B) whatever the length; a batch longer than the queue leaves its last
    ``length`` rows. A row with NaN or ±inf (after the cast) is skipped without a host sync: its slot keeps
    its row (the oldest; before full, a zero row, counted as filled). lightly's ``bank`` (storage, (length, 0)
    until D is known) and ``bank_ptr`` (next slot, read-only (1,) long) are not buffers, so DDP cannot
    broadcast rank 0's queue; ``state_dict()`` saves them and ``bank_filled`` (lightly's state loads empty),
    as DTensors in the state dict of a sharded model, so that DCP saves each rank's own (see the end).

    Args:
        size: queue length (D taken from the first batch), or ``(length, D)``; 0 disables it. Default: 65536
        gather_distributed: push every rank's batch, all-gathered (ranks may differ in B). Default: False
        feature_dim_first: ``forward`` returns the bank as (D, length), not (length, D). Default: True

    Shape:
        push(x), forward(x) → (x, bank): x (B, D).  features(): (num_filled, D).  bank: (length, D).

    Example:
        >>> queue = MemoryBankModule(size=(3840, 128))
        >>> queue.push(torch.randn(256, 128))
        >>> queue.num_filled, queue.is_full, queue.bank_ptr
        (256, False, tensor([256]))
    """

    def __init__(self, size: Union[int, Sequence[int]] = 65536, gather_distributed: bool = False,
                 feature_dim_first: bool = True):
        super().__init__()
        shape = tuple(size) if isinstance(size, (tuple, list, torch.Size)) else (size, 1)  # (length, D)
        if not (len(shape) == 2 and all(type(v) is int for v in shape) and shape[0] >= 0 and shape[1] > 0):
            raise ValueError("size must be a non-negative int (length) or a pair (length >= 0, dim > 0) of "
                             f"ints, got {size!r}")
        self.size = size if isinstance(size, int) else shape
        self.gather_distributed = _flag("gather_distributed", gather_distributed)
        self.feature_dim_first = _flag("feature_dim_first", feature_dim_first)
        with torch.inference_mode(False):  # no inference tensors: they refuse in-place pushes outside it
            self.bank = torch.zeros(shape[0], 0 if isinstance(size, int) else shape[1])
            self._bank_ptr = torch.zeros(1, dtype=torch.long)  # plain attributes, not buffers (see above)
        self._ptr, self._filled = 0, 0  # the next slot to write; real rows stored, ≤ length

    bank_ptr = property(lambda self: self._bank_ptr)  # (1,) int64, refilled by every push
    length = property(lambda self: self.bank.shape[0])
    dim = property(lambda self: self.bank.shape[1] or None)  # None: an int size before its first batch
    num_filled = property(lambda self: self._filled)
    is_full = property(lambda self: self.length > 0 and self._filled == self.length)

    def features(self, ordered: bool = True) -> torch.Tensor:
        """The ``num_filled`` stored rows (n, D): oldest → newest in a new tensor, or, ``ordered=False``,
        in slot order as a view of the storage (no copy; it changes with later pushes)."""
        stored = self.bank[: self._filled]  # (n, D), slot order
        return stored.roll(-self._ptr, 0) if ordered else stored  # the oldest row is at the pointer

    @_eager()
    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        """Append a batch (B, D), overwriting the oldest rows once full; all-gathered if requested."""
        if self.length == 0:
            raise ValueError("MemoryBankModule(size=0) is disabled: it stores nothing, push is not allowed")
        self._accept(x, "push")
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

    def _set_counters(self, ptr: int, filled: int) -> None:
        self._ptr, self._filled = ptr, filled
        self._bank_ptr.fill_(ptr)  # a kernel argument, no host sync

    def _accept(self, x: torch.Tensor, what: str) -> None:
        """Check a batch (B, D) against the bank; an int ``size`` takes D from its first batch."""
        dim = self.dim
        if not (torch.is_tensor(x) and x.ndim == 2 and x.shape[1] > 0 and x.shape[1] == (dim or x.shape[1])):
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            want = f"(B, {dim}) to match the bank {tuple(self.bank.shape)}" if dim else "(B, D) with D > 0"
            raise ValueError(f"MemoryBankModule.{what} expects features of shape {want}, got {shape}")
        self._resize(x.shape[1])

    def _resize(self, dim: int) -> None:  # a new (length, dim) storage unless it has D = dim already
        if dim != self.bank.shape[1]:
            with torch.inference_mode(False):  # see __init__
                self.bank = self.bank.new_zeros(self.length, dim)

    def forward(self, output: torch.Tensor, labels: Optional[torch.Tensor] = None,
                update: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """lightly's interface: ``(output, bank)``, ``bank`` a detached copy of the storage before this
        call's push (slot order, zeros where empty); ``update=True`` then pushes. ``labels`` is ignored."""
        if self.length == 0:
            return output, None
        self._accept(output, "forward")
        bank = self.bank.T if self.feature_dim_first else self.bank
        bank = bank.clone(memory_format=torch.contiguous_format)
        if update:
            self.push(output)
        return output, bank

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(), ... move and cast the storage too
        super()._apply(fn, recurse)
        with torch.inference_mode(False):  # see __init__
            self.bank, self._bank_ptr = fn(self.bank), fn(self._bank_ptr)
        return self

    @property
    def bank_filled(self) -> torch.Tensor:  # the state_dict's name, for torch.distributed.checkpoint
        return torch.tensor(self._filled)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        state = {"bank": self.bank.clone(),  # a snapshot, as the counters are
                 "bank_ptr": torch.tensor(self._ptr), "bank_filled": torch.tensor(self._filled)}
        if _sharded(destination):  # each rank's own queue, as DTensors that DCP saves per rank
            state = {k: _per_rank(v.to(self.bank.device)) for k, v in state.items()}
        destination.update({prefix + k: v for k, v in state.items()})

    def _load_from_state_dict(self, state_dict, prefix, metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(state_dict, prefix, metadata, strict, missing, unexpected, errors)
        keys = [prefix + k for k in ("bank", "bank_ptr", "bank_filled")]
        unexpected[:] = [k for k in unexpected if k not in keys]
        absent = [k for k in keys if k not in state_dict]
        if absent:  # start empty: lightly / fmcib save no queue state, which is not an incompatibility
            if len(absent) < len(keys):  # part of it: PyTorch's convention, strict=True raises on these
                missing.extend(absent)
            self.bank.zero_()
            self._set_counters(0, 0)
            return
        bank, ptr, filled = (_own_part(state_dict[k], n) for k, n in zip(keys, (2, 0, 0)))
        problems = self._state_errors(prefix, bank, ptr, filled)
        errors.extend(problems)
        if not problems:
            self._resize(bank.shape[1])
            self.bank.copy_(bank)
            self._set_counters(int(ptr), int(filled))

    def _state_errors(self, prefix: str, bank, ptr, filled) -> List[str]:
        """Why a saved queue does not fit this one; empty when it does."""
        length, dim = self.length, self.dim if isinstance(self.size, tuple) else "D"
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
                problems.append(f"{prefix}{name}={int(v)} is out of range: expected 0..{top} "
                                f"(queue length {length})")
        if not problems and int(filled) < length and int(ptr) != int(filled):
            problems.append(f"inconsistent queue state at '{prefix}': bank_ptr={int(ptr)}, bank_filled="
                            f"{int(filled)}, length={length}: a queue not full has bank_ptr == bank_filled")
        return problems

    def extra_repr(self) -> str:
        return (f"size={self.size}, gather_distributed={self.gather_distributed}, "
                f"feature_dim_first={self.feature_dim_first}")


def _flag(name: str, value) -> bool:
    """True / False or 1 / 0 (NumPy's bool has no __index__; or a 0-dim tensor); a truthy "no" is refused."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    try:
        if isinstance(value, bool) or numpy_bool or operator.index(value) in (0, 1):
            return bool(value)
    except TypeError:
        pass
    raise ValueError(f"{name} must be a bool, got {value!r}")


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (B_r, D) concatenated in rank order; ``x`` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    counts = [x.new_zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
    counts = torch.cat(counts).tolist()  # ranks may differ in B: pad to the largest, then trim
    padded = torch.cat([x, x.new_zeros(max(counts) - x.shape[0], x.shape[1])])  # (max B_r, D)
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[:n] for rows, n in zip(gathered, counts)])


# ---- the queue state of a sharded model (FSDP2, tensor parallel) ----------------------------------
# DCP (torch.distributed.checkpoint) takes a plain tensor for one replicated across ranks and keeps one
# rank's copy: every rank would get that rank's queue back. In a state dict that already holds DTensors
# (a sharded model; SwaV registers its queues after its parameters) the queue state is therefore a DTensor
# sharded over all W ranks, rank r's part its own: bank (W, L, D), bank_ptr and bank_filled (W,). Gathered
# into plain tensors (get_model_state_dict(..., full_state_dict=True)), each rank loads its own row.


def _sharded(state: dict) -> bool:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from torch.distributed.tensor import DTensor
    return any(isinstance(v, DTensor) for v in state.values())


def _per_rank(t: torch.Tensor) -> torch.Tensor:
    """This rank's ``t`` as row ``rank`` of a DTensor (W, *t.shape) sharded over the default group."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard
    mesh = DeviceMesh.from_group(dist.group.WORLD, t.device.type)
    shape = torch.Size((dist.get_world_size(), *t.shape))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(t[None], mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def _own_part(value, ndim: int):
    """This rank's part of a queue state saved by :func:`_per_rank` (a DTensor, or all W rows gathered
    into a plain tensor under W ranks); anything else as it is, for the checks."""
    if type(value).__name__ == "DTensor":
        value = value.to_local()  # (1, ...): this rank's row
        return value[0] if value.ndim == ndim + 1 and len(value) == 1 else value
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and torch.is_tensor(value) and value.ndim == ndim + 1 and len(value) == dist.get_world_size():
        return value[dist.get_rank()]
    return value

