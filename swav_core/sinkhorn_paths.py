"""The two ways :func:`swav_core.sinkhorn` computes SwAV's codes (see its docstring and the README).

Both keep a (B, K) matrix fixed and update only the scaling vectors u (samples) and v (prototypes),
one matrix-vector product per half-iteration. :func:`_stable_codes` shifts the exponent by column and
row maxima so that nothing under- or overflows for any valid input, and hands over to exact
log-domain Sinkhorn (``sinkhorn_log.py``) where v spans beyond its range; :func:`_fast_codes`
exponentiates S/ε as given in fewer passes and reports whether under- or overflow could have touched
its result.
"""
from typing import Optional

import torch

from . import distributed as D
from .sinkhorn_log import _column_max, _log_codes

# The fast path keeps its codes when every mass it divides by (c = Eᵀu and r = E v, with u and v
# scaled to max 1) is ≥ 2⁻⁷⁸ and spans at most 2¹⁰⁰ (so u and v are normal numbers): entries of E lost
# to underflow (each < 2⁻¹²⁶, flushed denormals included) then change no mass by more than 2⁻³⁰
# relatively (n ≤ 2¹⁸ terms), and NaN or ∞ anywhere fails the comparisons.
_FAST_MIN_MASS, _FAST_MAX_SPAN = 2.0**-78, 2.0**100


def _fast_codes(blocks, iterations: int, epsilon: float, dtype, rows: int, out):
    """Codes from E = exp(S/ε) without shifts, and whether under- or overflow left them exact.

    E = exp(S/ε) in place in the output buffer and the scaling vectors from :func:`_fast_scaling`;
    the last sample step is exact in the log domain: Q = Diag(1/(E v)) E Diag(v) = softmax(S/ε +
    log v) per row. Far fewer passes over B × K than :func:`_stable_codes`, but exp(S/ε) must stay
    inside the dtype's range (|S|/ε ≲ 80 in float32): the second result is False otherwise (and for
    NaN or ±∞ anywhere), so that the caller falls back. Deciding it is the call's one host sync.
    """
    if out is None and len(blocks) == 1:
        e = torch.mul(blocks[0].to(dtype), 1.0 / epsilon)  # (B, K) S/ε
    else:
        n_rows, n_prototypes = sum(b.shape[0] for b in blocks), blocks[0].shape[1]
        e = blocks[0].new_empty((n_rows, n_prototypes), dtype=dtype) if out is None else out
        start = 0
        for b in blocks:
            torch.mul(b.to(dtype), 1.0 / epsilon, out=e[start : start + b.shape[0]])  # (B_j, K) S/ε
            start += b.shape[0]
    log_v, ranges = _fast_scaling(e, iterations, rows)
    # The (rows, K) logits are the one temporary; the codes overwrite E.
    logits = torch.add(log_v, blocks[0][:rows].to(dtype), alpha=1.0 / epsilon)  # (rows, K)
    return torch.softmax(logits, dim=1, out=e[:rows]), _fast_accurate(ranges)


def _fast_scaling(e: torch.Tensor, iterations: int, rows: int, ones: Optional[torch.Tensor] = None):
    """E = exp(X) in place for X = S/ε (B, K), then log v (K,) and the ranges of the masses (2, n).

    u₀ = 1; per iteration v ∝ 1/(Eᵀu) ("each prototype receives mass 1/K") and u ∝ 1/(E v) ("each
    sample 1/B"), one matrix-vector product each, the vectors scaled to max 1. ``ranges`` holds the
    minimum (row 0) and maximum (row 1) of every mass divided by, for :func:`_fast_accurate`.
    Shape-static and free of host syncs: a CUDA graph can capture it. Given ``ones`` (B,), the first
    column sums are Eᵀ1, a matrix-vector product (on a GPU faster than a dim-0 sum).
    """
    e.exp_()  # (B, K) E
    lows, highs = [], []

    def scaled_reciprocal(mass):  # 1/mass scaled to max 1, and the mass' range noted
        low, high = torch.aminmax(mass)
        lows.append(low)
        highs.append(high)
        return torch.div(low, mass)

    column_sums = e.sum(dim=0) if ones is None else _prototype_mass(e, ones)  # (K,) Eᵀu₀, u₀ = 1
    v = scaled_reciprocal(column_sums)  # (K,) v ∝ 1/(Eᵀu₀)
    for _ in range(1, iterations):
        u = scaled_reciprocal(_sample_mass(e, v))  # (B,) u ∝ 1/(E v)
        v = scaled_reciprocal(_prototype_mass(e, u))  # (K,) v ∝ 1/(Eᵀu)
    if iterations == 1:  # a sample without a finite score must fail the guard too
        scaled_reciprocal(_sample_mass(e[:rows], v))
    return v.log(), torch.stack(lows + highs).view(2, -1)


def _fast_accurate(ranges: torch.Tensor) -> bool:
    """Whether every mass of :func:`_fast_scaling` is within the guard's bounds (a host sync)."""
    lows, highs = ranges.tolist()
    return all(lo >= _FAST_MIN_MASS and hi <= lo * _FAST_MAX_SPAN for lo, hi in zip(lows, highs))


# The stable path's codes are exact while every v (scaled to max 1) is ≥ tiny^½ (2⁻⁶³ in float32):
# entries of E lost to underflow (< tiny) then change no mass by more than B·K·tiny^½ relatively
# (c ≥ 1/K, u ≤ 1/min v; r ≥ min v), i.e. 2⁻³⁰ for B·K ≤ 2³³; and v stays above its clamp.
def _stable_codes(blocks, iterations: int, epsilon: float, gather: bool, dtype, rows: int, out, names):
    """Codes from E = exp((S − m_col − m_row)/ε), finite for every valid input; validates S.

    Exact unless v spans more than float32 can scale (possible from ~5 iterations at small ε, with
    a far prototype): then :func:`_log_codes` recomputes them, decided in the same host sync.
    """
    scale = 2.0 / epsilon  # the scores are halved in _shifted_exp
    e, half_row_max = _shifted_exp(blocks, scale, iterations > 0, gather, dtype, out)
    # NaN or +inf anywhere, or a sample or prototype without a finite score, shows up here.
    finite = local = torch.isfinite(half_row_max).all()
    exact = finite  # a plain softmax spans nothing: exact whenever finite (and unread otherwise)
    if iterations == 0:
        v, r = None, e[:rows].sum(dim=1)  # (rows,) ≥ 1: a softmax per sample
    else:
        u = half_row_max.mul_(scale).exp_()  # (B,) u₀ = exp(m_row/ε) in [0, 1]
        v, r, v_min = _scaling_vectors(e, u, iterations, gather, rows)
        exact = v_min >= torch.finfo(dtype).tiny ** 0.5  # the same on all ranks
        if gather:  # a rank's NaN reaches every rank's v through the all-reduce
            finite = finite & torch.isfinite(v).all()
    q = e[:rows]
    if v is not None:
        q.mul_(v)
    q.div_(r[:, None])  # Q = Diag(1/(E v)) E Diag(v): each row sums to 1

    # One host sync, after all the work is queued; skipped while torch.compile traces.
    if _is_compiling():
        return q
    finite, exact, local = torch.stack([finite, exact, local]).tolist()
    if not finite:
        raise ValueError(_non_finite_message(blocks, names, iterations, elsewhere=local))
    return q if exact else _log_codes(blocks, iterations, epsilon, gather, rows, e)


def _non_finite_message(blocks, names, iterations: int, elsewhere: bool = False) -> str:
    if elsewhere:  # this rank's scores are fine; the gathered masses are not
        return (
            f"sinkhorn: another rank's scores are not finite (NaN, +inf, or a sample or prototype with "
            f"only -inf); this rank's {' and '.join(names)} are"
        )
    bad = [n for n, b in zip(names, blocks) if bool((b.isnan() | (b == float("inf"))).any())]
    if bad:
        return f"sinkhorn: {' and '.join(bad)} must be finite: got NaN or +inf scores"
    return (
        f"sinkhorn: {' and '.join(names)} must be finite: -inf is accepted only where every sample"
        f"{' and every prototype' if iterations > 0 else ''} keeps a finite score "
        f"(got shapes {[tuple(b.shape) for b in blocks]})"
    )


def _shifted_exp(blocks, scale: float, shift_prototypes: bool, gather: bool, dtype, out):
    """E = exp((S − m_col − m_row)/ε) in one (B, K) buffer, and m_row/2 (B,).

    m_col (per-prototype maxima, global over ranks; skipped for the plain softmax) leaves the codes
    unchanged; m_row (per-sample maxima of S − m_col) is compensated by u₀ = exp(m_row/ε), for
    Diag(u₀) E = exp((S − m_col)/ε) is the textbook's start. Every row of E holds an exact 1, and so
    does every column (at its maximum's row, where m_row = 0). Scores are halved before the
    subtraction (exact) so that no difference of finite scores overflows; ``scale`` is 2/ε.
    """
    n_rows, n_prototypes = sum(b.shape[0] for b in blocks), blocks[0].shape[1]
    if shift_prototypes:
        shift = _column_max(blocks, gather, dtype).mul_(-0.5)
    else:
        shift = torch.zeros(n_prototypes, dtype=dtype, device=blocks[0].device)
    if out is None and len(blocks) == 1:
        e = torch.add(shift, blocks[0], alpha=0.5)  # (B, K) (S − m_col)/2, 0 at each column's max
    else:
        e = blocks[0].new_empty((n_rows, n_prototypes), dtype=dtype) if out is None else out
        start = 0
        for b in blocks:
            torch.add(shift, b, alpha=0.5, out=e[start : start + b.shape[0]])
            start += b.shape[0]
    half_row_max = e.amax(dim=1)  # (B,) m_row/2 ≤ 0
    e.sub_(half_row_max[:, None]).mul_(scale).exp_()  # (B, K) in [0, 1]
    return e, half_row_max


def _scaling_vectors(e: torch.Tensor, u: torch.Tensor, iterations: int, gather: bool, rows: int):
    """v (K,), r = E v (rows,) after ``iterations`` prototype and sample steps from u₀ (B,), and
    the smallest v met before clamping (0-dim).

    v is rescaled to max 1 and clamped at tiny ** 0.8 (≈ 4.5e-31 in float32): with a 1 in every
    row and column of E, r ≥ floor, u = 1/r ≤ 1/floor and c = Eᵀu ∈ [min u, B/floor] stay finite.
    """
    floor = torch.finfo(e.dtype).tiny ** 0.8
    spans = []
    for t in range(iterations):
        # Prototype step, "each prototype receives mass 1/K": v ∝ 1/(Eᵀu).
        c = _prototype_mass(e, u)  # (K,) ≥ min u > 0 thanks to each column's 1
        if gather:
            D.all_reduce_sum_(c)
        low, high = torch.aminmax(c)
        spans.append(low / high)  # min v
        v = torch.div(low, c).clamp_(min=floor)  # (K,) in [floor, 1], the same on all ranks
        # Sample step, "each sample receives mass 1/B": u ∝ 1/(E v); the last one is the output's.
        if t < iterations - 1:
            u = _sample_mass(e, v).reciprocal_()  # (B,) in [1/K, 1/floor] thanks to each row's 1
    return v, _sample_mass(e[:rows], v), torch.stack(spans).amin()


# CPU matrix-vector products as batched products over row blocks: MKL runs a matrix-vector product on
# one thread but spreads a batched one over all of them (3× faster with 2 threads at 4096 × 3000).
_BLOCKS = 8


def _blocks(e: torch.Tensor) -> int:
    use = e.device.type == "cpu" and e.shape[0] >= 4 * _BLOCKS and e.numel() >= 2**18
    return _BLOCKS if use else 1


def _prototype_mass(e: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Eᵀu, shape (K,), for E (B, K) and u (B,)."""
    n = _blocks(e)
    if n == 1:
        return torch.mv(e.t(), u)
    main = e.shape[0] - e.shape[0] % n
    c = torch.bmm(u[:main].view(n, 1, -1), e[:main].view(n, main // n, -1)).sum(dim=0)[0]  # (K,)
    return c if main == e.shape[0] else c.add_(torch.mv(e[main:].t(), u[main:]))


def _sample_mass(e: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """E v, shape (B,), for E (B, K) and v (K,)."""
    n = _blocks(e)
    if n == 1:
        return torch.mv(e, v)
    main = e.shape[0] - e.shape[0] % n
    blocks = e[:main].view(n, main // n, -1).transpose(1, 2)  # (n, K, B/n)
    r = torch.bmm(v.view(1, 1, -1).expand(n, 1, -1), blocks).view(main)  # (main,)
    return r if main == e.shape[0] else torch.cat([r, torch.mv(e[main:], v)])


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return is_compiling() if is_compiling is not None else torch._dynamo.is_compiling()
