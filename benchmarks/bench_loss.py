"""SwaVLoss against the per-pair loss (lightly's forward, textbook Sinkhorn, log_softmax per pair).

    python benchmarks/bench_loss.py [--device cuda] [--min-run-time 1.0]

2 × 256 high-resolution and 6 × 256 low-resolution crops, K = 3000 prototypes, without and with a
3840-row queue per high-resolution crop; forward alone and forward + backward. Prints a markdown table.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # common.py, and swav_core from a plain checkout
from bench_sinkhorn import textbook_sinkhorn  # noqa: E402
from common import interleaved_median_ms, markdown_table  # noqa: E402

from swav_core import SwaVLoss  # noqa: E402


def per_pair_loss(high, low, queue=None, temperature=0.1, iterations=3, epsilon=0.05):
    """lightly's SwaVLoss.forward: codes per high-res crop, log_softmax recomputed for every pair."""
    n_crops = len(high) + len(low)
    loss = 0.0
    for i in range(len(high)):
        with torch.no_grad():
            scores = high[i].detach()
            if queue is not None:
                scores = torch.cat((scores, queue[i].detach()))
            q = textbook_sinkhorn(scores, iterations, epsilon)
            if queue is not None:
                q = q[: len(high[i])]
        subloss = 0.0
        for v, z in enumerate(high + low):
            if v != i or v >= len(high):
                subloss += -torch.mean(torch.sum(q * F.log_softmax(z / temperature, dim=1), dim=1))
        loss += subloss / (n_crops - 1)
    return loss / len(high)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per candidate and shape")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (noisy machines)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prototypes", type=int, default=3000)
    parser.add_argument("--queue", type=int, default=3840)
    args = parser.parse_args()
    dev, B, K = args.device, args.batch, args.prototypes
    g = torch.Generator(device=dev).manual_seed(0)
    prototypes = F.normalize(torch.randn(K, 128, device=dev, generator=g), dim=1)

    def scores(n):  # (n, K) cosine similarities
        return F.normalize(torch.randn(n, 128, device=dev, generator=g), dim=1) @ prototypes.t()

    high = [scores(B).requires_grad_() for _ in range(2)]
    low = [scores(B).requires_grad_() for _ in range(6)]
    queue = [scores(args.queue) for _ in range(2)]
    ours = SwaVLoss()
    rows = []
    for q in (None, queue):
        for backward in (False, True):
            def run(fn):
                def step():
                    loss = fn(high, low, q)
                    if backward:
                        loss.backward()
                    return loss
                return step

            t_pair, t_ours = interleaved_median_ms(
                [run(per_pair_loss), run(ours)], dev, args.rounds, args.min_run_time
            )
            rows.append({
                "queue": 0 if q is None else args.queue,
                "pass": "forward + backward" if backward else "forward",
                "per-pair ms": t_pair,
                "ours ms": t_ours,
                "speed-up": t_pair / t_ours,
            })
    diff = abs(per_pair_loss(high, low, queue).item() - ours(high, low, queue).item())
    cuda = dev.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"SwaVLoss, 2 × {B} + 6 × {B} crops, K = {K}, {name}, torch {torch.__version__}; "
          f"|ours − per-pair| = {diff:.2e}\n")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
