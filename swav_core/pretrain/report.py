"""What the job prints and writes besides checkpoints: progress lines, ``log.csv``, ``metrics.json``."""
import csv
import json
import os
from typing import Any, Dict

__all__ = ["LOG_FIELDS", "duration", "progress_line", "reset_log", "append_log", "write_metrics"]

LOG_FIELDS = ("step", "loss", "lr", "crops_per_s", "elapsed")


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(step: int, steps: int, loss: float, lr: float, crops_per_s: float, eta_s: float) -> str:
    w = len(str(steps))
    return (f"step {step:>{w}}/{steps} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{crops_per_s:,.0f} crops/s | ETA {duration(eta_s)}")


def reset_log(path: str, keep_until_step: int) -> None:
    """Start ``log.csv`` afresh, keeping the rows of steps ≤ ``keep_until_step`` (those a resume keeps)."""
    rows = []
    if keep_until_step > 0 and os.path.isfile(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until_step]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def append_log(path: str, row: Dict[str, Any]) -> None:
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(row)


def write_metrics(path: str, metrics: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
