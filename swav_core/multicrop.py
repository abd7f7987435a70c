"""Batched multi-crop augmentation (SwAV §3.2) for 2D images and 3D volumes, in pure torch.

Every crop of the whole batch is one ``F.affine_grid`` + ``F.grid_sample`` call: each sample gets
its own scale, centre and flips, folded into a diagonal affine map, so the work stays on the
batch's device and no Python loop runs over samples.
"""
import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._checks import _as_int, _flag, _int_at_least

__all__ = ["MultiCrop"]

Size = Union[int, Sequence[int]]


def _check_scale(name: str, scale: Sequence[float]) -> Tuple[float, float]:
    try:
        pair = (scale[0], scale[1]) if not isinstance(scale, (str, bytes)) and len(scale) == 2 else ()
    except (TypeError, KeyError):
        pair = ()
    if (len(pair) != 2 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair)
            or not 0.0 < float(pair[0]) <= float(pair[1]) <= 1.0):
        raise ValueError(f"{name} must be a pair (lo, hi) of real numbers with 0 < lo <= hi <= 1, got {scale!r}")
    return float(pair[0]), float(pair[1])


def _check_size(name: str, size: Size) -> Tuple[int, ...]:
    try:
        sizes = (size,) if _as_int(size) is not None else tuple(size)
    except TypeError:
        sizes = ()
    ints = tuple(_as_int(s) for s in sizes)
    if len(ints) not in (1, 2, 3) or not all(s is not None and s > 0 for s in ints):
        raise ValueError(f"{name} must be a positive int or a tuple of 1 to 3 positive ints (one per spatial "
                         f"axis; not floats or bools), got {size!r}")
    return ints


class MultiCrop:
    r"""Random resized crops at two resolutions, random flips and intensity jitter, batched.

    For each of the ``n_high`` high-resolution and ``n_low`` low-resolution crops, every sample
    draws (independently):

    - a scale :math:`s \sim U(lo, hi)`: the crop covers the fraction :math:`s` of the input's area
      (2D) or volume (3D), as torchvision's ``RandomResizedCrop`` in FAIR's recipe. The crop keeps the
      output's aspect (a square / cube for an int size); where that shape cannot reach the fraction
      inside a non-square input it is clipped to the largest crop that fits. With
      ``scale_per_side=True`` the crop instead spans the fraction :math:`s` of every side of the input
      (monai's ``RandScaleCrop``, which fmcib's 3D crops use: a (0.5, 1) scale there means half to all
      of each side, i.e. an eighth to all of the volume);
    - a centre uniform over all positions that keep the crop inside the input;
    - with ``flip=True``, a flip along every spatial axis with probability 1/2 each;
    - with ``intensity > 0``, an affine jitter :math:`a x + b`, :math:`a \sim U(1 - i, 1 + i)`,
      :math:`b \sim U(-i, i)` with :math:`i` = ``intensity``.

    The crop is resampled bilinearly to the output size (``align_corners=False``, border padding,
    so every output value is a convex combination of input values). When ``high_scale`` or
    ``low_scale`` is ``(1, 1)`` and the output size equals the input size, the geometry is the
    identity and that crop is taken exactly (only the flips and jitter apply), bit for bit.

    Args:
        high_size: output size of the high-resolution crops, an int (square / cube) or a tuple.
        low_size: output size of the low-resolution crops.
        n_high: number of high-resolution crops. Default: 2
        n_low: number of low-resolution crops. Default: 6
        high_scale: (lo, hi) area/volume fraction of a high-resolution crop. Default: (0.14, 1.0)
        low_scale: (lo, hi) area/volume fraction of a low-resolution crop. Default: (0.05, 0.14)
        flip: random flips along every spatial axis. Default: True
        intensity: strength :math:`i` of the affine intensity jitter, 0 disables it. Default: 0.0
        scale_per_side: the scales are fractions of each side rather than of the area / volume.
            Default: False

    Shape:
        input: (B, C, H, W) or (B, C, D, H, W), floating point, any device.
        output: a pair of lists, ``n_high`` tensors (B, C, *high_size) and ``n_low`` tensors
        (B, C, *low_size), same dtype and device as the input.

    Randomness comes from ``generator`` when given (drawn on the generator's device, then moved to
    the batch's device, so a CPU generator drives a CUDA batch reproducibly), else from the default
    generator of the batch's device.

    Example::

        >>> crops = MultiCrop(32, 16, n_high=2, n_low=4)
        >>> high, low = crops(torch.rand(8, 3, 48, 48), generator=torch.Generator().manual_seed(0))
        >>> len(high), len(low)
        (2, 4)
        >>> high[0].shape, low[0].shape
        (torch.Size([8, 3, 32, 32]), torch.Size([8, 3, 16, 16]))
    """

    def __init__(
        self,
        high_size: Size,
        low_size: Size,
        n_high: int = 2,
        n_low: int = 6,
        high_scale: Sequence[float] = (0.14, 1.0),
        low_scale: Sequence[float] = (0.05, 0.14),
        flip: bool = True,
        intensity: float = 0.0,
        scale_per_side: bool = False,
    ):
        self.high_size = _check_size("high_size", high_size)
        self.low_size = _check_size("low_size", low_size)
        n_high = _int_at_least("n_high", n_high, 1)  # SwAV needs a high-resolution crop
        n_low = _int_at_least("n_low", n_low, 0)
        if n_high + n_low < 2:
            raise ValueError(f"need at least 2 crops in total, got n_high={n_high}, n_low={n_low}")
        if not (isinstance(intensity, (int, float)) and 0.0 <= intensity < 1.0):
            raise ValueError(f"intensity must be a number in [0, 1), got {intensity!r}")
        self.n_high, self.n_low = n_high, n_low
        self.high_scale = _check_scale("high_scale", high_scale)
        self.low_scale = _check_scale("low_scale", low_scale)
        self.flip = _flag("flip", flip)
        self.intensity = float(intensity)
        self.scale_per_side = _flag("scale_per_side", scale_per_side)

    @classmethod
    def fair_2d(cls, **kwargs) -> "MultiCrop":
        """FAIR's SwAV ImageNet recipe: 2 × 224² (scale 0.14–1) + 6 × 96² (scale 0.05–0.14)."""
        return cls(**{**dict(high_size=224, low_size=96, n_high=2, n_low=6,
                             high_scale=(0.14, 1.0), low_scale=(0.05, 0.14)), **kwargs})

    @classmethod
    def fmcib_3d(cls, **kwargs) -> "MultiCrop":
        """fmcib's CT recipe: 2 × 50³ (0.5–1 of each side) + 6 × 25³ (0.3–0.5 of each side)."""
        return cls(**{**dict(high_size=50, low_size=25, n_high=2, n_low=6, high_scale=(0.5, 1.0),
                             low_scale=(0.3, 0.5), scale_per_side=True), **kwargs})

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(high_size={self.high_size}, low_size={self.low_size}, "
                f"n_high={self.n_high}, n_low={self.n_low}, high_scale={self.high_scale}, "
                f"low_scale={self.low_scale}, flip={self.flip}, intensity={self.intensity}, "
                f"scale_per_side={self.scale_per_side})")

    def __call__(
        self, x: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MultiCrop expects (B, C, H, W) or (B, C, D, H, W), got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"MultiCrop expects a floating-point batch, got dtype {x.dtype}; convert it first")
        if x.shape[0] == 0 or any(n == 0 for n in x.shape[1:]):
            raise ValueError(f"MultiCrop got an empty batch of shape {tuple(x.shape)}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {generator!r}")
        high = [self._crop(x, self.high_size, self.high_scale, generator) for _ in range(self.n_high)]
        low = [self._crop(x, self.low_size, self.low_scale, generator) for _ in range(self.n_low)]
        return high, low

    def _crop(self, x: torch.Tensor, size: Tuple[int, ...], scale: Tuple[float, float],
              generator: Optional[torch.Generator]) -> torch.Tensor:
        B, d = x.shape[0], x.ndim - 2
        n_in = tuple(x.shape[2:])  # input spatial sizes, (H, W) or (D, H, W)
        n_out = _spatial(size, d)
        # All draws for one crop, in a fixed order, on the generator's device, then moved.
        gdev = generator.device if generator is not None else x.device
        u = torch.rand(B, 1 + d + d + 2, generator=generator, device=gdev, dtype=torch.float64).to(x.device)
        s = scale[0] + (scale[1] - scale[0]) * u[:, 0]  # (B,) area / volume (or side) fraction
        centre_u = u[:, 1 : 1 + d]  # (B, d) in [0, 1)
        flips = (u[:, 1 + d : 1 + 2 * d] < 0.5) & self.flip  # (B, d)
        a = 1.0 + self.intensity * (2.0 * u[:, -2] - 1.0)  # (B,) gain
        b = self.intensity * (2.0 * u[:, -1] - 1.0)  # (B,) offset

        if scale == (1.0, 1.0) and n_out == n_in:
            out = _flip_exact(x, flips)  # identity geometry: exact, no resampling
        else:
            out = _resample(x, n_in, n_out, s, centre_u, flips, self.scale_per_side)
        if self.intensity > 0:
            shape = (B,) + (1,) * (x.ndim - 1)
            out = out * a.to(out.dtype).view(shape) + b.to(out.dtype).view(shape)
        return out


def _spatial(size: Tuple[int, ...], d: int) -> Tuple[int, ...]:
    if len(size) == 1:
        return size * d
    if len(size) != d:
        raise ValueError(f"crop size {size} has {len(size)} dims but the input has {d} spatial dims")
    return size


def _flip_exact(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flip each sample along the spatial axes where ``flips`` (B, d) is True, without resampling."""
    out = x.clone()
    for axis in range(flips.shape[1]):
        mask = flips[:, axis].view((-1,) + (1,) * (x.ndim - 1))
        out = torch.where(mask, out.flip(2 + axis), out)
    return out


def _resample(x: torch.Tensor, n_in: Tuple[int, ...], n_out: Tuple[int, ...], s: torch.Tensor,
              centre_u: torch.Tensor, flips: torch.Tensor, per_side: bool = False) -> torch.Tensor:
    """One ``grid_sample`` for the batch: per-sample diagonal affine maps output → input coordinates.

    In normalised coordinates ([-1, 1] spans the input axis) a crop of e_i pixels along axis i is the
    map t ↦ (e_i / n_i) · t + c_i, with |c_i| ≤ 1 − e_i / n_i; a flip negates the scale.
    """
    d = len(n_in)
    n_in_t = torch.tensor(n_in, dtype=torch.float64, device=x.device)
    n_out_t = torch.tensor(n_out, dtype=torch.float64, device=x.device)
    if per_side:  # crop extent e_i = s · n_i: the input's aspect, resized to the output's
        half = s[:, None].expand(-1, d)  # (B, d) crop half-extent in normalised units, ≤ 1
    else:  # e_i = k · n_out_i with Π e_i = s · Π n_i, clipped to fit: e_i ≤ n_i for every i
        k = (s * math.prod(n_in) / math.prod(n_out)) ** (1.0 / d)  # (B,)
        k = torch.minimum(k, (n_in_t / n_out_t).min())
        half = k[:, None] * n_out_t / n_in_t  # (B, d)
    centre = (2.0 * centre_u - 1.0) * (1.0 - half)  # (B, d)
    scale = torch.where(flips, -half, half)  # (B, d)
    theta = torch.zeros(x.shape[0], d, d + 1, dtype=torch.float64, device=x.device)
    # affine_grid orders coordinates (x, y[, z]) = (W, H[, D]): reverse our (H, W) / (D, H, W) order.
    theta[:, :, :d] = torch.diag_embed(scale.flip(1))
    theta[:, :, d] = centre.flip(1)
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    grid = F.affine_grid(theta.to(work.dtype), [x.shape[0], x.shape[1], *n_out], align_corners=False)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(x.dtype)
