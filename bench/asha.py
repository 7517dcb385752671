"""FIFO against ASHA on real data: netconv on 10,000 training images, the same 16-configuration
lr x momentum grid run twice; best validation accuracy and total epochs trained.

    python bench/asha.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--epochs 6]

Target: ASHA within 1 point of the grid's best with at most 40% of its epochs.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

from cifar_ray import analysis
from cifar_ray.sweep import main as sweep


def sweep_file(folder: Path, name: str, data: str, epochs: int, scheduler: dict) -> str:
    doc = {"name": name, "metric": "val_acc", "mode": "max", "model": {"name": "netconv"},
           "data": {"source": data, "train_size": 10_000, "val_size": 5_000},
           "train": {"epochs": epochs, "batch_size": 128, "optimizer": "sgd",
                     "lr": {"grid": [0.1, 0.05, 0.01, 0.001]}, "momentum": {"grid": [0, 0.5, 0.9, 0.99]}},
           "scheduler": scheduler, "resources": {"cpu": 1}, "checkpoint": {"keep": 1}, "wandb": {"mode": "disabled"}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=os.environ.get("CIFAR_RAY_DATA", "../shared/data/cifar10-jpeg.tar.gz"))
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    data = os.path.abspath(args.data)
    folder = Path(tempfile.mkdtemp(prefix="cifar_ray_asha_"))
    rows = {}
    for name, scheduler in (("fifo", {"kind": "fifo"}),
                            ("asha", {"kind": "asha", "grace_period": 1, "reduction_factor": 3})):
        t0 = time.perf_counter()
        rc = sweep([sweep_file(folder, name, data, args.epochs, scheduler), "--storage-path", str(folder / "results")])
        trials = analysis.load(folder / "results" / name).trials()
        rows[name] = {"exit": rc, "best": trials["best_val_acc"].max(), "epochs": int(trials["epochs"].sum()),
                      "seconds": time.perf_counter() - t0, "trials": len(trials)}
    print(f"\nnetconv, 10,000 training images, 16 configurations, up to {args.epochs} epochs each")
    print(f"{'scheduler':<10}{'best val_acc':>13}{'epochs trained':>16}{'wall s':>9}")
    for name, r in rows.items():
        print(f"{name:<10}{r['best']:>13.4f}{r['epochs']:>16}{r['seconds']:>9.0f}")
    f, a = rows["fifo"], rows["asha"]
    print(f"ASHA: {100 * (a['best'] - f['best']):+.2f} points against the grid's best, "
          f"{a['epochs'] / f['epochs']:.0%} of its epochs, {a['seconds'] / f['seconds']:.0%} of its wall time")


if __name__ == "__main__":
    main()
