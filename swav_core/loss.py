"""The SwAV swapped-prediction loss (Caron et al., 2020, arXiv:2006.09882, §3.1 and multi-crop §3.2)."""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import _flag, _positive_number
from .sinkhorn import _check_hyper, _is_compiling, _sinkhorn

__all__ = ["SwaVLoss"]

Crops = List[torch.Tensor]


class SwaVLoss(nn.Module):
    r"""Swapped prediction of Sinkhorn codes across multi-crop views (§3.1, §3.2).

    For each high-resolution crop i, codes q_i = sinkhorn(cat(z_i, queue_i))[:B] are computed without
    gradient (the queue rows only help the equipartition). Every other crop v predicts them with
    p_v = softmax(z_v/τ):

        ℓ = 1/n_high · Σ_i 1/(n_crops − 1) · Σ_{v≠i} −1/B · Σ_b Σ_k q_i[b, k] · log p_v[b, k]

    log_softmax is computed once per crop (not once per pair); the value equals lightly's SwaVLoss.
    With several prototype heads, each argument holds per crop a list over heads and the loss is the
    mean over heads.

    Args:
        temperature: τ of the predictions. Default: 0.1.
        sinkhorn_iterations: Sinkhorn-Knopp rounds for the codes. Default: 3.
        sinkhorn_epsilon: ε of the codes. Default: 0.05.
        sinkhorn_gather_distributed: compute the codes over the batches of all ranks (see
            :func:`swav_core.sinkhorn`). Default: False.

    Shape:
        - high_resolution_outputs: list of n_high ≥ 1 tensors (B, K) (or lists over heads of (B, K_h)).
        - low_resolution_outputs: list of n_low tensors (B, K), n_high + n_low ≥ 2.
        - queue_outputs: ``None``, an empty list, or one (N_i, K) tensor per high-resolution crop.
        - output: 0-dim, float32 (float64 when an input is float64), also under autocast.

    Example::

        >>> loss = SwaVLoss()(high_resolution_outputs=[p1, p2], low_resolution_outputs=[p3, p4])
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_gather_distributed: bool = False,
    ):
        super().__init__()
        self.temperature = _positive_number("temperature", temperature)
        self.sinkhorn_iterations, self.sinkhorn_epsilon = _check_hyper(sinkhorn_iterations, sinkhorn_epsilon)
        self.sinkhorn_gather_distributed = _flag("sinkhorn_gather_distributed", sinkhorn_gather_distributed)
        # Sinkhorn's (B + N, K) work buffer, kept between calls on the CPU: a fresh allocation of that
        # size is a fresh mmap whose page faults cost a third of the whole Sinkhorn call. Scratch only
        # (codes are copied out of it), so it is neither state nor a buffer.
        self._work: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, sinkhorn_iterations={self.sinkhorn_iterations}, "
            f"sinkhorn_epsilon={self.sinkhorn_epsilon}, "
            f"sinkhorn_gather_distributed={self.sinkhorn_gather_distributed}"
        )

    def forward(
        self,
        high_resolution_outputs: Sequence,
        low_resolution_outputs: Sequence,
        queue_outputs: Optional[Sequence] = None,
    ) -> torch.Tensor:
        heads = _split_heads(high_resolution_outputs, low_resolution_outputs, queue_outputs)
        losses = [self._head_loss(high, low, queue) for high, low, queue in heads]
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        # Non-finite predictions (or z/τ overflowing) make the loss non-finite: named, not passed on.
        # One host sync, skipped while torch.compile traces.
        if not _is_compiling() and not bool(torch.isfinite(loss)):
            raise ValueError(self._non_finite_message(heads))
        return loss

    def _non_finite_message(self, heads) -> str:
        multi_head = len(heads) > 1
        predictors = [(h, name, z) for h, (high, low, _) in enumerate(heads) for name, z in _predictors(high, low)]
        for h, name, z in predictors:
            if not bool(torch.isfinite(z).all()):
                where = f"{name}[{h}]" if multi_head else name
                return (
                    f"SwaVLoss: {where} must be finite: its NaN or ±inf scores make the loss "
                    "non-finite (-inf is accepted only for computing codes, not as a prediction)"
                )
        biggest = max(z.abs().max().item() for _, _, z in predictors)
        return (
            f"SwaVLoss: the loss is not finite: scores up to {biggest:.3g} divided by "
            f"temperature={self.temperature} overflow"
        )

    def _head_loss(self, high: Crops, low: Crops, queue: Optional[Crops]) -> torch.Tensor:
        crops = high + low
        n_high, n_crops = len(high), len(crops)
        batch = crops[0].shape[0]
        dtype = torch.float64 if any(z.dtype == torch.float64 for z in crops) else torch.float32
        with torch.autocast(device_type=crops[0].device.type, enabled=False):
            codes = self._codes(high, queue, dtype)  # (n_high, B, K), no gradient
            total = codes.sum(dim=0)  # (B, K)
            loss = None
            for v, z in enumerate(crops):
                if v == 0 and n_high == 1:
                    continue  # a single high-resolution crop predicts nothing
                # Crop v predicts every code but its own: weight Σ_{i ≠ v} q_i.
                weight = total - codes[v] if v < n_high else total  # (B, K)
                log_p = F.log_softmax(z.to(dtype) / self.temperature, dim=1)  # (B, K), once per crop
                term = (weight * log_p).sum()
                loss = term if loss is None else loss + term
        return loss.neg() / (n_high * (n_crops - 1) * batch)

    def _codes(self, high: Crops, queue: Optional[Crops], dtype: torch.dtype) -> torch.Tensor:
        batch, n_prototypes = high[0].shape
        codes = high[0].new_empty((len(high), batch, n_prototypes), dtype=dtype)  # (n_high, B, K)
        work = None
        if queue is not None:  # one (B + N, K) buffer for all crops
            n_rows = batch + max(len(x) for x in queue)
            work = self._work_buffer(n_rows * n_prototypes, high[0].device, dtype)
            work = work[: n_rows * n_prototypes].view(n_rows, n_prototypes)
        for i, z in enumerate(high):
            names = (f"high_resolution_outputs[{i}]", f"queue_outputs[{i}]")
            if queue is None:
                _sinkhorn([z], *self._sinkhorn_args, out=codes[i], names=names)
            else:
                out = work[: batch + len(queue[i])]
                q = _sinkhorn([z, queue[i]], *self._sinkhorn_args, out=out, rows=batch, names=names)
                codes[i].copy_(q)
        return codes

    def _work_buffer(self, numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A flat scratch tensor of at least ``numel`` elements, reused between calls on the CPU."""
        if device.type != "cpu" or _is_compiling():
            return torch.empty(numel, device=device, dtype=dtype)
        w = self._work
        if w is None or w.numel() < numel or w.dtype != dtype:
            w = self._work = torch.empty(numel, dtype=dtype)
        return w

    @property
    def _sinkhorn_args(self) -> Tuple[int, float, bool]:
        return self.sinkhorn_iterations, self.sinkhorn_epsilon, self.sinkhorn_gather_distributed


def _split_heads(high, low, queue) -> List[Tuple[Crops, Crops, Optional[Crops]]]:
    """Validate the three arguments and regroup them per prototype head."""
    high = _as_list(high, "high_resolution_outputs")
    low = _as_list(low, "low_resolution_outputs")
    queue = None if queue is None else _as_list(queue, "queue_outputs")
    queue = queue or None  # an empty queue list means no queue
    if not high:
        raise ValueError("high_resolution_outputs must hold at least one crop, got an empty list")
    if len(high) + len(low) < 2:
        raise ValueError(
            f"SwaVLoss needs at least 2 crops in total, got {len(high)} high-resolution and "
            f"{len(low)} low-resolution"
        )
    if queue is not None and len(queue) != len(high):
        raise ValueError(
            f"queue_outputs must hold one entry per high-resolution crop ({len(high)}), got {len(queue)}"
        )
    named = [(f"high_resolution_outputs[{i}]", z) for i, z in enumerate(high)]
    named += [(f"low_resolution_outputs[{i}]", z) for i, z in enumerate(low)]
    multi_head = isinstance(high[0], (list, tuple))
    n_heads = len(high[0]) if multi_head else 1
    if n_heads == 0:
        raise ValueError("high_resolution_outputs[0] must hold at least one prototype head, got an empty list")
    per_head = []
    for h in range(n_heads):
        crops = [_head(z, h, name, multi_head, n_heads) for name, z in named]
        queues = None
        if queue is not None:
            queues = [
                _head(x, h, f"queue_outputs[{i}]", multi_head, n_heads, queue=True) for i, x in enumerate(queue)
            ]
        _check_shapes(crops, [name for name, _ in named], queues, h if multi_head else None)
        per_head.append((crops[: len(high)], crops[len(high) :], queues))
    return per_head


def _predictors(high: Crops, low: Crops) -> List[Tuple[str, torch.Tensor]]:
    """(argument name, scores) of the crops that predict codes: all but a lone high-resolution crop."""
    named = [(f"high_resolution_outputs[{i}]", z) for i, z in enumerate(high)] if len(high) > 1 else []
    return named + [(f"low_resolution_outputs[{i}]", z) for i, z in enumerate(low)]


def _as_list(x, name: str) -> list:
    if isinstance(x, torch.Tensor) or not isinstance(x, (list, tuple)):
        raise ValueError(f"{name} must be a list (one entry per crop), got {type(x).__name__}")
    return list(x)


def _head(x, h: int, name: str, multi_head: bool, n_heads: int, queue: bool = False) -> torch.Tensor:
    if multi_head:
        if not isinstance(x, (list, tuple)) or len(x) != n_heads:
            got = f"a list of {len(x)}" if isinstance(x, (list, tuple)) else type(x).__name__
            raise ValueError(f"{name} must be a list over the {n_heads} prototype heads, got {got}")
        x, name = x[h], f"{name}[{h}]"
    ok = isinstance(x, torch.Tensor) and x.dim() == 2 and x.is_floating_point()
    if not ok or x.shape[1] == 0 or (x.shape[0] == 0 and not queue):
        is_tensor = isinstance(x, torch.Tensor)
        what = f"shape {tuple(x.shape)}, dtype {x.dtype}" if is_tensor else type(x).__name__
        rows = "(N, K)" if queue else "(B, K), B ≥ 1"
        raise ValueError(f"{name} must be a floating-point tensor {rows}, K ≥ 1, got {what}")
    return x


def _check_shapes(crops: Crops, names: List[str], queues: Optional[Crops], head: Optional[int]) -> None:
    shape = tuple(crops[0].shape)
    for name, z in zip(names, crops):
        if tuple(z.shape) != shape:
            raise ValueError(
                f"all crops must have the same shape (B, K): {names[0]} is {shape} but {name} is "
                f"{tuple(z.shape)}" + ("" if head is None else f" (head {head})")
            )
    for i, x in enumerate(queues or []):
        if x.shape[1] != shape[1]:
            raise ValueError(
                f"queue_outputs[{i}] must have K={shape[1]} prototype scores like the crops, got shape "
                f"{tuple(x.shape)}" + ("" if head is None else f" (head {head})")
            )
