"""Batched multi-crop augmentation (SwAV §3.2) for 2D images and 3D volumes, in pure torch: each crop of the
whole batch is one ``F.affine_grid`` + ``F.grid_sample`` call, every sample's scale, centre and flips folded
into its own diagonal affine map, so no Python loop runs over samples."""
import math
import numbers
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["MultiCrop"]

Size = Union[int, Sequence[int]]
_LAYOUT = {2: "(B, C, H, W)", 3: "(B, C, D, H, W)"}


def _as_int(value) -> Optional[int]:
    """``value`` as an int if it is an integer (int, NumPy integer, 0-dim integer tensor) but not a bool."""
    try:
        return None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return None


def _count(name: str, value, low: int) -> int:
    number = _as_int(value)
    if number is None or number < low:
        raise ValueError(f"{name} must be a {'positive' if low else 'non-negative'} int, got {value!r}")
    return number


def _flag(name: str, value) -> bool:
    """True / False or 1 / 0 (also NumPy's, or a 0-dim tensor): a string such as "no" is truthy, not False."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")  # no __index__
    number = bool(value) if isinstance(value, bool) or numpy_bool else _as_int(value)
    if number not in (0, 1):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(number)


def _scale(name: str, scale) -> Tuple[float, float]:
    try:
        pair = (scale[0], scale[1]) if not isinstance(scale, (str, bytes)) and len(scale) == 2 else ()
    except (TypeError, KeyError):
        pair = ()
    if (len(pair) != 2 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair)
            or not 0.0 < float(pair[0]) <= float(pair[1]) <= 1.0):
        raise ValueError(f"{name} must be a pair (lo, hi) of real numbers with 0 < lo <= hi <= 1, got {scale!r}")
    return float(pair[0]), float(pair[1])


def _size(name: str, size: Size) -> Tuple[int, ...]:
    try:
        sizes = tuple(_as_int(s) for s in ((size,) if _as_int(size) is not None else size))
    except TypeError:
        sizes = ()
    if len(sizes) not in (1, 2, 3) or not all(s is not None and s > 0 for s in sizes):
        raise ValueError(f"{name} must be a positive int or a tuple of 1 to 3 positive ints (one per spatial "
                         f"axis; not floats or bools), got {size!r}")
    return sizes


class MultiCrop:
    r"""Random resized crops at two resolutions, random flips and intensity jitter, batched.

    Every sample draws per crop: a scale :math:`s \sim U(lo, hi)`, the fraction of the input's area (2D)
    or volume (3D) covered, as torchvision's ``RandomResizedCrop`` in FAIR's recipe (the crop keeps the
    output's aspect, clipped to the largest that fits a non-square input), or with ``scale_per_side`` the
    fraction of every side (monai's ``RandScaleCrop``, as fmcib); a centre uniform over the positions
    inside the input; flips along each axis with probability 1/2; a jitter :math:`a x + b`,
    :math:`a \sim U(1 - i, 1 + i)`, :math:`b \sim U(-i, i)`. Resampling is bilinear with border padding
    (a convex combination of input values); a (1, 1) scale at the input's size is exact, bit for bit.

    Args:
        high_size: size of the high-resolution crops, an int (square / cube) or one int per spatial axis.
        low_size: size of the low-resolution crops.
        n_high: number of high-resolution crops. Default: 2
        n_low: number of low-resolution crops. Default: 6
        high_scale: (lo, hi) fraction covered by a high-resolution crop. Default: (0.14, 1.0)
        low_scale: (lo, hi) fraction covered by a low-resolution crop. Default: (0.05, 0.14)
        flip: random flips along every spatial axis. Default: True
        intensity: strength :math:`i` of the intensity jitter, in [0, 1). Default: 0.0
        scale_per_side: the scales are fractions of each side, not of the area / volume. Default: False

    Shape:
        input: (B, C, H, W) or (B, C, D, H, W), floating point (half precision is cropped in float32),
        any device; a size tuple fixes which.
        output: ``n_high`` tensors (B, C, *high_size) and ``n_low`` tensors (B, C, *low_size), in the
        input's dtype and device. Randomness comes from ``generator`` (drawn on its device, so a CPU
        generator drives a CUDA batch reproducibly), else from the batch device's default generator.

    Example:
        >>> crops = MultiCrop(32, 16, n_high=2, n_low=4)
        >>> high, low = crops(torch.rand(8, 3, 48, 48), generator=torch.Generator().manual_seed(0))
        >>> [c.shape for c in (high[0], low[0])], len(high + low)
        ([torch.Size([8, 3, 32, 32]), torch.Size([8, 3, 16, 16])], 6)
    """

    def __init__(self, high_size: Size, low_size: Size, n_high: int = 2, n_low: int = 6,
                 high_scale: Sequence[float] = (0.14, 1.0), low_scale: Sequence[float] = (0.05, 0.14),
                 flip: bool = True, intensity: float = 0.0, scale_per_side: bool = False):
        self.high_size, self.low_size = _size("high_size", high_size), _size("low_size", low_size)
        self.n_high = _count("n_high", n_high, 1)  # SwAV needs a high-resolution crop
        self.n_low = _count("n_low", n_low, 0)
        if self.n_high + self.n_low < 2:
            raise ValueError(f"need at least 2 crops in total, got n_high={self.n_high}, n_low={self.n_low}")
        if not (isinstance(intensity, (int, float)) and 0.0 <= intensity < 1.0):
            raise ValueError(f"intensity must be a number in [0, 1), got {intensity!r}")
        self.high_scale, self.low_scale = _scale("high_scale", high_scale), _scale("low_scale", low_scale)
        self.flip, self.intensity = _flag("flip", flip), float(intensity)
        self.scale_per_side = _flag("scale_per_side", scale_per_side)

    @classmethod
    def fair_2d(cls, **kwargs) -> "MultiCrop":
        """FAIR's SwAV ImageNet recipe: 2 × 224² (scale 0.14–1) + 6 × 96² (scale 0.05–0.14)."""
        return cls(**{**dict(high_size=224, low_size=96, n_high=2, n_low=6,
                             high_scale=(0.14, 1.0), low_scale=(0.05, 0.14)), **kwargs})

    @classmethod
    def fmcib_3d(cls, **kwargs) -> "MultiCrop":
        """fmcib's CT recipe: 2 × 50³ (0.5–1 of each side) + 6 × 25³ (0.3–0.5 of each side); 3D input only."""
        return cls(**{**dict(high_size=(50, 50, 50), low_size=(25, 25, 25), n_high=2, n_low=6,
                             high_scale=(0.5, 1.0), low_scale=(0.3, 0.5), scale_per_side=True), **kwargs})

    def __repr__(self) -> str:
        names = "high_size low_size n_high n_low high_scale low_scale flip intensity scale_per_side".split()
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)}' for k in names)})"

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None
                 ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        self._check(x, generator)
        high = [self._crop(x, self.high_size, self.high_scale, generator) for _ in range(self.n_high)]
        low = [self._crop(x, self.low_size, self.low_scale, generator) for _ in range(self.n_low)]
        return high, low

    def _check(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MultiCrop expects (B, C, H, W) or (B, C, D, H, W), got {shape}")
        for name, size in (("high_size", self.high_size), ("low_size", self.low_size)):
            if len(size) > 1 and len(size) != x.ndim - 2:  # e.g. monai's unbatched (C, D, H, W) volume
                hint = "; one volume (C, D, H, W) needs x[None]" if x.ndim == 4 else ""
                raise ValueError(f"{name}={size} is {len(size)}-D, so MultiCrop expects {_LAYOUT[len(size)]}, "
                                 f"got shape {tuple(x.shape)}{hint}")
        if not x.is_floating_point():
            raise ValueError(f"MultiCrop expects a floating-point batch, got dtype {x.dtype}; convert it first")
        if x.shape[0] == 0 or any(n == 0 for n in x.shape[1:]):
            raise ValueError(f"MultiCrop got an empty batch of shape {tuple(x.shape)}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {generator!r}")
        # Decision (issue 12): crops are computed in float32 or wider, then cast back. The jitter reaches
        # (1 + i)|x| + i, past float16's max from |x| ≈ 50,000 (i = 0.3): rather than return inf crops, a
        # narrow batch that could overflow is refused, whatever the draws. float32/64 would need |x| > 1.7e38:
        # unchecked, so their path has no host sync.
        if self.intensity > 0 and x.element_size() < 4:
            i, (lo, hi) = self.intensity, torch.stack(torch.aminmax(x.detach())).tolist()
            limit = (torch.finfo(x.dtype).max - i) / (1 + i)
            if max(-lo, hi) > limit:
                raise ValueError(f"MultiCrop(intensity={i}) scales values by up to {1 + i:g}: a {x.dtype} batch "
                                 f"must lie within ±{limit:.6g}, got values in [{lo:g}, {hi:g}]; rescale it or "
                                 "pass float32")

    def _crop(self, x: torch.Tensor, size: Tuple[int, ...], scale: Tuple[float, float],
              generator: Optional[torch.Generator]) -> torch.Tensor:
        B, d, n_in = x.shape[0], x.ndim - 2, tuple(x.shape[2:])  # n_in: (H, W) or (D, H, W)
        n_out = size * d if len(size) == 1 else size
        # All draws for one crop, in a fixed order, on the generator's device, then moved.
        gdev = generator.device if generator is not None else x.device
        u = torch.rand(B, 1 + d + d + 2, generator=generator, device=gdev, dtype=torch.float64).to(x.device)
        s = scale[0] + (scale[1] - scale[0]) * u[:, 0]  # (B,) area / volume (or side) fraction
        flips = (u[:, 1 + d : 1 + 2 * d] < 0.5) & self.flip  # (B, d)
        work = x if x.element_size() >= 4 else x.float()  # float16 / bfloat16: compute in float32
        if scale == (1.0, 1.0) and n_out == n_in:
            out = _flip_exact(work, flips)  # identity geometry: exact, no resampling
        else:
            out = _resample(work, n_out, s, u[:, 1 : 1 + d], flips, self.scale_per_side)
        if self.intensity > 0:  # a·x + b per sample, a ~ U(1 − i, 1 + i), b ~ U(−i, i)
            a, b = 1.0 + self.intensity * (2.0 * u[:, -2] - 1.0), self.intensity * (2.0 * u[:, -1] - 1.0)  # (B,)
            shape = (B,) + (1,) * (x.ndim - 1)
            out = out * a.to(out.dtype).view(shape) + b.to(out.dtype).view(shape)
        return out.to(x.dtype)


def _flip_exact(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flip each sample along the spatial axes where ``flips`` (B, d) is True, without resampling."""
    for axis in range(flips.shape[1]):  # d >= 2 passes: the result never aliases x
        x = torch.where(flips[:, axis].view((-1,) + (1,) * (x.ndim - 1)), x.flip(2 + axis), x)
    return x


def _resample(x: torch.Tensor, n_out: Tuple[int, ...], s: torch.Tensor, centre_u: torch.Tensor,
              flips: torch.Tensor, per_side: bool) -> torch.Tensor:
    """One ``grid_sample`` for the batch: per-sample diagonal affine maps output → input coordinates.

    In normalised coordinates ([-1, 1] spans the input axis) a crop of e_i pixels along axis i is the
    map t ↦ (e_i / n_i) · t + c_i, with |c_i| ≤ 1 − e_i / n_i; a flip negates the scale.
    """
    n_in, d = x.shape[2:], x.ndim - 2
    n_in_t, n_out_t = (torch.tensor(n, dtype=torch.float64, device=x.device) for n in (n_in, n_out))
    if per_side:  # crop extent e_i = s · n_i: the input's aspect, resized to the output's
        half = s[:, None].expand(-1, d)  # (B, d) crop half-extent in normalised units, ≤ 1
    else:  # e_i = k · n_out_i with Π e_i = s · Π n_i, clipped to fit: e_i ≤ n_i for every i
        k = (s * math.prod(n_in) / math.prod(n_out)) ** (1.0 / d)  # (B,)
        half = torch.minimum(k, (n_in_t / n_out_t).min())[:, None] * n_out_t / n_in_t  # (B, d)
    centre = (2.0 * centre_u - 1.0) * (1.0 - half)  # (B, d)
    theta = torch.zeros(x.shape[0], d, d + 1, dtype=torch.float64, device=x.device)
    # affine_grid orders coordinates (x, y[, z]) = (W, H[, D]): reverse our (H, W) / (D, H, W) order.
    theta[:, :, :d] = torch.diag_embed(torch.where(flips, -half, half).flip(1))
    theta[:, :, d] = centre.flip(1)
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], *n_out], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
