"""Exact Sinkhorn in the log domain, in float64: where the stable path's scaling vector v would span
beyond float32 (many rounds at small ε with a far prototype), it recomputes the codes."""
import torch

from . import distributed as D


def _log_codes(blocks, iterations: int, epsilon: float, gather: bool, rows: int, out):
    """Exact Sinkhorn in the log domain and in float64, for inputs where v spans beyond the stable
    path's range (rare: ≥ 5 iterations, small ε, a far prototype); the codes go into ``out``.

    On Y = (S − m_col)/ε, from f₀ = 0: g = −logsumexp_b(Y + f) (K,), f = −logsumexp_k(Y + g) (B,),
    and Q = softmax_k(Y + g) per row. Y + f or Y + g is rebuilt from the scores at every
    half-iteration in one float64 (B, K) temporary, so that the potentials' size costs no precision.
    """
    x = blocks[0].new_empty(out.shape, dtype=torch.float64)  # (B, K)
    shift = _column_max(blocks, gather, torch.float64).neg_()  # (K,) −m_col

    def exponents(potential):  # x = Y + potential, potential (B, 1) or (K,)
        start = 0
        for b in blocks:
            torch.add(shift, b, out=x[start : start + b.shape[0]])
            start += b.shape[0]
        return x.mul_(1.0 / epsilon).add_(potential)

    f = x.new_zeros(x.shape[0], 1)  # (B, 1) log u₀ = 0 on (S − m_col)/ε
    for t in range(iterations):
        g = _neg_logsumexp(exponents(f), 0, gather)  # (1, K)
        if t < iterations - 1:
            f = _neg_logsumexp(exponents(g), 1, False)  # (B, 1)
    q = exponents(g)[:rows]  # (rows, K) logits Y + g
    q.sub_(q.amax(dim=1, keepdim=True)).exp_()
    return out[:rows].copy_(q.div_(q.sum(dim=1, keepdim=True)))


def _neg_logsumexp(x: torch.Tensor, dim: int, gather: bool) -> torch.Tensor:
    """−log Σ exp(x) along ``dim``, kept (summed over ranks with ``gather``); overwrites x."""
    m = x.amax(dim=dim, keepdim=True)
    if gather:
        D.all_reduce_max_(m)
    total = x.sub_(m).exp_().sum(dim=dim, keepdim=True)
    if gather:
        D.all_reduce_sum_(total)
    return total.log_().add_(m).neg_()


def _column_max(blocks, gather: bool, dtype) -> torch.Tensor:
    """m_col (K,): per-prototype maxima over all blocks (and ranks), exact in ``dtype``."""
    col_max = blocks[0].amax(dim=0).to(dtype)
    for b in blocks[1:]:
        col_max = torch.maximum(col_max, b.amax(dim=0).to(dtype))
    if gather:
        D.all_reduce_max_(col_max)
    return col_max
