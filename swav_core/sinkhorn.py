"""Sinkhorn-Knopp codes of SwAV (Caron et al., 2020, arXiv:2006.09882, §3.1 "Computing codes online").

The codes are Q* = Diag(u) exp(Cᵀ Z / ε) Diag(v) (§3.1): the entropic transport plan between B
samples and K prototypes whose prototype marginals are 1/K and whose sample marginals are 1/B. The
textbook routine (FAIR's ``distributed_sinkhorn``, lightly's ``sinkhorn``) rewrites the whole B × K
matrix at every half-iteration. Here a matrix E ∝ exp(S/ε) is computed once and only the two scaling
vectors u (samples) and v (prototypes) are updated, one matrix-vector product per half-iteration, on
one of two paths (``sinkhorn_paths.py``). See :func:`sinkhorn` for the guarantees.
"""
import contextlib
from typing import Optional, Sequence

import torch

from . import distributed as D
from ._checks import _int_at_least, _positive_number
from .sinkhorn_paths import _fast_codes, _is_compiling, _stable_codes

__all__ = ["sinkhorn"]


def sinkhorn(
    probabilities: torch.Tensor,
    iterations: int = 3,
    epsilon: float = 0.05,
    gather_distributed: bool = False,
) -> torch.Tensor:
    r"""Equipartitioned soft codes Q of SwAV by Sinkhorn-Knopp: Q* = Diag(u) exp(S/ε) Diag(v) (§3.1).

    Starting from Q ∝ exp(S/ε), each of ``iterations`` rounds rescales every prototype to total
    mass 1/K and then every sample to 1/B; the returned rows (one per sample) sum to 1. Equal, up to
    float32 rounding, to the textbook FAIR / lightly routine evaluated in float64 wherever that stays
    exact, and to exact (log-domain) Sinkhorn beyond, where the textbook under- or overflows. Finite
    for every finite input (−∞ allowed, see Raises) and every ε > 0 with 2/ε finite in the compute
    dtype (ε ≳ 6e-39 in float32).

    Implementation: with Q = Diag(u) E Diag(v), v ← 1/(Eᵀu) (prototype step) and u ← 1/(E v)
    (sample step); constants such as 1/K and 1/B cancel in the final per-sample normalisation
    Q = Diag(1/(E v)) E Diag(v). The stable path (CPU, distributed, compiled) uses
    E = exp((S − m_col − m_row)/ε) with column and row maxima, a 1 in every row and column; the fast
    path (GPU) uses E = exp(S/ε) and a row softmax for the last step, and hands over to the stable
    path whenever its guard sees under- or overflow that could matter; the stable path hands over to
    exact log-domain Sinkhorn in float64 when v spans beyond its range (many rounds at small ε).

    Args:
        probabilities: scores S, e.g. ``prototypes(z)``; any floating dtype. Not modified, no
            gradient flows through the result.
        iterations: rounds of (prototype, sample) normalisation. ``0`` returns the per-sample
            softmax of S/ε. Default: 3.
        epsilon: entropic regularisation ε > 0. Default: 0.05.
        gather_distributed: with an initialised process group, sum the prototype masses over all
            ranks (all-reduce of K-vectors only), so that every rank gets its rows of the codes of
            the concatenated batch; ranks may hold different B. Without a group it is ignored.
            Default: False.

    Shape:
        - probabilities: (B, K)
        - output: (B, K), float32 (float64 for float64 input); rows sum to 1.

    Raises:
        ValueError: ``probabilities`` not a non-empty 2-D floating tensor, NaN or +∞ scores (or a
            sample or prototype with only −∞ scores), ``iterations`` not an int ≥ 0, ``epsilon``
            not a finite number > 0 or so small that 2/ε overflows. The check of the scores, and
            the log-domain hand-over, are skipped while ``torch.compile`` traces.

    Example::

        >>> q = sinkhorn(torch.randn(256, 3000))
        >>> q.sum(dim=1)  # tensor([1.0000, 1.0000, ...])
    """
    _check_scores(probabilities, "probabilities")
    return _sinkhorn([probabilities], iterations, epsilon, gather_distributed)


def _sinkhorn(
    blocks: Sequence[torch.Tensor],
    iterations: int,
    epsilon: float,
    gather_distributed: bool,
    out: Optional[torch.Tensor] = None,
    rows: Optional[int] = None,
    names: Sequence[str] = ("probabilities",),
) -> torch.Tensor:
    """Codes of the row-wise concatenation of ``blocks`` without materialising that concatenation.

    ``out`` (optional) is a (Σ B_j, K) buffer of the compute dtype to work in (the loss reuses one
    for all its crops); with ``rows`` only the codes of the first ``rows`` samples are normalised and
    returned (queue rows only help the equipartition). The result is a view of ``out`` (or of a new
    buffer).

    Single-process eager calls take the fast path (:func:`_fast_codes`) and keep its result when
    its underflow guard holds, which one host sync decides; otherwise, and for ``iterations=0``,
    gathered or compiled calls, the stable path (:func:`_stable_codes`) computes the codes and
    validates the scores.
    """
    iterations, epsilon = _check_hyper(iterations, epsilon)
    names = [n for n, b in zip(names, blocks) if b.shape[0] > 0]
    blocks = [b.detach() for b in blocks if b.shape[0] > 0]  # an empty queue adds nothing
    dtype = torch.float64 if any(b.dtype == torch.float64 for b in blocks) else torch.float32
    dtype = dtype if out is None else out.dtype
    rows = sum(b.shape[0] for b in blocks) if rows is None else rows
    gather = gather_distributed and iterations > 0 and D.world_size() > 1
    if 2.0 / epsilon > torch.finfo(dtype).max:  # the scale 2/ε must be finite in the compute dtype
        raise ValueError(
            f"epsilon={epsilon!r} is too small for {dtype}: 2/epsilon overflows; "
            f"use epsilon >= {2.0 / torch.finfo(dtype).max:.1e}"
        )
    device_type = blocks[0].device.type
    with torch.no_grad(), _autocast_off(device_type):
        fast = _FAST_PATH.get(device_type, True)
        if fast and iterations > 0 and not gather and not _is_compiling():
            q, accurate = _fast_codes(blocks, iterations, epsilon, dtype, rows, out)
            if accurate:
                return q
        return _stable_codes(blocks, iterations, epsilon, gather, dtype, rows, out, names)


# Where the fast path is tried: on GPUs, where the cost is passes over B × K, it makes fewer (13
# instead of 20 for 3 iterations, and 23 instead of 35 kernels); on the CPU, where exp and fresh pages
# dominate, the stable path is faster (benchmarks/results/cpu.log). Tests force either path everywhere.
_FAST_PATH = {"cpu": False}


def _autocast_off(device_type: str):
    """Autocast disabled (the codes are computed in float32 or float64), entered only if enabled."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    return torch.autocast(device_type=device_type, enabled=False) if enabled else contextlib.nullcontext()


def _check_scores(scores: torch.Tensor, name: str) -> None:
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, K), got {type(scores).__name__}")
    if scores.dim() != 2 or scores.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D tensor (B, K), got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {scores.dtype}")


def _check_hyper(iterations, epsilon):
    return _int_at_least("iterations", iterations, 0), _positive_number("epsilon", epsilon)
