"""How long will a sweep take here: `python -m cifar_ray.sweep FILE --dry-run --estimate`.

Each distinct (model and its options, batch size, precision, memory format, augmentation) of the sweep
is timed for a few training steps and one evaluation batch on the device a trial would get on this
machine, with the threads a trial gets (resources.cpu), on synthetic images of CIFAR-10's shape (no
data is read or downloaded). Per trial: epochs x (training images / measured rate + validation images
/ measured rate + per-epoch bookkeeping). The sweep: trials placed in start order on the slots this
machine (or the connected cluster) has for their resource request, capped by max_concurrent_trials,
plus the fixed cost of starting Ray, loading the data from its cache, Tune's setup and shutdown.
Under ASHA the worst case (every trial to max_t) and the expected case (1/reduction_factor of the
trials continue at each rung) are both given.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Optional

from cifar_ray.config import TrialConfig, default
from cifar_ray.progress import duration
from cifar_ray.space import Domain, Space, first_candidate, format_value
from cifar_ray.sweep_config import SweepConfig

# Fixed costs of a local sweep on top of its trials, seconds: Ray's start, the driver loading the data
# from a warm cache and putting it in the object store, Tune's setup, the summary and Ray's shutdown.
# Measured on the 2-core development machine with the quickstart sweep (docs/performance.md).
FIXED_S = 10.0
TRIAL_START_S = 0.5  # a trial's start in a reused worker: config, data from the object store
EPOCH_OVERHEAD_S = 0.3  # per epoch: the checkpoint write, the report and the driver's bookkeeping
CIFAR10_TRAIN = 50_000  # training images of CIFAR-10 (and of an image-folder copy of it)
TIMED_IMAGES = 384  # images per timed pass, at least 3 steps
MAX_TRIAL_LINES = 20  # more trials than this: one line per distinct timing
SLOW_PASS_S = 2.0  # a first pass this slow is used as it is (no second, warm pass)
MAX_TIMED = 24  # distinct configurations timed at most; the others get the mean rate of those timed
TIMED_BATCH_CAP = 1024  # larger batches are timed at this size: the rate per image levels off well before it,
# and a full batch of 65,536 ResNet18 images needs tens of GB here
TIME_KEYS = ("model.", "train.batch_size", "train.amp", "train.channels_last", "train.compile", "data.augment",
             "train.eval_batch_size", "train.device")


@dataclass(frozen=True)
class Rate:
    label: str  # "netconv bs 64 fp32 on cpu"
    train_ips: float  # training images per second
    eval_ips: float
    build_s: float


def _timing_keys(space: Space) -> list[str]:
    return [k for k in space.values if k.startswith(TIME_KEYS)]


def _variants(space: Space, trials: Optional[list[dict]]) -> list[dict]:
    """The flat configs of the trials (a random space: each combination of time-relevant candidates
    once, or a seeded sample of MAX_TIMED of them where there are more)."""
    import random

    if trials is not None:
        return trials
    base = first_candidate(space)
    keys = [k for k in _timing_keys(space) if isinstance(space.values[k], Domain)]
    choices = [space.values[k].candidates() for k in keys]
    starts = [base | c for c in space.listed] or [dict(base)]  # each listed configuration
    if math.prod(len(c) for c in choices) * len(starts) > MAX_TIMED:
        rng = random.Random(0)
        return [rng.choice(starts) | {k: rng.choice(c) for k, c in zip(keys, choices, strict=True)}
                for _ in range(MAX_TIMED)]
    out = starts
    for key, candidates in zip(keys, choices, strict=True):
        out = [v | {key: c} for v in out for c in candidates]
    return out


def _signature(flat: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if k.startswith(TIME_KEYS)))


def split_sizes(cfg: TrialConfig) -> tuple[int, int]:
    """Training and validation images per epoch, without reading the data."""
    total = int(cfg.data.synthetic_size * 5 / 6) if cfg.data.source == "synthetic" else CIFAR10_TRAIN
    val = min(cfg.data.val_size, total - 1)
    train = total - val
    return (min(train, cfg.data.train_size) if cfg.data.train_size else train), val


def _precision(cfg: TrialConfig, device) -> str:
    import torch

    from cifar_ray.device import amp_dtype

    amp = amp_dtype(cfg.train.amp, device)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, str(amp))


def measure(flat: dict, threads: int) -> Rate:
    """Time a few training steps and one evaluation batch of this configuration here."""
    import torch

    from cifar_ray.data import make_synthetic
    from cifar_ray.device import select_device
    from cifar_ray.engine import Run

    cfg = TrialConfig.from_flat(flat)
    bs = min(cfg.train.batch_size, TIMED_BATCH_CAP)
    steps = max(3, math.ceil(TIMED_IMAGES / bs))
    val = min(cfg.train.eval_batch_size, TIMED_BATCH_CAP)
    size = math.ceil((bs * steps + val) * 6 / 5) + 12
    timing = cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"source": "synthetic", "synthetic_size": size, "val_size": val,
                                            "train_size": bs * steps}),
        "train": cfg.train.model_copy(update={"compile": False, "batch_size": bs, "eval_batch_size": val})})
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        device = select_device(cfg.train.device)
        dataset = make_synthetic(size, seed=0)
        t0 = time.perf_counter()
        run = Run.build(timing, dataset, device)
        build_s = time.perf_counter() - t0
        run.model.train()
        first = run.train_epoch()
        trained = first if first.seconds > SLOW_PASS_S else run.train_epoch()
        t0 = time.perf_counter()
        run.validate()
        eval_s = time.perf_counter() - t0
        if eval_s < SLOW_PASS_S:  # the first pass carried the warm-up: time a second one
            t0 = time.perf_counter()
            run.validate()
            eval_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous)
    name = cfg.model.name + "".join(f" {k}={format_value(v)}" for k, v in sorted(cfg.model.options().items()))
    augment = cfg.data.augment.model_dump(exclude_defaults=True)
    aug = f" augment {','.join(f'{k}={format_value(v)}' for k, v in augment.items())}" if augment else ""
    timed_at = f" (timed at {bs})" if bs < cfg.train.batch_size else ""
    label = f"{name} bs {cfg.train.batch_size}{timed_at}{aug} {_precision(cfg, device)} on {device.type}"
    return Rate(label, trained.images / trained.seconds, val / eval_s, build_s)


def slots(sweep: SweepConfig, space: Space, available: dict[str, float]) -> int:
    """Trials that run at once: what the machine's CPUs/GPUs fit of the largest request, capped by
    max_concurrent_trials. With no GPU at all, GPU requests are left out (timed as if on the CPU)."""
    from cifar_ray.cluster import requests_by_model

    fit: float = math.inf
    for req in requests_by_model(sweep, space).values():
        for res in ("cpu", "gpu"):
            if req.get(res) and (res == "cpu" or available.get("GPU")):
                fit = min(fit, math.floor(available.get(res.upper(), 0) / req[res] + 1e-9))
    fits = max(1, int(fit) if fit != math.inf else 1)
    return min(fits, sweep.max_concurrent_trials or fits)


def schedule(durations: list[float], n_slots: int) -> float:
    """Wall time of trials started in order on n_slots, each on the first free one."""
    free = [0.0] * max(1, n_slots)
    for d in durations:
        i = min(range(len(free)), key=free.__getitem__)
        free[i] += d
    return max(free) if durations else 0.0


def asha_epochs(n: int, max_t: int, grace: int, eta: float) -> list[int]:
    """Expected epochs of each of n trials under ASHA, longest first: every trial reaches the grace
    period, and of those at a rung 1 in eta continues to the next (rungs grace * eta^k below max_t)."""
    levels = []
    r = float(grace)
    while r < max_t:
        levels.append(int(r))
        r *= eta
    levels.append(max_t)
    epochs = []
    for i in range(n):
        reached = levels[0]
        for k in range(1, len(levels)):
            if i >= n / eta ** k:
                break
            reached = levels[k]
        epochs.append(reached)
    return epochs


def machine() -> dict[str, float]:
    """What this machine offers trials: its CPUs and CUDA GPUs."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def estimate(sweep: SweepConfig, space: Space, trials: Optional[list[dict]], n_trials: int,
             available: Optional[dict[str, float]] = None, where: str = "this machine") -> list[str]:
    """The estimate's lines; the last starts with `estimated wall time:`."""
    return estimate_epochs(sweep, space, trials, n_trials, available, where)[0]


def estimate_epochs(sweep: SweepConfig, space: Space, trials: Optional[list[dict]], n_trials: int,
                    available: Optional[dict[str, float]] = None,
                    where: str = "this machine") -> tuple[list[str], float]:
    """The estimate's lines and its mean seconds per epoch over the trials (the console's first ETA)."""
    from cifar_ray.cluster import requests_by_model
    from cifar_ray.device import trial_threads

    available = available or machine()
    requests = requests_by_model(sweep, space)
    default_model = next(iter(requests))
    lines = []
    rates: dict[tuple, Rate] = {}
    variants = _variants(space, trials)
    distinct = {_signature(flat): flat for flat in variants}
    for key, flat in list(distinct.items())[:MAX_TIMED]:
        req = requests.get(flat.get("model.name", default("model.name")), requests[default_model])
        rates[key] = measure(flat, trial_threads(req.get("cpu", 1)))
    gpu_asked = any(r.get("gpu") for r in requests.values())
    lines.append(f"measured here ({len(rates)} configurations, a few steps each, synthetic images):")
    lines += [f"  {r.label}: {r.train_ips:,.0f} img/s training, {r.eval_ips:,.0f} img/s evaluation"
              for r in rates.values()]
    if len(distinct) > len(rates):
        mean = Rate("mean", sum(r.train_ips for r in rates.values()) / len(rates),
                    sum(r.eval_ips for r in rates.values()) / len(rates),
                    sum(r.build_s for r in rates.values()) / len(rates))
        rates.update({key: mean for key in distinct if key not in rates})
        lines.append(f"  timed {MAX_TIMED} of {len(distinct)} distinct configurations (the estimate times at most "
                     f"{MAX_TIMED}); the others are given their mean rate")
    if gpu_asked and not available.get("GPU"):
        lines.append("  note: the trials ask for GPUs and there is none here; timed on this machine's device")

    def trial_seconds(flat: dict, epochs: Optional[int] = None) -> tuple[float, float]:
        cfg = TrialConfig.from_flat(flat)
        rate = rates[_signature(flat)]
        train, val = split_sizes(cfg)
        epoch = train / rate.train_ips + val / rate.eval_ips + EPOCH_OVERHEAD_S
        n = cfg.train.epochs if epochs is None else epochs
        return epoch, TRIAL_START_S + rate.build_s + n * epoch

    if trials is not None:
        per = [trial_seconds(t) for t in trials]
        shown: dict[tuple, list[int]] = {}  # many trials: one line per (configuration timed, epochs)
        for i, t in enumerate(trials, 1):
            shown.setdefault((_signature(t), t.get("train.epochs")) if len(trials) > MAX_TRIAL_LINES else (i,),
                             []).append(i)
        for ids in shown.values():
            epoch, total = per[ids[0] - 1]
            epochs = trials[ids[0] - 1].get("train.epochs", default("train.epochs"))
            who = f"trial {ids[0]:>3}" if len(ids) == 1 else f"{len(ids)} trials like trial {ids[0]}"
            lines.append(f"  {who}: {epochs} epochs x {epoch:.1f} s = {duration(total)}"
                         + (" each" if len(ids) > 1 else ""))
        flats = trials
        mean_epoch = sum(e for e, _ in per) / max(len(per), 1)
    else:  # a random space: every trial the mean of its time-relevant candidates
        mean_epoch = sum(trial_seconds(v)[0] for v in variants) / len(variants)
        mean_total = sum(trial_seconds(v)[1] for v in variants) / len(variants)
        combos = math.prod(len(space.values[k].candidates()) for k in _timing_keys(space)
                           if isinstance(space.values[k], Domain)) * (len(space.listed) or 1)
        over = (f"a seeded sample of {len(variants)} of the {combos:,} combinations of the searched model/batch "
                "candidates") if combos > len(variants) else "the searched model/batch candidates"
        lines.append(f"  each of {n_trials} trials (mean over {over}): {mean_epoch:.1f} s an epoch, "
                     f"{duration(mean_total)}")
        flats = [variants[i % len(variants)] for i in range(n_trials)]
    n_slots = slots(sweep, space, available)
    cpus = {r.get("cpu", 1) for r in requests.values()}
    gpus = {r.get("gpu", 0) for r in requests.values()}
    lines.append(f"{n_trials} trials, {n_slots} at a time ({where}: {available.get('CPU', 0):g} CPUs, "
                 f"{available.get('GPU', 0):g} GPUs; a trial asks cpu {'/'.join(map(format_value, sorted(cpus)))}"
                 + (f", gpu {'/'.join(map(format_value, sorted(gpus)))}" if any(gpus) else "")
                 + f"; max_concurrent_trials {sweep.max_concurrent_trials or 'none'})")
    worst = FIXED_S + schedule([trial_seconds(f)[1] for f in flats], n_slots)
    if sweep.scheduler.kind == "asha":
        s = sweep.scheduler
        max_t = s.max_t or max(int(TrialConfig.from_flat(f).train.epochs) for f in flats)
        expected_epochs = asha_epochs(len(flats), max_t, s.grace_period, s.reduction_factor)
        expected = FIXED_S + schedule([trial_seconds(f, e)[1] for f, e in zip(flats, expected_epochs, strict=True)],
                                      n_slots)
        lines.append(f"ASHA: worst case (every trial to {max_t} epochs) {duration(worst)}; expected (1 in "
                     f"{format_value(s.reduction_factor)} continues at each rung) {duration(expected)}")
        lines.append(f"estimated wall time: {duration(expected)} (expected; worst case {duration(worst)})")
    else:
        lines.append(f"estimated wall time: {duration(worst)} (including {FIXED_S:.0f} s to start Ray, load the "
                     "data and shut down)")
    return lines, mean_epoch
