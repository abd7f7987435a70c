"""Independent oracles shared by the tests: the textbook Sinkhorn (fp64 and native precision), exact
log-domain Sinkhorn, the per-pair SwAV loss, and the score and crop builders they are run on."""
import torch
import torch.nn.functional as F

# ---- oracles, written from the textbook ---------------------------------------------------------


def textbook_fp64(scores, iterations=3, epsilon=0.05):
    """FAIR / lightly's routine (see ``textbook_native``) evaluated in float64 on the CPU."""
    return textbook_native(scores.detach().cpu().double(), epsilon, iterations)


def textbook_native(scores, epsilon, iterations=3):
    """The textbook in the input's own precision, as lightly and FAIR run it: Q = exp(S/ε)ᵀ (K, B)
    normalised, then per iteration each prototype row to total 1/K and each sample column to 1/B;
    finally Q *= B, returned as (B, K)."""
    Q = torch.exp(scores / epsilon).t()
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(iterations):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    return (Q * B).t()


def exact_fp64(scores, iterations=3, epsilon=0.05):
    """The same iteration in the log domain (no under- or overflow): exact Sinkhorn in float64."""
    L = scores.detach().cpu().double() / epsilon  # (B, K)
    for _ in range(iterations):
        L = L - torch.logsumexp(L, dim=0, keepdim=True)  # prototypes: equal mass
        L = L - torch.logsumexp(L, dim=1, keepdim=True)  # samples: each row sums to 1
    return L.exp()


def assert_matches_oracle(q, oracle, rtol=1e-4, fro=1e-5, atol=1e-20):
    """SPEC §2: fp32 output within 1e-4 relative per element (entries below ``atol``, which float32
    cannot resolve relative to the rows' mass, excepted) and 1e-5 relative in Frobenius norm."""
    q = q.detach().cpu().double()
    torch.testing.assert_close(q, oracle, rtol=rtol, atol=atol)
    assert (q - oracle).norm() <= fro * oracle.norm()


def far_pair_scores(batch=3, prototypes=256, seed=0):
    """Scores in [-1, 1] with a far prototype (column 0) and a far sample (row 0), 2 below the rest:
    at ε = 0.01, from ~20 iterations on, exact Sinkhorn scales that prototype by more than e^300."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, prototypes, generator=g) * 2 - 1
    scores[:, 0] -= 2
    scores[0] -= 2
    return scores


def cosine_scores(batch, prototypes, device, seed=0, dim=32):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(prototypes, dim, generator=g), dim=1)
    return (z @ c.t()).to(device)  # (B, K) in [-1, 1], what SwAV's prototypes produce


# ---- the oracle: lightly's forward, one pair at a time, in float64 --------------------------------


def per_pair_oracle(high, low, queue=None, temperature=0.1, iterations=3, epsilon=0.05, codes=None):
    """ℓ = mean_i Σ_{v≠i} −mean_b Σ_k q_i log softmax(z_v/τ) / (n_crops − 1), with the codes of the
    fp64 textbook on cat(z_i, queue_i) (or ``codes(i)``), log_softmax recomputed for every pair."""
    crops = [z.detach().cpu().double() for z in high + low]
    total = 0.0
    for i in range(len(high)):
        if codes is not None:
            q = codes(i)
        else:
            scores = crops[i] if queue is None else torch.cat([crops[i], queue[i].detach().cpu().double()])
            q = textbook_fp64(scores, iterations, epsilon)[: len(crops[i])]
        subloss = 0.0
        for v, z in enumerate(crops):
            if v != i:
                subloss += -(q * F.log_softmax(z / temperature, dim=1)).sum(dim=1).mean()
        total += subloss / (len(crops) - 1)
    return total / len(high)


def make_crops(n_high, n_low, batch, prototypes, queue_sizes, seed, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def scores(n):  # cosine-like scores in [-1, 1]
        return (torch.rand(n, prototypes, generator=g) * 2 - 1).to(device, dtype)

    high = [scores(batch) for _ in range(n_high)]
    low = [scores(batch) for _ in range(n_low)]
    queue = None if queue_sizes is None else [scores(n) for n in queue_sizes]
    return high, low, queue
