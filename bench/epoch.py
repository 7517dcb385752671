"""One training epoch per model, images per second: cifar_ray's engine against a plain PyTorch loop
fed by the seed's DataLoader pipeline (PIL images, transforms), same model, batch size and device.

    python bench/epoch.py [--models base,netconv,resnet18] [--data SOURCE] [--train-size 5000]
        [--large-train-size 640] [--batch-size 128] [--device auto] [--augment none]

Models above 0.1 forward GFLOPs per image (resnet18, vgg, inception) train on --large-train-size
images so that the CPU run stays short (resnet18's plain loop runs at ~50 img/s here).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from pipeline import SETS, PILDataset  # the same baseline pipeline as bench/pipeline.py

from cifar_ray import metrics as M
from cifar_ray.config import AUGMENT_PRESETS, TrialConfig
from cifar_ray.data import load_dataset, split_dataset
from cifar_ray.device import amp_dtype, select_device
from cifar_ray.engine import fit
from cifar_ray.models import build_model
from cifar_ray.models.stats import forward_gflops

LARGE_GFLOPS = 0.1  # forward GFLOPs per image above which a model counts as large


def baseline_epoch(name: str, ds, split, args, device) -> float:
    """Images per second of one epoch of the plain loop."""
    torch.manual_seed(0)
    model = build_model(name).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    transforms = next(t for _, (preset, t) in SETS.items() if preset == args.augment)
    loader = torch.utils.data.DataLoader(
        PILDataset(ds.train_x[split.train_idx], ds.train_y[split.train_idx],
                   T.Compose([*transforms, T.ToTensor(), T.Normalize(split.mean, split.std)])),
        batch_size=args.batch_size, shuffle=True, num_workers=args.workers, pin_memory=device.type == "cuda")
    model.train()
    seen, t0 = 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def data_config(args, train_size: int) -> dict:
    return {"source": args.data, "val_size": args.val_size, "train_size": train_size, "augment": args.augment}


def engine_epoch(name: str, ds, args, device, train_size: int, amp: str = "auto") -> float:
    cfg = TrialConfig.model_validate({
        "model": {"name": name},
        "data": data_config(args, train_size),
        "train": {"epochs": 1, "batch_size": args.batch_size, "lr": 0.01, "momentum": 0.9, "device": str(device),
                  "amp": amp}})
    return fit(cfg, ds, device=device).history[0][M.IMAGES_PER_SECOND]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="base,netconv,resnet18")
    p.add_argument("--data", default="synthetic")
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--large-train-size", type=int, default=640)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--augment", default="none", choices=[v[0] for v in SETS.values()])
    args = p.parse_args()
    assert args.augment in AUGMENT_PRESETS
    device = select_device(args.device)
    ds = load_dataset(TrialConfig.model_validate({"data": data_config(args, args.train_size)}).data)
    amp = amp_dtype("auto", device)
    print(f"device {device}, batch size {args.batch_size}, augment {args.augment}; plain loop: fp32, DataLoader with "
          f"{args.workers} workers; cifar_ray: {'bf16 autocast' if amp else 'fp32'}"
          f"{', channels_last' if device.type in ('cuda', 'cpu') else ''}")
    # the fp32 column separates what the data path and channels_last give from what bf16 gives
    print(f"{'model':<10}{'images':>8}{'plain loop img/s':>18}{'cifar_ray fp32':>16}{'cifar_ray img/s':>17}"
          f"{'ratio':>9}")
    for name in args.models.split(","):
        size = args.large_train_size if forward_gflops(build_model(name)) > LARGE_GFLOPS else args.train_size
        split = split_dataset(ds, TrialConfig.model_validate({"data": data_config(args, size)}).data)
        base = baseline_epoch(name, ds, split, args, device)
        fp32 = engine_epoch(name, ds, args, device, size, amp="off") if amp else None
        ours = engine_epoch(name, ds, args, device, size)
        print(f"{name:<10}{len(split.train_idx):>8}{base:>18.0f}{f'{fp32:.0f}' if fp32 else '-':>16}{ours:>17.0f}"
              f"{ours / base:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
