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
import time
from pathlib import Path

import numpy as np

from cifar_ray import metrics as M
from cifar_ray.config import DataConfig, TrialConfig
from cifar_ray.data import load_dataset


def private_mib() -> float:
    """This process's private memory (Private_Clean + Private_Dirty of smaps_rollup), MiB: what it holds
    that no other process shares. Pages of Ray's object store are shared, so they are not in it."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024


def run(mode: str, data_cfg: DataConfig, trials: int, epochs: int) -> dict:
    """mode 'shared': the data set through the object store (cifar_ray); 'per_trial': each trial loads
    it; 'none': shared, with a data set just large enough for the same split (7,000 training images), to
    measure what a trial process holds besides the data."""
    from ray import tune

    from cifar_ray.engine import fit

    def report(m, _state):
        tune.report({**{k: v for k, v in m.items() if k != M.VAL_CLASS_ACC}, "private_mib": private_mib()})

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
        # a small set with the same train/val sizes, so the same batches and activations
        data_cfg = DataConfig(source="synthetic", synthetic_size=8400, val_size=5000, train_size=2000)
        trial["data"] = data_cfg.model_dump()
    if mode in ("shared", "none"):
        trainable = tune.with_parameters(shared, dataset=load_dataset(data_cfg))
    else:
        trainable = per_trial
    trainable = tune.with_resources(trainable, {"cpu": 0.5})  # 4 trials at once on 2 cores
    # cifar_ray reuses trial processes (TuneConfig.reuse_actors, as cifar_ray.sweep does); Ray's
    # CIFAR example starts a process per trial.
    tuner = tune.Tuner(trainable, param_space={"trial": trial, "i": tune.grid_search(list(range(trials)))},
                       tune_config=tune.TuneConfig(max_concurrent_trials=4, reuse_actors=mode != "per_trial"),
                       run_config=tune.RunConfig(name=mode,
                                                 storage_path=f"/tmp/cifar_ray_bench/{mode}_{int(time.time())}",
                                                 verbose=0))
    grid = tuner.fit()
    firsts = [r.metrics_dataframe[M.SETUP_SECONDS].iloc[0] for r in grid]
    private = [r.metrics_dataframe["private_mib"].max() for r in grid]
    return {"first_step_s": float(np.median(firsts)), "first_step_max_s": float(np.max(firsts)),
            "private_mib": float(np.mean(private))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=os.environ.get("CIFAR_RAY_DATA", "synthetic"))
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no per-experiment banner
    import ray

    source = args.data if args.data in ("cifar10", "synthetic") else os.path.abspath(args.data)  # trials run elsewhere
    data_cfg = DataConfig(source=source, val_size=5000, train_size=2000, synthetic_size=60_000)
    ds = load_dataset(data_cfg)  # build the cache before timing anything
    one_copy = (ds.train_x.nbytes + ds.test_x.nbytes) / 2**20
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "cifar_ray.trainable.warm_worker"})
    print(f"data set: {len(ds.train_y) + len(ds.test_y)} images, one copy {one_copy:.0f} MiB; {args.trials} trials, "
          f"4 at once")
    rows = {mode: run(mode, data_cfg, args.trials, args.epochs) for mode in ("none", "per_trial", "shared")}
    base = rows.pop("none")["private_mib"]  # a trial process's private memory with a tiny data set
    print(f"private memory of a trial process without data: {base:.0f} MiB")
    print(f"{'approach':<24}{'first step median / max (s)':>29}{'data MiB, 4 trials':>20}{'copies':>8}")
    for mode, r in rows.items():
        label = "each trial loads data" if mode == "per_trial" else "cifar_ray object store"
        # 4 trials' private data, plus the one shared copy in the object store for cifar_ray
        data_mib = 4 * (r["private_mib"] - base) + (one_copy if mode == "shared" else 0)
        r["copies"] = data_mib / one_copy
        print(f"{label:<24}{r['first_step_s']:>17.2f} / "
              f"{r['first_step_max_s']:<9.2f}{data_mib:>20.0f}{r['copies']:>8.2f}")
    print(f"data memory, each-trial-loads / cifar_ray: {rows['per_trial']['copies'] / rows['shared']['copies']:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
