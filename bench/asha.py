"""FIFO against ASHA on real data: netconv on 10,000 training images, the same 16-configuration
lr x momentum grid run twice; best validation accuracy and total epochs trained.

    python bench/asha.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--epochs 8]
        [--grace-period 1] [--reduction-factor 4]

Target: ASHA within 1 point of the grid's best with at most 40% of its epochs.

ASHA's saving depends on the order trials arrive in (cifar_ray shuffles a grid under ASHA with
search.seed, 0 here). After the two runs the script also replays the FIFO run's recorded curves
through Ray's own ASHA rung rule in 100 other shuffled orders (two trials at a time, equal epoch
times): a replay, not a run, printed as such, to show how typical the measured order is.
"""
from __future__ import annotations

import argparse
import heapq
import os
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

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
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--grace-period", type=int, default=1)
    p.add_argument("--reduction-factor", type=float, default=4)
    p.add_argument("--only", choices=("fifo", "asha"), help="run one of the two sweeps (to study it; prints no ratio)")
    args = p.parse_args()
    data = os.path.abspath(args.data)
    folder = Path(tempfile.mkdtemp(prefix="cifar_ray_asha_"))
    rows = {}
    schedulers = {"fifo": {"kind": "fifo"},
                  "asha": {"kind": "asha", "grace_period": args.grace_period,
                           "reduction_factor": args.reduction_factor}}
    for name, scheduler in schedulers.items():
        if args.only and name != args.only:
            continue
        t0 = time.perf_counter()
        rc = sweep([sweep_file(folder, name, data, args.epochs, scheduler), "--storage-path", str(folder / "results")])
        trials = analysis.load(folder / "results" / name).trials()
        rows[name] = {"exit": rc, "best": trials["best_val_acc"].max(), "epochs": int(trials["epochs"].sum()),
                      "seconds": time.perf_counter() - t0, "trials": len(trials)}
    print(f"\nnetconv, 10,000 training images, 16 configurations, up to {args.epochs} epochs each")
    print(f"{'scheduler':<10}{'best val_acc':>13}{'epochs trained':>16}{'wall s':>9}")
    for name, r in rows.items():
        print(f"{name:<10}{r['best']:>13.4f}{r['epochs']:>16}{r['seconds']:>9.0f}")
    print(f"results: {folder / 'results'}")
    if args.only:
        return
    f, a = rows["fifo"], rows["asha"]
    print(f"ASHA: {100 * (a['best'] - f['best']):+.2f} points against the grid's best, "
          f"{a['epochs'] / f['epochs']:.0%} of its epochs, {a['seconds'] / f['seconds']:.0%} of its wall time")
    curves = [list(c) for _, c in analysis.load(folder / "results" / "fifo").curves().groupby("trial_id")["val_acc"]]
    print_replay(curves, args)


def replay(curves: list[list[float]], order: list[int], args, concurrent: int = 2) -> tuple[float, int]:
    """(best val_acc, epochs) of ASHA on recorded curves: Ray's _Bracket decides, trials arrive in
    `order`, `concurrent` at a time, every epoch takes the same time."""
    from ray.tune.schedulers.async_hyperband import _Bracket

    bracket = _Bracket(args.grace_period, args.epochs, args.reduction_factor, 0)
    pending, running, epochs, best, clock = list(order), [], 0, -1.0, 0
    for k in range(min(concurrent, len(pending))):
        heapq.heappush(running, (1.0 + k * 1e-3, pending.pop(0), 1))
    while running:
        clock, i, epoch = heapq.heappop(running)
        epochs, best = epochs + 1, max(best, curves[i][epoch - 1])
        trial = SimpleNamespace(trial_id=str(i))  # the bracket reads only trial_id
        if bracket.on_result(trial, epoch, curves[i][epoch - 1]) == "CONTINUE" and epoch < args.epochs:
            heapq.heappush(running, (clock + 1, i, epoch + 1))
        elif pending:
            heapq.heappush(running, (clock + 1, pending.pop(0), 1))
    return best, epochs


def print_replay(curves: list[list[float]], args, orders: int = 100) -> None:
    if any(len(c) < args.epochs for c in curves):
        return  # a FIFO trial ended early (diverged): no full curve to replay
    grid_best, total = max(max(c) for c in curves), len(curves) * args.epochs
    fractions, within = [], 0
    for seed in range(1, orders + 1):
        order = list(range(len(curves)))
        random.Random(seed).shuffle(order)
        best, epochs = replay(curves, order, args)
        fractions.append(epochs / total)
        within += best >= grid_best - 0.01
    fractions.sort()
    print(f"replay of the FIFO curves (not a run) in {orders} other shuffled orders: epochs "
          f"median {fractions[orders // 2]:.0%}, 90th percentile {fractions[int(orders * 0.9)]:.0%}, "
          f"max {fractions[-1]:.0%}; within 1 point of the grid's best in {within} of {orders}")


if __name__ == "__main__":
    main()
