"""MultiCrop's presets and its argument checks: every bad argument is a ValueError that names the
argument and the value received; integer-like sizes and counts (numpy integers) and real scales are
accepted."""
import re
from fractions import Fraction

import pytest
import torch

from swav_core import MultiCrop


class Index:
    """An integer that is not an int, as NumPy's integers are (numpy is not a test dependency)."""

    def __init__(self, value):
        self.value = value

    def __index__(self):
        return self.value

    def __repr__(self):
        return f"Index({self.value})"


def test_presets(device):
    fair, fmcib = MultiCrop.fair_2d(), MultiCrop.fmcib_3d()
    assert (fair.high_size, fair.low_size, fair.n_high, fair.n_low) == ((224,), (96,), 2, 6)
    assert (fair.high_scale, fair.low_scale) == ((0.14, 1.0), (0.05, 0.14))
    assert (fmcib.high_size, fmcib.low_size, fmcib.n_high, fmcib.n_low) == ((50, 50, 50), (25, 25, 25), 2, 6)
    assert (fmcib.high_scale, fmcib.low_scale) == ((0.5, 1.0), (0.3, 0.5))
    assert fmcib.scale_per_side and not fair.scale_per_side  # monai's RandScaleCrop vs torchvision
    high, low = fmcib(torch.rand(2, 1, 30, 30, 30, device=device))
    assert [c.shape for c in high] == [(2, 1, 50, 50, 50)] * 2 and [c.shape for c in low] == [(2, 1, 25, 25, 25)] * 6
    assert all(c.device.type == device for c in high + low)
    assert MultiCrop.fair_2d(n_low=2).n_low == 2 and "high_scale=(0.14, 1.0)" in repr(fair)


@pytest.mark.parametrize("kwargs, match", [
    (dict(high_scale=(0.0, 1.0)), r"high_scale .*got \(0\.0, 1\.0\)"),
    (dict(low_scale=(0.5, 0.2)), "low_scale"),
    (dict(low_scale=(0.5, 1.5)), "low_scale"),
    (dict(high_scale=(float("nan"), 1.0)), "high_scale"),
    (dict(high_scale=0.5), r"high_scale must be a pair \(lo, hi\) of real numbers .*got 0\.5$"),
    (dict(high_scale=(0.1, 0.5, 1.0)), r"high_scale .*got \(0\.1, 0\.5, 1\.0\)"),
    (dict(high_scale="11"), "high_scale .*got '11'"),
    (dict(high_scale=("0.1", "0.5")), "high_scale .*got \\('0.1', '0.5'\\)"),
    (dict(low_scale=(True, True)), r"low_scale .*got \(True, True\)"),
    (dict(low_scale={0.1, 0.2}), "low_scale"),
    (dict(high_size=0), "high_size .*got 0$"),
    (dict(high_size=8.0), r"high_size must be a positive int .*not floats or bools.*got 8\.0$"),
    (dict(high_size=Fraction(8)), r"high_size .*got Fraction\(8, 1\)$"),
    (dict(high_size=True), "high_size .*got True$"),
    (dict(high_size="8"), "high_size .*got '8'$"),
    (dict(low_size=(4, 4.0)), r"low_size .*got \(4, 4\.0\)$"),
    (dict(low_size=(4, False)), r"low_size .*got \(4, False\)$"),
    (dict(low_size=(4, 4, 4, 4)), "low_size"),
    (dict(low_size=()), r"low_size .*got \(\)$"),
    (dict(n_high=0), "n_high must be a positive int, got 0$"),
    (dict(n_high=True), "n_high must be a positive int, got True$"),
    (dict(n_high=2.0), r"n_high must be a positive int, got 2\.0$"),
    (dict(n_high=1, n_low=0), "at least 2 crops"),
    (dict(n_low=-1), "n_low must be a non-negative int, got -1$"),
    (dict(n_low=False), "n_low must be a non-negative int, got False$"),
    (dict(n_low=Fraction(2)), r"n_low must be a non-negative int, got Fraction\(2, 1\)$"),
    (dict(intensity=-0.1), "intensity"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiCrop(**{**dict(high_size=8, low_size=4), **kwargs})


def test_integer_like_sizes_and_counts_and_real_scales_are_accepted():
    crops = MultiCrop(Index(8), (Index(4), 4), n_high=Index(1), n_low=Index(2),
                      high_scale=[Fraction(1, 2), 1], low_scale=(0.1, 0.5))
    assert (crops.high_size, crops.low_size, crops.n_high, crops.n_low) == ((8,), (4, 4), 1, 2)
    assert (crops.high_scale, crops.low_scale) == ((0.5, 1.0), (0.1, 0.5))
    assert all(type(v) is int for v in crops.high_size + crops.low_size + (crops.n_high, crops.n_low))
    assert MultiCrop(8, 4, high_scale=(1, 1)).high_scale == (1.0, 1.0)


def test_numpy_integers_and_scales_are_accepted_and_numpy_floats_rejected():
    np = pytest.importorskip("numpy")
    crops = MultiCrop(np.int64(8), (np.int32(4), 4), n_high=np.int64(1), n_low=np.uint8(2),
                      high_scale=(np.float32(0.5), 1), low_scale=np.array([0.1, 0.5]))
    assert (crops.high_size, crops.low_size, crops.n_high, crops.n_low) == ((8,), (4, 4), 1, 2)
    assert (crops.high_scale, crops.low_scale) == ((0.5, 1.0), (0.1, 0.5))
    for kwargs in (dict(high_size=np.float64(8)), dict(low_size=(4, np.float32(4))), dict(n_low=np.bool_(True))):
        (name, value), = kwargs.items()
        with pytest.raises(ValueError, match=f"{name} .*got {re.escape(repr(value))}$"):  # repr: numpy's version
            MultiCrop(**{**dict(high_size=8, low_size=4), **kwargs})


@pytest.mark.parametrize("x, match", [
    (torch.rand(3, 8, 8), r"\(B, C, H, W\)"),
    (torch.rand(1, 1, 1, 4, 4, 4), r"\(B, C, D, H, W\)"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "floating-point"),
    (torch.rand(0, 1, 8, 8), "empty"),
])
def test_bad_inputs_raise(device, x, match):
    with pytest.raises(ValueError, match=match):
        MultiCrop(4, 2)(x.to(device))


@pytest.mark.parametrize("crops, shape, match", [
    # one unbatched volume, as monai hands them out: the 3D preset's sizes say it expects 5-D input
    (MultiCrop.fmcib_3d(), (1, 64, 64, 64),
     r"high_size=\(50, 50, 50\) is 3-D, so MultiCrop expects \(B, C, D, H, W\), got shape \(1, 64, 64, 64\); "
     r"one volume \(C, D, H, W\) needs x\[None\]$"),
    (MultiCrop(4, (2, 2)), (2, 1, 8, 8, 8), r"low_size=\(2, 2\) is 2-D, so MultiCrop expects \(B, C, H, W\), got shape "
                                            r"\(2, 1, 8, 8, 8\)$"),
])
def test_size_with_wrong_number_of_dims_raises(device, crops, shape, match):
    with pytest.raises(ValueError, match=match):
        crops(torch.rand(shape, device=device))


@pytest.mark.parametrize("generator", [0, "cpu", torch.Generator, torch.device("cpu")])
def test_generator_that_is_not_a_torch_generator_raises(device, generator):
    with pytest.raises(ValueError, match=re.escape(f"generator must be a torch.Generator or None, got {generator!r}")):
        MultiCrop(4, 2)(torch.rand(2, 1, 8, 8, device=device), generator=generator)
