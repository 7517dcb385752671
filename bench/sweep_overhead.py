"""Sweep overhead on a local Ray: seconds from trial start to its first training step, and host
memory taken by the data set while 4 trials run at once, against the approach of Ray's own CIFAR
example (each trial loads the data set itself).

    python bench/sweep_overhead.py [--data SOURCE] [--trials 8]

Targets: first step within 2 s of trial start once the data is cached; 4 concurrent trials share one
copy of the data (their combined data memory at most 1.3x one copy).
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import numpy as np

from cifar_ray import metrics as M
from cifar_ray.config import DataConfig, TrialConfig
from cifar_ray.data import load_dataset


def used_mib() -> float:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) / 1024


class Sampler:
    """Host memory in use, every 0.2 s, in a thread."""

    def __init__(self):
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.values.append(used_mib())
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(mode: str, data_cfg: DataConfig, trials: int, epochs: int) -> dict:
    """mode 'shared': the data set through the object store (cifar_ray); 'per_trial': each trial loads
    it; 'none': shared, but a tiny data set, to measure what the trial processes take without data."""
    import ray
    from ray import tune

    from cifar_ray.train import fit

    def report(m, _state):
        tune.report({k: v for k, v in m.items() if k != M.VAL_CLASS_ACC})

    def per_trial(config):
        t0 = time.perf_counter()
        ds = load_dataset(data_cfg)  # from the decoded cache, as Ray's example loads torchvision's CIFAR10
        fit(TrialConfig.model_validate(config["trial"]), ds, on_epoch=report, started_at=t0)

    def shared(config, dataset=None):
        t0 = time.perf_counter()
        fit(TrialConfig.model_validate(config["trial"]), dataset, on_epoch=report, started_at=t0)

    trial = {"model": {"name": "base"}, "data": data_cfg.model_dump(),
             "train": {"epochs": epochs, "batch_size": 256, "device": "cpu"}}
    if mode == "none":
        data_cfg = DataConfig(source="synthetic", synthetic_size=600, val_size=100)
        trial["data"] = data_cfg.model_dump()
    if mode in ("shared", "none"):
        trainable = tune.with_parameters(shared, dataset=load_dataset(data_cfg))
    else:
        trainable = per_trial
    trainable = tune.with_resources(trainable, {"cpu": 0.5})  # 4 trials at once on 2 cores
    base = used_mib()
    with Sampler() as s:
        tuner = tune.Tuner(trainable, param_space={"trial": trial, "i": tune.grid_search(list(range(trials)))},
                           tune_config=tune.TuneConfig(max_concurrent_trials=4, reuse_actors=False),
                           run_config=tune.RunConfig(storage_path=f"/tmp/cifar_ray_bench/{mode}_{int(time.time())}",
                                                     verbose=0))
        grid = tuner.fit()
    firsts = [r.metrics_dataframe[M.SETUP_SECONDS].iloc[0] for r in grid]
    return {"first_step_s": float(np.median(firsts)), "first_step_max_s": float(np.max(firsts)),
            "peak_extra_mib": max(s.values) - base}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=os.environ.get("CIFAR_RAY_DATA", "synthetic"))
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    import ray

    data_cfg = DataConfig(source=args.data, val_size=5000, train_size=2000, synthetic_size=60_000)
    ds = load_dataset(data_cfg)  # build the cache before timing anything
    one_copy = (ds.train_x.nbytes + ds.test_x.nbytes) / 2**20
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"data set: {len(ds.train_y) + len(ds.test_y)} images, one copy {one_copy:.0f} MiB; {args.trials} trials, "
          f"4 at once")
    rows = {mode: run(mode, data_cfg, args.trials, args.epochs) for mode in ("none", "per_trial", "shared")}
    base = rows.pop("none")["peak_extra_mib"]  # 4 trial processes with no real data
    print(f"trial processes alone (tiny data): {base:.0f} MiB")
    print(f"{'approach':<24}{'first step median / max (s)':>29}{'data memory MiB':>17}{'copies':>8}")
    for mode, r in rows.items():
        label = "each trial loads data" if mode == "per_trial" else "cifar_ray object store"
        data_mib = r["peak_extra_mib"] - base
        r["copies"] = data_mib / one_copy
        print(f"{label:<24}{r['first_step_s']:>17.2f} / {r['first_step_max_s']:<9.2f}{data_mib:>17.0f}{r['copies']:>8.2f}")
    print(f"data memory ratio, each-trial-loads / shared: {rows['per_trial']['copies'] / rows['shared']['copies']:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
