"""What the job prints and writes besides checkpoints: progress lines, ``log.csv``, ``metrics.json`` (the
whole-file writes go through :func:`~.checkpoint.write_atomic`), the :class:`Progress` they are made from,
the health figures' embeddings and the line that says a run looks collapsed."""
import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..health import COLLAPSED
from . import checkpoint
from .errors import JobError
from .parallel import say

__all__ = ["HEALTH_FIELDS", "LOG_FIELDS", "Progress", "FirstEmbedding", "duration", "progress_line", "queue_line",
           "crops_text", "summary", "collapse", "watch", "Collapsed", "read_log", "kept_log", "start_log", "append_log",
           "metrics_text"]

HEALTH_FIELDS = ("pred_entropy", "prototype_usage", "embedding_std")  # swav_core.health, window means
LOG_FIELDS = ("step", "loss", "lr", "crops_per_s", "elapsed", "skipped") + HEALTH_FIELDS


@dataclass
class Progress:
    """What the loop carries from step to step and saves with the checkpoint."""

    step: int = 0
    loss_first: Optional[float] = None  # the first and last log.csv rows' loss (window means)
    loss_last: Optional[float] = None
    seconds: float = 0.0  # time spent in training steps, over all sessions of the run
    skipped: int = 0  # steps skipped for scores that were not finite (a bad batch), over the run
    skipped_in_a_row: int = 0
    window: List[float] = field(default_factory=list)  # losses since the last progress line
    health: List[List[float]] = field(default_factory=list)  # (pred_entropy, prototype_usage, embedding_std)
    collapsed_rows: int = 0  # logged rows in a row that look collapsed (see :func:`watch`)
    # When, and after which step, this session and its current window began: crops/s counts the
    # window's steps, the ETA all of this session's (after a resume, ``window`` also holds losses
    # from before the interruption).
    window_start: float = field(default_factory=time.perf_counter)
    window_from: int = 0
    session_start: float = field(default_factory=time.perf_counter)
    session_from: int = 0


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(step: int, steps: int, row: Dict[str, float], eta_s: float) -> str:
    """The line printed with each log.csv ``row`` (loss, lr, crops_per_s and the health figures)."""
    return (f"step {step:>{len(str(steps))}}/{steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | entropy "
            f"{row['pred_entropy']:.2f} usage {row['prototype_usage']:.2f} std {row['embedding_std']:.2f} | "
            f"{row['crops_per_s']:,.0f} crops/s | ETA {duration(eta_s)}")


def queue_line(length: int, batch: int, n: int, world: int, steps: int) -> str:
    """When the queues are first used and what they hold: per process, each fills with its own batches."""
    full = -(-length // batch)  # steps of B rows until a queue holds `length`
    use = (f"used from step {full + 1}" if full < steps else
           f"never used in this run (full after step {full}, --steps {steps})")
    held = (f"each of this process's samples about {length * world / n:.1f} times (more than an epoch: lower "
            f"--queue-length)" if length * world > n else f"{length / n:.1%} of the {n} training samples")
    return f"queues: 2 x {length} rows per process, {use}; each holds {held}"


def crops_text(crops) -> str:
    """``2x32x32 + 4x16x16 crops`` for a :class:`~swav_core.multicrop.MultiCrop`."""
    size = lambda s: "x".join(map(str, s))  # noqa: E731
    return f"{crops.n_high}x{size(crops.high_size)} + {crops.n_low}x{size(crops.low_size)} crops"


def summary(m: Dict[str, Any], knn_k: int, out: str, plot_hint: Optional[str]) -> str:
    """The lines printed at the end of the job, from its ``metrics.json`` values ``m``; ``plot_hint``
    says how to get ``loss.png`` where it could not be drawn (None: it was)."""
    lines = [f"done: {m['steps']} steps, {m['seconds']:.1f} s training ({m['crops_per_s']:,.0f} crops/s), "
             f"loss {m['loss_first']:.4f} -> {m['loss_last']:.4f} (first and last log.csv rows)"]
    if m.get("knn_top1") is not None:
        lines.append(f"k-NN top-1 (k={knn_k}, {m['knn_test_samples']} held-out samples): "
                     f"{m['knn_top1']:.3f} pretrained vs {m['knn_top1_random_init']:.3f} at random initialisation")
        if m.get("linear_top1") is not None:
            lines.append(f"linear probe top-1 (logistic regression on the frozen features): {m['linear_top1']:.3f} "
                         f"pretrained vs {m['linear_top1_random_init']:.3f} at random initialisation")
    else:
        lines.append("k-NN evaluation skipped: the data has no labels")
    png = [] if plot_hint else ["loss.png"]
    lines.append(f"wrote {', '.join(['checkpoint.pt', 'backbone.pt', 'metrics.json', 'log.csv'] + png)} to {out}")
    return "\n".join(lines + ([plot_hint] if plot_hint else []))


def collapse(health: Dict[str, float], k: int) -> Optional[str]:
    """What in ``health`` (one logged row's figures) looks collapsed, with the knobs to turn; None if nothing."""
    if health["pred_entropy"] >= COLLAPSED["pred_entropy"]:
        return (f"pred_entropy {health['pred_entropy']:.3f}: the predictions are near uniform (the loss sits "
                f"at ln K); lower --temperature, raise --lr or lower --freeze-prototypes-steps")
    if health["prototype_usage"] * k <= COLLAPSED["prototype_usage_k"]:
        return (f"prototype_usage {health['prototype_usage']:.3f}: a handful of the {k} prototypes take every "
                f"sample; raise --epsilon, start the queue later or freeze the prototypes longer")
    if health["embedding_std"] < COLLAPSED["embedding_std"]:
        return (f"embedding_std {health['embedding_std']:.3f}: the embeddings sit near one point; lower --lr "
                f"or strengthen the augmentations (--high-scale, --low-scale, --intensity)")
    return None


ROWS_TO_WARN = 3  # logged rows in a row that look collapsed before the warning


def watch(progress: Progress, args, health: Dict[str, float]) -> None:
    """After the warm-up and the frozen prototype steps, say once (in one line) when the last logged rows all
    look collapsed, naming the figure and the knobs; with --stop-on-collapse, stop (a :class:`Collapsed`)."""
    if progress.step <= max(args.warmup_steps, args.freeze_prototypes_steps):
        return
    why = collapse(health, args.prototypes)
    progress.collapsed_rows = progress.collapsed_rows + 1 if why else 0
    if progress.collapsed_rows == ROWS_TO_WARN:  # once per stretch of collapsed rows
        line = f"step {progress.step}: the run looks collapsed for {ROWS_TO_WARN} logged rows: {why}"
        if args.stop_on_collapse:
            raise Collapsed(line)
        say(line + " (going on; --stop-on-collapse stops instead)")


class Collapsed(Exception):
    """--stop-on-collapse: the run looks collapsed (the message says how); it stops after a checkpoint."""


class FirstEmbedding:
    """``value``: the unit embeddings z (B, D) of a step's first crop: the first B rows of the projection
    head's first output in the ``with`` block (all crops at once with --group-crops-by-resolution)."""

    def __init__(self, model, batch: int):
        self.model, self.batch, self.value = model, batch, None

    def __enter__(self) -> "FirstEmbedding":
        self.handle = self.model.projection_head.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _keep(self, module, args, out: torch.Tensor) -> None:
        if self.value is None:
            self.value = out.detach()[: self.batch]


def read_log(path: str) -> List[Dict[str, str]]:
    """The rows of ``log.csv`` (:data:`LOG_FIELDS`, as strings)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def kept_log(path: str, keep_until_step: int) -> Tuple[str, int]:
    """The text of a fresh ``log.csv`` holding the rows of ``path`` for steps ≤ ``keep_until_step`` (those
    a resume keeps; none for a new run), for an atomic rewrite, and the number of damaged lines dropped
    (not rows of :data:`LOG_FIELDS`: garbage, binary, a lost header). A last row cut short by a kill or a
    full disk (no line end) is dropped too, uncounted."""
    rows, damaged = [], 0
    if keep_until_step > 0 and os.path.isfile(path):
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", errors="replace").split("\n")[:-1]  # after the last \n: cut short
        header = ",".join(LOG_FIELDS)
        for line in lines[1:] if lines[:1] == [header] else lines:
            row = _log_row(line.rstrip("\r"))
            damaged += row is None
            if row is not None and int(row["step"]) <= keep_until_step:
                rows.append(row)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue(), damaged


def _log_row(line: str) -> Optional[Dict[str, str]]:
    """``line`` as a row of ``log.csv`` (a step ≥ 1, then numbers), or None."""
    values = line.split(",")
    try:
        if len(values) == len(LOG_FIELDS) and int(values[0]) >= 1 and all(
                math.isfinite(float(v)) for v in values[1:]):
            return dict(zip(LOG_FIELDS, values))
    except ValueError:
        pass
    return None


def start_log(out: str, log_path: str, step: int, overwrite: bool) -> None:
    """With everything checked: remove what a killed job left (and the old run with ``--overwrite``),
    then rewrite log.csv atomically, keeping a resumed run's rows up to ``step``."""
    checkpoint.clear(out, old_run=overwrite)
    text, damaged = kept_log(log_path, step)
    if damaged:  # the rows that could be read go on; the file as it was stays beside them
        with open(log_path, "rb") as f:
            original = f.read()
        checkpoint.write_atomic(log_path + ".damaged", lambda f: f.write(original))
        say(f"{log_path}: {damaged} damaged line(s) dropped, the readable rows kept; the file as it was "
            f"is {log_path}.damaged")
    checkpoint.write_atomic(log_path, lambda f: f.write(text.encode()))


def append_log(path: str, row: Dict[str, Any]) -> None:
    """Append one row and fsync it: a checkpoint written later never refers to a row a crash lost."""
    try:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(row)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: a row cut short is dropped by the next resume (kept_log)
        raise JobError(f"cannot write {path}: {e.strerror or e}") from e


def metrics_text(metrics: Dict[str, Any]) -> str:
    """``metrics.json``'s text (sorted keys, indented)."""
    return json.dumps(metrics, indent=2, sort_keys=True) + "\n"
