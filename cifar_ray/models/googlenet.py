"""GoogLeNet (Inception v1) with its two auxiliary classifiers. Szegedy et al., "Going Deeper with
Convolutions", arXiv:1409.4842.

In training mode forward returns (logits, aux1, aux2) and the engine adds 0.3 x each aux loss, as
the paper does; in eval mode it returns logits only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from cifar_ray.models import register_model
from cifar_ray.models.layers import ResizeTo, scaled
from cifar_ray.models.layers import activation as make_act

AUX_WEIGHT = 0.3  # the paper's weight of each auxiliary loss


def conv_bn(cin: int, cout: int, k: int, act: str, **kw) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, bias=False, **kw), nn.BatchNorm2d(cout), make_act(act))


class Inception(nn.Module):
    def __init__(self, cin: int, n1: int, n3r: int, n3: int, n5r: int, n5: int, pool: int, act: str):
        super().__init__()
        self.b1 = conv_bn(cin, n1, 1, act)
        self.b2 = nn.Sequential(conv_bn(cin, n3r, 1, act), conv_bn(n3r, n3, 3, act, padding=1))
        # 5x5 branch as in the paper (torchvision uses 3x3 here, a known deviation).
        self.b3 = nn.Sequential(conv_bn(cin, n5r, 1, act), conv_bn(n5r, n5, 5, act, padding=2))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv_bn(cin, pool, 1, act))
        self.out_channels = n1 + n3 + n5 + pool

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class AuxHead(nn.Module):
    """Auxiliary classifier: avg-pool to 4x4, 1x1 conv 128, fc 1024, dropout 0.7, fc."""

    def __init__(self, cin: int, num_classes: int, act: str):
        super().__init__()
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(4), conv_bn(cin, 128, 1, act), nn.Flatten(),
                                 nn.Linear(128 * 16, 1024), make_act(act), nn.Dropout(0.7),
                                 nn.Linear(1024, num_classes))

    def forward(self, x):
        return self.net(x)


# (n1x1, n3x3reduce, n3x3, n5x5reduce, n5x5, pool proj) per block, from the paper's table 1.
BLOCKS = {
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64), "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64), "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128), "5b": (384, 192, 384, 48, 128, 128),
}


class GoogLeNet(nn.Module):
    def __init__(self, num_classes: int, stem: str, activation: str, dropout: float, width: float):
        super().__init__()
        c192 = scaled(192, width)
        if stem == "imagenet":  # 224 -> 28x28 before inception 3a
            self.stem = nn.Sequential(ResizeTo(224), conv_bn(3, scaled(64, width), 7, activation, stride=2, padding=3),
                                      nn.MaxPool2d(3, 2, ceil_mode=True),
                                      conv_bn(scaled(64, width), scaled(64, width), 1, activation),
                                      conv_bn(scaled(64, width), c192, 3, activation, padding=1),
                                      nn.MaxPool2d(3, 2, ceil_mode=True))
        else:  # native 32x32 kept until after 3b, as kuangliu/pytorch-cifar does
            self.stem = conv_bn(3, c192, 3, activation, padding=1)

        def block(cin: int, key: str) -> Inception:
            n1, n3r, n3, n5r, n5, pool = (scaled(v, width) for v in BLOCKS[key])
            return Inception(cin, n1, n3r, n3, n5r, n5, pool, activation)

        self.i3a = block(c192, "3a")
        self.i3b = block(self.i3a.out_channels, "3b")
        self.pool3 = nn.MaxPool2d(3, 2, padding=1)
        self.i4a = block(self.i3b.out_channels, "4a")
        self.i4b = block(self.i4a.out_channels, "4b")
        self.i4c = block(self.i4b.out_channels, "4c")
        self.i4d = block(self.i4c.out_channels, "4d")
        self.i4e = block(self.i4d.out_channels, "4e")
        self.pool4 = nn.MaxPool2d(3, 2, padding=1)
        self.i5a = block(self.i4e.out_channels, "5a")
        self.i5b = block(self.i5a.out_channels, "5b")
        self.aux1 = AuxHead(self.i4a.out_channels, num_classes, activation)
        self.aux2 = AuxHead(self.i4d.out_channels, num_classes, activation)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(self.i5b.out_channels, num_classes))

    def forward(self, x):
        x = self.i3b(self.i3a(self.stem(x)))  # cifar: (B, 480w, 32, 32)
        x = self.i4a(self.pool3(x))  # cifar: (B, 512w, 16, 16)
        aux1 = self.aux1(x) if self.training else None
        x = self.i4d(self.i4c(self.i4b(x)))
        aux2 = self.aux2(x) if self.training else None
        x = self.i5b(self.i5a(self.pool4(self.i4e(x))))  # cifar: (B, 1024w, 8, 8)
        logits = self.head(x)
        return (logits, aux1, aux2) if self.training else logits


# AdaptiveAvgPool2d with sizes that do not divide the input failed on MPS in the seed's runs.
@register_model("inception", stems=("cifar", "imagenet"), unsupported_devices=("mps",),
                summary="GoogLeNet / Inception v1 with two auxiliary classifiers")
def inception(num_classes: int = 10, stem: str = "cifar", activation: str = "relu", dropout: float = 0.4,
              width: float = 1.0):
    return GoogLeNet(num_classes, stem, activation, dropout, width)
