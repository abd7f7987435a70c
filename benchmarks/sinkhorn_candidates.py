"""GPU candidates for the host-bound part of sinkhorn()'s fast path, timed by bench_sinkhorn.py.

On the H200 the fast path's kernels take 237 µs at 4096 × 3000 but a call takes 0.38 ms: the host
needs ~13 µs per dispatched operator (23 of them) and the call ends in the guard's host sync. These
two variants measure what removing each cost would give; neither is part of the library.

- :func:`unchecked_fast_codes`: the same operators without the guard's sync (and so without its
  fallback): the cost of the sync alone.
- :class:`GraphedFastCodes`: the vector iterations (exp, 5 matrix-vector products, the scaling) replayed
  from a CUDA graph, captured once per shape over one persistent (B, K) buffer; 4 eager operators and
  one graph launch per call instead of 23 operators. Its first column sums are a matrix-vector product
  with a ones vector (18 against 26 µs for the dim-0 sum on the H200), free of host cost in a graph.
"""
import torch

from swav_core import sinkhorn
from swav_core.sinkhorn_paths import _fast_accurate, _fast_scaling


@torch.no_grad()
def unchecked_fast_codes(scores: torch.Tensor, iterations: int = 3, epsilon: float = 0.05) -> torch.Tensor:
    """The fast path's operators on (B, K) float32 scores, without the guard (no host sync)."""
    e = torch.mul(scores, 1.0 / epsilon)  # (B, K) S/ε
    log_v, _ = _fast_scaling(e, iterations, len(scores))
    logits = torch.add(log_v, scores, alpha=1.0 / epsilon)
    return torch.softmax(logits, dim=1, out=e)


class GraphedFastCodes:
    """sinkhorn(S, iterations, epsilon) for float32 CUDA scores of one fixed shape (B, K).

    The buffer holds S/ε, then E (inside the graph), then the logits S/ε + log v; the codes are a new
    tensor. Equal to the eager fast path up to the rounding of the first column sums; when the guard
    rejects, the library's sinkhorn() answers.
    """

    def __init__(self, shape, iterations: int = 3, epsilon: float = 0.05, device="cuda"):
        self.iterations, self.epsilon = iterations, epsilon
        self.buffer = torch.zeros(shape, device=device)  # (B, K)
        self.ones = torch.ones(shape[0], device=device)  # (B,) u₀
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():  # warm-up: cuBLAS handles, workspaces
            for _ in range(3):
                _fast_scaling(self.buffer.zero_(), iterations, shape[0], self.ones)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            # (K,) log v and (2, n) mass ranges, in the graph's memory
            self.log_v, self.ranges = _fast_scaling(self.buffer, iterations, shape[0], self.ones)

    @torch.no_grad()
    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        torch.mul(scores, 1.0 / self.epsilon, out=self.buffer)
        self.graph.replay()
        torch.add(self.log_v, scores, alpha=1.0 / self.epsilon, out=self.buffer)
        q = torch.softmax(self.buffer, dim=1)
        return q if _fast_accurate(self.ranges) else sinkhorn(scores, self.iterations, self.epsilon)
