"""Batched multi-crop (SwAV §3.2), 2D and 3D: one ``F.grid_sample`` call per crop for the whole batch."""
import math
import numbers
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["MultiCrop"]

Size = Union[int, Sequence[int]]


class MultiCrop:
    r"""Random resized crops at two resolutions, random flips and intensity jitter, batched.

    A batch (B, C, H, W) or (B, C, D, H, W) (a size tuple fixes which), floating, any device, gives ``n_high``
    (B, C, *high_size) and ``n_low`` (B, C, *low_size) crops (a size: an int, or one per spatial axis) in its
    dtype and device (16-bit: cropped in float32). Per crop and sample: a scale s ~ U(lo, hi) of ``high_scale`` /
    ``low_scale``, the fraction of the area (2D) or volume (3D), as torchvision's ``RandomResizedCrop`` (at the
    output's aspect, clipped to fit), or with ``scale_per_side`` of every side, as monai's ``RandScaleCrop``
    (fmcib); a centre uniform inside the input; a flip per axis with p = 1/2 (``flip``); a jitter a·x + b,
    a − 1, b ~ U(−i, i), i = ``intensity`` in [0, 1). Resampling is bilinear with border padding (convex
    combinations of inputs); scale (1, 1) at the input's size is exact. ``generator`` draws on its device.

    >>> crops = MultiCrop(32, 16, n_high=2, n_low=4)
    >>> high, low = crops(torch.rand(8, 3, 48, 48), generator=torch.Generator().manual_seed(0))
    >>> [c.shape for c in (high[0], low[0])], len(high + low)
    ([torch.Size([8, 3, 32, 32]), torch.Size([8, 3, 16, 16])], 6)
    """

    def __init__(self, high_size: Size, low_size: Size, n_high: int = 2, n_low: int = 6,
                 high_scale: Sequence[float] = (0.14, 1.0), low_scale: Sequence[float] = (0.05, 0.14),
                 flip: bool = True, intensity: float = 0.0, scale_per_side: bool = False):
        self.high_size, self.low_size = _size("high_size", high_size), _size("low_size", low_size)
        self.n_high, self.n_low = _int("n_high", n_high, 1), _int("n_low", n_low, 0)
        if self.n_high + self.n_low < 2:
            raise ValueError(f"need at least 2 crops in total, got n_high={self.n_high}, n_low={self.n_low}")
        if not (isinstance(intensity, (int, float)) and 0.0 <= intensity < 1.0):
            raise ValueError(f"intensity must be a number in [0, 1), got {intensity!r}")
        self.high_scale, self.low_scale = _scale("high_scale", high_scale), _scale("low_scale", low_scale)
        self.flip, self.intensity = _flag("flip", flip), float(intensity)
        self.scale_per_side = _flag("scale_per_side", scale_per_side)

    @classmethod
    def fair_2d(cls, **kwargs) -> "MultiCrop":
        """FAIR's SwAV ImageNet recipe: 2 × 224² (scale 0.14–1) + 6 × 96² (0.05–0.14), the defaults."""
        return cls(**{**dict(high_size=224, low_size=96), **kwargs})

    @classmethod
    def fmcib_3d(cls, **kwargs) -> "MultiCrop":
        """fmcib's CT recipe, 3D only: 2 × 50³ (0.5–1 of each side) + 6 × 25³ (0.3–0.5 of each side)."""
        return cls(**{**dict(high_size=(50, 50, 50), low_size=(25, 25, 25), high_scale=(0.5, 1.0),
                             low_scale=(0.3, 0.5), scale_per_side=True), **kwargs})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in vars(self).items())})"

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None
                 ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        _check_batch(x, generator, self)
        high = [self._crop(x, self.high_size, self.high_scale, generator) for _ in range(self.n_high)]
        low = [self._crop(x, self.low_size, self.low_scale, generator) for _ in range(self.n_low)]
        return high, low

    def _crop(self, x: torch.Tensor, size: Tuple[int, ...], scale: Tuple[float, float],
              generator: Optional[torch.Generator]) -> torch.Tensor:
        """A crop of e_i of n_i pixels maps output → input by t ↦ (e_i / n_i) t + c_i, |c_i| ≤ 1 − e_i / n_i."""
        B, d, n_in = x.shape[0], x.ndim - 2, tuple(x.shape[2:])  # n_in: (H, W) or (D, H, W)
        n_out, per_sample = size * d if len(size) == 1 else size, (B,) + (1,) * (d + 1)
        gdev = generator.device if generator is not None else x.device  # drawn there, then moved
        u = torch.rand(B, 1 + d + d + 2, generator=generator, device=gdev, dtype=torch.float64).to(x.device)
        s = scale[0] + (scale[1] - scale[0]) * u[:, 0]  # (B,) area / volume (or side) fraction
        flips = (u[:, 1 + d : 1 + 2 * d] < 0.5) & self.flip  # (B, d)
        if self.scale_per_side:  # e_i = s · n_i: the input's aspect, resized to the output's
            half = s[:, None].expand(-1, d)  # (B, d) e_i / n_i: the crop's half-extent, ≤ 1
        else:  # e_i = k · n_out_i with Π e_i = s · Π n_i, clipped to fit: e_i ≤ n_i for every i
            n_in_t, n_out_t = (torch.tensor(n, dtype=torch.float64, device=x.device) for n in (n_in, n_out))
            k = (s * math.prod(n_in) / math.prod(n_out)) ** (1.0 / d)  # (B,)
            half = torch.minimum(k, (n_in_t / n_out_t).min())[:, None] * n_out_t / n_in_t  # (B, d)
        out = x if x.element_size() >= 4 else x.float()  # float16 / bfloat16: compute in float32
        if scale == (1.0, 1.0) and n_out == n_in:  # identity geometry: exact flips, no resampling
            for axis in range(d):  # d >= 2 passes: the result never aliases x
                out = torch.where(flips[:, axis].view(per_sample), out.flip(2 + axis), out)
        else:
            theta = torch.zeros(B, d, d + 1, dtype=torch.float64, device=x.device)
            # affine_grid orders coordinates (x, y[, z]) = (W, H[, D]): reverse our (H, W) / (D, H, W) order.
            theta[:, :, :d] = torch.diag_embed(torch.where(flips, -half, half).flip(1))
            theta[:, :, d] = ((2.0 * u[:, 1 : 1 + d] - 1.0) * (1.0 - half)).flip(1)  # centres c_i
            grid = F.affine_grid(theta.to(out.dtype), [B, x.shape[1], *n_out], align_corners=False)
            out = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.intensity > 0:  # a·x + b per sample, a ~ U(1 − i, 1 + i), b ~ U(−i, i)
            a = 1.0 + self.intensity * (2.0 * u[:, -2] - 1.0)  # (B,)
            b = self.intensity * (2.0 * u[:, -1] - 1.0)  # (B,)
            out = out * a.to(out.dtype).view(per_sample) + b.to(out.dtype).view(per_sample)
        return out.to(x.dtype)


# --- argument checks --------------------------------------------------------------------------------

def _int(name: str, value, low: int) -> int:
    """``value`` as an int >= ``low``: an int, NumPy integer or 0-dim integer tensor, not a bool."""
    try:
        if not isinstance(value, bool) and operator.index(value) >= low:
            return operator.index(value)
    except TypeError:
        pass
    kind = {0: "a non-negative int", 1: "a positive int"}.get(low, f"an int >= {low}")
    raise ValueError(f"{name} must be {kind}, got {value!r}")


def _flag(name: str, value) -> bool:
    """True / False or 1 / 0 (also NumPy's, or a 0-dim tensor); a truthy "no" is refused."""
    try:  # NumPy's bool (class bool_, or bool in NumPy 2) has no __index__
        if type(value).__name__ in ("bool", "bool_") or operator.index(value) in (0, 1):
            return bool(value)
    except TypeError:
        pass
    raise ValueError(f"{name} must be a bool, got {value!r}")


def _scale(name: str, scale) -> Tuple[float, float]:
    try:  # indexed, not unpacked: a set has no order
        pair = (scale[0], scale[1]) if not isinstance(scale, (str, bytes)) and len(scale) == 2 else ()
    except (TypeError, KeyError):
        pair = ()
    reals = len(pair) == 2 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair)
    if not (reals and 0.0 < float(pair[0]) <= float(pair[1]) <= 1.0):  # NaN fails too
        raise ValueError(f"{name} must be a pair (lo, hi) of real numbers 0 < lo <= hi <= 1, got {scale!r}")
    return float(pair[0]), float(pair[1])


def _size(name: str, size: Size) -> Tuple[int, ...]:
    try:
        sizes = (_int(name, size, 1),)
    except ValueError:  # not one int: one per spatial axis
        try:
            sizes = tuple(_int(name, s, 1) for s in size)
        except (TypeError, ValueError):
            sizes = ()
    if len(sizes) not in (1, 2, 3):
        raise ValueError(f"{name} must be a positive int or a tuple of 1 to 3 positive ints (one per spatial "
                         f"axis; not floats or bools), got {size!r}")
    return sizes


def _check_batch(x, generator, crops: MultiCrop) -> None:
    """A floating batch (B, C, *spatial) of the sizes' rank; 16-bit: within what (1 + i)|x| + i keeps finite."""
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"MultiCrop expects (B, C, H, W) or (B, C, D, H, W), got {shape}")
    for name, size in (("high_size", crops.high_size), ("low_size", crops.low_size)):
        if len(size) > 1 and len(size) != x.ndim - 2:  # e.g. monai's unbatched (C, D, H, W) volume
            layout = "(B, C, H, W)" if len(size) == 2 else "(B, C, D, H, W)"
            hint = "; one volume (C, D, H, W) needs x[None]" if x.ndim == 4 else ""
            raise ValueError(f"{name}={size} is {len(size)}-D, so MultiCrop expects {layout}, "
                             f"got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point() or x.numel() == 0:
        raise ValueError("MultiCrop expects a non-empty floating-point batch (convert integer images), "
                         f"got shape {tuple(x.shape)} of dtype {x.dtype}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {generator!r}")
    if crops.intensity > 0 and x.element_size() < 4:
        i, (lo, hi) = crops.intensity, torch.stack(torch.aminmax(x.detach())).tolist()
        limit = (torch.finfo(x.dtype).max - i) / (1 + i)
        if max(-lo, hi) > limit:
            raise ValueError(f"MultiCrop(intensity={i}) scales values by up to {1 + i:g}: a {x.dtype} "
                             f"batch must lie within ±{limit:.6g}, got values in [{lo:g}, {hi:g}]; "
                             "rescale it or pass float32")
