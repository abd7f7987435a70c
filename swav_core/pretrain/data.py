"""The job's data: the embedded synthetic sets or a folder read lazily, with labels where the folder has
class subfolders, and the batch order.

A ``--data`` folder holds one sample per file: ``.pt`` / ``.npy`` arrays (C, H, W) or (C, D, H, W), or PNG /
JPEG images (8-bit, scaled to [0, 1]; grayscale as C = 1, colour as C = 3, alpha dropped; a folder mixing
the two is read as colour, as torchvision's ImageFolder does). Files are found recursively. A folder whose
files all lie in two or more subfolders (``train/cat/*.png``, ``train/dog/*.png``: ImageFolder's layout)
gives labels, the subfolder names in sorted order; the labels only score the evaluation, pretraining never
sees them. :data:`HELD_OUT` of each class is held out for it and not pretrained on, the same files for every
``--seed`` (a split drawn from the file list alone, so runs of different seeds are scored alike).

Every sample has one shape: images of different sizes are refused naming two of them, not resized (a
resize would change what the crops' scales mean; resize them once yourself, e.g. with Pillow).

Batch order, a pure function of (seed, step, rank): every epoch is a fresh permutation drawn from its
own seeded generator, and the global batch of step t is the slice [t·B·W, (t+1)·B·W) of the
concatenated epochs (W processes, B samples each), rank r taking its r-th part. Resuming at step t
therefore needs no sampler state, and ranks never share a sample within a step. A folder is read
lazily, file by file, through a ``torch.utils.data.DataLoader`` that follows this same order
(:func:`batches`), so memory does not grow with the number of files.
"""
import hashlib
import os
import sys
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import DataFault, UsageError
from .synthetic import SYNTHETIC

__all__ = ["Data", "load_data", "FolderDataset", "load_folder", "to_unit_float", "check_sample", "scan",
           "INPUT_RANGE", "MAX_ABS", "HELD_OUT", "Order", "batch_indices", "batches", "next_batch", "derive_seed"]

ARRAYS, IMAGES = (".pt", ".npy"), (".png", ".jpg", ".jpeg")
HELD_OUT = 0.2  # of each class's files, for the evaluation (at least one, never all)


@dataclass
class Data:
    """``train`` (N, C, *spatial) float32, in memory (a tensor) or read lazily (a :class:`FolderDataset`);
    labels and a held-out set only where known (for the evaluation)."""

    train: Union[torch.Tensor, "FolderDataset"]
    train_labels: Optional[torch.Tensor] = None
    test: Union[torch.Tensor, "FolderDataset", None] = None
    test_labels: Optional[torch.Tensor] = None

    @property
    def dims(self) -> int:
        return len(self.train.shape) - 2


def load_data(spec: str, seed: int, n_train: Optional[int] = None, n_test: int = 1024,
              size: Optional[int] = None) -> Data:
    """``spec`` is ``synthetic2d``, ``synthetic3d`` or a folder path (see the module docstring)."""
    if spec in SYNTHETIC:
        make, default_size, default_n = SYNTHETIC[spec]
        size, n_train = size or default_size, n_train or default_n
        x, y = make(n_train, size, seed=seed)
        xt, yt = make(n_test, size, seed=seed + 7919)  # held out: another stream of the generator
        return Data(x, y, xt, yt)
    folder = FolderDataset(spec)
    if folder.labels is None:
        return Data(folder)
    train, test = held_out_split(folder.labels)
    return Data(folder.subset(train), folder.labels[train], folder.subset(test), folder.labels[test])


def held_out_split(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices, sorted: round(:data:`HELD_OUT` · n) of each class's n samples (at least one of
    a class of two or more, never all) drawn by a generator seeded by the class alone."""
    train, test = [], []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        n_test = min(max(round(HELD_OUT * len(members)), 1), len(members) - 1)
        order = members[torch.randperm(len(members), generator=torch.Generator().manual_seed(c))]
        test.append(order[:n_test]), train.append(order[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def scan(path: str) -> Tuple[List[str], Optional[List[str]]]:
    """The sample files under ``path`` (relative names, sorted, found recursively) and each one's class: its
    first subfolder when every file lies in one of two or more subfolders, else None."""
    names = sorted(os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                   for root, _, files in os.walk(path) for f in files if f.lower().endswith(ARRAYS + IMAGES))
    tops = [n.split("/")[0] if "/" in n else None for n in names]
    if None in tops and any(tops):
        raise UsageError(f"--data {path!r} holds sample files both at its top ({tops.count(None)}, e.g. "
                         f"{names[tops.index(None)]}) and in subfolders (e.g. {next(n for n in names if '/' in n)}): "
                         f"expected one or the other (subfolders are classes)")
    return names, tops if len(set(tops) - {None}) >= 2 else None


def _module(name: str, package: str, extra: str, path: str):
    try:
        return __import__(name)
    except ImportError as e:
        raise UsageError(f"--data: reading {path} needs {package}: pip install -e \".[{extra}]\"") from e


def _torch_load(path: str, mmap: bool):
    if mmap:
        try:  # the zip format maps without reading the values; anything else is read below, which says why
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            pass
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never arbitrary code


GRAY_MODES, COLOUR_MODES = ("1", "L", "LA", "La"), ("P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")


def _read_image(path: str, peek: bool, channels: Optional[int]) -> torch.Tensor:
    """An 8-bit image as uint8 (C, H, W): C = ``channels``, or 1 for a grayscale image and 3 for a colour one."""
    Image = _module("PIL.Image", "Pillow", "images", path).Image
    try:
        with Image.open(path) as img:
            if img.mode not in GRAY_MODES + COLOUR_MODES:
                raise UsageError(f"--data: {path} is a {img.mode} image; expected an 8-bit grayscale or colour "
                                 f"PNG/JPEG (save other images as .npy or .pt)")
            c = channels or (1 if img.mode in GRAY_MODES else 3)
            w, h = img.size
            if peek:
                return torch.empty(c, h, w, dtype=torch.uint8, device="meta")
            pixels = img.convert("L" if c == 1 else "RGB").tobytes()
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"--data: cannot read {path} ({type(e).__name__}); expected a PNG or JPEG image") from e
    return torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(h, w, c).permute(2, 0, 1).contiguous()


def _read(path: str, peek: bool = False, channels: Optional[int] = None) -> torch.Tensor:
    """One sample as stored; ``peek``: only its shape and dtype (a meta or memory-mapped tensor, no
    values read); ``channels``: an image's, as the folder reads it. A file that cannot be read is a
    :class:`UsageError` naming it."""
    if path.lower().endswith(IMAGES):
        return _read_image(path, peek, channels)
    if path.endswith(".npy"):
        np = _module("numpy", "numpy", "arrays", path)
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
               "as they are (normalise them yourself), uint8/uint16 files and PNG/JPEG images are divided by "
               "255/65535, bool files give 0/1; signed integers (CT in HU) have no fixed unit range and are "
               "refused: window and scale them to [0, 1] yourself and save float32")


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
    """The sample files of a folder (:func:`scan`), read lazily: sample ``i`` is the ``i``-th file in sorted
    name order, (C, H, W) or (C, D, H, W) as float32 (:func:`to_unit_float`); ``labels`` (N,) the class
    index of each (``classes``: their names) when the folder has class subfolders, else None.

    The constructor reads every file once, one at a time (float values are checked, integer files and
    images are only opened for their shape and dtype), so a bad file is refused before training and memory
    holds the file names only. ``shape`` is (N, C, *spatial).
    """

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise UsageError(f"--data {path!r}: no such folder (expected synthetic2d, synthetic3d or a folder of "
                             f".pt/.npy/.png/.jpg files)")
        names, tops = scan(path)
        if not names:
            raise UsageError(f"--data {path!r}: the folder holds no .pt, .npy, .png or .jpg files")
        self.files = [os.path.join(path, name) for name in names]
        self.classes = sorted(set(tops)) if tops else None
        self.labels = torch.tensor([self.classes.index(t) for t in tops]) if tops else None
        headers = {f: _read(f, peek=True) for f in self.files if f.lower().endswith(IMAGES)}  # (C, H, W) on meta
        self.channels = 3 if any(x.shape[0] == 3 for x in headers.values()) else None  # colour if any, as ImageFolder
        first: Dict[tuple, str] = {}  # shape -> the first file of that shape
        for name, file in zip(names, self.files):
            x = headers[file].new_empty((self.channels or 1, *headers[file].shape[1:])) if file in headers else \
                _read(file, peek=True)
            if x.dtype.is_floating_point and x.is_meta:  # a .npy: numpy's memory map, read the values
                x = _read(file)
            check_sample(x, file)
            first.setdefault(tuple(x.shape), name)
            if len(first) > 1:
                (s0, f0), (s1, f1) = list(first.items())[:2]
                raise UsageError(f"--data {path!r}: files have different shapes: {f0} is {s0} but {f1} is {s1}; "
                                 f"expected one shape (resize images to one size first)")
        self.shape = (len(names),) + next(iter(first))

    def subset(self, indices: torch.Tensor) -> "FolderDataset":
        """The samples ``indices`` (sorted), read as this folder reads them."""
        part = object.__new__(FolderDataset)
        part.__dict__.update(self.__dict__, files=[self.files[i] for i in indices.tolist()],
                             shape=(len(indices),) + self.shape[1:])
        return part

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Sample ``i``; a file that changed since the scan (deleted, unreadable, another shape, values not
        finite) is a :class:`DataFault` naming it: a fault of the run, not of its options."""
        try:
            x = _read(self.files[i], channels=self.channels)
            check_sample(x, self.files[i])
        except UsageError as e:
            raise DataFault(str(e).replace("--data: ", "", 1)) from None
        if tuple(x.shape) != self.shape[1:]:
            raise DataFault(f"{self.files[i]} is now {tuple(x.shape)}, expected {self.shape[1:]}")
        return to_unit_float(x)


def manifest(path: str) -> List[List]:
    """[name, size in bytes] of each sample file of a ``--data`` folder, in sample order: what a resumed run
    compares (a folder changed between sessions would silently train on other samples)."""
    return [[name, os.path.getsize(os.path.join(path, name))] for name in scan(path)[0]]


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


class Order(NamedTuple):
    """Which samples a process takes at each step (:func:`batch_indices`): B, the seed, its rank of W."""

    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1


class _StepBatches:
    """A ``DataLoader`` batch sampler: the indices of each step in ``steps`` (:func:`batch_indices`)."""

    def __init__(self, steps: range, n: int, order: Order):
        self.steps, self.n, self.order = steps, n, order

    def __iter__(self) -> Iterator[List[int]]:
        b, seed, rank, world = self.order
        return (batch_indices(step, b, self.n, seed, rank, world).tolist() for step in self.steps)

    def __len__(self) -> int:
        return len(self.steps)


def batches(train, order: Order, steps: range, workers: int = 0, pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """The batch (B, C, *spatial) of each step in ``steps``, in :func:`batch_indices` ``order``.

    ``train`` in memory is indexed directly; a :class:`FolderDataset` is read by a ``DataLoader`` with
    ``workers`` processes (0: this one) and, for CUDA, ``pin_memory``. Both give the same batches.
    """
    sampler = _StepBatches(steps, len(train), order)
    if isinstance(train, torch.Tensor):
        return (train[idx] for idx in sampler)
    return iter(DataLoader(train, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                           worker_init_fn=_quiet_worker if workers else None))


def next_batch(loader):
    """The next batch, or (None, one line) when a ``--data`` file changed (deleted, made NaN) or a process
    reading it died; the DataLoader wraps a worker's error in its traceback: its last line is kept."""
    try:
        return next(loader), None
    except DataFault as e:
        return None, str(e).strip().splitlines()[-1].split("DataFault: ")[-1]
    except (RuntimeError, OSError) as e:  # OSError: a worker killed while handing over a batch
        if isinstance(e, RuntimeError) and "DataLoader worker" not in str(e):
            raise
        return None, f"a process reading --data died ({type(e).__name__}: {str(e).splitlines()[0]})"


def _quiet_worker(worker_id: int) -> None:
    """A worker reports its errors to the job (the DataLoader sends them); when the job ends an exchange early
    (another worker died), the thread that hands over its batches must not print a traceback too."""
    default = sys.excepthook
    sys.excepthook = lambda kind, error, trace: None if issubclass(kind, ConnectionError) else default(
        kind, error, trace)
