"""A small fast CNN whose first layer whitens 2x2 patches (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds
on a single GPU", arXiv:2404.00498; its architecture from tysam-code's hlb-CIFAR10).

The first convolution is fixed, not trained: `data_init` sets it from the eigenvectors of the training
patches' covariance, so the next layers see decorrelated, unit-variance inputs from the first step.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from cifar_ray.models import register_model
from cifar_ray.models.layers import activation as make_act
from cifar_ray.models.layers import scaled

WHITEN_KERNEL = 2  # px: 2x2x3 = 12 patch dimensions, each kept with both signs -> 24 channels
WHITEN_EPS = 5e-4  # added to the eigenvalues: the smallest are noise, so their scale is capped
# BatchNorm running statistics follow a fast-moving network: 0.4 per step (torch's convention, the
# weight of the new batch) where the default 0.1 lags the weights over the few hundred steps of a run.
BN_MOMENTUM = 0.4
# The logits' scale: with BatchNorm before the pool the features are O(1), and 256 of them into an
# unscaled linear layer give logits large enough to saturate softmax in the first steps.
LOGIT_SCALE = 1 / 9


class WhiteningConv(nn.Conv2d):
    """A frozen k x k convolution that whitens patches; its bias stays trainable."""

    def __init__(self, cin: int = 3, kernel: int = WHITEN_KERNEL):
        super().__init__(cin, 2 * cin * kernel * kernel, kernel, padding=0, bias=True)
        self.weight.requires_grad_(False)
        assert self.bias is not None  # made with bias=True above
        nn.init.zeros_(self.bias)

    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> None:
        """x: normalised training images (N, C, H, W). Each output channel pair is one eigenvector of
        the patch covariance, scaled by 1/sqrt(eigenvalue), with both signs (the next GELU keeps each half)."""
        c, k = x.shape[1], self.kernel_size[0]
        patches = x.float().unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H-k+1, W-k+1, k, k)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)  # (P, C*k*k), matching weight's layout
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
        order = eigenvalues.argsort(descending=True)
        filters = (eigenvectors[:, order] / torch.sqrt(eigenvalues[order] + WHITEN_EPS)).T  # (C*k*k, C*k*k)
        filters = filters.reshape(-1, c, k, k)
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight.dtype))


class IdentityInitConv(nn.Conv2d):
    """3x3 'same' convolution without bias whose first in_channels filters start as the identity
    (dirac): each block begins close to passing its input through, an implicit residual."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=1, bias=False)
        with torch.no_grad():
            nn.init.dirac_(self.weight[:min(cin, cout)])


def _norm(channels: int) -> nn.BatchNorm2d:
    """Batch norm with a trained shift and a fixed unit scale (the next conv can scale)."""
    bn = nn.BatchNorm2d(channels, eps=1e-12, momentum=BN_MOMENTUM)
    bn.weight.requires_grad_(False)
    return bn


class ConvBlock(nn.Sequential):
    """conv, 2x2 max-pool, BN, act, conv, BN, act: (B, cin, H, W) -> (B, cout, H/2, W/2)."""

    def __init__(self, cin: int, cout: int, activation: str):
        super().__init__(IdentityInitConv(cin, cout), nn.MaxPool2d(2), _norm(cout), make_act(activation),
                         IdentityInitConv(cout, cout), _norm(cout), make_act(activation))


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


@register_model("whitened_cnn", whitening=True,
                summary="2x2 whitening conv (set from training patches), conv blocks 64, 256, 256 with BN and GELU, "
                        "3x3 max-pool, linear (airbench)")
def whitened_cnn(num_classes: int = 10, activation: str = "gelu", width: float = 1.0):
    whiten = WhiteningConv()
    widths = [scaled(c, width) for c in (64, 256, 256)]
    return nn.Sequential(
        whiten, make_act(activation),  # (B, 24, 31, 31)
        ConvBlock(whiten.out_channels, widths[0], activation),  # (B, 64, 15, 15)
        ConvBlock(widths[0], widths[1], activation),  # (B, 256, 7, 7)
        ConvBlock(widths[1], widths[2], activation),  # (B, 256, 3, 3)
        nn.MaxPool2d(3), nn.Flatten(),  # (B, 256)
        nn.Linear(widths[2], num_classes, bias=False), Scale(LOGIT_SCALE),
    )
