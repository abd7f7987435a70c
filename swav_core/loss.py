"""The SwAV swapped-prediction loss (Caron et al., 2020, arXiv:2006.09882, §3.1 and multi-crop §3.2)."""
import math
import numbers
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .sinkhorn import sinkhorn

__all__ = ["SwaVLoss"]


class SwaVLoss(nn.Module):
    r"""Swapped prediction of Sinkhorn codes across multi-crop views (§3.1, §3.2).

    For each high-resolution crop i, the codes q_i = sinkhorn(cat(z_i, queue_i))[:B] are computed
    without gradient (queue rows only help the equipartition). Every other crop v predicts them
    with p_v = softmax(z_v/τ):

        ℓ = 1/n_high · Σ_i 1/(n_crops − 1) · Σ_{v≠i} subloss(z_v, q_i),
        subloss(z, q) = −1/B · Σ_b Σ_k q[b, k] · log softmax(z/τ)[b, k]

    As subloss is linear in q, crop v's terms are one call with Σ_{i≠v} q_i: log_softmax runs once
    per crop, not once per pair. A subclass that overrides :meth:`subloss` is called per pair, as in
    lightly. With several prototype heads every argument holds, per crop, a list over heads and the
    loss is the mean over heads.

    Args:
        temperature: τ of the predictions. Default: 0.1.
        sinkhorn_iterations: Sinkhorn-Knopp rounds for the codes. Default: 3.
        sinkhorn_epsilon: ε of the codes. Default: 0.05.
        sinkhorn_gather_distributed: codes over the batches of all ranks (see :func:`swav_core.sinkhorn`);
            needs ``torch.distributed``. Default: False.

    Shape: high_resolution_outputs: n_high ≥ 1 tensors (B, K) (or lists over heads of (B, K_h));
    low_resolution_outputs: n_low tensors (B, K), n_high + n_low ≥ 2; queue_outputs: ``None``, ``[]``,
    or one (N_i, K) per high-resolution crop → 0-dim, float32 (float64 for float64 input).

    Example::

        >>> p = [torch.randn(8, 30) for _ in range(4)]
        >>> SwaVLoss()(high_resolution_outputs=p[:2], low_resolution_outputs=p[2:]).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05,
                 sinkhorn_gather_distributed: bool = False):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            0.0 < temperature < math.inf and 1.0 / temperature < math.inf
        ):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        try:  # sinkhorn's own checks on a 1 × 1 score; its messages begin with the argument's name
            sinkhorn(torch.zeros(1, 1), sinkhorn_iterations, sinkhorn_epsilon)
        except ValueError as error:
            raise ValueError(f"sinkhorn_{error}") from None
        if sinkhorn_gather_distributed not in (False, True):  # "no" is truthy: bools (or 0 / 1) only
            raise ValueError(f"sinkhorn_gather_distributed must be a bool, got {sinkhorn_gather_distributed!r}")
        if sinkhorn_gather_distributed and not dist.is_available():
            raise ValueError("sinkhorn_gather_distributed=True needs torch.distributed, which is not "
                             "available in this torch build")
        self.temperature = float(temperature)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.sinkhorn_epsilon = float(sinkhorn_epsilon)
        self.sinkhorn_gather_distributed = bool(sinkhorn_gather_distributed)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, sinkhorn_iterations={self.sinkhorn_iterations}, "
                f"sinkhorn_epsilon={self.sinkhorn_epsilon}, "
                f"sinkhorn_gather_distributed={self.sinkhorn_gather_distributed}")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], tuple) and len(args[0]) == 3:  # fmcib's loss(out)
            raise ValueError("SwaVLoss takes the model's three outputs as three arguments: criterion(*model(crops)), "
                             "or criterion(high_resolution_outputs, low_resolution_outputs, queue_outputs)")
        return super().__call__(*args, **kwargs)

    def subloss(self, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the prediction softmax(z/τ) against codes q: −mean_b Σ_k q·log softmax(z/τ).

        Shape: z (B, K), q (B, K) → 0-dim.
        """
        return -(q * F.log_softmax(z / self.temperature, dim=1)).sum(dim=1).mean()

    def forward(self, high_resolution_outputs: Sequence, low_resolution_outputs: Sequence,
                queue_outputs: Optional[Sequence] = None) -> torch.Tensor:
        """The loss ℓ above, averaged over prototype heads; see the class docstring for shapes."""
        heads = _split_heads(high_resolution_outputs, low_resolution_outputs, queue_outputs)
        losses = [self._head_loss(high, low, queue) for high, low, queue in heads]
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        # Non-finite predictions (or z/τ overflowing) are named, not passed on: one host sync.
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(loss)):
            raise ValueError(self._non_finite_message(heads))
        return loss

    def _head_loss(self, high: list, low: list, queue: Optional[list]) -> torch.Tensor:
        crops, n_high = high + low, len(high)
        top = 1.0 / ((len(crops) - 1) * crops[0].shape[0] * self.temperature)  # the largest |∂ℓ/∂z|
        for name, z in _named(high, low):  # a float16 score's gradient must fit float16
            if top > torch.finfo(z.dtype).max:
                raise ValueError(f"SwaVLoss: temperature={self.temperature} gives gradients up to {top:.3g} for "
                                 f"{name}, beyond {z.dtype}'s range: raise it or use float32 scores")
        dtype = torch.float64 if any(z.dtype == torch.float64 for z in crops) else torch.float32
        with torch.autocast(crops[0].device.type, enabled=False):
            codes = [self._codes(i, z, queue) for i, z in enumerate(high)]  # n_high × (B, K)
            crops = [z.to(dtype) for z in crops]
            if type(self).subloss is not SwaVLoss.subloss:  # an override sees every (crop, code) pair
                terms = [self.subloss(z, q) for i, q in enumerate(codes) for v, z in enumerate(crops) if v != i]
            else:  # crop v predicts every code but its own: one call with Σ_{i≠v} q_i
                total = sum(codes)
                terms = [self.subloss(z, total - codes[v] if v < n_high else total)
                         for v, z in enumerate(crops) if n_high > 1 or v > 0]
        return sum(terms) / (n_high * (len(crops) - 1))

    def _codes(self, i: int, z: torch.Tensor, queue: Optional[list]) -> torch.Tensor:
        """Codes (B, K) of crop i with its queue; errors name the loss' arguments. Nothing is kept between
        calls: one loss may serve several threads."""
        try:
            return sinkhorn(z, self.sinkhorn_iterations, self.sinkhorn_epsilon, self.sinkhorn_gather_distributed,
                            queue=None if queue is None else queue[i])
        except ValueError as error:
            names = f"high_resolution_outputs[{i}]" + ("" if queue is None else f" and queue_outputs[{i}]")
            raise ValueError(f"SwaVLoss: codes of {names}: {error}") from error

    def _non_finite_message(self, heads) -> str:
        predictors = [(f"{name}[{h}]" if len(heads) > 1 else name, z) for h, (high, low, _) in enumerate(heads)
                      for name, z in _named(high, low) if not (name.startswith("high") and len(high) == 1)]
        bad = [name for name, z in predictors if not bool(torch.isfinite(z).all())]
        if bad:
            return (f"SwaVLoss: {bad[0]} must be finite: its NaN or ±inf scores make the loss non-finite "
                    "(-inf is accepted only for computing codes, not as a prediction)")
        biggest = max(z.abs().max().item() for _, z in predictors)
        return (f"SwaVLoss: the loss is not finite: scores up to {biggest:.3g} divided by "
                f"temperature={self.temperature} overflow")


def _named(high: list, low: list):
    return [(f"high_resolution_outputs[{i}]", z) for i, z in enumerate(high)] + [
        (f"low_resolution_outputs[{i}]", z) for i, z in enumerate(low)]


def _split_heads(high, low, queue):
    """Validate the three arguments and regroup them per prototype head: [(high, low, queue)]."""
    for name, x in [("high_resolution_outputs", high), ("low_resolution_outputs", low), ("queue_outputs", queue)]:
        if x is not None and (isinstance(x, torch.Tensor) or not isinstance(x, (list, tuple))):
            raise ValueError(f"{name} must be a list (one entry per crop), got {type(x).__name__}")
    high, low, queue = list(high), list(low), (list(queue) if queue else None)  # [] means no queue
    if not high:
        raise ValueError("high_resolution_outputs must hold at least one crop, got an empty list")
    if len(high) + len(low) < 2:
        raise ValueError(f"SwaVLoss needs at least 2 crops in total, got {len(high)} high-resolution "
                         f"and {len(low)} low-resolution")
    if queue is not None and len(queue) != len(high):
        raise ValueError(f"queue_outputs must hold one entry per high-resolution crop ({len(high)}), "
                         f"got {len(queue)}")
    multi_head = isinstance(high[0], (list, tuple))
    n_heads = len(high[0]) if multi_head else 1
    if n_heads == 0:
        raise ValueError("high_resolution_outputs[0] must hold at least one prototype head, got an empty list")
    named, heads = _named(high, low), n_heads if multi_head else 0
    queue_named = [(f"queue_outputs[{i}]", x) for i, x in enumerate(queue or [])]
    per_head = []
    for h in range(n_heads):  # the queues' tensors are checked by sinkhorn, which names them
        crops = [_head(x, h, name, heads) for name, x in named]
        queues = [_head(x, h, name, heads) for name, x in queue_named] if queue is not None else None
        for (name, _), z in zip(named, crops):
            if z.shape != crops[0].shape:
                raise ValueError(f"all crops must have the same shape (B, K): {named[0][0]} is "
                                 f"{tuple(crops[0].shape)} but {name} is {tuple(z.shape)}"
                                 + (f" (head {h})" if multi_head else ""))
        per_head.append((crops[: len(high)], crops[len(high):], queues))
    return per_head


def _head(x, h: int, name: str, n_heads: int) -> torch.Tensor:
    """Head h of one argument (n_heads = 0: a single head); a crop is checked to be (B, K) floating."""
    if n_heads:
        if not isinstance(x, (list, tuple)) or len(x) != n_heads:
            got = f"a list of {len(x)}" if isinstance(x, (list, tuple)) else type(x).__name__
            raise ValueError(f"{name} must be a list over the {n_heads} prototype heads, got {got}")
        x, name = x[h], f"{name}[{h}]"
    if not name.startswith("queue") and not (
        isinstance(x, torch.Tensor) and x.dim() == 2 and x.is_floating_point() and x.numel() > 0
    ):
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor (B, K), B ≥ 1, K ≥ 1, got {got}")
    return x
