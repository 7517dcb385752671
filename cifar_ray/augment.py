"""Batched augmentations with per-sample random parameters, run on the training device.

Every function takes float images (B, 3, H, W) in [0, 1] and a torch.Generator on the same device,
so one seeded generator makes a run's augmentation reproducible (and resumable from its state).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cifar_ray.config import AugmentConfig


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def hflip(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen, device=x.device) < p  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` px, then cut a random HxW window per sample with one gather."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows, cols]


def _perspective_matrices(b: int, scale: float, gen: torch.Generator, device) -> torch.Tensor:
    """Per-sample homographies (B, 3, 3) in normalised [-1, 1] coordinates that move each corner
    inwards by up to `scale`/2 of the side, as torchvision's RandomPerspective does."""
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], device=device)
    jitter = torch.rand(b, 4, 2, generator=gen, device=device) * scale  # inwards, in [0, scale]
    inward = -corners.sign()  # direction towards the centre per corner
    dst = corners + jitter * inward  # (B, 4, 2)
    src = corners.expand(b, 4, 2)
    # Solve for H with dst -> src (grid_sample maps output pixels to input locations): 8 unknowns.
    rows = []
    for i in range(4):
        x, y = dst[:, i, 0], dst[:, i, 1]
        u, v = src[:, i, 0], src[:, i, 1]
        z, o = torch.zeros_like(x), torch.ones_like(x)
        rows.append(torch.stack([x, y, o, z, z, z, -u * x, -u * y], 1))
        rows.append(torch.stack([z, z, z, x, y, o, -v * x, -v * y], 1))
    a = torch.stack(rows, 1)  # (B, 8, 8)
    rhs = torch.stack([src[:, i // 2, i % 2] for i in range(8)], 1)  # (B, 8)
    h = torch.linalg.solve(a, rhs)
    return torch.cat([h, torch.ones(b, 1, device=device)], 1).view(b, 3, 3)


def _rotation_matrices(b: int, degrees: float, gen: torch.Generator, device) -> torch.Tensor:
    angle = _uniform(b, -degrees, degrees, gen, device) * (math.pi / 180)
    cos, sin = torch.cos(angle), torch.sin(angle)
    m = torch.zeros(b, 3, 3, device=device)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1], m[:, 2, 2] = cos, -sin, sin, cos, 1
    return m


def warp(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Resample each image through its 3x3 homography (output coords -> input coords), zeros outside."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device)
    xs = torch.linspace(-1, 1, w, device=x.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(1, h * w, 3)  # (1, HW, 3)
    pts = base @ matrices.transpose(1, 2)  # (B, HW, 3)
    grid = (pts[..., :2] / pts[..., 2:].clamp_min(1e-6)).view(b, h, w, 2)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # (B, 1, H, W)


def color_jitter(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    b, dev = x.shape[0], x.device
    if cfg.brightness:
        x = x * _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, gen, dev)[:, None, None, None]
    if cfg.contrast:
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        f = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, gen, dev)[:, None, None, None]
        x = (x - mean) * f + mean
    if cfg.saturation:
        g = _gray(x)
        f = _uniform(b, 1 - cfg.saturation, 1 + cfg.saturation, gen, dev)[:, None, None, None]
        x = (x - g) * f + g
    if cfg.hue:
        # A hue shift is a rotation about the grey axis of RGB space: one 3x3 matrix per sample.
        theta = _uniform(b, -cfg.hue, cfg.hue, gen, dev) * (2 * math.pi)
        cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
        k = torch.full((3, 3), 1 / 3, device=dev)
        cross = torch.tensor([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=dev) / math.sqrt(3)
        rot = cos * torch.eye(3, device=dev) + (1 - cos) * k + sin * cross  # (B, 3, 3)
        x = torch.einsum("bij,bjhw->bihw", rot.to(x.dtype), x)
    return x.clamp(0, 1)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero a size x size square centred at a random pixel (clipped at the border), per sample."""
    b, _, h, w = x.shape
    y0 = torch.randint(0, h, (b,), generator=gen, device=x.device)[:, None, None] - size // 2
    x0 = torch.randint(0, w, (b,), generator=gen, device=x.device)[:, None, None] - size // 2
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    hole = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)  # (B, H, W)
    return x * (~hole).unsqueeze(1).to(x.dtype)


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Apply every enabled augmentation of cfg to a float batch (B, 3, H, W) in [0, 1]."""
    if cfg.hflip:
        x = hflip(x, cfg.hflip, gen)
    if cfg.crop_padding:
        x = random_crop(x, cfg.crop_padding, gen)
    if cfg.rotation or cfg.perspective:
        m = torch.eye(3, device=x.device).expand(x.shape[0], 3, 3)
        if cfg.rotation:
            m = m @ _rotation_matrices(x.shape[0], cfg.rotation, gen, x.device)
        if cfg.perspective:
            m = m @ _perspective_matrices(x.shape[0], cfg.perspective, gen, x.device)
        x = warp(x, m)
    if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
        x = color_jitter(x, cfg, gen)
    if cfg.cutout:
        x = cutout(x, cfg.cutout, gen)
    return x
