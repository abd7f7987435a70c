"""The job's data: the usage error, the embedded synthetic sets, a folder of arrays, the batch order.

:class:`UsageError` and :class:`JobError` live here, in the leaf module every other part of the job may import.

Synthetic sets, deterministic from a seed, with class structure (labels only score the k-NN
evaluation; pretraining never sees them): ``synthetic2d``, 8 shape classes at a random position,
size, rotation and contrast on a noisy background; ``synthetic3d``, 5 lesion-like classes at a random
position, size, 3D orientation and contrast in a textured, noisy background. Shapes are soft masks
``sigmoid(-f / pixel)`` of an approximately signed distance ``f`` (negative inside) in the shape's own
rotated, unit-radius coordinates, so edges are anti-aliased.

Batch order, a pure function of (seed, step, rank): every epoch is a fresh permutation drawn from its
own seeded generator, and the global batch of step t is the slice [t·B·W, (t+1)·B·W) of the
concatenated epochs (W processes, B samples each), rank r taking its r-th part. Resuming at step t
therefore needs no sampler state, and ranks never share a sample within a step. A folder is read
lazily, file by file, through a ``torch.utils.data.DataLoader`` that follows this same order
(:func:`batches`), so memory does not grow with the number of files.
"""
import hashlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

__all__ = ["UsageError", "JobError", "Data", "load_data", "FolderDataset", "load_folder", "to_unit_float", "check_sample",
           "INPUT_RANGE", "MAX_ABS", "batch_indices", "batches", "derive_seed",
           "synthetic2d", "synthetic3d", "CLASSES_2D", "CLASSES_3D"]

CLASSES_2D = ("disc", "ring", "square", "triangle", "plus", "ellipse", "frame", "star")
CLASSES_3D = ("sphere", "ellipsoid", "spiculated", "hollow", "lobulated")
EXTENSIONS = (".pt", ".npy")


class UsageError(ValueError):
    """Bad input to the job (an option, the data, the checkpoint): the command line reports it as
    argparse does, one ``error:`` line and exit code 2, instead of a traceback. Messages name the
    option and value."""


class JobError(RuntimeError):
    """A run that cannot go on (non-finite state, a full disk, a stalled process, an abort): the command
    line reports it as one ``error:`` line with exit code ``code`` (1; 130 after a signal). The
    checkpoint already on disk is kept."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass
class Data:
    """``train`` (N, C, *spatial) float32, in memory (a tensor) or read lazily (a :class:`FolderDataset`);
    labels and a held-out set only where known (for k-NN)."""

    train: Union[torch.Tensor, "FolderDataset"]
    train_labels: Optional[torch.Tensor] = None
    test: Optional[torch.Tensor] = None
    test_labels: Optional[torch.Tensor] = None

    @property
    def dims(self) -> int:
        return len(self.train.shape) - 2


def load_data(spec: str, seed: int, n_train: Optional[int] = None, n_test: int = 1024,
              size: Optional[int] = None) -> Data:
    """``spec`` is ``synthetic2d``, ``synthetic3d`` or a folder path (see :class:`FolderDataset`)."""
    if spec in SYNTHETIC:
        make, default_size, default_n = SYNTHETIC[spec]
        size, n_train = size or default_size, n_train or default_n
        x, y = make(n_train, size, seed=seed)
        xt, yt = make(n_test, size, seed=seed + 7919)  # held out: another stream of the generator
        return Data(x, y, xt, yt)
    return Data(FolderDataset(spec))


def _numpy(path: str):
    try:
        import numpy as np  # optional, only for .npy folders
    except ImportError as e:
        raise UsageError(f"--data: reading {path} needs numpy; install it or save the arrays as .pt") from e
    return np


def _torch_load(path: str, mmap: bool):
    if mmap:
        try:  # the zip format maps without reading the values; anything else is read below, which says why
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            pass
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never arbitrary code


def _read(path: str, peek: bool = False) -> torch.Tensor:
    """One sample as stored; ``peek``: only its shape and dtype (a meta or memory-mapped tensor, no
    values read). A file that cannot be read is a :class:`UsageError` naming it."""
    if path.endswith(".npy"):
        np = _numpy(path)
        try:
            a = np.load(path, mmap_mode="r" if peek else None, allow_pickle=False)
            dtype = torch.from_numpy(np.empty(0, a.dtype)).dtype
            return torch.empty(a.shape, dtype=dtype, device="meta") if peek else torch.from_numpy(a)
        except Exception as e:
            raise UsageError(f"--data: cannot read {path} ({type(e).__name__}); expected one array saved "
                             f"with numpy.save, of a numeric dtype") from e
    try:
        x = _torch_load(path, mmap=peek)
    except Exception as e:
        raise UsageError(f"--data: cannot read {path} ({type(e).__name__}); expected one tensor saved with "
                         f"torch.save") from e
    if not isinstance(x, torch.Tensor):
        raise UsageError(f"--data: {path} holds a {type(x).__name__}, expected one tensor (C, H, W) or (C, D, H, W)")
    return x


# Integer samples are scaled by their type's maximum; see INPUT_RANGE. Float samples must be finite and
# within ±MAX_ABS: far off the unit scale, and float32 statistics (x² in BatchNorm) overflow soon after.
MAX_ABS = 1e6
UNIT_SCALE = {torch.bool: 1.0, torch.uint8: 255.0, torch.uint16: 65535.0}
INPUT_RANGE = ("the crops' intensity jitter assumes values on a unit scale, about [0, 1]: float files are used "
               "as they are (normalise them yourself), uint8/uint16 files are divided by 255/65535, bool files "
               "give 0/1; signed integers (CT in HU) have no fixed unit range and are refused: window and scale "
               "them to [0, 1] yourself and save float32")


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 by the rule of :data:`INPUT_RANGE` (a dtype :func:`check_sample` accepts)."""
    return x.float() if x.dtype.is_floating_point else x.float() / UNIT_SCALE[x.dtype]


def check_sample(x: torch.Tensor, path: str) -> None:
    """One sample's rank, dtype and, unless ``x`` is a meta tensor, values (finite, within ±:data:`MAX_ABS`);
    a :class:`UsageError` naming the file otherwise."""
    if x.ndim not in (3, 4):
        raise UsageError(f"--data: {path} has shape {tuple(x.shape)}; expected one sample (C, H, W) or (C, D, H, W)")
    if x.shape[-1] in (1, 3, 4) and min(x.shape[:-1]) > 4:  # channels last, as image libraries give them
        axes = ", ".join(["D", "H", "W"][-(x.ndim - 1):] + ["C"])
        order = (x.ndim - 1, *range(x.ndim - 1))
        raise UsageError(f"--data: {path} has shape {tuple(x.shape)}, which looks like ({axes}) with the channels "
                         f"last; expected channels first: save x.transpose{order} (numpy) or x.permute{order} (torch)")
    if not (x.dtype.is_floating_point or x.dtype in UNIT_SCALE):
        raise UsageError(f"--data: {path} holds {str(x.dtype).replace('torch.', '')} values; expected float, uint8, "
                         f"uint16 or bool samples. Signed data such as CT in HU has no fixed unit range: window "
                         f"it yourself, e.g. ((x.clamp(-1000, 1000) + 1000) / 2000).float(), and save that")
    if x.dtype.is_floating_point and not x.is_meta:
        bad = ~(torch.isfinite(x) & (x.abs() <= MAX_ABS))  # isfinite too: float16 rounds 1e6 to inf
        if bad.any():
            raise UsageError(f"--data: {path} holds {int(bad.sum())} value(s) that are NaN, ±inf or beyond "
                             f"±{MAX_ABS:g} (the first: {x[bad][0].item()}); expected finite values on a unit scale")


class FolderDataset(Dataset):
    """A folder of ``.pt`` / ``.npy`` files, one sample per file, read lazily: sample ``i`` is the
    ``i``-th file in sorted name order, (C, H, W) or (C, D, H, W) as float32 (:func:`to_unit_float`).

    The constructor reads every file once, one at a time (float values are checked, integer files
    are only mapped for their shape and dtype), so a bad file is refused before training and memory
    holds the file names only. ``shape`` is (N, C, *spatial).
    """

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise UsageError(f"--data {path!r}: no such folder (expected synthetic2d, synthetic3d or a folder of .pt/.npy files)")
        names = sorted(f for f in os.listdir(path) if f.endswith(EXTENSIONS))
        if not names:
            raise UsageError(f"--data {path!r}: the folder holds no .pt or .npy files")
        self.files = [os.path.join(path, name) for name in names]
        first: Dict[tuple, str] = {}  # shape -> the first file of that shape
        for name, file in zip(names, self.files):
            x = _read(file, peek=True)
            if x.dtype.is_floating_point and x.is_meta:  # a .npy: numpy's memory map, read the values
                x = _read(file)
            check_sample(x, file)
            first.setdefault(tuple(x.shape), name)
            if len(first) > 1:
                (s0, f0), (s1, f1) = list(first.items())[:2]
                raise UsageError(f"--data {path!r}: files have different shapes: {f0} is {s0} but {f1} is {s1}")
        self.shape = (len(names),) + next(iter(first))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Sample ``i``; a file that changed since the scan (deleted, unreadable, another shape, values not
        finite) is a :class:`DataFault` naming it: a fault of the run, not of its options."""
        try:
            x = _read(self.files[i])
            check_sample(x, self.files[i])
        except UsageError as e:
            raise DataFault(str(e).replace("--data: ", "", 1)) from None
        if tuple(x.shape) != self.shape[1:]:
            raise DataFault(f"{self.files[i]} is now {tuple(x.shape)}, expected {self.shape[1:]}")
        return to_unit_float(x)


class DataFault(JobError):
    """A ``--data`` file that changed during the run; ``str()`` is one line naming it."""


def manifest(path: str) -> List[List]:
    """[name, size in bytes] of each sample file of a ``--data`` folder, in sample order: what a resumed run
    compares (a folder changed between sessions would silently train on other samples)."""
    names = sorted(f for f in os.listdir(path) if f.endswith(EXTENSIONS))
    return [[name, os.path.getsize(os.path.join(path, name))] for name in names]


def manifest_change(saved: List[List], now: List[List]) -> Optional[str]:
    """What differs between two :func:`manifest` results, in a few words; None when nothing does."""
    old, new = dict(map(tuple, saved)), dict(map(tuple, now))
    changes = [f"{n} removed" for n in old if n not in new] + [f"{n} added" for n in new if n not in old] + [
        f"{n} resized ({old[n]} -> {new[n]} bytes)" for n in old if n in new and old[n] != new[n]]
    if not changes:
        return None
    return ", ".join(changes[:3]) + (f" and {len(changes) - 3} more" if len(changes) > 3 else "")


def load_folder(path: str) -> torch.Tensor:
    """Every sample of :class:`FolderDataset` ``(path)`` stacked in memory, (N, C, *spatial) float32."""
    dataset = FolderDataset(path)
    return torch.stack([dataset[i] for i in range(len(dataset))])


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


class _StepBatches:
    """A ``DataLoader`` batch sampler: the indices of steps ``start`` … ``end - 1`` (:func:`batch_indices`)."""

    def __init__(self, start: int, end: int, batch_size: int, n: int, seed: int, rank: int, world: int):
        self.steps, self.args = range(start, end), (batch_size, n, seed, rank, world)

    def __iter__(self) -> Iterator[List[int]]:
        return (batch_indices(step, *self.args).tolist() for step in self.steps)

    def __len__(self) -> int:
        return len(self.steps)


def batches(train, batch_size: int, seed: int, start: int, end: int, rank: int = 0, world: int = 1,
            workers: int = 0, pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """The batch (B, C, *spatial) of each step ``start`` … ``end - 1``, in :func:`batch_indices` order.

    ``train`` in memory is indexed directly; a :class:`FolderDataset` is read by a ``DataLoader`` with
    ``workers`` processes (0: this one) and, for CUDA, ``pin_memory``. Both give the same batches.
    """
    steps = _StepBatches(start, end, batch_size, len(train), seed, rank, world)
    if isinstance(train, torch.Tensor):
        return (train[idx] for idx in steps)
    return iter(DataLoader(train, batch_sampler=steps, num_workers=workers, pin_memory=pin_memory,
                           worker_init_fn=_quiet_worker if workers else None))


def _quiet_worker(worker_id: int) -> None:
    """A worker reports its errors to the job (the DataLoader sends them); when the job ends an exchange early
    (another worker died), the thread that hands over its batches must not print a traceback too."""
    default = sys.excepthook
    sys.excepthook = lambda kind, error, trace: None if issubclass(kind, ConnectionError) else default(
        kind, error, trace)


# --- synthetic sets -------------------------------------------------------------------------------

_CHUNK = 256  # samples rendered at once, to bound memory


def _u(g: torch.Generator, *shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=g)


def _shape2d(label: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of each sample's shape at local coordinates.

    Shape:
        label: (B,); u, v: (B, H, W) rotated, unit-radius coordinates. Output: (B, H, W).
    """
    rho, phi = torch.hypot(u, v), torch.atan2(v, u)
    au, av = u.abs(), v.abs()
    s3 = math.sqrt(3.0) / 2.0
    f = torch.stack([
        rho - 1.0,  # disc
        (rho - 0.72).abs() - 0.28,  # ring
        torch.maximum(au, av) - 0.8,  # square
        torch.stack([-v - 0.6, s3 * u + 0.5 * v - 0.6, -s3 * u + 0.5 * v - 0.6]).amax(0),  # triangle
        torch.minimum(torch.maximum(au - 1.0, av - 0.3), torch.maximum(av - 1.0, au - 0.3)),  # plus
        (torch.hypot(u, v / 0.4) - 1.0) * 0.4,  # ellipse
        (torch.maximum(au, av) - 0.72).abs() - 0.2,  # frame
        rho - (0.62 + 0.33 * torch.cos(5.0 * phi)),  # star
    ])  # (8, B, H, W)
    return f.gather(0, label.view(1, -1, 1, 1).expand(1, *u.shape)).squeeze(0)


def synthetic2d(n: int, size: int = 32, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` grayscale shape images, (n, 1, size, size) float32 roughly in [-0.5, 1.5], and labels (n,).

    Each image: a shape of class ``label`` (uniform over :data:`CLASSES_2D`), centre offset
    U(-0.3, 0.3), radius U(0.3, 0.55) of the half-width, rotation U(0, 2π), contrast U(0.6, 1)
    over a background level U(-0.1, 0.1) with a random linear ramp (slopes U(-0.05, 0.05)), plus
    Gaussian noise of standard deviation σ ~ U(0.04, 0.06). The nuisance ranges are moderate on
    purpose: a statistic that every crop of an image shares (say a widely varying noise level) is a
    shortcut SwAV's crops can match without looking at the shape.
    """
    g = torch.Generator().manual_seed(int(seed))
    labels = torch.randint(len(CLASSES_2D), (n,), generator=g)
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0  # pixel centres in [-1, 1]
    yy, xx = torch.meshgrid(t, t, indexing="ij")  # (H, W)
    out = []
    for lab in labels.split(_CHUNK):
        B = lab.shape[0]
        cx, cy = _u(g, B, 1, 1, lo=-0.3, hi=0.3), _u(g, B, 1, 1, lo=-0.3, hi=0.3)
        r, th = _u(g, B, 1, 1, lo=0.3, hi=0.55), _u(g, B, 1, 1, hi=2 * math.pi)
        contrast, bg = _u(g, B, 1, 1, lo=0.6, hi=1.0), _u(g, B, 1, 1, lo=-0.1, hi=0.1)
        ramp, sigma = _u(g, B, 2, 1, 1, lo=-0.05, hi=0.05), _u(g, B, 1, 1, lo=0.04, hi=0.06)
        dx, dy = xx - cx, yy - cy  # (B, H, W)
        u = (torch.cos(th) * dx + torch.sin(th) * dy) / r
        v = (-torch.sin(th) * dx + torch.cos(th) * dy) / r
        pixel = (2.0 / size) / r  # one pixel in local units
        mask = torch.sigmoid(-_shape2d(lab, u, v) / pixel)
        img = bg + ramp[:, 0] * xx + ramp[:, 1] * yy + contrast * mask
        img = img + sigma * torch.randn(B, size, size, generator=g)
        out.append(img.unsqueeze(1))
    return torch.cat(out), labels


def _rotations(g: torch.Generator, n: int) -> torch.Tensor:
    """(n, 3, 3) random rotation matrices (QR of a Gaussian with the sign fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    q[torch.det(q) < 0, :, 0] *= -1
    return q.float()


def _shape3d(label: torch.Tensor, p: torch.Tensor, spikes: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) per sample. p: (B, 3, N) local points; spikes: (B, M, 3)."""
    px, py, pz = p.unbind(1)  # (B, N) each
    rho = torch.sqrt(px * px + py * py + pz * pz).clamp_min(1e-6)
    f = torch.empty_like(rho)
    for c in range(len(CLASSES_3D)):
        sel = label == c
        r, x, y, z = rho[sel], px[sel], py[sel], pz[sel]
        if c == 0:  # sphere
            f[sel] = r - 1.0
        elif c == 1:  # ellipsoid, 2:1:1
            f[sel] = (torch.sqrt(x**2 + (y / 0.5) ** 2 + (z / 0.5) ** 2) - 1.0) * 0.5
        elif c == 2:  # spiculated: a core with sharp radial spikes along M random directions
            spike = torch.einsum("bmc,bcn->bmn", spikes[sel], p[sel] / r.unsqueeze(1)).clamp_min(0).pow(24).amax(1)
            f[sel] = r - (0.6 + 0.5 * spike)
        elif c == 3:  # hollow shell
            f[sel] = (r - 0.72).abs() - 0.25
        else:  # lobulated
            f[sel] = r - (0.75 + 0.25 * torch.cos(3 * torch.atan2(y, x)) * torch.cos(2 * z / r))
    return f


def synthetic3d(n: int, size: int = 24, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` lesion-like volumes, (n, 1, size, size, size) float32, and labels (n,).

    Each volume: a lesion of class ``label`` (uniform over :data:`CLASSES_3D`), centre offset
    U(-0.25, 0.25)³, radius U(0.35, 0.55) of the half-width, a random 3D orientation, contrast
    U(0.6, 1) over a background level U(-0.1, 0.1), in a smooth random texture (average-pooled
    noise) plus white noise σ ~ U(0.04, 0.06).
    """
    g = torch.Generator().manual_seed(int(seed))
    labels = torch.randint(len(CLASSES_3D), (n,), generator=g)
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0
    grid = torch.stack(torch.meshgrid(t, t, t, indexing="ij")).reshape(3, -1)  # (3, N) as (z, y, x)
    out = []
    for lab in labels.split(_CHUNK):
        B = lab.shape[0]
        centre, r = _u(g, B, 3, 1, lo=-0.25, hi=0.25), _u(g, B, 1, 1, lo=0.35, hi=0.55)
        rot = _rotations(g, B)  # (B, 3, 3)
        spikes = F.normalize(torch.randn(B, 7, 3, generator=g), dim=-1)
        contrast, bg = _u(g, B, 1, 1, 1, 1, lo=0.6, hi=1.0), _u(g, B, 1, 1, 1, 1, lo=-0.1, hi=0.1)
        sigma = _u(g, B, 1, 1, 1, 1, lo=0.04, hi=0.06)
        p = torch.einsum("bij,bjn->bin", rot, grid - centre) / r  # (B, 3, N) local coordinates
        pixel = (2.0 / size) / r.squeeze(1)  # (B, 1)
        mask = torch.sigmoid(-_shape3d(lab, p, spikes) / pixel).view(B, 1, size, size, size)
        texture = F.avg_pool3d(torch.randn(B, 1, size, size, size, generator=g), 5, 1, 2) * 0.6
        vol = bg + texture + contrast * mask + sigma * torch.randn(B, 1, size, size, size, generator=g)
        out.append(vol)
    return torch.cat(out), labels


# name -> (generator, default size, default number of training samples)
SYNTHETIC = {"synthetic2d": (synthetic2d, 32, 4096), "synthetic3d": (synthetic3d, 24, 1536)}
