"""The runnable SwAV pretraining job: ``python -m swav_core.pretrain --help``.

Layout, each module importing only those listed before it (no import cycle; the job uses only the public
names of ``swav_core``):

- ``errors.py``: :class:`UsageError` (bad input: one ``error:`` line, exit code 2), :class:`JobError` (a run that
  cannot go on: one ``error:`` line, exit code 1 or 130), :class:`DataFault`, the out-of-memory line;
- ``synthetic.py``: the embedded 2D shapes and 3D lesion-like volumes;
- ``data.py``: folders of images or arrays read lazily, class subfolders as labels, the batch order, a pure
  function of (seed, step, rank);
- ``parallel.py``: the process group (``--dist-timeout``), collectives, DDP or FSDP2, state as one process holds it;
- ``signals.py``: Ctrl-C and SIGTERM;
- ``backbone.py``: ``SmallCNN`` and ``--backbone MODULE:CALLABLE``;
- ``evaluate.py``: k-NN and linear probe of the learned features against random initialisation;
- ``checkpoint.py``: what ``checkpoint.pt`` holds, durable atomic writes (no NaN or inf saved), the folder's lock,
  saving and restoring a run;
- ``plot.py``: ``loss.png`` from a run folder (matplotlib, optional, imported only there);
- ``report.py``: progress lines, ``log.csv``, ``metrics.json``, the collapse warning, the end of a run;
- ``options.py``: the options, their defaults and help, merged with a resumed checkpoint's, made final;
- ``train.py``: the :class:`~.train.Run` of a session, the learning-rate schedule, the loop;
- ``cli.py``: :func:`main`.

Importing this package has no side effects; :func:`main` takes an argv list and returns an exit code.
"""
from .backbone import SmallCNN
from .cli import main
from .options import build_parser

__all__ = ["SmallCNN", "build_parser", "main"]
