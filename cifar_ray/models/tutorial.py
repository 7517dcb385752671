"""The PyTorch CIFAR-10 tutorial's CNN (`base`) and the seed's grown variant (`netconv`).

Tutorial: https://pytorch.org/tutorials/beginner/blitz/cifar10_tutorial.html
"""
from __future__ import annotations

import torch.nn as nn

from cifar_ray.models import register_model
from cifar_ray.models.layers import activation as make_act
from cifar_ray.models.layers import scaled


@register_model("base", summary="PyTorch tutorial CNN: conv5x5 6, pool, conv5x5 16, pool, fc 120, 84, 10")
def base(num_classes: int = 10, activation: str = "relu", batch_norm: bool = False):
    def conv(cin, cout):
        norm = [nn.BatchNorm2d(cout)] if batch_norm else []
        return [nn.Conv2d(cin, cout, 5), *norm, make_act(activation), nn.MaxPool2d(2)]

    return nn.Sequential(
        *conv(3, 6),  # (B, 6, 14, 14)
        *conv(6, 16),  # (B, 16, 5, 5)
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), make_act(activation),
        nn.Linear(120, 84), make_act(activation),
        nn.Linear(84, num_classes),
    )


@register_model("netconv", summary="the seed's NetConv: conv blocks 32, 64, 128 with BN, LeakyReLU, 2x2 max-pool")
def netconv(num_classes: int = 10, activation: str = "leaky_relu", batch_norm: bool = True,
            dropout: float = 0.25, width: float = 1.0):
    layers: list[nn.Module] = []
    cin = 3
    for cout in (32, 64, 128):
        cout = scaled(cout, width)
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
        layers += [nn.BatchNorm2d(cout)] if batch_norm else []
        layers += [make_act(activation), nn.MaxPool2d(2)]
        cin = cout
    hidden = scaled(256, width)
    return nn.Sequential(
        *layers,  # (B, 128w, 4, 4)
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(cin * 4 * 4, hidden), make_act(activation),
        nn.Linear(hidden, num_classes),
    )
