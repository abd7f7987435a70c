"""Training data for the job: the embedded synthetic sets or a folder of arrays, and the batch order.

The batch order is a pure function of (seed, step, rank): every epoch is a fresh permutation drawn
from its own seeded generator, and the global batch of step t is the slice [t·B·W, (t+1)·B·W) of the
concatenated epochs (W processes, B samples each), rank r taking its r-th part. Resuming at step t
therefore needs no sampler state, and ranks never share a sample within a step.
"""
import hashlib
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .cli import UsageError
from .synthetic import synthetic2d, synthetic3d

__all__ = ["Data", "load_data", "load_folder", "batch_indices", "derive_seed"]

SYNTHETIC = {"synthetic2d": (synthetic2d, 32, 4096), "synthetic3d": (synthetic3d, 24, 1536)}
EXTENSIONS = (".pt", ".npy")


@dataclass
class Data:
    """``train`` (N, C, *spatial) float32; labels and a held-out set only where known (for k-NN)."""

    train: torch.Tensor
    train_labels: Optional[torch.Tensor] = None
    test: Optional[torch.Tensor] = None
    test_labels: Optional[torch.Tensor] = None

    @property
    def dims(self) -> int:
        return self.train.ndim - 2


def load_data(spec: str, seed: int, n_train: Optional[int] = None, n_test: int = 1024,
              size: Optional[int] = None) -> Data:
    """``spec`` is ``synthetic2d``, ``synthetic3d`` or a folder path (see :func:`load_folder`)."""
    if spec in SYNTHETIC:
        make, default_size, default_n = SYNTHETIC[spec]
        size, n_train = size or default_size, n_train or default_n
        x, y = make(n_train, size, seed=seed)
        xt, yt = make(n_test, size, seed=seed + 7919)  # held out: another stream of the generator
        return Data(x, y, xt, yt)
    return Data(load_folder(spec))


def _read(path: str) -> torch.Tensor:
    """One sample; a file that cannot be read is a :class:`UsageError` naming it (no unpickling advice)."""
    if path.endswith(".npy"):
        try:
            import numpy as np  # optional, only for .npy folders
        except ImportError as e:
            raise UsageError(f"--data: reading {path} needs numpy; install it or save the arrays as .pt") from e
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except Exception as e:
            raise UsageError(f"--data: cannot read {path} ({type(e).__name__}); expected one array saved "
                             f"with numpy.save, of a numeric dtype") from e
    try:
        x = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never arbitrary code
    except Exception as e:
        raise UsageError(f"--data: cannot read {path} ({type(e).__name__}); expected one tensor saved with "
                         f"torch.save") from e
    if not isinstance(x, torch.Tensor):
        raise UsageError(f"--data: {path} holds a {type(x).__name__}, expected one tensor (C, H, W) or (C, D, H, W)")
    return x


def load_folder(path: str) -> torch.Tensor:
    """Stack a folder of ``.pt`` / ``.npy`` files, one sample per file, into (N, C, *spatial) float32.

    Each file holds one sample shaped (C, H, W) (2D) or (C, D, H, W) (3D); all files must share one
    shape. Files are read in sorted name order; other files are ignored.
    """
    if not os.path.isdir(path):
        raise UsageError(f"--data {path!r}: no such folder (expected synthetic2d, synthetic3d or a folder of .pt/.npy files)")
    names = sorted(f for f in os.listdir(path) if f.endswith(EXTENSIONS))
    if not names:
        raise UsageError(f"--data {path!r}: the folder holds no .pt or .npy files")
    samples, shapes = [], {}  # type: list, Dict[tuple, str]
    for name in names:
        x = _read(os.path.join(path, name))
        if x.ndim not in (3, 4):
            raise UsageError(f"--data: {os.path.join(path, name)} has shape {tuple(x.shape)}; "
                             f"expected one sample (C, H, W) or (C, D, H, W)")
        shapes.setdefault(tuple(x.shape), name)
        if len(shapes) > 1:
            (s0, f0), (s1, f1) = list(shapes.items())[:2]
            raise UsageError(f"--data {path!r}: files have different shapes: {f0} is {s0} but {f1} is {s1}")
        samples.append(x.float())
    return torch.stack(samples)


def derive_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. ``("crops", seed, step, rank)``)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def batch_indices(step: int, batch_size: int, n: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Indices (batch_size,) of rank ``rank``'s samples at ``step`` (0-based), see the module docstring."""
    pos = step * batch_size * world + rank * batch_size + torch.arange(batch_size)
    epochs, offsets = pos // n, pos % n
    out = torch.empty(batch_size, dtype=torch.long)
    for e in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed("epoch", seed, e)))
        sel = epochs == e
        out[sel] = perm[offsets[sel]]
    return out
