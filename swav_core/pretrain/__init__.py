"""The runnable SwAV pretraining job: ``python -m swav_core.pretrain --help``.

Layout (each module imports only those listed before it, so there is no import cycle; the job uses
only the public names of ``swav_core``):

- ``data.py``: :class:`UsageError` (bad input, reported as one ``error:`` line, exit code 2) and
  :class:`JobError` (a run that cannot go on: one ``error:`` line, exit code 1 or 130), the
  embedded synthetic 2D/3D sets, folders read lazily (integer samples scaled to [0, 1]) and the batch
  order, a pure function of (seed, step, rank);
- ``report.py``: progress lines, ``log.csv`` and ``metrics.json``;
- ``plot.py``: ``loss.png`` from a run folder (matplotlib, optional, imported only there);
- ``checkpoint.py``: what ``checkpoint.pt`` holds, durable atomic writes (no NaN or inf saved), the
  folder's lock, gathering every rank's state, the checks made on resume;
- ``evaluate.py``: the k-NN evaluation of the learned features against random initialisation;
- ``train.py``: the backbone, the learning-rate schedule, process group (``--dist-timeout``) and
  signals, the loop;
- ``cli.py``: the options and :func:`main`.

Importing this package has no side effects; :func:`main` takes an argv list and returns an exit code.
"""
from .cli import build_parser, main
from .backbone import SmallCNN

__all__ = ["SmallCNN", "build_parser", "main"]
