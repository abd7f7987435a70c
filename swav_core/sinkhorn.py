"""Sinkhorn-Knopp codes of SwAV (Caron et al., 2020, arXiv:2006.09882, §3.1 "Online clustering").

Q = Diag(u) exp(S/ε) Diag(v) is the entropic transport plan between B samples and K prototypes with
prototype marginals 1/K and sample marginals 1/B. FAIR's and lightly's routine rewrites the B × K
matrix at every half-iteration; here it is exponentiated once and only the scaling vectors move:

    E  = exp((S − m_col − m_row)/ε)   m_col, m_row: per-prototype, then per-sample maxima
    u₀ = exp(m_row/ε)                 Diag(u₀) E = exp((S − m_col)/ε), the textbook's start
    v  ← 1/(Eᵀu)                      "each prototype receives mass 1/K" (constants cancel)
    u  ← 1/(E v)                      "each sample receives mass 1/B"
    Q  = Diag(1/(E v)) E Diag(v)      every row sums to 1

Why it stays exact: E ∈ [0, 1] holds a 1 in every row and column, so nothing overflows and the masses
E v ≥ min v, Eᵀu ≥ min u never vanish; entries of E lost to underflow (< tiny) move a mass by at most
B·K·tiny / min v, below float32's rounding while min v ≥ tiny^½ (v scaled to max 1). Lower (many rounds,
small ε, a far prototype), the host sync that validates the scores hands over to log-domain float64.
"""
import math
import numbers
import operator
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["sinkhorn"]


def sinkhorn(out: torch.Tensor, iterations: int = 3, epsilon: float = 0.05, gather_distributed: bool = False,
             queue: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Equipartitioned soft codes Q of SwAV by Sinkhorn-Knopp (§3.1; the algorithm: module docstring).

    Equal, up to float32 rounding, to FAIR's / lightly's routine in float64 wherever that stays finite,
    and to exact (log-domain) Sinkhorn beyond; finite for every finite input. Bad shapes or dtypes, NaN
    or +∞ scores, ``iterations`` < 0 and ``epsilon`` ≤ 0 raise ValueError naming the argument (−∞ means
    "never assigned"); under ``torch.compile`` the score check and the log-domain hand-over are skipped.

    Args:
        out: scores S, e.g. ``prototypes(z)`` (lightly's and FAIR's name); any floating dtype.
        iterations: rounds of normalisation; ``0`` gives the per-sample softmax of S/ε. Default: 3.
        epsilon: entropic regularisation ε. Default: 0.05.
        gather_distributed: with a process group, each rank gets its rows of the codes of all ranks'
            batches (an all-reduce of K-vectors; B may differ across ranks). Default: False.
        queue: scores of N stored samples that share the equipartition; only ``out``'s rows are
            returned, as ``sinkhorn(cat(out, queue))[:B]``. Default: None.

    Shape: out (B, K), queue (N, K) → (B, K), float32 (float64 for float64 input), rows sum to 1; no gradient.

    Example::

        >>> sinkhorn(torch.randn(256, 3000), queue=torch.randn(3840, 3000)).shape
        torch.Size([256, 3000])
    """
    blocks, iterations, epsilon, dtype = _check(out, queue, iterations, epsilon, gather_distributed)
    gather = gather_distributed and iterations > 0 and dist.is_available() and dist.is_initialized()
    gather, rows = bool(gather) and dist.get_world_size() > 1, len(out)
    with torch.no_grad(), torch.autocast(out.device.type, enabled=False):
        e, half_row_max = _shifted_exp(blocks, 2.0 / epsilon, iterations > 0, gather, dtype)
        finite = local = torch.isfinite(half_row_max).all()  # NaN, +∞, or a row or column of −∞
        exact = finite  # a softmax per sample spans nothing
        q = e[:rows]
        if iterations > 0:
            u = half_row_max.mul_(2.0 / epsilon).exp_()  # (B + N,) u₀ = exp(m_row/ε) ∈ [0, 1]
            v, v_min = _scaling_vectors(e, u, iterations, gather)
            q.mul_(v)
            exact = v_min >= torch.finfo(dtype).tiny ** 0.5  # the same on every rank
            if gather:  # another rank's NaN reaches this rank's v through the all-reduce
                finite = finite & torch.isfinite(v).all()
        q.div_(q.sum(dim=1, keepdim=True))  # (B, K) Q = Diag(1/(E v)) E Diag(v): rows sum to 1
        if torch.compiler.is_compiling():
            return q
        finite, exact, local = torch.stack([finite, exact, local]).tolist()  # the one host sync
        if not finite:
            raise ValueError(_non_finite_message(blocks, iterations, elsewhere=local))
        return q if exact else q.copy_(_log_codes(blocks, iterations, epsilon, gather, rows))


def _shifted_exp(blocks, scale: float, shift_prototypes: bool, gather: bool, dtype):
    """E = exp((S − m_col − m_row)/ε) in one (B + N, K) buffer, and m_row/2 (B + N,). The scores are
    halved first (exactly), so no difference of finite scores overflows; ``scale`` = 2/ε; no m_col: softmax."""
    n, k, first = sum(len(b) for b in blocks), blocks[0].shape[1], blocks[0]
    # (K,) −m_col/2, or zeros for a softmax ((K,), not 0-dim: the sum below is then taken in ``dtype``)
    shift = _column_max(blocks, gather, dtype).mul_(-0.5) if shift_prototypes else first.new_zeros(k, dtype=dtype)
    e = first.new_empty((n, k), dtype=dtype)
    for b, part in zip(blocks, e.split([len(b) for b in blocks])):
        torch.add(shift, b.detach(), alpha=0.5, out=part)  # (S − m_col)/2, 0 at each column's max
    half_row_max = e.amax(dim=1)  # (B + N,) m_row/2 ≤ 0
    e.sub_(half_row_max[:, None]).mul_(scale).exp_()  # (B + N, K) E ∈ [0, 1]
    return e, half_row_max


def _scaling_vectors(e, u, iterations: int, gather: bool):
    """v (K,) after ``iterations`` rounds from u₀, and the smallest v met (0-dim); v is scaled to max 1
    and clamped at tiny^0.8, so that E v ≥ tiny^0.8 and u stay finite."""
    floor = torch.finfo(e.dtype).tiny ** 0.8
    v_mins = []
    for t in range(iterations):
        c = _matvec(e, u, transpose=True)  # (K,) Eᵀu ≥ min u > 0 thanks to each column's 1
        if gather:
            dist.all_reduce(c)  # prototype mass over all ranks' samples
        low, high = torch.aminmax(c)
        v_mins.append(low / high)
        v = torch.div(low, c).clamp_(min=floor)  # (K,) v ∝ 1/(Eᵀu): each prototype gets 1/K
        if t < iterations - 1:
            u = _matvec(e, v).reciprocal_()  # (B + N,) u ∝ 1/(E v): each sample gets 1/B
    return v, torch.stack(v_mins).amin()


def _matvec(e: torch.Tensor, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """E x (B,), or Eᵀx (K,) with ``transpose``. On the CPU a batched product over 8 row blocks: MKL
    runs ``torch.mv`` on one thread, a batched product on all (1.5–3× faster on 2 at 4096 × 3000)."""
    n = e.shape[0]
    if e.device.type != "cpu" or n % 8 or e.numel() < 2**18:
        return torch.mv(e.t(), x) if transpose else torch.mv(e, x)
    blocks = e.view(8, n // 8, -1)  # (8, n/8, K)
    if transpose:
        return torch.bmm(x.view(8, 1, -1), blocks).sum(dim=0)[0]  # (K,)
    return torch.bmm(x.view(1, 1, -1).expand(8, 1, -1), blocks.transpose(1, 2)).view(n)  # (n,)


def _log_codes(blocks, iterations: int, epsilon: float, gather: bool, rows: int) -> torch.Tensor:
    """Exact Sinkhorn in the log domain, in float64: the hand-over for v beyond float32's range.

    On Y = (S − m_col)/ε from f = 0: g = −logsumexp_b(Y + f) (K,), f = −logsumexp_k(Y + g) (B,),
    and Q = softmax_k(Y + g). The potentials are added afresh at every half-iteration.
    """
    y = torch.cat([b.detach().to(torch.float64) for b in blocks])  # (B + N, K)
    y = y.sub_(_column_max(blocks, gather, torch.float64)).div_(epsilon)
    f = y.new_zeros(len(y), 1)  # (B + N, 1)
    for t in range(iterations):
        g = _neg_logsumexp(y + f, 0, gather)  # (1, K)
        if t < iterations - 1:
            f = _neg_logsumexp(y + g, 1, False)  # (B + N, 1)
    return torch.softmax(y[:rows].add_(g), dim=1)  # (B, K)


def _neg_logsumexp(x: torch.Tensor, dim: int, gather: bool) -> torch.Tensor:
    """−log Σ exp(x) along ``dim`` (over all ranks' rows with ``gather``); overwrites x."""
    m = x.amax(dim=dim, keepdim=True)
    if gather:
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    total = x.sub_(m).exp_().sum(dim=dim, keepdim=True)
    if gather:
        dist.all_reduce(total)
    return total.log_().add_(m).neg_()


def _column_max(blocks, gather: bool, dtype) -> torch.Tensor:
    """m_col (K,): per-prototype maxima over all blocks (and ranks), exact in ``dtype``."""
    m = torch.stack([b.detach().amax(dim=0).to(dtype) for b in blocks]).amax(dim=0)
    if gather:
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    return m


def _non_finite_message(blocks, iterations: int, elsewhere: bool) -> str:
    names = ["out", "queue"][: len(blocks)]
    if elsewhere:  # this rank's scores are fine; the gathered masses are not
        return (f"sinkhorn: another rank's scores are not finite (NaN, +inf, or a sample or prototype "
                f"with only -inf); this rank's {' and '.join(names)} are")
    bad = [n for n, b in zip(names, blocks) if bool((b.isnan() | (b == math.inf)).any())]
    return f"sinkhorn: {' and '.join(bad)} must be finite: got NaN or +inf scores" if bad else (
        f"sinkhorn: {' and '.join(names)} must be finite: -inf is accepted only where every sample"
        f"{' and every prototype' if iterations > 0 else ''} keeps a finite score")


def _check(out, queue, iterations, epsilon, gather_distributed):
    """The score blocks ([out], or [out, queue] unless the queue is empty or iterations = 0),
    iterations, ε and the compute dtype, after checking every argument (on ε by comparisons only:
    torch.compile traces a symbolic float)."""
    for name, s in [("out", out)] + ([] if queue is None else [("queue", queue)]):
        if not (isinstance(s, torch.Tensor) and s.dim() == 2 and s.is_floating_point()) or (
            s.shape[1] == 0 or (name == "out" and s.shape[0] == 0) or s.shape[1] != out.shape[1]
        ):
            got = f"shape {tuple(s.shape)}, dtype {s.dtype}" if isinstance(s, torch.Tensor) else type(s).__name__
            want = "(B, K)" if name == "out" else f"(N, K) with K={out.shape[1]} like out"
            raise ValueError(f"sinkhorn: {name} must be a non-empty 2-D floating-point tensor {want}, got {got}")
    try:
        number = None if isinstance(iterations, bool) else operator.index(iterations)  # NumPy ints too
    except TypeError:
        number = None
    if number is None or number < 0:
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not (
        0.0 < epsilon < math.inf and 1.0 / epsilon < math.inf
    ):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if gather_distributed not in (False, True):  # "no" is truthy: bools (or 0 / 1) only
        raise ValueError(f"gather_distributed must be a bool, got {gather_distributed!r}")
    blocks = [out] if queue is None or len(queue) == 0 or number == 0 else [out, queue]
    dtype = torch.float64 if any(b.dtype == torch.float64 for b in blocks) else torch.float32
    if 2.0 / epsilon > torch.finfo(dtype).max:
        raise ValueError(f"epsilon={epsilon!r} is too small for {dtype}: 2/epsilon overflows; "
                         f"use epsilon >= {2.0 / torch.finfo(dtype).max:.1e}")
    return blocks, number, float(epsilon), dtype
