"""Tiny shared helpers for the benchmark scripts: a median timer and a markdown table."""
import statistics
from typing import Callable, Dict, List, Sequence

import torch
from torch.utils.benchmark import Timer

__all__ = ["median_ms", "interleaved_median_ms", "markdown_table", "copy_bandwidth_gbs"]


def median_ms(fn: Callable[[], object], device: str = "cpu", min_run_time: float = 1.0) -> float:
    """Median wall time of ``fn()`` in milliseconds (``blocked_autorange``; CUDA is synchronised)."""
    fn()  # warm-up: lazy initialisation, allocator, cuBLAS handles
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())  # Timer's default: 1
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def interleaved_median_ms(
    fns: Sequence[Callable[[], object]], device: str = "cpu", rounds: int = 5, min_run_time: float = 1.0
) -> List[float]:
    """Median ms of each of ``fns``, timed in alternating rounds so that a shared, noisy machine
    slows every candidate alike: the median over rounds of each round's ``blocked_autorange`` median."""
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, times):
            t.append(median_ms(fn, device, min_run_time / rounds))
    return [statistics.median(t) for t in times]


def copy_bandwidth_gbs(device: str = "cpu", n_bytes: int = 2**28) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second, in GB/s)."""
    x = torch.ones(n_bytes // 4, device=device)  # touched: untouched pages would read as cached zeros
    y = torch.zeros_like(x)
    return 2 * n_bytes / (median_ms(lambda: y.copy_(x), device, 0.5) * 1e-3) / 1e9


def markdown_table(rows: Sequence[Dict[str, object]]) -> str:
    """Rows (dicts with the same keys, in column order) as a GitHub markdown table."""
    headers: List[str] = list(rows[0])
    cells = [[_fmt(row[h]) for h in headers] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.2f}" if abs(x) < 1e4 else f"{x:.3g}"
    return str(x)
