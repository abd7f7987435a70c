"""The runnable SwAV pretraining job: ``python -m swav_core.pretrain --help``.

Importing this package has no side effects; :func:`main` takes an argv list and returns an exit code.
"""
from .cli import build_parser, main

__all__ = ["build_parser", "main"]
