"""VGG with batch norm. Simonyan & Zisserman, "Very Deep Convolutional Networks", arXiv:1409.1556."""
from __future__ import annotations

import torch.nn as nn

from cifar_ray.models import register_model
from cifar_ray.models.layers import ResizeTo, scaled
from cifar_ray.models.layers import activation as make_act

CFG = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, cfg: list, num_classes: int, stem: str, activation: str, batch_norm: bool,
                 dropout: float, width: float):
        super().__init__()
        layers: list[nn.Module] = [ResizeTo(224)] if stem == "imagenet" else []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            cout = scaled(v, width)
            layers.append(nn.Conv2d(cin, cout, 3, padding=1))  # biased even before BN, as torchvision and kuangliu
            layers += [nn.BatchNorm2d(cout)] if batch_norm else []
            layers.append(make_act(activation))
            cin = cout
        self.features = nn.Sequential(*layers)  # cifar: (B, 512w, 1, 1); imagenet: (B, 512w, 7, 7)
        if stem == "imagenet":
            # torchvision's head: two 4096-unit layers with dropout.
            self.classifier = nn.Sequential(
                nn.Flatten(), nn.Linear(cin * 7 * 7, 4096), make_act(activation), nn.Dropout(dropout or 0.5),
                nn.Linear(4096, 4096), make_act(activation), nn.Dropout(dropout or 0.5),
                nn.Linear(4096, num_classes))
        else:
            self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def _factory(name: str):
    def build(num_classes: int = 10, stem: str = "cifar", activation: str = "relu", batch_norm: bool = True,
              dropout: float = 0.0, width: float = 1.0):
        return VGG(CFG[name], num_classes, stem, activation, batch_norm, dropout, width)

    return build


vgg16 = register_model("vgg16", stems=("cifar", "imagenet"), summary="VGG16 with batch norm")(_factory("vgg16"))
vgg19 = register_model("vgg19", stems=("cifar", "imagenet"), summary="VGG19 with batch norm")(_factory("vgg19"))
