"""Tiny 2-D and 3-D backbones, random crops and a feature recorder shared by the SwaV model tests."""
import torch
import torch.nn.functional as F
from torch import nn

from swav_core import SwaV


def backbone_2d(channels: int = 3, width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))


def backbone_3d(channels: int = 1, width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv3d(channels, width, 3), nn.ReLU(), nn.AdaptiveAvgPool3d(1))


def crops_2d(batch, n_high=2, n_low=2, device="cpu", generator=None):
    high = [torch.randn(batch, 3, 12, 12, generator=generator).to(device) for _ in range(n_high)]
    low = [torch.randn(batch, 3, 6, 6, generator=generator).to(device) for _ in range(n_low)]
    return high, low


class Recorder:
    """Records the unit-norm features z of every crop from the projection head's outputs."""

    def __init__(self, model: SwaV):
        self.z = []
        model.projection_head.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.z.append(F.normalize(output.detach(), dim=1))


def sorted_rows(x: torch.Tensor) -> torch.Tensor:
    return x[torch.argsort(x[:, 0])]
