"""Sinkhorn-Knopp: swav_core.sinkhorn against the textbook in-place routine (FAIR / lightly).

    python benchmarks/bench_sinkhorn.py [--device cuda] [--profile]

Prints a markdown table: shape, textbook ms, ours ms, speed-up, and the memory traffic of each
version (B×K passes counted from the code, 4 bytes per element) as GB/s and as a fraction of the
measured device copy bandwidth. ``--profile`` adds GPU kernel time and launches per call.
"""
import argparse
import contextlib
import importlib
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # common.py, and swav_core from a plain checkout
from common import copy_bandwidth_gbs, interleaved_median_ms, markdown_table, median_ms  # noqa: E402

from sinkhorn_candidates import GraphedFastCodes, unchecked_fast_codes  # noqa: E402
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
    # stable: column max, shift, row max, -= row max, *= 2/ε, exp; 2 matvecs per iteration; *= v, /= r
    stable = 1 + 2 + 1 + 2 + 2 + 2 + 2 * iterations + 2 + 2
    # fast: S/ε, exp in place; column sums, then 2 matvecs per further iteration; the last sample
    # step as logits = S/ε + log v (read S, write) and their softmax (read, write Q); one more
    # matvec for a single iteration
    fast = 2 + 2 + 2 * iterations - 1 + 4 + (1 if iterations == 1 else 0)
    return textbook, stable, fast


@contextlib.contextmanager
def forced_path(path: str):
    """Run sinkhorn with its default device dispatch ("auto"), or force "fast" or "stable"."""
    module = importlib.import_module("swav_core.sinkhorn")
    saved = module._FAST_PATH
    if path != "auto":
        module._FAST_PATH = {"cpu": path == "fast", "cuda": path == "fast"}
    try:
        yield
    finally:
        module._FAST_PATH = saved


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


def op_costs(B: int, K: int, dev: str, min_run_time: float):
    """Median µs of the single B × K operations the versions are built from."""
    s = cosine_scores(B, K, dev)
    x, p = torch.empty_like(s), torch.empty_like(s)
    u, v = torch.rand(B, device=dev) + 0.5, torch.rand(K, device=dev) + 0.5
    ones = torch.ones(B, device=dev)
    ops = {
        "copy": lambda: x.copy_(s),
        "x = S * (1/eps)": lambda: torch.mul(s, 20.0, out=x),
        "E = pow(e^(1/eps), S)": lambda: torch.pow(4.85e8, s, out=p),
        "x = S/eps + log v (broadcast add)": lambda: torch.add(v, s, alpha=20.0, out=x),
        "x = S/eps + 1 log v^T (addmm)": lambda: torch.addmm(s, ones[:, None], v[None], beta=20.0, out=x),
        "softmax over prototypes (dim 1)": lambda: torch.softmax(x, 1, out=p),
        "exp_": lambda: p.exp_(),
        "amax dim 0": lambda: x.amax(0),
        "amax dim 1": lambda: x.amax(1),
        "sum dim 1": lambda: p.sum(1),
        "mv(P, v)": lambda: torch.mv(p, v),
        "mv(P.t(), u)": lambda: torch.mv(p.t(), u),
        "P *= v": lambda: p.mul_(v),
        "P /= r[:, None]": lambda: p.div_(u[:, None]),
    }
    torch.softmax(torch.mul(s, 20.0, out=x), 0, out=p)
    rows = [{"op": k, "µs": 1e3 * median_ms(f, dev, min_run_time)} for k, f in ops.items()]
    return markdown_table(rows)


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
    n_textbook, n_stable, n_fast = passes(T)
    cuda = dev.startswith("cuda")
    n_ours = n_fast if cuda else n_stable  # the path sinkhorn() takes by default on this device
    rows, checks = [], []
    for B in [int(b) for b in args.sizes.split(",")]:
        scores = cosine_scores(B, K, dev)
        other = "stable" if cuda else "fast"
        candidates = [
            lambda: textbook_sinkhorn(scores, T),
            lambda: _forced("auto", scores, T),
            lambda: _forced(other, scores, T),
        ]
        if cuda:  # what removing the host's share would give (sinkhorn_candidates.py)
            graphed = GraphedFastCodes(scores.shape, T)
            candidates += [lambda: graphed(scores), lambda: unchecked_fast_codes(scores, T)]
            fast = _forced("fast", scores, T)
            checks.append(f"B = {B}: max |graph-captured − eager fast path| "
                          f"{(graphed(scores) - fast).abs().max().item():.1e} (first column sums by gemv); "
                          f"no-sync: {(unchecked_fast_codes(scores, T) - fast).abs().max().item():.1e}")
        t_text, t_ours, t_other, *t_extra = interleaved_median_ms(candidates, dev, args.rounds, args.min_run_time)
        gb = B * K * 4 / 1e9  # one pass over the matrix
        rows.append({
            "B × K": f"{B} × {K}",
            "textbook ms": t_text,
            "ours ms": t_ours,
            "speed-up": t_text / t_ours,
            ("stable path ms" if cuda else "fast path ms"): t_other,
            "textbook GB/s": n_textbook * gb / (t_text * 1e-3),
            "ours GB/s": n_ours * gb / (t_ours * 1e-3),
            "ours / copy bw": f"{n_ours * gb / (t_ours * 1e-3) / copy_gbs:.0%}",
        })
        if t_extra:
            rows[-1].update({"graph-captured ms": t_extra[0], "graph speed-up": t_text / t_extra[0],
                             "no-sync ms": t_extra[1], "no-sync speed-up": t_text / t_extra[1]})
    name = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"Sinkhorn, {T} iterations, fp32, {name}, torch {torch.__version__}; copy bandwidth "
          f"{copy_gbs:.0f} GB/s; ours = sinkhorn() as dispatched, the {'fast' if cuda else 'stable'} "
          f"path here; traffic per call: textbook {n_textbook}, stable path {n_stable}, fast path "
          f"{n_fast} B×K passes (the minimum, read S + write Q, is 2)\n")
    print(markdown_table(rows))
    print("\n".join(checks))
    if args.profile and cuda:
        B = int(args.sizes.split(",")[-1])
        print(f"\nSingle operations at {B} × {K}:\n")
        print(op_costs(B, K, dev, 0.2))
        print()
        small = cosine_scores(int(args.sizes.split(",")[0]), K, dev)
        for name, path in [("textbook", None), ("ours, fast path", "fast"), ("ours, stable path", "stable")]:
            fn = textbook_sinkhorn if path is None else (lambda s, t, path=path: _forced(path, s, t))
            print(profile(fn, scores, T, name))
            print(host_profile(fn, small, T))
        big, little = GraphedFastCodes(scores.shape, T), GraphedFastCodes(small.shape, T)
        print(profile(lambda s, t: big(s), scores, T, "graph-captured candidate"))
        print(host_profile(lambda s, t: little(s), small, T))


def _forced(path, scores, iterations):
    with forced_path(path):
        return sinkhorn(scores, iterations)


if __name__ == "__main__":
    main()
