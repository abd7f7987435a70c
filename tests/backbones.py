"""User backbones for ``--backbone backbones:NAME`` (tests put this folder on the path)."""
import torch
from torch import nn


def tiny(in_channels):
    """What a researcher writes: takes ``in_channels``, maps (B, C, H, W) to (B, 12)."""
    return nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 12, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class Gray(nn.Module):
    """A class without ``in_channels``: called with no argument (one input channel)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 5, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def unpooled():
    return nn.Conv2d(1, 4, 3)  # (B, 4, H - 2, W - 2): not features


def raises(in_channels):
    raise RuntimeError("no weights file found")


def not_a_module():
    return torch.zeros(3)


def by_size():
    return nn.Flatten()  # F depends on the crop size


NUMBER = 3
