"""Model registry: `build_model(name, num_classes=10, **options)` and `list_models()`.

A family module registers its variants with `@register_model`; tests are parametrized over the
registry, so a new model is tested the moment it is registered.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[..., nn.Module]
    stems: tuple[str, ...]  # input layouts it supports: "cifar" (32x32) and/or "imagenet" (224x224)
    unsupported_devices: frozenset[str]  # device types it cannot run on, e.g. {"mps"}
    summary: str
    whitening: bool = False  # has a data-initialised whitening layer (train.whiten_bias_epochs applies)
    convolutions: bool = True  # has trained convolution filters (train.optimizer muon steps those)

    def options(self) -> tuple[str, ...]:
        params = inspect.signature(self.factory).parameters
        return tuple(p for p in params if p != "num_classes")


_REGISTRY: dict[str, ModelSpec] = {}


class ModelError(ValueError):
    """An unknown model, option, stem or device, phrased for the user."""


def register_model(name: str, *, stems=("cifar",), unsupported_devices=(), summary: str = "", whitening: bool = False,
                   convolutions: bool = True):
    def wrap(factory: Callable[..., nn.Module]):
        _REGISTRY[name] = ModelSpec(name, factory, tuple(stems), frozenset(unsupported_devices), summary, whitening,
                                    convolutions)
        return factory

    return wrap


def list_models() -> list[str]:
    return list(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; allowed: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def check_options(name: str, options: dict) -> None:
    spec = model_spec(name)
    for key in options:
        if key not in spec.options() and key != "stem":
            raise ModelError(f"model {name!r} has no option {key!r}; its options: "
                             f"{', '.join(spec.options()) or 'none'}")
    stem = options.get("stem", "cifar")
    if stem not in spec.stems:
        raise ModelError(f"model {name!r} has no {stem!r} stem; its stems: {', '.join(spec.stems)}")


def check_device(name: str, device_type: str) -> None:
    spec = model_spec(name)
    if device_type in spec.unsupported_devices:
        raise ModelError(f"model {name!r} cannot run on {device_type} "
                         f"(unsupported: {', '.join(sorted(spec.unsupported_devices))}); choose another device")


@functools.lru_cache(maxsize=256)
def _has_batch_norm(name: str, options: tuple[tuple[str, Any], ...]) -> bool:
    with torch.device("meta"):  # the layers without their weights: VGG19's 140M parameters take no memory
        model = build_model(name, **dict(options))
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def has_batch_norm(name: str, options: dict[str, Any]) -> bool:
    """Whether the model `name` built with `options` has a BatchNorm layer (train.bn_momentum acts)."""
    return _has_batch_norm(name, tuple(sorted(options.items())))


def build_model(name: str, num_classes: int = 10, **options) -> nn.Module:
    """The model `name` with the given architecture options; it returns logits (B, num_classes)."""
    check_options(name, options)
    if "stem" not in model_spec(name).options():
        options = {k: v for k, v in options.items() if k != "stem"}
    return model_spec(name).factory(num_classes=num_classes, **options)


# Importing the families registers them (order = listing order).
# isort: off
from cifar_ray.models import mlp, tutorial, vgg, googlenet, resnet, whitened  # noqa: E402,F401
# isort: on
