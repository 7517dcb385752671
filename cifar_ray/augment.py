"""Batched augmentations with per-sample random parameters, run on the training device.

Every function takes float images (B, 3, H, W) in [0, 1] and a torch.Generator on the same device,
so one seeded generator makes a run's augmentation reproducible (and resumable from its state).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from cifar_ray.config import AugmentConfig


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


# hflip and random_crop are the plain definitions; augment() and the batch path run both at once
# through flip_crop, which tests hold to exactly these pixels.
def hflip(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen, device=x.device) < p  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` px, then cut a random HxW window per sample with one flat gather."""
    b, c, h, w = x.shape
    wide = w + 2 * padding
    padded = F.pad(x, (padding, padding, padding, padding)).flatten(2)  # (B, C, (H+2p)(W+2p))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=x.device)
    window = (torch.arange(h, device=x.device)[:, None] * wide + torch.arange(w, device=x.device)).view(1, 1, h * w)
    idx = (window + (oy * wide + ox)[:, None, None]).expand(b, c, h * w)
    return padded.gather(2, idx).view(b, c, h, w)


def reflect_index(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices past either edge of 0..n-1 mirrored back inside, the edge itself not repeated (torch's
    `reflect` padding: -1 -> 1, n -> n-2); valid up to n-1 past the edge."""
    return (n - 1) - ((n - 1) - i.abs()).abs()


def flip_crop(x: torch.Tensor, flip_p: float, padding: int, gen: torch.Generator,
              flip: Optional[torch.Tensor] = None, reflect: bool = False) -> torch.Tensor:
    """hflip(p=flip_p) then random_crop(padding) as one flat gather: the same random draws and the
    same pixels as the two calls, on any dtype, so the batch path runs it on uint8 before the float
    conversion (4x fewer bytes than on float, and no flipped copy of the batch).
    flip: which images to mirror (B,) bool, given instead of drawn (alternating flips); reflect: the
    padding mirrors the image's edge (torch's `reflect`) instead of zeros, read by index, not padded."""
    b, c, h, w = x.shape
    if flip is None:
        flip = torch.rand(b, generator=gen, device=x.device) < flip_p if flip_p else None
    if reflect and padding:
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=x.device)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=x.device)
        cols = reflect_index(ox[:, None] + torch.arange(w, device=x.device) - padding, w)  # (B, W)
        if flip is not None:  # the flipped image's column j is the original's w-1-j
            cols = torch.where(flip[:, None], w - 1 - cols, cols)
        rows = reflect_index(oy[:, None] + torch.arange(h, device=x.device) - padding, h) * w  # (B, H)
        idx = (rows[:, :, None] + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        return x.flatten(2).gather(2, idx).view(b, c, h, w)
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=x.device)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen, device=x.device)
    else:
        oy = ox = torch.zeros(b, dtype=torch.int64, device=x.device)
    wide = w + 2 * padding
    j = torch.arange(w, device=x.device)
    cols = ox[:, None] + j  # (B, W)
    if flip is not None:  # a flipped-then-padded image read at ox+j is the padded one read at wide-1-ox-j
        cols = torch.where(flip[:, None], (wide - 1 - ox)[:, None] - j, cols)
    rows = (oy[:, None] + torch.arange(h, device=x.device)) * wide  # (B, H)
    idx = (rows[:, :, None] + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return x.flatten(2).gather(2, idx).view(b, c, h, w)


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
    gy = torch.linspace(-1, 1, h, device=x.device).view(1, h, 1)
    gx = torch.linspace(-1, 1, w, device=x.device).view(1, 1, w)
    m = matrices.to(x.dtype).view(b, 9, 1, 1).unbind(1)  # nine (B, 1, 1) coefficients
    # elementwise, not a batched matmul of tiny matrices: several times faster on the CPU
    u = m[0] * gx + m[1] * gy + m[2]  # (B, H, W)
    v = m[3] * gx + m[4] * gy + m[5]
    z = (m[6] * gx + m[7] * gy + m[8]).clamp_min(1e-6)
    grid = torch.stack([u / z, v / z], dim=-1)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision's rgb_to_grayscale


def color_jitter(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, composed into one per-sample affine colour map
    x -> M x + o (M: (B, 3, 3), o: (B, 3)) and applied in a single pass over the pixels."""
    b, dev = x.shape[0], x.device
    eye = torch.eye(3, device=dev).expand(b, 3, 3)
    gray = torch.tensor(GRAY, device=dev)
    m = eye.clone()
    o = torch.zeros(b, 3, device=dev)
    mu = x.mean(dim=(2, 3))  # (B, 3) per-channel means: the image's grey mean is linear in them
    if cfg.brightness:
        f = _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, gen, dev)[:, None, None]
        m = f * m
    if cfg.contrast:
        # blend with the image's mean grey level: x -> f x + (1 - f) mean_gray(x)
        f = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, gen, dev)
        mean_gray = ((m @ mu[:, :, None]).squeeze(2) + o) @ gray  # (B,)
        m = f[:, None, None] * m
        o = f[:, None] * o + ((1 - f) * mean_gray)[:, None]
    if cfg.saturation:
        # blend with each pixel's grey value: x -> f x + (1 - f) (gray . x) 1
        f = _uniform(b, 1 - cfg.saturation, 1 + cfg.saturation, gen, dev)[:, None, None]
        sat = f * eye + (1 - f) * gray.expand(3, 3)
        m, o = sat @ m, (sat @ o[:, :, None]).squeeze(2)
    if cfg.hue:
        # a hue shift is a rotation about the grey axis of RGB space
        theta = _uniform(b, -cfg.hue, cfg.hue, gen, dev) * (2 * math.pi)
        cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
        k = torch.full((3, 3), 1 / 3, device=dev)
        cross = torch.tensor([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=dev) / math.sqrt(3)
        rot = cos * torch.eye(3, device=dev) + (1 - cos) * k + sin * cross  # (B, 3, 3)
        m, o = rot @ m, (rot @ o[:, :, None]).squeeze(2)
    out = torch.baddbmm(o[:, :, None].to(x.dtype), m.to(x.dtype), x.flatten(2))  # (B, 3, HW)
    return out.view_as(x).clamp_(0, 1)


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero a size x size square centred at a random pixel (clipped at the border), per sample."""
    b, _, h, w = x.shape
    y0 = torch.randint(0, h, (b,), generator=gen, device=x.device)[:, None, None] - size // 2
    x0 = torch.randint(0, w, (b,), generator=gen, device=x.device)[:, None, None] - size // 2
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    hole = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)  # (B, H, W)
    return x * (~hole).unsqueeze(1).to(x.dtype)


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, *, flip_crop_done: bool = False) -> torch.Tensor:
    """Apply every enabled augmentation of cfg to a float batch (B, 3, H, W) in [0, 1].
    flip_crop_done: the caller already ran flip_crop(cfg.hflip, cfg.crop_padding) (on uint8)."""
    if (cfg.hflip or cfg.crop_padding) and not flip_crop_done:  # alternate_flip: only the batch path knows the epoch
        x = flip_crop(x, cfg.hflip, cfg.crop_padding, gen, reflect=cfg.crop_reflect)
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
