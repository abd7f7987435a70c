"""The SwAV swapped-prediction loss (Caron et al., 2020, arXiv:2006.09882, §3.1 and multi-crop §3.2)."""
import math
import numbers
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .sinkhorn import hyperparameters, sinkhorn

__all__ = ["SwaVLoss"]


class SwaVLoss(nn.Module):
    r"""Swapped prediction of Sinkhorn codes across multi-crop views (§3.1, §3.2).

    For each high-resolution crop i, the codes q_i = sinkhorn(cat(z_i, queue_i))[:B] are computed without
    gradient (queue rows only help the equipartition). Every other crop v predicts them with p_v = softmax(z_v/τ):

        ℓ = 1/n_high · Σ_i 1/(n_crops − 1) · Σ_{v≠i} subloss(z_v, q_i),
        subloss(z, q) = −1/B · Σ_b Σ_k q[b, k] · log softmax(z/τ)[b, k]

    pair by pair, as lightly's forward (a subclass may override :meth:`subloss`). τ defaults to 0.1; Sinkhorn's
    iterations, ε and gather_distributed (over all ranks' batches) to 3, 0.05 and False. Arguments: the scores
    (B, K) of n_high ≥ 1 high- and n_low low-resolution crops, n_high + n_low ≥ 2, and ``None``, ``[]`` or one
    queue's scores (N_i, K) per high-resolution crop; with several prototype heads, a list over heads per crop
    (the loss is their mean). Returns a 0-dim float32 (float64 for float64 input).

    >>> p = [torch.randn(8, 30) for _ in range(4)]
    >>> SwaVLoss()(high_resolution_outputs=p[:2], low_resolution_outputs=p[2:]).shape
    torch.Size([])
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05,
                 sinkhorn_gather_distributed: bool = False):
        super().__init__()
        self.temperature = _temperature(temperature)
        self.sinkhorn_iterations, self.sinkhorn_epsilon, self.sinkhorn_gather_distributed = hyperparameters(
            sinkhorn_iterations, sinkhorn_epsilon, sinkhorn_gather_distributed, prefix="sinkhorn_")
        if self.sinkhorn_gather_distributed and not dist.is_available():
            raise ValueError("sinkhorn_gather_distributed=True needs torch.distributed, not in this torch build")

    def forward(self, high_resolution_outputs: Sequence, low_resolution_outputs: Sequence,
                queue_outputs: Optional[Sequence] = None) -> torch.Tensor:
        """The loss ℓ above, averaged over prototype heads; shapes: the class docstring."""
        heads = _split_heads(high_resolution_outputs, low_resolution_outputs, queue_outputs, self.temperature)
        loss = torch.stack([self._head_loss(high, low, queue) for high, low, queue in heads]).mean()
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(loss)):  # one host sync
            raise ValueError(_non_finite_message(heads, self.temperature))
        return loss

    def _head_loss(self, high: list, low: list, queue: Optional[list]) -> torch.Tensor:
        dtype = torch.float64 if any(z.dtype == torch.float64 for z in high + low) else torch.float32
        with torch.autocast(high[0].device.type, enabled=False):
            codes = [self._codes(i, z, queue) for i, z in enumerate(high)]  # n_high × (B, K), no gradient
            crops = [z.to(dtype) for z in high + low]
            terms = [self.subloss(z, q) for i, q in enumerate(codes) for v, z in enumerate(crops) if v != i]
        return sum(terms) / (len(high) * (len(crops) - 1))

    def subloss(self, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of softmax(z/τ) against codes q, both (B, K): −mean_b Σ_k q·log softmax(z/τ)."""
        return -(q * F.log_softmax(z / self.temperature, dim=1)).sum(dim=1).mean()

    def _codes(self, i: int, z: torch.Tensor, queue: Optional[list]) -> torch.Tensor:
        """Codes (B, K) of crop i with its queue (nothing is kept between calls); errors name the arguments."""
        try:
            return sinkhorn(z, self.sinkhorn_iterations, self.sinkhorn_epsilon, self.sinkhorn_gather_distributed,
                            queue=None if queue is None else queue[i])
        except ValueError as error:
            names = f"high_resolution_outputs[{i}]" + ("" if queue is None else f" and queue_outputs[{i}]")
            raise ValueError(f"SwaVLoss: codes of {names}: {error}") from error

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], tuple) and len(args[0]) == 3:  # fmcib's loss(out)
            raise ValueError("SwaVLoss takes the model's three outputs as three arguments: criterion(*model(crops)), "
                             "or criterion(high_resolution_outputs, low_resolution_outputs, queue_outputs)")
        return super().__call__(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, sinkhorn_iterations={self.sinkhorn_iterations}, sinkhorn_epsilon="
                f"{self.sinkhorn_epsilon}, sinkhorn_gather_distributed={self.sinkhorn_gather_distributed}")


# --- argument checks and messages -------------------------------------------------------------------

def _temperature(temperature) -> float:
    real = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
    if not (real and 0.0 < temperature < math.inf and 1.0 / temperature < math.inf):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _non_finite_message(heads, temperature: float) -> str:
    predictors = [(f"{name}[{h}]" if len(heads) > 1 else name, z) for h, (high, low, _) in enumerate(heads)
                  for name, z in _named(high, low) if not (name.startswith("high") and len(high) == 1)]
    bad = [name for name, z in predictors if not bool(torch.isfinite(z).all())]
    if bad:
        return (f"SwaVLoss: {bad[0]} must be finite: its NaN or ±inf scores make the loss non-finite "
                "(-inf is accepted only for computing codes, not as a prediction)")
    biggest = max(z.abs().max().item() for _, z in predictors)
    return f"SwaVLoss: the loss is not finite: scores up to {biggest:.3g} divided by temperature={temperature} overflow"


def _named(high: list, low: list):
    return [(f"{k}_resolution_outputs[{i}]", z) for k, zs in (("high", high), ("low", low)) for i, z in enumerate(zs)]


def _split_heads(high, low, queue, temperature: float):
    """The three arguments, checked and regrouped per prototype head: [(high, low, queue)]."""
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
    n_heads = len(high[0]) if isinstance(high[0], (list, tuple)) else 0  # 0: one head, no lists
    if isinstance(high[0], (list, tuple)) and n_heads == 0:
        raise ValueError("high_resolution_outputs[0] must hold at least one prototype head, got an empty list")
    named, n = _named(high, low) + [(f"queue_outputs[{i}]", x) for i, x in enumerate(queue or [])], len(high + low)
    per_head = []
    for h in range(max(n_heads, 1)):
        xs, head = [], f"[{h}]" if n_heads else ""
        for i, (name, x) in enumerate(named):
            if n_heads and (not isinstance(x, (list, tuple)) or len(x) != n_heads):
                got = f"a list of {len(x)}" if isinstance(x, (list, tuple)) else type(x).__name__
                raise ValueError(f"{name} must be a list over the {n_heads} prototype heads, got {got}")
            x = x[h] if n_heads else x
            xs.append(x)
            if i >= n:  # a queue: sinkhorn checks it, naming it
                continue
            if not (torch.is_tensor(x) and x.dim() == 2 and x.is_floating_point() and x.numel() > 0):
                got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if torch.is_tensor(x) else type(x).__name__
                raise ValueError(f"{name}{head} must be a floating-point tensor (B, K), B ≥ 1, K ≥ 1, got {got}")
            if x.shape != xs[0].shape:
                raise ValueError(f"all crops must have the same shape (B, K): {named[0][0]} is {tuple(xs[0].shape)} "
                                 f"but {name} is {tuple(x.shape)}" + (f" (head {h})" if n_heads else ""))
            top = 1.0 / ((n - 1) * len(x) * temperature)  # the largest |∂ℓ/∂z|: a float16 score's must fit
            if top > torch.finfo(x.dtype).max:
                raise ValueError(f"SwaVLoss: temperature={temperature} gives gradients up to {top:.3g} for "
                                 f"{name}, beyond {x.dtype}'s range: raise it or use float32 scores")
        per_head.append((xs[: len(high)], xs[len(high): n], xs[n:] if queue is not None else None))
    return per_head
