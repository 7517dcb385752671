"""Small shared pieces of the model families."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class ResizeTo(nn.Module):
    """Resize inputs on the device (the imagenet stems expect 224x224)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x):  # (B, C, H, W) -> (B, C, size, size)
        if x.shape[-1] == self.size and x.shape[-2] == self.size:
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
