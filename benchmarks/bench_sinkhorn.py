"""Sinkhorn-Knopp: swav_core.sinkhorn against the textbook in-place routine (FAIR / lightly).

    python benchmarks/bench_sinkhorn.py [--device cuda] [--profile]

Prints a markdown table: shape, textbook ms, ours ms, speed-up, and the memory traffic of each
version (B×K passes counted from the code, 4 bytes per element) as GB/s and as a fraction of the
measured device copy bandwidth. ``--profile`` adds GPU kernel time and launches per call.
"""
import argparse
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # common.py, and swav_core from a plain checkout
from common import copy_bandwidth_gbs, interleaved_median_ms, markdown_table, median_ms  # noqa: E402

from swav_core import sinkhorn  # noqa: E402


@torch.no_grad()
def textbook_sinkhorn(scores: torch.Tensor, iterations: int = 3, epsilon: float = 0.05) -> torch.Tensor:
    """The FAIR / lightly routine: rewrite the whole K × B matrix at every half-iteration."""
    Q = torch.exp(scores / epsilon).t()  # (K, B)
    K, B = Q.shape
    Q /= torch.sum(Q)
    for _ in range(iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)  # total weight per prototype must be 1/K
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)  # total weight per sample must be 1/B
        Q /= B
    Q *= B  # the columns must sum to 1 so that Q is an assignment
    return Q.t()


def passes(iterations: int):
    """B×K read-or-write passes of each version (one unit: one read or one write of the matrix)."""
    # /ε, exp, sum, /=; per iteration 2 sums and 4 rescales; *= B
    textbook = 2 + 2 + 1 + 2 + iterations * 10 + 2
    # column max, shift, row max, -= row max, *= 2/ε, exp; 2 matvecs per iteration; *= v, /= r
    ours = 1 + 2 + 1 + 2 + 2 + 2 + 2 * iterations + 2 + 2
    return textbook, ours


def cosine_scores(batch: int, prototypes: int, device: str) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(batch)
    z = torch.nn.functional.normalize(torch.randn(batch, 128, device=device, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(prototypes, 128, device=device, generator=g), dim=1)
    return z @ c.t()  # (B, K) cosine similarities, as SwAV's prototypes produce


def profile(fn, scores, iterations, name, calls=10):
    """GPU kernel time, kernel launches and the kernels of one call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn(scores, iterations)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(scores, iterations)
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    kernel_us = sum(e.self_device_time_total for e in kernels) / calls
    launches = sum(e.count for e in kernels) / calls
    lines = [f"{name}: {kernel_us:.0f} us of GPU kernels, {launches:.0f} kernels per call (B = {len(scores)})"]
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]:
        lines.append(f"    {e.self_device_time_total / calls:7.1f} us  {e.count / calls:4.1f}x  {e.key[:90]}")
    return "\n".join(lines)


def host_profile(fn, scores, iterations, calls=20, rows=8):
    """Host (CPU) time per call of the operators ``fn`` dispatches: what bounds a call when the GPU
    work is short."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn(scores, iterations)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn(scores, iterations)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / calls
    lines = [f"host time per call {total:.0f} us (profiled), B = {len(scores)}; top operators:"]
    for e in events[:rows]:
        lines.append(f"    {e.self_cpu_time_total / calls:7.1f} us  {e.count / calls:4.1f}x  {e.key}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per candidate and shape")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (noisy machines)")
    parser.add_argument("--sizes", default="256,1024,4096", help="batch sizes B")
    parser.add_argument("--prototypes", type=int, default=3000)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="GPU kernel time and launches per call")
    args = parser.parse_args()
    dev, K, T = args.device, args.prototypes, args.iterations
    copy_gbs = copy_bandwidth_gbs(dev)
    n_textbook, n_ours = passes(T)
    cuda = dev.startswith("cuda")
    rows = []
    for B in [int(b) for b in args.sizes.split(",")]:
        scores = cosine_scores(B, K, dev)
        candidates = [lambda: textbook_sinkhorn(scores, T), lambda: sinkhorn(scores, T)]
        t_text, t_ours = interleaved_median_ms(candidates, dev, args.rounds, args.min_run_time)
        gb = B * K * 4 / 1e9  # one pass over the matrix
        rows.append({
            "B × K": f"{B} × {K}",
            "textbook ms": t_text,
            "ours ms": t_ours,
            "speed-up": t_text / t_ours,
            "textbook GB/s": n_textbook * gb / (t_text * 1e-3),
            "ours GB/s": n_ours * gb / (t_ours * 1e-3),
            "ours / copy bw": f"{n_ours * gb / (t_ours * 1e-3) / copy_gbs:.0%}",
        })
    name = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"Sinkhorn, {T} iterations, fp32, {name}, torch {torch.__version__}; copy bandwidth "
          f"{copy_gbs:.0f} GB/s; traffic per call: textbook {n_textbook}, ours {n_ours} B×K passes "
          f"(the minimum, read S + write Q, is 2)\n")
    print(markdown_table(rows))
    if args.profile and cuda:
        small = cosine_scores(int(args.sizes.split(",")[0]), K, dev)
        for name, fn in [("textbook", textbook_sinkhorn), ("ours", sinkhorn)]:
            print(profile(fn, scores, T, name))
            print(host_profile(fn, small, T))


if __name__ == "__main__":
    main()
