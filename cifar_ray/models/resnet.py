"""ResNet with basic blocks. He et al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385."""
from __future__ import annotations

import torch.nn as nn

from cifar_ray.models import register_model
from cifar_ray.models.layers import ResizeTo, scaled
from cifar_ray.models.layers import activation as make_act


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act1, self.act2 = make_act(activation), make_act(activation)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks: list[int], num_classes: int, stem: str, activation: str, width: float):
        super().__init__()
        c = [scaled(v, width) for v in (64, 128, 256, 512)]
        if stem == "imagenet":  # 224x224 input, 7x7/2 conv and 3x3/2 max-pool: (B, 64, 56, 56)
            self.stem = nn.Sequential(ResizeTo(224), nn.Conv2d(3, c[0], 7, stride=2, padding=3, bias=False),
                                      nn.BatchNorm2d(c[0]), make_act(activation), nn.MaxPool2d(3, 2, 1))
        else:  # native 32x32, no early downsampling: (B, 64, 32, 32)
            self.stem = nn.Sequential(nn.Conv2d(3, c[0], 3, padding=1, bias=False), nn.BatchNorm2d(c[0]),
                                      make_act(activation))
        layers, cin = [], c[0]
        for i, (cout, n) in enumerate(zip(c, blocks, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, activation))
                cin = cout
        self.layers = nn.Sequential(*layers)  # cifar: (B, 512w, 4, 4)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


@register_model("resnet18", stems=("cifar", "imagenet"), summary="ResNet18, [2, 2, 2, 2] basic blocks")
def resnet18(num_classes: int = 10, stem: str = "cifar", activation: str = "relu", width: float = 1.0):
    return ResNet([2, 2, 2, 2], num_classes, stem, activation, width)


@register_model("resnet34", stems=("cifar", "imagenet"), summary="ResNet34, [3, 4, 6, 3] basic blocks")
def resnet34(num_classes: int = 10, stem: str = "cifar", activation: str = "relu", width: float = 1.0):
    return ResNet([3, 4, 6, 3], num_classes, stem, activation, width)
