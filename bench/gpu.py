"""GPU measurements for one prepared run (bench/gpu.sh calls this; --smoke runs tiny sizes on the CPU).

0. the fast recipes (sweeps/fast.yaml, sweeps/fast94.yaml): test accuracy (with their test-time views)
   and training seconds at several epoch counts and seeds;
1. the card's measured dense bf16 matmul rate (TFLOP/s);
2. one training epoch of resnet18, vgg16 and netconv (cifar stem, bf16 autocast, channels_last), with
   and without torch.compile, against the floor from their FLOPs (3x forward) at that rate;
   then the batch path alone (flip+crop, the seed's four) in images/s against resnet18's training rate;
3. seconds for resnet18 to reach the seed's 85.8% validation accuracy;
4. wall time of the seed's 20-trial resnet_grid, four trials per GPU (needs Ray).
Parts run in that order and the JSON is rewritten after each, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch
from pipeline import _forever_ours  # bench/ is on sys.path when run as bench/gpu.py
from pipeline import rate as batches_per_second

from cifar_ray import metrics as M
from cifar_ray.batches import DeviceImages
from cifar_ray.config import AUGMENT_PRESETS, AugmentConfig, TrialConfig
from cifar_ray.data import load_dataset, split_dataset
from cifar_ray.device import select_device
from cifar_ray.engine import fit
from cifar_ray.evaluation import evaluate_split
from cifar_ray.models import build_model
from cifar_ray.models.stats import forward_gflops
from cifar_ray.retrain import from_sweep_file

SEED_VAL_ACC = 0.858
PARTS = ("fast", "epochs", "batch_path", "seed_accuracy", "grid")
# epochs x seeds of each fast recipe: the curve that places each file's epoch count
FAST_RUNS = {"sweeps/fast.yaml": ((2, 3, 4, 5, 6), (0, 1, 2)), "sweeps/fast94.yaml": ((10, 16, 24), (0,))}


def matmul_tflops(device: torch.device, n: int, repeats: int) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def trial(model: str, data: dict, train: dict) -> TrialConfig:
    return TrialConfig.model_validate({"model": {"name": model}, "data": data, "train": train})


def fast_recipes(data: dict, ds, device: torch.device, smoke: bool) -> list[dict]:
    """Each fast recipe as its file gives it, at FAST_RUNS' epochs and seeds: test accuracy with the file's
    test-time views, validation accuracy after the last epoch, training and test-evaluation seconds."""
    rows = []
    for path, (epoch_counts, seeds) in FAST_RUNS.items():
        for epochs in epoch_counts[:1] if smoke else epoch_counts:
            for seed in seeds[:1] if smoke else seeds:
                sets = [f"train.epochs={1 if smoke else epochs}", f"train.seed={seed}", f"train.device={device}"]
                sets += [f"data.{k}={v}" for k, v in data.items() if k != "source"]
                cfg = from_sweep_file(path, None, sets, data["source"]).config
                _sync(device)
                t0 = time.perf_counter()
                result = fit(cfg, ds, device=device)
                _sync(device)
                train_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                test = evaluate_split(result.model, cfg, ds, "test", device)
                _sync(device)
                row = {"file": path, "epochs": cfg.train.epochs, "seed": seed, "val_acc": result.history[-1][M.VAL_ACC],
                       "test_acc": test.accuracy, "train_s": train_s, "test_s": time.perf_counter() - t0,
                       "epoch_s": [h[M.EPOCH_SECONDS] for h in result.history]}
                rows.append(row)
                print(f"{path} epochs {row['epochs']:>2} seed {seed}: test {test.accuracy:.4f} ({cfg.train.tta}), "
                      f"val {row['val_acc']:.4f}, train {train_s:.1f} s, test eval {row['test_s']:.1f} s", flush=True)
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def epoch_times(data: dict, ds, device: torch.device, smoke: bool, rate: float) -> list[dict]:
    batch = 64 if smoke else 512
    epochs = []
    for model in ("resnet18", "vgg16", "netconv"):
        gflops = forward_gflops(build_model(model))
        for compiled in (False, True):
            if compiled and device.type != "cuda":
                continue
            cfg = trial(model, data, {"epochs": 2 if not smoke else 1, "batch_size": batch, "lr": 0.05,
                                      "device": str(device), "compile": compiled})
            hist = fit(cfg, ds, device=device).history
            last = hist[-1]  # the second epoch: compilation and cuDNN autotuning are behind it
            n_train = len(split_dataset(ds, cfg.data).train_idx)
            train_s = n_train / last[M.IMAGES_PER_SECOND]
            floor = 3 * gflops * 1e9 * n_train / (rate * 1e12)
            row = {"model": model, "compile": compiled, "epoch_s": last[M.EPOCH_SECONDS], "train_s": train_s,
                   "floor_s": floor, "images_per_s": last[M.IMAGES_PER_SECOND], "peak_mb": last[M.PEAK_MEMORY_MB]}
            epochs.append(row)
            print(f"{model:<9} compile={compiled!s:<5} epoch {last[M.EPOCH_SECONDS]:.2f} s (train {train_s:.2f} s, "
                  f"floor {floor:.2f} s, {last[M.IMAGES_PER_SECOND]:.0f} img/s, peak {last[M.PEAK_MEMORY_MB]:.0f} MiB)",
                  flush=True)
    return epochs


def batch_path(data: dict, ds, device: torch.device, smoke: bool, training_rate: float) -> dict:
    """The batch path alone on the device (gather, augment, normalise): it must outrun training."""
    batch = 64 if smoke else 512
    split = split_dataset(ds, trial("netconv", data, {}).data)
    images = DeviceImages.create(ds.train_x, ds.train_y, split, device, channels_last=True)
    idx = torch.from_numpy(split.train_idx).to(device)
    out = {}
    for preset in ("flip_crop", "seed"):
        gen = torch.Generator(device=device).manual_seed(0)
        batches = _forever_ours(images, idx, batch, gen, AugmentConfig(**AUGMENT_PRESETS[preset]))
        per_s = batches_per_second(batches, device, 0.5 if smoke else 3.0, batch) * batch
        out[preset] = per_s
        print(f"batch path {preset}: {per_s:.0f} img/s, {per_s / training_rate:.1f}x resnet18's training rate",
              flush=True)
    return out


def seed_accuracy(data: dict, ds, device: torch.device, smoke: bool) -> dict:
    """Time to the seed's 85.8%: resnet18, flip+crop, one-cycle, label smoothing, bs 512."""
    batch = 64 if smoke else 512
    cfg = trial("resnet18", {**data, "augment": "flip_crop"},
                {"epochs": 1 if smoke else 16, "batch_size": batch, "optimizer": "sgd", "lr": 0.1,
                 "lr_reference_batch": 128, "momentum": 0.9,  # linear scaling: 0.4 at batch 512
                 "nesterov": True, "weight_decay": 5e-4, "schedule": "onecycle", "label_smoothing": 0.1,
                 "device": str(device)})
    t0, reached = time.perf_counter(), None

    def watch(m, _state):
        nonlocal reached
        if reached is None and m[M.VAL_ACC] >= SEED_VAL_ACC:
            reached = (m[M.EPOCH], time.perf_counter() - t0)

    hist = fit(cfg, ds, on_epoch=watch, device=device).history
    out = {"reached": reached, "final_val_acc": hist[-1][M.VAL_ACC], "seconds": time.perf_counter() - t0,
           "epochs": len(hist)}
    print(f"resnet18 to {SEED_VAL_ACC:.1%}: {reached} (epoch, s); final val_acc {hist[-1][M.VAL_ACC]:.4f}", flush=True)
    return out


def resnet_grid(data_arg: str, smoke: bool) -> dict:
    """The seed's grid, four trials per GPU, through the sweep CLI (Ray must be installed)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        print("resnet_grid: skipped (Ray is not installed here)", flush=True)
        return {"skipped": "ray not installed"}
    sets = ["--set", "wandb.mode=disabled", "--storage-path", "/tmp/cifar_ray_gpu_bench", "--name",
            f"grid_{int(time.time())}"]
    if smoke:
        sets += ["--data", "synthetic", "--set", "data.synthetic_size=1200", "--set", "data.val_size=200",
                 "--set", "train.epochs=1", "--set", "train.lr={grid: [0.005, 0.001]}", "--set", "train.momentum=0.5",
                 "--set", "resources.gpu=0", "--set", "resources.cpu=1"]
    else:
        sets += ["--data", data_arg, "--set", "resources.cpu=2"]
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "cifar_ray.sweep", "sweeps/resnet_grid.yaml", *sets],
                        env={**os.environ, "RAY_AIR_NEW_OUTPUT": "0"}).returncode
    out = {"seconds": time.perf_counter() - t0, "exit": rc}
    print(f"resnet_grid: {out['seconds']:.0f} s, exit {rc}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any device: proves the script runs")
    p.add_argument("--data", default="cifar10")
    p.add_argument("--out", default="gpu_results.json")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, in this order: {', '.join(PARTS)}")
    args = p.parse_args()
    parts = [x for x in PARTS if x in args.parts.split(",")]
    device = select_device("auto")
    smoke = args.smoke
    data = ({"source": "synthetic", "synthetic_size": 1200, "val_size": 200, "train_size": 512} if smoke
            else {"source": args.data, "val_size": 10_000})
    ds = load_dataset(trial("netconv", data, {}).data)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": name,
           "torch": torch.__version__, "smoke": smoke, "parts": parts}

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)

    rate = matmul_tflops(device, 256 if smoke else 8192, 3 if smoke else 50)
    out["matmul_tflops"] = rate
    print(f"{name}: dense {'bf16' if device.type == 'cuda' else 'fp32'} matmul {rate:.1f} TFLOP/s", flush=True)
    save()
    if "fast" in parts:
        out["fast"] = fast_recipes(data, ds, device, smoke)
        save()
    if "epochs" in parts:
        out["epochs"] = epoch_times(data, ds, device, smoke, rate)
        save()
    if "batch_path" in parts:
        fastest = max((r["images_per_s"] for r in out.get("epochs", []) if r["model"] == "resnet18"), default=1.0)
        out["batch_path"] = batch_path(data, ds, device, smoke, fastest)
        save()
    if "seed_accuracy" in parts:
        out["to_seed_accuracy"] = seed_accuracy(data, ds, device, smoke)
        save()
    if "grid" in parts:
        out["resnet_grid"] = resnet_grid(args.data, smoke)
        save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
