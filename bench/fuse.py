"""Fused trials against separate ones: training images/s of one pack of K (cifar_ray.fuse) against the
same K configurations trained as separate trials, on the same device, in one run.

    python bench/fuse.py [--model M] [--batch-size B] [--k K] [--device cpu|cuda] [--threads T]
        [--steps S] [--slots N]
    python bench/fuse.py --leave M [--model M] [--batch-size B] [--k K] ...

Separate trials run as the sweep runs them: each in its own process, `--slots` at a time (on the CPU
the number of cores, as Ray places `cpu: 1` trials; on a GPU 4, as `gpu: 0.25` does), the threads
shared out (T / slots each), waiting at a start line so that the processes of one wave train together;
their rate is all their images over the sum of each wave's longest training time. The pack trains in
this process with all T threads. Both time the second of two epochs of S steps (the first warms up),
on synthetic data; members differ in learning rate, momentum and seed. Ends with
`fused/separate: R.RRx`. With no --model/--batch-size/--k, a table for netconv and resnet18 at batch
10, 32, 128 and K = 1, 2, 4, 8, 20 (long on a CPU).

--leave M: whether dropping members that left a pack pays. In one pack of K, M members leave after the
first epoch; the K - M that stay train two epochs with the wide network kept at K (those M fed zeros)
and two with it rebuilt at K - M (Pack.narrow), in that order, the second of each timed. Ends with
`narrowed/kept: R.RRx`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def configs(model: str, batch: int, k: int, steps: int, device: str) -> list[dict]:
    base = {"model": {"name": model},
            "data": {"source": "synthetic", "synthetic_size": batch * steps + 100, "val_size": 100},
            "train": {"epochs": 2, "batch_size": batch, "optimizer": "sgd", "device": device, "amp": "off",
                      "eval_batch_size": 100}}
    return [{**base, "train": {**base["train"], "lr": 0.01 * (1 + i % 5), "momentum": (0.0, 0.5, 0.9)[i % 3],
                               "seed": i}} for i in range(k)]


def train_seconds(docs: list[dict], device: str) -> tuple[int, float]:
    """(training images, seconds) of the second epoch: one run alone, or a pack of several."""
    import torch

    from cifar_ray.config import TrialConfig
    from cifar_ray.data import load_dataset
    from cifar_ray.engine import Run
    from cifar_ray.fuse import Pack

    cfgs = [TrialConfig.model_validate(d) for d in docs]
    dataset = load_dataset(cfgs[0].data)
    dev = torch.device(device)
    if len(cfgs) == 1 and os.environ.get("FUSE_BENCH_ALONE"):
        run = Run.build(cfgs[0], dataset, dev)
        run.model.train()
        run.train_epoch()
        _wait_at_start_line()
        trained = run.train_epoch()
        return trained.images, trained.seconds
    pack = Pack.build(cfgs, dataset, dev)
    pack.train_epoch()
    results = pack.train_epoch()
    return sum(r.images for r in results if r), max(r.seconds for r in results if r)


def _wait_at_start_line() -> None:
    line = os.environ.get("FUSE_BENCH_LINE")
    if not line:
        return
    Path(line, f"ready-{os.getpid()}").touch()
    want = int(os.environ["FUSE_BENCH_WAVE"])
    while len(list(Path(line).glob("ready-*"))) < want:
        time.sleep(0.01)  # a start line, not a timing: the wave's processes begin training together


def separate(docs: list[dict], device: str, threads: int, slots: int) -> tuple[int, float]:
    images, seconds = 0, 0.0
    per = max(1, threads // slots)
    for start in range(0, len(docs), slots):
        wave = docs[start:start + slots]
        with tempfile.TemporaryDirectory() as line:
            env = {**os.environ, "FUSE_BENCH_ALONE": "1", "FUSE_BENCH_LINE": line, "FUSE_BENCH_WAVE": str(len(wave)),
                   "OMP_NUM_THREADS": str(per)}
            procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(d), "--device", device,
                                       "--threads", str(per)], env=env, stdout=subprocess.PIPE, text=True)
                     for d in wave]
            outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        images += sum(o["images"] for o in outs)
        seconds += max(o["seconds"] for o in outs)
    return images, seconds


def compare(model: str, batch: int, k: int, device: str, threads: int, slots: int, steps: int) -> float:
    import torch

    torch.set_num_threads(threads)
    docs = configs(model, batch, k, steps, device)
    fi, fs = train_seconds(docs, device)
    si, ss = separate(docs, device, threads, slots)
    fused, apart = fi / fs, si / ss
    print(f"{model:9s} batch {batch:4d} K {k:3d}: fused {fused:9.1f} img/s, separate {apart:9.1f} img/s "
          f"({slots} at a time), {fused / apart:5.2f}x", flush=True)
    return fused / apart


def leave_compare(model: str, batch: int, k: int, leave: int, device: str, threads: int, steps: int) -> float:
    import torch

    from cifar_ray.config import TrialConfig
    from cifar_ray.data import load_dataset
    from cifar_ray.fuse import Pack

    torch.set_num_threads(threads)
    cfgs = [TrialConfig.model_validate(d) for d in configs(model, batch, k, steps, device)]
    pack = Pack.build(cfgs, load_dataset(cfgs[0].data), torch.device(device))
    pack.train_epoch()
    for i in range(k - leave, k):
        pack.leave(i)
    rates = {}
    for narrows in (False, True):
        pack.narrows = narrows
        pack.train_epoch()  # the first at this width warms up (a rebuilt network's first steps)
        results = [r for r in pack.train_epoch() if r]
        rates[narrows] = sum(r.images for r in results) / max(r.seconds for r in results)
    print(f"{model:9s} batch {batch:4d} K {k:3d}, {leave} left: kept at K {rates[False]:9.1f} img/s, narrowed to "
          f"K {k - leave} {rates[True]:9.1f} img/s, {rates[True] / rates[False]:5.2f}x", flush=True)
    return rates[True] / rates[False]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--slots", type=int, help="separate trials at a time (default: the cores on a CPU, 4 on a GPU)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--leave", type=int, help="members that leave the pack after its first epoch (see above)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.leave:
        k = a.k or 8
        if not 0 < a.leave < k:
            p.error(f"--leave {a.leave}: must be 1 to K - 1 ({k - 1})")
        ratio = leave_compare(a.model or "netconv", a.batch_size or 10, k, a.leave, a.device, a.threads, a.steps)
        print(f"narrowed/kept: {ratio:.2f}x")
        return
    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        images, seconds = train_seconds([json.loads(a.worker)], a.device)
        print(json.dumps({"images": images, "seconds": seconds}))
        return
    slots = a.slots or (4 if a.device == "cuda" else a.threads)
    if a.model or a.batch_size or a.k:
        ratio = compare(a.model or "netconv", a.batch_size or 10, a.k or 8, a.device, a.threads, slots, a.steps)
        print(f"fused/separate: {ratio:.2f}x")
        return
    for model in ("netconv", "resnet18"):
        for batch in (10, 32, 128):
            for k in (1, 2, 4, 8, 20):
                compare(model, batch, k, a.device, a.threads, slots, a.steps)


if __name__ == "__main__":
    main()
