"""A small CNN backbone, 2D or 3D, fast enough to pretrain on two CPU cores in minutes."""
from typing import Sequence

import torch
from torch import nn

__all__ = ["SmallCNN"]


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
        self.num_ftrs = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # (B, num_ftrs)
