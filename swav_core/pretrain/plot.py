"""``loss.png``: a run's loss and learning rate over its steps, with the k-NN result marked, and below
them the three training-health figures (:mod:`swav_core.health`).

matplotlib is optional (``pip install -e ".[plot]"``) and imported only here, when a picture is drawn;
without it the job prints :func:`hint` instead. Drawn on a bare ``Figure`` (no pyplot, no global
backend or style changed), from the run folder's ``log.csv`` and, when present, ``metrics.json``.
"""
import json
import os
from typing import Optional

from . import report
from .checkpoint import write_atomic
from .errors import UsageError

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
    fig = Figure(figsize=(7, 6.5), layout="constrained")
    ax, health = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    ax.plot(steps, [float(r["loss"]) for r in rows], color="tab:blue")
    ax.set(title=_title(folder, steps[-1]))
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
    for name, color in zip(report.HEALTH_FIELDS, ("tab:purple", "tab:brown", "tab:gray")):
        values = [float(r[name]) if r.get(name) else float("nan") for r in rows]  # older logs lack them
        health.plot(steps, values, color=color, label=name)
    health.axhline(1.0, color="black", linewidth=0.5, linestyle=":")
    health.set(xlabel="step", ylabel="training health", ylim=(0, 1.3))
    health.legend(loc="lower left", fontsize="small", ncol=3, title="1 = uniform predictions / spread embeddings",
                  title_fontsize="small")
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
