"""MultiCrop: shapes, value ranges, crop geometry read back from coordinate ramps (random scale and
position, clipping on non-square inputs), exact identity, flips, intensity jitter, determinism, dtypes and
CPU/CUDA agreement. Presets and argument checks are in test_multicrop_inputs.py."""
import itertools
import math
import re

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from swav_core import MultiCrop
from strategies import examples, multicrop_configs


def _crops(cfg, x, seed=0):
    return MultiCrop(**cfg)(x, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=examples(20))
@given(case=multicrop_configs())
def test_shapes_dtype_device(device, case):
    shape, cfg = case
    x = torch.randn(shape, device=device)
    high, low = _crops(cfg, x)
    d = len(shape) - 2
    full = lambda s: (s,) * d if isinstance(s, int) else tuple(s)  # noqa: E731
    assert len(high) == cfg["n_high"] and len(low) == cfg["n_low"]
    for crops, size in ((high, cfg["high_size"]), (low, cfg["low_size"])):
        for c in crops:
            assert c.shape == shape[:2] + full(size)
            assert c.dtype == x.dtype and c.device == x.device and torch.isfinite(c).all()


@settings(max_examples=examples(20))
@given(case=multicrop_configs())
def test_values_stay_in_the_jittered_input_range(device, case):
    """Bilinear resampling with border padding is a convex combination of each sample's own values;
    the jitter a·x + b then moves them by at most a ∈ [1 − i, 1 + i], b ∈ [−i, i]."""
    shape, cfg = case
    x = torch.randn(shape, device=device)
    i = cfg["intensity"]
    mn = x.flatten(2).amin(2)[..., None]  # (B, C, 1) per sample and channel
    mx = x.flatten(2).amax(2)[..., None]
    lo = torch.minimum((1 - i) * mn, (1 + i) * mn) - i - 1e-5
    hi = torch.maximum((1 - i) * mx, (1 + i) * mx) + i + 1e-5
    high, low = _crops(cfg, x)
    for c in high + low:
        flat = c.flatten(2)
        assert (flat >= lo).all() and (flat <= hi).all()


@settings(max_examples=examples(15))
@given(case=multicrop_configs(), seed=st.integers(0, 2**31))
def test_deterministic_for_a_fixed_generator(device, case, seed):
    shape, cfg = case
    x = torch.randn(shape, device=device)
    first, second = _crops(cfg, x, seed), _crops(cfg, x, seed)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spatial", [(8, 8), (5, 9), (4, 6, 7), (6, 6, 6)])
def test_identity_is_exact(device, spatial):
    x = torch.randn((3, 2) + spatial, device=device)
    crops = MultiCrop(spatial, spatial, n_high=2, n_low=2, high_scale=(1, 1), low_scale=(1, 1), flip=False)
    high, low = crops(x, generator=torch.Generator().manual_seed(1))
    for c in high + low:
        assert torch.equal(c, x)


@pytest.mark.parametrize("spatial", [(6, 7), (3, 4, 5)])
def test_full_scale_crops_with_flips_are_exact_flips_and_all_occur(device, spatial):
    d = len(spatial)
    x = torch.randn((64, 2) + spatial, device=device)
    (out,), _ = MultiCrop(spatial, 2, n_high=1, n_low=1, high_scale=(1, 1))(x, torch.Generator().manual_seed(3))
    seen = set()
    for b in range(x.shape[0]):
        matches = [axes for r in range(d + 1) for axes in itertools.combinations(range(d), r)
                   if torch.equal(out[b], x[b].flip([a + 1 for a in axes]) if axes else x[b])]
        assert matches, f"sample {b} is not a flip of its input"
        seen.add(matches[0])
    assert len(seen) == 2**d  # every combination of axes is drawn


def _ramps(batch: int, spatial, device) -> torch.Tensor:
    """(batch, d, *spatial): channel i holds each voxel's index along spatial axis i (its centre)."""
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in spatial], indexing="ij")
    return torch.stack(axes).expand(batch, len(spatial), *spatial).contiguous().to(device)


def _read_back(out: torch.Tensor, spatial):
    """Where each crop of a ramp batch was sampled: the signed step per output pixel (B, d) and the
    crop's centre (B, d), both in input pixels. Asserts the map is linear along each axis (exact for a
    ramp) and constant along the others, i.e. an axis-aligned crop."""
    tol, slopes, centres = 1e-6 * max(spatial), [], []
    for i in range(len(spatial)):
        n_out = out.shape[2 + i]
        u = out[:, i].movedim(1 + i, -1).flatten(1, -2)  # (B, rest, n_out): values along axis i
        slope = (u[..., -1] - u[..., 0]) / (n_out - 1)  # (B, rest)
        predicted = u[..., :1] + slope[..., None] * torch.arange(n_out, device=u.device, dtype=u.dtype)
        assert torch.allclose(u, predicted, atol=tol)  # linear along axis i …
        assert torch.allclose(u, u[:, :1].expand_as(u), atol=tol)  # … and constant along the others
        slopes.append(slope[:, 0])
        centres.append((u[:, 0, 0] + u[:, 0, -1]) / 2)
    return torch.stack(slopes, 1), torch.stack(centres, 1)


@settings(max_examples=examples(25))
@given(d=st.sampled_from([2, 3]), n=st.integers(8, 20), lo=st.floats(0.05, 1.0), width=st.floats(0.0, 1.0),
       flip=st.booleans(), per_side=st.booleans(), seed=st.integers(0, 2**31))
@example(d=2, n=8, lo=1.0, width=0.0, flip=True, per_side=False, seed=0)
@example(d=3, n=20, lo=0.5, width=1.0, flip=False, per_side=True, seed=1)  # fmcib's high-res scale
def test_crop_geometry_read_back_from_coordinate_ramps(device, d, n, lo, width, flip, per_side, seed):
    """A linear image is resampled exactly, so each output channel tells where it was sampled:
    the crop is a square/cube inside the input, covering an area/volume fraction (or, with
    ``scale_per_side``, a fraction of each side) within the scale range, with a negative slope
    exactly on the flipped axes (and none without flip)."""
    hi = lo + (1 - lo) * width
    side = lo if per_side else lo ** (1 / d)  # the smallest crop's side, as a fraction of n
    n_out = min(n, math.floor(side * n - 1e-9))  # crops ≥ n_out wide never reach the border clamp
    assume(n_out >= 2)
    x = _ramps(16, (n,) * d, device)
    (out,), _ = MultiCrop(n_out, 2, n_high=1, n_low=1, high_scale=(lo, hi), flip=flip,
                          scale_per_side=per_side)(x, torch.Generator().manual_seed(seed))
    slope, centre = _read_back(out, (n,) * d)
    tol = 1e-6 * n
    assert (slope != 0).all() and (flip or (slope > 0).all())
    e = slope.abs() * n_out  # (B, d) crop extent along each axis, in pixels
    assert (centre - e / 2 >= -0.5 - tol).all() and (centre + e / 2 <= n - 0.5 + tol).all()
    assert torch.allclose(e, e[:, :1].expand_as(e), atol=tol)  # square / cube
    fraction = e[:, 0] / n if per_side else e.prod(1) / n**d
    assert (fraction >= lo - 1e-6).all() and (fraction <= hi + 1e-6).all()


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("per_side", [False, True])
def test_scale_and_centre_are_random_over_their_whole_range(device, d, per_side):
    """Random *resized* crops: over 64 samples the area/volume (or side) fraction spreads over the
    scale range, and along every axis the centre spreads over the positions that keep the crop inside
    the input, on both sides of the middle (a fixed scale or a centred crop fails this)."""
    n, lo, hi = 16, 0.2, 0.8
    side = lo if per_side else lo ** (1 / d)
    n_out = math.floor(side * n - 1e-9)  # no crop reaches the border clamp
    x = _ramps(64, (n,) * d, device)
    (out,), _ = MultiCrop(n_out, 2, 1, 1, high_scale=(lo, hi), scale_per_side=per_side)(
        x, torch.Generator().manual_seed(0))
    slope, centre = _read_back(out, (n,) * d)
    e = slope.abs() * n_out  # (B, d) crop extents, all < n
    fraction = e[:, 0] / n if per_side else e.prod(1) / n**d  # (B,)
    w = hi - lo
    assert fraction.min() < lo + 0.25 * w and fraction.max() > hi - 0.25 * w
    offset = (centre - (n - 1) / 2) / ((n - e) / 2)  # (B, d): −1 … 1 spans every position that fits
    assert (offset.abs() <= 1 + 1e-6).all()
    assert (offset.amin(0) < -0.5).all() and (offset.amax(0) > 0.5).all()
    assert len({tuple(r) for r in (offset > 0).tolist()}) == 2**d  # every quadrant / octant: axes independent


@pytest.mark.parametrize("spatial", [(10, 40), (8, 16, 16)])
def test_non_square_input_clips_the_crop_to_the_largest_that_fits(device, spatial):
    """A square/cube crop covers at most 10²/(10·40) = 8³/(8·16·16) = 0.25 of these inputs, below the
    requested 0.5–1: it is then the largest that fits (README): the full short side, centred along it,
    still placed at random along the long sides."""
    x = _ramps(64, spatial, device)
    (out,), _ = MultiCrop(8, 2, 1, 1, high_scale=(0.5, 1.0))(x, torch.Generator().manual_seed(0))
    slope, centre = _read_back(out, spatial)
    short = min(spatial)
    e = slope.abs() * 8  # (B, d)
    assert torch.allclose(e, torch.full_like(e, short), atol=1e-6)
    for i, n in enumerate(spatial):
        offset = centre[:, i] - (n - 1) / 2
        if n == short:
            assert torch.allclose(offset, torch.zeros_like(offset), atol=1e-6)
        else:
            assert offset.min() < -(n - short) / 4 and offset.max() > (n - short) / 4


@settings(max_examples=examples(15))
@given(intensity=st.floats(0.01, 0.9), seed=st.integers(0, 2**31))
def test_intensity_jitter_is_a_per_sample_affine_map(device, intensity, seed):
    x = torch.randn(8, 2, 6, 6, device=device, dtype=torch.float64)
    crops = MultiCrop(6, 6, 1, 1, high_scale=(1, 1), low_scale=(1, 1), flip=False, intensity=intensity)
    (out,), _ = crops(x, torch.Generator().manual_seed(seed))
    for b in range(x.shape[0]):  # least squares fit out = a·x + b, per sample
        design = torch.stack([x[b].flatten(), torch.ones_like(x[b].flatten())], 1)
        (a, off), = torch.linalg.lstsq(design, out[b].flatten()[:, None]).solution.T
        assert torch.allclose(design @ torch.stack([a, off]), out[b].flatten(), atol=1e-10)
        assert 1 - intensity - 1e-9 <= a <= 1 + intensity + 1e-9 and abs(off) <= intensity + 1e-9


def test_device_matches_cpu_for_a_cpu_generator(device):
    x = torch.randn(4, 3, 20, 20)
    crops = MultiCrop(12, 6, 2, 3, high_scale=(0.3, 1), low_scale=(0.1, 0.3), intensity=0.2)
    ref = crops(x, torch.Generator().manual_seed(5))
    got = crops(x.to(device), torch.Generator().manual_seed(5))
    for a, b in zip(ref[0] + ref[1], got[0] + got[1]):
        assert b.device.type == device and torch.allclose(a, b.cpu(), atol=1e-5)


# Worst |error| against the float32 crops, measured on 16,000 samples of U(0, 1) inputs: bf16 3.8e-3 and
# fp16 4.7e-4 (input and output rounding, at most 2^-8 and 2^-11 here), fp64 8.9e-7 (the fp32
# reference's own rounding).
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 5e-3), (torch.float16, 6e-4), (torch.float64, 2e-6)])
def test_other_float_dtypes_are_kept(device, dtype, atol):
    x = torch.rand(2, 1, 10, 10, device=device)
    crops = MultiCrop(8, 4, 1, 2, high_scale=(0.5, 1), low_scale=(0.1, 0.5))
    ref = crops(x, torch.Generator().manual_seed(0))
    got = crops(x.to(dtype), torch.Generator().manual_seed(0))
    for a, b in zip(ref[0] + ref[1], got[0] + got[1]):
        assert b.dtype == dtype and torch.allclose(a, b.float(), atol=atol, rtol=0)


@settings(max_examples=examples(15))
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16]), intensity=st.floats(0.01, 0.99),
       seed=st.integers(0, 2**31))
@example(dtype=torch.float16, intensity=0.3, seed=0)  # issue 12: inf crops from fp16 input near 60,000
def test_narrow_dtypes_give_finite_crops_or_refuse_by_range(device, dtype, intensity, seed):
    """float16 / bfloat16 crops are the float32 crops cast back, and never overflow: the jitter reaches
    (1 + i)|x| + i, so a batch within ±(max − i)/(1 + i) gives finite crops whatever the draws, and one
    value beyond that bound is refused, naming the dtype and the batch's range."""
    top = torch.finfo(dtype).max
    limit = (top - intensity) / (1 + intensity)
    bits = torch.tensor([limit], dtype=torch.float64).to(dtype).view(torch.int16)  # limit rounded to nearest
    inside = bits.view(dtype) if float(bits.view(dtype)) <= limit else (bits - 1).view(dtype)  # largest <= limit
    outside = (inside.view(torch.int16) + 1).view(dtype)  # the next representable value
    assert (1 + intensity) * float(inside) + intensity <= top < (1 + intensity) * float(outside) + intensity
    signs = torch.tensor([1.0, -1.0]).repeat(8).view(16, 1, 1, 1)
    x = (signs * inside.float()).expand(16, 2, 9, 9).to(device=device, dtype=dtype)  # every value at the edge
    x[0, 1, 4, 4] = 0.5  # and not a constant image
    crops = MultiCrop(7, (4, 5), 1, 2, high_scale=(0.3, 1), low_scale=(0.1, 0.3), intensity=intensity)
    high, low = crops(x, torch.Generator().manual_seed(seed))
    ref_high, ref_low = crops(x.float(), torch.Generator().manual_seed(seed))
    for c, ref in zip(high + low, ref_high + ref_low):
        assert c.dtype == dtype and torch.isfinite(c).all()
        assert torch.equal(c, ref.to(dtype))  # computed in float32, rounded once
    x[3, 0, 2, 2] = -outside.item()
    got = re.escape(f"got values in [{-float(outside):g}, {float(inside):g}]")
    with pytest.raises(ValueError, match=rf"intensity={re.escape(repr(intensity))}\).*a {dtype} batch .*{got}"):
        crops(x, torch.Generator().manual_seed(seed))
