"""Sinkhorn-Knopp codes of SwAV (Caron et al., 2020, arXiv:2006.09882, §3.1 "Online clustering").

Q = Diag(u) exp(S/ε) Diag(v), the entropic transport plan of B samples to K prototypes (marginals 1/B, 1/K).
FAIR's and lightly's routine rewrites the B × K matrix every half-iteration; here only the scalings move:

    E  = exp((S − m_col − m_row)/ε)   m_col, m_row: per-prototype, then per-sample maxima
    u₀ = exp(m_row/ε)                 Diag(u₀) E = exp((S − m_col)/ε), the textbook's start
    v  ← 1/(Eᵀu)                      "each prototype receives mass 1/K" (constants cancel)
    u  ← 1/(E v)                      "each sample receives mass 1/B"
    Q  = Diag(1/(E v)) E Diag(v)      every row sums to 1

E ∈ [0, 1] holds a 1 in every row and column, so nothing overflows and no mass vanishes; where v falls below
float32's exact range (many rounds, small ε, a far prototype) the codes are recomputed in log-domain float64.
"""
import math
import numbers
import operator

import torch
import torch.distributed as dist

__all__ = ["sinkhorn", "hyperparameters"]

EXACT = 0.5  # min v >= tiny^EXACT: what E loses to underflow moves no mass beyond float32's rounding
FLOOR = 0.8  # v >= tiny^FLOOR, so E v >= tiny^FLOOR and u = 1/(E v) stays finite


def sinkhorn(out: torch.Tensor, iterations: int = 3, epsilon: float = 0.05, gather_distributed: bool = False,
             queue: "torch.Tensor | None" = None) -> torch.Tensor:
    r"""Codes Q (B, K) of scores ``out`` S (B, K) by Sinkhorn-Knopp: FAIR's / lightly's routine in float64 (up to
    float32 rounding) where that is finite, exact Sinkhorn beyond; float32 (float64 input: float64), rows sum to 1,
    no gradient. ``iterations=0``: the softmax of S/ε. ``gather_distributed``: each rank gets its rows of the codes
    of all ranks' batches (B may differ). ``queue`` (N, K): scores of stored samples sharing the equipartition
    (``sinkhorn(cat(out, queue))[:B]``). Bad arguments, NaN or +∞ scores raise ValueError naming the argument
    (−∞: "never assigned"); not checked under ``torch.compile``. Example:

    >>> sinkhorn(torch.randn(256, 3000), queue=torch.randn(3840, 3000)).shape
    torch.Size([256, 3000])
    """
    blocks, iterations, epsilon, dtype = _check(out, queue, iterations, epsilon, gather_distributed)
    distributed = gather_distributed and iterations > 0 and dist.is_available() and dist.is_initialized()
    reduce = _all_reduce if distributed and dist.get_world_size() > 1 else _local  # chosen once
    tiny = torch.finfo(dtype).tiny
    with torch.no_grad(), torch.autocast(out.device.type, enabled=False):
        m_col = reduce(torch.stack([b.detach().amax(0).to(dtype) for b in blocks]).amax(0), "max") if iterations else 0
        shift = m_col.mul(-0.5) if iterations else out.new_zeros(out.shape[1], dtype=dtype)  # (K,); softmax: no m_col
        e = out.new_empty((sum(len(b) for b in blocks), out.shape[1]), dtype=dtype)  # (B + N, K)
        for b, part in zip(blocks, e.split([len(b) for b in blocks])):
            torch.add(shift, b.detach(), alpha=0.5, out=part)  # (S − m_col)/2: halved, no difference overflows
        half_row_max = e.amax(dim=1)  # (B + N,) m_row/2 ≤ 0
        e.sub_(half_row_max[:, None]).mul_(2.0 / epsilon).exp_()  # E = exp((S − m_col − m_row)/ε) ∈ [0, 1]
        finite = local = torch.isfinite(half_row_max).all()  # NaN, +∞, or a row or column of −∞
        q, exact = e[: len(out)], finite  # a softmax per sample spans nothing
        if iterations > 0:
            u, v_mins = half_row_max.mul_(2.0 / epsilon).exp_(), []  # (B + N,) u₀ = exp(m_row/ε) ∈ [0, 1]
            for t in range(iterations):
                c = reduce(_matvec(e, u, transpose=True))  # (K,) Eᵀu over all ranks' samples, ≥ min u > 0
                low, high = torch.aminmax(c)
                v_mins.append(low / high)
                v = torch.div(low, c).clamp_(min=tiny**FLOOR)  # (K,) v ∝ 1/(Eᵀu): each prototype gets 1/K
                if t < iterations - 1:
                    u = _matvec(e, v).reciprocal_()  # (B + N,) u ∝ 1/(E v): each sample gets 1/B
            q.mul_(v)
            exact = torch.stack(v_mins).amin() >= tiny**EXACT  # the same on every rank
            finite = finite & torch.isfinite(v).all()  # another rank's NaN reaches v through the all-reduce
        q.div_(q.sum(dim=1, keepdim=True))  # (B, K) Q = Diag(1/(E v)) E Diag(v): rows sum to 1
        if torch.compiler.is_compiling():
            return q
        finite, exact, local = torch.stack([finite, exact, local]).tolist()  # the one host sync
        if not finite:
            raise ValueError(_non_finite_message(blocks, iterations, elsewhere=local))
        if not exact:  # v beyond float32's range: exact Sinkhorn in the log domain, in float64, from f = 0
            y = torch.cat([b.detach().double() for b in blocks])  # (B + N, K)
            y = y.sub_(m_col.double()).div_(epsilon)  # Y = (S − m_col)/ε
            f = y.new_zeros(len(y), 1)  # (B + N, 1)
            for t in range(iterations):
                g = _neg_logsumexp(y + f, 0, reduce)  # (1, K) g = −logsumexp_b(Y + f), over all ranks' samples
                if t < iterations - 1:
                    f = _neg_logsumexp(y + g, 1, _local)  # (B + N, 1) f = −logsumexp_k(Y + g)
            q.copy_(torch.softmax(y[: len(out)].add_(g), dim=1))  # (B, K) Q = softmax_k(Y + g)
        return q


def _neg_logsumexp(x: torch.Tensor, dim: int, reduce) -> torch.Tensor:  # −log Σ exp(x) along dim; overwrites x
    m = reduce(x.amax(dim=dim, keepdim=True), "max")
    return reduce(x.sub_(m).exp_().sum(dim=dim, keepdim=True)).log_().add_(m).neg_()


def _matvec(e: torch.Tensor, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """E x (B,), or Eᵀx (K,): on the CPU over 8 row blocks, as MKL runs mv on one thread (1.5–3× on 2 cores)."""
    if e.device.type != "cpu" or len(e) % 8 or e.numel() < 2**18:
        return torch.mv(e.t(), x) if transpose else torch.mv(e, x)
    blocks = e.view(8, len(e) // 8, -1)  # (8, n/8, K)
    if transpose:
        return torch.bmm(x.view(8, 1, -1), blocks).sum(dim=0)[0]  # (K,)
    return torch.bmm(x.view(1, 1, -1).expand(8, 1, -1), blocks.transpose(1, 2)).view(len(e))  # (n,)


def _all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x


_local = lambda x, op="sum": x  # noqa: E731  (one process: the reduction is the identity)


# --- argument checks and messages -------------------------------------------------------------------

def hyperparameters(iterations, epsilon, gather_distributed, prefix: str = "", dtype=torch.float32):
    """The three as (int, float, bool), or a ValueError naming ``prefix`` + the argument (SwaVLoss: "sinkhorn_")."""
    try:
        number = None if isinstance(iterations, bool) else operator.index(iterations)  # NumPy ints too
    except TypeError:
        number = None
    if number is None or number < 0:
        raise ValueError(f"{prefix}iterations must be a non-negative int, got {iterations!r}")
    real = isinstance(epsilon, numbers.Real) and not isinstance(epsilon, bool)  # compared only: compile traces it
    if not (real and 0.0 < epsilon < math.inf and 1.0 / epsilon < math.inf):
        raise ValueError(f"{prefix}epsilon must be a finite number > 0, got {epsilon!r}")
    if gather_distributed not in (False, True):  # "no" is truthy: bools (or 0 / 1) only
        raise ValueError(f"{prefix}gather_distributed must be a bool, got {gather_distributed!r}")
    if 2.0 / epsilon > torch.finfo(dtype).max:
        raise ValueError(f"{prefix}epsilon={epsilon!r} is too small for {dtype}: 2/epsilon overflows; "
                         f"use epsilon >= {2.0 / torch.finfo(dtype).max:.1e}")
    return number, float(epsilon), bool(gather_distributed)


def _check(out, queue, iterations, epsilon, gather_distributed):
    """Score blocks ([out], [out, queue] if the queue is used), iterations, ε, compute dtype; all checked."""
    for name, s in [("out", out)] + ([] if queue is None else [("queue", queue)]):
        if not (isinstance(s, torch.Tensor) and s.dim() == 2 and s.is_floating_point() and s.shape[1] > 0) or (
                (name == "out" and s.shape[0] == 0) or s.shape[1] != out.shape[1]):
            got = f"shape {tuple(s.shape)}, dtype {s.dtype}" if isinstance(s, torch.Tensor) else type(s).__name__
            want = "(B, K)" if name == "out" else f"(N, K) with K={out.shape[1]} like out"
            raise ValueError(f"sinkhorn: {name} must be a non-empty 2-D floating-point tensor {want}, got {got}")
    blocks = [out] if queue is None or len(queue) == 0 or iterations == 0 else [out, queue]  # checked next
    dtype = torch.float64 if any(b.dtype == torch.float64 for b in blocks) else torch.float32
    return (blocks, *hyperparameters(iterations, epsilon, gather_distributed, dtype=dtype)[:2], dtype)


def _non_finite_message(blocks, iterations: int, elsewhere: bool) -> str:
    names = ["out", "queue"][: len(blocks)]
    bad = [n for n, b in zip(names, blocks) if bool((b.isnan() | (b == math.inf)).any())]
    if elsewhere:  # this rank's scores are fine; the gathered masses are not
        return (f"sinkhorn: another rank's scores are not finite (NaN, +inf, or a sample or prototype with only -inf); "
                f"this rank's {' and '.join(names)} are")
    return f"sinkhorn: {' and '.join(bad)} must be finite: got NaN or +inf scores" if bad else (
        f"sinkhorn: {' and '.join(names)} must be finite: -inf is accepted only where every sample"
        f"{' and every prototype' if iterations > 0 else ''} keeps a finite score")
