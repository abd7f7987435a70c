"""``loss.png``: a run's loss and learning rate over its steps, with the k-NN result marked.

matplotlib is optional (``pip install -e ".[plot]"``) and imported only here, when a picture is drawn;
without it the job prints :func:`hint` instead. Drawn on a bare ``Figure`` (no pyplot, no global
backend or style changed), from the run folder's ``log.csv`` and, when present, ``metrics.json``.
"""
import json
import os
from typing import Optional

from . import report
from .checkpoint import write_atomic
from .data import UsageError

__all__ = ["write", "hint"]


def hint(folder: str) -> str:
    """The one line that says how to get ``loss.png`` without matplotlib."""
    return (f'loss.png needs matplotlib: pip install -e ".[plot]" (or pip install matplotlib), then '
            f"python -m swav_core.pretrain --plot {folder}")


def write(folder: str) -> Optional[str]:
    """Draw ``folder/loss.png``; return its path, or None when matplotlib is not installed.

    A folder without ``log.csv`` rows is a :class:`UsageError`.
    """
    log = os.path.join(folder, "log.csv")
    rows = report.read_log(log) if os.path.isfile(log) else []
    if not rows:
        raise UsageError(f"--plot {folder!r}: no log.csv rows there (expected the --out folder of a run)")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    steps = [int(r["step"]) for r in rows]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, [float(r["loss"]) for r in rows], color="tab:blue")
    ax.set(xlabel="step", title=_title(folder, steps[-1]))
    ax.set_ylabel("SwAV loss (mean since the previous row)", color="tab:blue")
    lr = ax.twinx()
    lr.plot(steps, [float(r["lr"]) for r in rows], color="tab:orange", linewidth=1)
    lr.set_ylabel("learning rate", color="tab:orange")
    metrics = _metrics(folder)
    if metrics.get("knn_top1") is not None:
        ax.axvline(metrics["steps"], color="tab:green", linestyle="--")
        ax.annotate(f"k-NN top-1 {metrics['knn_top1']:.3f}\nrandom init {metrics['knn_top1_random_init']:.3f}",
                    (metrics["steps"], ax.get_ylim()[1]), xytext=(-4, -4), textcoords="offset points",
                    ha="right", va="top", color="tab:green")
    path = os.path.join(folder, "loss.png")
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))  # a kill leaves no half picture
    return path


def _metrics(folder: str) -> dict:
    path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _title(folder: str, last_step: int) -> str:
    return f"{os.path.basename(os.path.abspath(folder))}: {last_step} steps"
