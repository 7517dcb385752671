"""The on-device batch path: the data set kept on the training device as uint8, batches gathered by
index, augmented and normalised there (airbench's layout; no DataLoader workers)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from cifar_ray.augment import augment, flip_crop
from cifar_ray.data import Split


@dataclass
class DeviceImages:
    """Images kept on the training device as uint8 (N, 3, 32, 32); batches are gathered by index,
    converted and normalised there. On the CPU the tensor shares memory with the numpy array."""

    x: torch.Tensor
    y: torch.Tensor
    mean: torch.Tensor  # (1, 3, 1, 1), [0, 1] scale
    std: torch.Tensor
    channels_last: bool = False
    # (x / 255 - mean) / std == x * scale - shift: one multiply and one subtract per uint8 batch
    scale: torch.Tensor = field(init=False)
    shift: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.scale, self.shift = 1 / (255 * self.std), self.mean / self.std

    @classmethod
    def create(cls, x: np.ndarray, y: np.ndarray, split: Split, device: torch.device, channels_last: bool):
        with warnings.catch_warnings():  # arrays from Ray's object store are read-only; we never write
            warnings.simplefilter("ignore", UserWarning)
            tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        mean = torch.tensor(split.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(split.std, device=device).view(1, 3, 1, 1)
        return cls(tx.to(device), ty.to(device), mean, std, channels_last)

    def batch(self, idx: torch.Tensor, augment_cfg=None, gen: Optional[torch.Generator] = None,
              flips: Optional[torch.Tensor] = None):
        """flips: the images to mirror (alternate_flip), indexed like the data set: (N,) bool."""
        x = self.x[idx]  # (B, 3, 32, 32) uint8
        if augment_cfg is not None and gen is None:
            raise ValueError("augmented batches draw from the run's generator: pass gen")
        flip = flips[idx] if flips is not None and augment_cfg is not None and augment_cfg.alternate_flip else None
        if augment_cfg is not None and gen is not None and (augment_cfg.hflip or augment_cfg.crop_padding
                                                            or flip is not None):
            x = flip_crop(x, augment_cfg.hflip, augment_cfg.crop_padding, gen, flip,  # on uint8: a quarter of the bytes
                          augment_cfg.crop_reflect)
        if augment_cfg is not None and gen is not None and augment_cfg.needs_float():
            x = augment(x.float().div_(255), augment_cfg, gen, flip_crop_done=True)  # on [0, 1]
            x = x.sub_(self.mean).div_(self.std)
        else:
            x = x.float().mul_(self.scale).sub_(self.shift)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.y[idx]

    def batches(self, idx: torch.Tensor, batch_size: int, *, gen: Optional[torch.Generator] = None,
                augment_cfg=None, flips: Optional[torch.Tensor] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches over idx; shuffled on the device when gen is given."""
        if gen is not None:
            idx = idx[torch.randperm(len(idx), generator=gen, device=idx.device)]
        for i in range(0, len(idx), batch_size):
            yield self.batch(idx[i:i + batch_size], augment_cfg, gen, flips)
