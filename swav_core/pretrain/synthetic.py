"""The embedded synthetic sets, deterministic from a seed, with class structure (labels only score the
evaluation; pretraining never sees them).

``synthetic2d``: 8 shape classes at a random position, size, rotation and contrast on a noisy background;
``synthetic3d``: 5 lesion-like classes at a random position, size, 3D orientation and contrast in a textured,
noisy background. Shapes are soft masks ``sigmoid(-f / pixel)`` of an approximately signed distance ``f``
(negative inside) in the shape's own rotated, unit-radius coordinates, so edges are anti-aliased.
"""
import math
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["synthetic2d", "synthetic3d", "CLASSES_2D", "CLASSES_3D", "SYNTHETIC"]

CLASSES_2D = ("disc", "ring", "square", "triangle", "plus", "ellipse", "frame", "star")
CLASSES_3D = ("sphere", "ellipsoid", "spiculated", "hollow", "lobulated")

_CHUNK = 256  # samples rendered at once, to bound memory


def _u(g: torch.Generator, *shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=g)


def _shape2d(label: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of each sample's shape at local coordinates.

    Shape:
        label: (B,); u, v: (B, H, W) rotated, unit-radius coordinates. Output: (B, H, W).
    """
    rho, phi = torch.hypot(u, v), torch.atan2(v, u)
    au, av = u.abs(), v.abs()
    s3 = math.sqrt(3.0) / 2.0
    f = torch.stack([
        rho - 1.0,  # disc
        (rho - 0.72).abs() - 0.28,  # ring
        torch.maximum(au, av) - 0.8,  # square
        torch.stack([-v - 0.6, s3 * u + 0.5 * v - 0.6, -s3 * u + 0.5 * v - 0.6]).amax(0),  # triangle
        torch.minimum(torch.maximum(au - 1.0, av - 0.3), torch.maximum(av - 1.0, au - 0.3)),  # plus
        (torch.hypot(u, v / 0.4) - 1.0) * 0.4,  # ellipse
        (torch.maximum(au, av) - 0.72).abs() - 0.2,  # frame
        rho - (0.62 + 0.33 * torch.cos(5.0 * phi)),  # star
    ])  # (8, B, H, W)
    return f.gather(0, label.view(1, -1, 1, 1).expand(1, *u.shape)).squeeze(0)


def synthetic2d(n: int, size: int = 32, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` grayscale shape images, (n, 1, size, size) float32 roughly in [-0.5, 1.5], and labels (n,).

    Each image: a shape of class ``label`` (uniform over :data:`CLASSES_2D`), centre offset
    U(-0.3, 0.3), radius U(0.3, 0.55) of the half-width, rotation U(0, 2π), contrast U(0.6, 1)
    over a background level U(-0.1, 0.1) with a random linear ramp (slopes U(-0.05, 0.05)), plus
    Gaussian noise of standard deviation σ ~ U(0.04, 0.06). The nuisance ranges are moderate on
    purpose: a statistic that every crop of an image shares (say a widely varying noise level) is a
    shortcut SwAV's crops can match without looking at the shape.
    """
    g = torch.Generator().manual_seed(int(seed))
    labels = torch.randint(len(CLASSES_2D), (n,), generator=g)
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0  # pixel centres in [-1, 1]
    yy, xx = torch.meshgrid(t, t, indexing="ij")  # (H, W)
    out = []
    for lab in labels.split(_CHUNK):
        B = lab.shape[0]
        cx, cy = _u(g, B, 1, 1, lo=-0.3, hi=0.3), _u(g, B, 1, 1, lo=-0.3, hi=0.3)
        r, th = _u(g, B, 1, 1, lo=0.3, hi=0.55), _u(g, B, 1, 1, hi=2 * math.pi)
        contrast, bg = _u(g, B, 1, 1, lo=0.6, hi=1.0), _u(g, B, 1, 1, lo=-0.1, hi=0.1)
        ramp, sigma = _u(g, B, 2, 1, 1, lo=-0.05, hi=0.05), _u(g, B, 1, 1, lo=0.04, hi=0.06)
        dx, dy = xx - cx, yy - cy  # (B, H, W)
        u = (torch.cos(th) * dx + torch.sin(th) * dy) / r
        v = (-torch.sin(th) * dx + torch.cos(th) * dy) / r
        pixel = (2.0 / size) / r  # one pixel in local units
        mask = torch.sigmoid(-_shape2d(lab, u, v) / pixel)
        img = bg + ramp[:, 0] * xx + ramp[:, 1] * yy + contrast * mask
        img = img + sigma * torch.randn(B, size, size, generator=g)
        out.append(img.unsqueeze(1))
    return torch.cat(out), labels


def _rotations(g: torch.Generator, n: int) -> torch.Tensor:
    """(n, 3, 3) random rotation matrices (QR of a Gaussian with the sign fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    q[torch.det(q) < 0, :, 0] *= -1
    return q.float()


def _shape3d(label: torch.Tensor, p: torch.Tensor, spikes: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) per sample. p: (B, 3, N) local points; spikes: (B, M, 3)."""
    px, py, pz = p.unbind(1)  # (B, N) each
    rho = torch.sqrt(px * px + py * py + pz * pz).clamp_min(1e-6)
    f = torch.empty_like(rho)
    for c in range(len(CLASSES_3D)):
        sel = label == c
        r, x, y, z = rho[sel], px[sel], py[sel], pz[sel]
        if c == 0:  # sphere
            f[sel] = r - 1.0
        elif c == 1:  # ellipsoid, 2:1:1
            f[sel] = (torch.sqrt(x**2 + (y / 0.5) ** 2 + (z / 0.5) ** 2) - 1.0) * 0.5
        elif c == 2:  # spiculated: a core with sharp radial spikes along M random directions
            spike = torch.einsum("bmc,bcn->bmn", spikes[sel], p[sel] / r.unsqueeze(1)).clamp_min(0).pow(24).amax(1)
            f[sel] = r - (0.6 + 0.5 * spike)
        elif c == 3:  # hollow shell
            f[sel] = (r - 0.72).abs() - 0.25
        else:  # lobulated
            f[sel] = r - (0.75 + 0.25 * torch.cos(3 * torch.atan2(y, x)) * torch.cos(2 * z / r))
    return f


def synthetic3d(n: int, size: int = 24, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` lesion-like volumes, (n, 1, size, size, size) float32, and labels (n,).

    Each volume: a lesion of class ``label`` (uniform over :data:`CLASSES_3D`), centre offset
    U(-0.25, 0.25)³, radius U(0.35, 0.55) of the half-width, a random 3D orientation, contrast
    U(0.6, 1) over a background level U(-0.1, 0.1), in a smooth random texture (average-pooled
    noise) plus white noise σ ~ U(0.04, 0.06).
    """
    g = torch.Generator().manual_seed(int(seed))
    labels = torch.randint(len(CLASSES_3D), (n,), generator=g)
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0
    grid = torch.stack(torch.meshgrid(t, t, t, indexing="ij")).reshape(3, -1)  # (3, N) as (z, y, x)
    out = []
    for lab in labels.split(_CHUNK):
        B = lab.shape[0]
        centre, r = _u(g, B, 3, 1, lo=-0.25, hi=0.25), _u(g, B, 1, 1, lo=0.35, hi=0.55)
        rot = _rotations(g, B)  # (B, 3, 3)
        spikes = F.normalize(torch.randn(B, 7, 3, generator=g), dim=-1)
        contrast, bg = _u(g, B, 1, 1, 1, 1, lo=0.6, hi=1.0), _u(g, B, 1, 1, 1, 1, lo=-0.1, hi=0.1)
        sigma = _u(g, B, 1, 1, 1, 1, lo=0.04, hi=0.06)
        p = torch.einsum("bij,bjn->bin", rot, grid - centre) / r  # (B, 3, N) local coordinates
        pixel = (2.0 / size) / r.squeeze(1)  # (B, 1)
        mask = torch.sigmoid(-_shape3d(lab, p, spikes) / pixel).view(B, 1, size, size, size)
        texture = F.avg_pool3d(torch.randn(B, 1, size, size, size, generator=g), 5, 1, 2) * 0.6
        vol = bg + texture + contrast * mask + sigma * torch.randn(B, 1, size, size, size, generator=g)
        out.append(vol)
    return torch.cat(out), labels


# name -> (generator, default size, default number of training samples)
SYNTHETIC = {"synthetic2d": (synthetic2d, 32, 4096), "synthetic3d": (synthetic3d, 24, 1536)}
