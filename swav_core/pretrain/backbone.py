"""The job's backbone: the built-in :class:`SmallCNN`, or a researcher's own network (``--backbone
MODULE:CALLABLE``), and the dry run that finds its feature size."""
import importlib
import inspect
import os
import sys
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import UsageError

__all__ = ["SmallCNN", "build", "feature_size", "describe"]


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stages, each halving the resolution after the first, then global average pooling.

    Works on any input size ≥ 2^(len(widths) - 1), so high- and low-resolution crops share it.

    Args:
        in_channels: input channels C.
        dims: 2 for images (B, C, H, W), 3 for volumes (B, C, D, H, W). Default: 2
        widths: output channels of each 3×3(×3) stage. Default: (16, 32, 64, 128)

    Shape:
        input: (B, C, H, W) or (B, C, D, H, W). Output: (B, widths[-1]), the SwaV ``num_ftrs``.
    """

    def __init__(self, in_channels: int = 1, dims: int = 2, widths: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims!r}")
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
        layers, c = [], in_channels
        for i, w in enumerate(widths):
            layers += [conv(c, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False), norm(w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers, pool, nn.Flatten(1))
        self.num_ftrs, self.dims, self.widths = c, dims, tuple(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, num_ftrs)


def build(spec: Optional[str], in_channels: int, dims: int, widths: Optional[Sequence[int]]) -> nn.Module:
    """``SmallCNN(in_channels, dims, widths)``, or for ``spec`` = ``MODULE:CALLABLE`` what the callable returns,
    called with ``in_channels=`` when it takes that keyword and with no argument otherwise. MODULE is imported
    as Python would from the current folder; any failure is a :class:`UsageError` naming ``spec``."""
    if spec is None:
        return SmallCNN(in_channels, dims, widths)
    make = _callable(spec)
    try:
        params = inspect.signature(make).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        params = {}
    takes = "in_channels" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    try:
        net = make(in_channels=in_channels) if takes else make()
    except Exception as e:
        raise UsageError(f"--backbone {spec}: calling it raised {_first_line(e)}") from e
    if not isinstance(net, nn.Module):
        raise UsageError(f"--backbone {spec} returned a {type(net).__name__}; expected a torch.nn.Module")
    return net


def feature_size(net: nn.Module, spec: Optional[str], inputs: Sequence[Tuple[int, ...]]) -> int:
    """F, from one dry run of ``net`` (eval mode, no gradient, the global RNG untouched) on a batch of 2 zeros
    of each shape (C, *spatial) in ``inputs``: each must give features (2, F) of one F, else a
    :class:`UsageError` naming ``--backbone`` and the shapes."""
    name = f"--backbone {spec}" if spec else "the backbone"
    sizes = set()
    was_training = net.training
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        net.eval()
        for shape in inputs:
            try:
                out = net(torch.zeros(2, *shape))
            except Exception as e:
                raise UsageError(f"{name} fails on a batch {(2, *shape)} (a crop): {_first_line(e)}") from e
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            if not torch.is_tensor(out) or out.ndim != 2 or out.shape[0] != 2 or not out.is_floating_point():
                raise UsageError(f"{name} maps a batch {(2, *shape)} to {got}; expected float features (2, F): "
                                 f"pool and flatten them in the network")
            sizes.add(out.shape[1])
    net.train(was_training)
    if len(sizes) > 1:
        raise UsageError(f"{name} gives features of sizes {sorted(sizes)} for the crop sizes {list(inputs)}; "
                         f"expected one F for all (end the network with a global pooling)")
    return sizes.pop()


def describe(spec: Optional[str], net: nn.Module, in_channels: int) -> dict:
    """What rebuilds the backbone (metrics.json ``backbone``): ``SmallCNN(**it)``, or the callable and its keyword."""
    if spec is None:
        return {"in_channels": in_channels, "dims": net.dims, "widths": list(net.widths)}
    return {"callable": spec, "in_channels": in_channels}


def _callable(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--backbone {spec!r}: expected MODULE:CALLABLE, e.g. mynets:resnet18 (a function or class "
                         f"in mynets.py returning an nn.Module)")
    if os.getcwd() not in sys.path:  # `swav-pretrain` (a script) does not put the current folder on the path
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:
        raise UsageError(f"--backbone {spec}: cannot import {module_name} ({_first_line(e)}); run from the folder "
                         f"holding {module_name.replace('.', '/')}.py or install it") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--backbone {spec}: {module_name} has no {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--backbone {spec}: {attr} is a {type(obj).__name__}, expected a function or class")
    return obj


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
