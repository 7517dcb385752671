"""Augmented training batches per second: cifar_ray's device-resident batch path against the seed's
pipeline (torchvision DataLoader over PIL images with transforms), same data, batch size, device.

    python bench/pipeline.py [--data SOURCE] [--batch-size 128] [--device cpu] [--seconds 8]

Prints one row per augmentation set and the ratio; target on a 2-core CPU: at least 10x for each.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from cifar_ray.batches import DeviceImages
from cifar_ray.config import AUGMENT_PRESETS, AugmentConfig, DataConfig
from cifar_ray.data import load_dataset, split_dataset
from cifar_ray.device import select_device

SETS = {
    "none": ("none", []),
    "flip+crop": ("flip_crop", [T.RandomHorizontalFlip(), T.RandomCrop(32, padding=4)]),
    "seed's four": ("seed", [T.RandomHorizontalFlip(), T.RandomRotation(10), T.RandomPerspective(0.2),
                             T.ColorJitter(0.2, 0.2, 0.2, 0.05)]),
}


class PILDataset(torch.utils.data.Dataset):
    """The seed's way: one PIL image per item, transformed on a CPU worker."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.x[i].transpose(1, 2, 0))), int(self.y[i])


def rate(batches, device: torch.device, seconds: float, batch_size: int) -> float:
    """Batches per second over `seconds`, after two warm-up batches; each batch lands on `device`."""
    it = iter(batches)
    for _ in range(2):
        next(it)
    n, t0 = 0, time.perf_counter()
    for x, _y in it:
        x = x.to(device, non_blocking=True)
        n += 1
        if time.perf_counter() - t0 > seconds:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="synthetic")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline (the seed used 2)")
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args()
    device = select_device(args.device)
    cfg = DataConfig(source=args.data, val_size=1000, synthetic_size=12_000)
    ds = load_dataset(cfg)
    split = split_dataset(ds, cfg)
    images = DeviceImages.create(ds.train_x, ds.train_y, split, device, channels_last=device.type == "cuda")
    idx = torch.from_numpy(split.train_idx).to(device)
    normalize = T.Normalize(split.mean, split.std)
    print(f"device {device}, batch size {args.batch_size}, {len(idx)} training images, "
          f"baseline DataLoader with {args.workers} workers, torch threads {torch.get_num_threads()}")
    print(f"{'augmentation':<14}{'DataLoader+PIL b/s':>20}{'cifar_ray b/s':>16}{'ratio':>9}")
    for name, (preset, transforms) in SETS.items():
        # ours first: the baseline's worker processes must not be running while ours is timed
        aug = AugmentConfig(**AUGMENT_PRESETS[preset])
        gen = torch.Generator(device=device).manual_seed(0)
        ours_batches = _forever_ours(images, idx, args.batch_size, gen, aug if aug.enabled() else None)
        # median of three slices: this shared 2-core VM has moments when a neighbour takes a core
        ours = statistics.median(rate(ours_batches, device, args.seconds / 3, args.batch_size) for _ in range(3))
        loader = torch.utils.data.DataLoader(
            PILDataset(ds.train_x[split.train_idx], ds.train_y[split.train_idx],
                       T.Compose([*transforms, T.ToTensor(), normalize])),
            batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True,
            pin_memory=device.type == "cuda")
        batches = _forever(loader)
        base = rate(batches, device, args.seconds, args.batch_size)
        del batches, loader  # shuts the workers down before the next set times ours
        gc.collect()
        time.sleep(1)
        print(f"{name:<14}{base:>20.1f}{ours:>16.1f}{ours / base:>8.1f}x", flush=True)


def _forever(loader):
    while True:
        yield from loader


def _forever_ours(images, idx, batch_size, gen, aug):
    while True:
        yield from images.batches(idx, batch_size, gen=gen, augment_cfg=aug)


if __name__ == "__main__":
    main()
