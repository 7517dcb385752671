"""The seed's multilayer perceptrons net1-net3 on flattened 3x32x32 images."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from cifar_ray.models import register_model
from cifar_ray.models.layers import activation, scaled

IN_FEATURES = 3 * 32 * 32


def build_mlp(hidden: list[int], acts: list[str], dropout_after: set[int], dropout: float,
              num_classes: int, width: float, override: Optional[str]) -> nn.Sequential:
    """Linear layers of `hidden` units; layer i gets acts[i] (or `override`) and, when i is in
    dropout_after, a Dropout(p=dropout) after its activation."""
    layers: list[nn.Module] = [nn.Flatten()]  # (B, 3, 32, 32) -> (B, 3072)
    fan_in = IN_FEATURES
    for i, (units, act) in enumerate(zip(hidden, acts, strict=True)):
        units = scaled(units, width)
        layers += [nn.Linear(fan_in, units), activation(override or act)]
        if i in dropout_after and dropout > 0:
            layers.append(nn.Dropout(dropout))
        fan_in = units
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


@register_model("net1", convolutions=False,
                summary="MLP, 8 hidden layers, ReLU and LeakyReLU, dropout 0.2 twice (the seed's best MLP)")
def net1(num_classes: int = 10, activation: Optional[str] = None, dropout: float = 0.2, width: float = 1.0):
    hidden = [2048, 1024, 1024, 512, 512, 256, 256, 128]
    acts = ["relu", "leaky_relu"] * 4
    return build_mlp(hidden, acts, {1, 4}, dropout, num_classes, width, activation)


@register_model("net2", convolutions=False, summary="MLP, 9 hidden layers, LeakyReLU, dropout 0.4 five times")
def net2(num_classes: int = 10, activation: Optional[str] = None, dropout: float = 0.4, width: float = 1.0):
    hidden = [2048, 2048, 1024, 1024, 512, 512, 256, 256, 128]
    return build_mlp(hidden, ["leaky_relu"] * 9, {0, 2, 4, 6, 8}, dropout, num_classes, width, activation)


@register_model("net3", convolutions=False, summary="MLP, 5 hidden layers, ReLU, ELU and LeakyReLU, with dropout")
def net3(num_classes: int = 10, activation: Optional[str] = None, dropout: float = 0.3, width: float = 1.0):
    hidden = [1024, 512, 256, 128, 64]
    acts = ["relu", "elu", "leaky_relu", "relu", "elu"]
    return build_mlp(hidden, acts, {0, 2}, dropout, num_classes, width, activation)
