"""Training-health figures of a SwAV step: is the run learning, or stuck at ln K (collapsed)?

The most asked SwAV question is a loss that stays at ln K (8.006 for K = 3000, 6.238 for K = 512) for many
epochs: the predictions softmax(z·cᵀ/τ) are uniform. These three figures, from what a step already has
(the unit embeddings z of the crops, their prototype scores, τ), tell a slow start from a collapse:

- ``pred_entropy``: mean entropy of the predictions divided by ln K. 1: uniform, the "stuck at ln K" state;
  0: one-hot. A healthy run falls below ~0.9 once the prototypes unfreeze; near 1 later means the scores
  are too flat for τ: lower τ, raise the learning rate, or unfreeze sooner.
- ``prototype_usage``: the fraction of the K prototypes that are the top score of at least one sample.
  A few prototypes taking every sample (usage near 1/K) is a collapse that the equipartition hides within
  a batch: raise ε, start the queue later, freeze the prototypes longer.
- ``embedding_std``: the standard deviation of the unit embeddings over the batch, averaged over the D
  dimensions and scaled by √D: about 1 for embeddings spread over the sphere, 0 when every sample maps to
  one point (collapse): lower the learning rate, check the augmentations are not too weak.

The figures are 0-dim tensors on the scores' device, computed without gradient and without a host sync;
call ``float()`` on them as often as you log.

Example:
    >>> z = torch.nn.functional.normalize(torch.randn(256, 128), dim=1)
    >>> figures = training_health(z, z @ torch.nn.functional.normalize(torch.randn(3000, 128), dim=1).T)
    >>> sorted(figures)
    ['embedding_std', 'pred_entropy', 'prototype_usage']
"""
import math
from typing import Dict

import torch

__all__ = ["training_health", "pred_entropy", "prototype_usage", "embedding_std", "COLLAPSED"]

# Thresholds of a collapsed run, for the figures averaged over a logging window (see the job's warning).
COLLAPSED = {"pred_entropy": 0.97, "prototype_usage_k": 4, "embedding_std": 0.05}


@torch.no_grad()
def pred_entropy(scores: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Mean over samples of the entropy of softmax(S/τ), over ln K: (B, K) scores, K ≥ 2 → 0-dim in [0, 1]."""
    _check(scores, "scores", "(B, K)", min_k=2)
    if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    log_p = torch.log_softmax(scores.float() / temperature, dim=1)  # (B, K)
    return -(log_p.exp() * log_p).sum(dim=1).mean() / math.log(scores.shape[1])


@torch.no_grad()
def prototype_usage(scores: torch.Tensor) -> torch.Tensor:
    """Fraction of the K prototypes that are some sample's top score: (B, K) → 0-dim, in [1/K, min(1, B/K)]."""
    _check(scores, "scores", "(B, K)")
    used = torch.zeros(scores.shape[1], device=scores.device)
    used[scores.argmax(dim=1)] = 1.0
    return used.mean()


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """√D · mean over dimensions of the std over samples of the L2-normalised z: (B, D) → 0-dim (≈1 spread,
    0 collapsed to one point)."""
    _check(z, "z", "(B, D)")
    if z.shape[0] < 2:
        raise ValueError(f"embedding_std needs at least 2 samples, got z of shape {tuple(z.shape)}")
    unit = torch.nn.functional.normalize(z.float(), dim=1)
    return unit.std(dim=0).mean() * math.sqrt(z.shape[1])


def training_health(z: torch.Tensor, scores: torch.Tensor, temperature: float = 0.1) -> Dict[str, torch.Tensor]:
    """The three figures of one crop's embeddings z (B, D) and prototype scores (B, K), as 0-dim tensors."""
    return {"pred_entropy": pred_entropy(scores, temperature), "prototype_usage": prototype_usage(scores),
            "embedding_std": embedding_std(z)}


# ---- checks ------------------------------------------------------------------------------------------
def _check(x, name: str, shape: str, min_k: int = 1) -> None:
    if not (isinstance(x, torch.Tensor) and x.ndim == 2 and x.is_floating_point() and x.shape[0] > 0
            and x.shape[1] >= min_k):
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor {shape} with B >= 1 and {shape[-2]} >= {min_k}, "
                         f"got {got}")
