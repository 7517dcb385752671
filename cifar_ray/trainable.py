"""The Ray Tune trainable: the only place that calls tune.report and tune.get_checkpoint.

It turns Tune's flat config back into a TrialConfig, picks the device Ray granted, resumes from the
trial's checkpoint (falling back to an older one if the newest is damaged), runs the engine and
reports each epoch with a checkpoint.
"""
from __future__ import annotations

import logging
import math
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from cifar_ray import metrics as M
from cifar_ray.config import TrialConfig
from cifar_ray.data import Dataset
from cifar_ray.device import Grant, select_device, trial_threads
from cifar_ray.engine import fit, group_settings, load_state, save_state
from cifar_ray.files import scratch_folder
from cifar_ray.record import STATE_FILE, member_configs, member_id, member_state_file

MPS_TAG = "mps"  # custom resource a node advertises when its trials should use Apple's MPS


def warm_worker() -> None:
    """Ray worker_process_setup_hook: pay torch's one-time lazy imports (torch._dynamo, pulled in by the
    first optimizer, ~1.5 s) when the worker process starts rather than inside the first trial."""
    import torch._dynamo  # noqa: F401
    import torch.optim  # noqa: F401


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def ray_grant() -> Grant:
    """What Ray gave this trial: GPU ids (Ray sets CUDA_VISIBLE_DEVICES) or an `mps` tag."""
    import ray

    assigned = ray.get_runtime_context().get_assigned_resources()
    return Grant(gpu=bool(ray.get_gpu_ids()), mps=bool(assigned.get(MPS_TAG)))


def _checkpoint_state(checkpoint, warn: Callable[[str], None] = _stderr) -> Optional[dict]:
    """A trial's state: its checkpoint's one state file (_checkpoint_states)."""
    states = _checkpoint_states(checkpoint, warn, (STATE_FILE,))
    return states[0] if states else None


def _checkpoint_states(checkpoint, warn: Callable[[str], None], files: Sequence[str]) -> Optional[list[dict]]:
    """Load the trial's newest checkpoint state; when it is damaged, fall back to the newest readable
    older checkpoint of the same trial (Tune keeps `checkpoint.keep` of them) with a warning. `files`:
    the state files a checkpoint holds (a pack's: one per member), loaded in that order."""
    if checkpoint is None:
        return None
    newest = Path(checkpoint.path)
    older = sorted((p for p in newest.parent.glob("checkpoint_*") if p.name < newest.name), reverse=True)
    for folder in [newest, *older]:
        try:
            states = [load_state(folder / name) for name in files]
        except Exception as exc:  # missing, truncated or corrupt file
            warn(f"checkpoint {folder} is unreadable ({type(exc).__name__}); trying an older one")
            continue
        if folder != newest:
            warn(f"resuming from older checkpoint {folder.name} (epoch {max(s['epoch'] for s in states)})")
        return states
    warn("no readable checkpoint; the trial starts from scratch")
    return None


def _flat_metrics(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update({f"{k}/{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _setup(quiet: bool, pending: list[str]) -> Callable[[str], None]:
    """A trial's logging and threads; its warn(), which also queues the warning for the next report."""
    from ray import tune

    if quiet:  # Ray logs a line per saved and restored checkpoint
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(trial_threads(cpus))

    def warn(message: str) -> None:
        _stderr(message)  # the worker's log
        pending.append(message)
    return warn


def _where(device: torch.device) -> dict:
    """node: the node's address; host: the machine's name (m1-laptop on the lab), as trials() shows them."""
    import ray

    return {"node": ray.util.get_node_ip_address(), "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(), "device": str(device),
            "accelerator": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}


def _carry(flat: dict, pending: list[str]) -> None:
    if pending:
        flat[M.WARNINGS] = "; ".join(pending)
        pending.clear()


def run_trial(config: dict, dataset: Optional[Dataset] = None, checkpoint_every: int = 1, quiet: bool = True) -> None:
    """Tune function trainable; `dataset` arrives once through the object store (tune.with_parameters).
    W&B is written by the driver from what this reports (cifar_ray.callbacks), not here: Tune stops,
    pauses and reuses this worker without waiting for anything it runs to finish."""
    started_at = time.perf_counter()
    from ray import tune

    pending: list[str] = []  # warnings for the user, carried to the driver by the next report
    warn = _setup(quiet, pending)
    ctx = tune.get_context()
    cfg = TrialConfig.from_flat(config, where=f"trial {ctx.get_trial_id()}")
    device = select_device(cfg.train.device, ray_grant(), warn)
    resume = _checkpoint_state(tune.get_checkpoint(), warn)
    where = _where(device)

    def on_epoch(metrics: dict, make_state) -> None:
        flat = _flat_metrics(metrics) | where
        _carry(flat, pending)
        done = metrics[M.STATUS] != M.RUNNING
        if done:
            # The trial ends with this report: the scheduler is not asked about it (PBT would otherwise
            # clone a finished checkpoint into a trial that reports its end again, without end).
            flat["done"] = True
        if metrics[M.EPOCH] % checkpoint_every and not done:
            tune.report(flat)
            return
        with scratch_folder() as d:
            save_state(make_state(), Path(d) / STATE_FILE)
            tune.report(flat, checkpoint=tune.Checkpoint.from_directory(d))

    if resume is not None and resume.get("config", {}).get("train") != cfg.train.model_dump(mode="json"):
        resume = _adopt_new_hyperparameters(resume, cfg)
    fit(cfg, dataset, on_epoch=on_epoch, resume=resume, device=device, started_at=started_at)


def _adopt_new_hyperparameters(state: dict, cfg) -> dict:
    """PBT restarts a trial from another trial's checkpoint with mutated hyperparameters: keep the
    weights and optimizer moments but use the new lr, momentum and weight decay."""
    settings = group_settings(cfg.train)
    groups = state["optimizer"]["param_groups"]
    if len(groups) != len(settings):
        raise RuntimeError(f"PBT mutated the parameter groups of trial config (from {len(groups)} to "
                           f"{len(settings)}): do not mutate train.bias_lr_factor/bias_decay_factor to or from 1")
    for group, setting in zip(groups, settings, strict=True):
        group["lr"] = group["initial_lr"] = setting["lr"]
        group["weight_decay"] = setting["weight_decay"]
        if "momentum" in group:
            group["momentum"] = setting.get("momentum", cfg.train.momentum)  # Muon's group has its own
    if state.get("scheduler"):
        state["scheduler"]["base_lrs"] = [s["lr"] for s in settings]
    return state


def pack_summary(reports: list[dict], metric: str, mode: str) -> dict:
    """The pack's own figures for Tune (its metric check, the console): the best member's metric this
    epoch, the slowest member's epoch time, the members' images per second together. The record holds
    each member's own report (M.MEMBERS)."""
    values = [r[metric] for r in reports if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    best = (max if mode == "max" else min)(values) if values else math.nan
    return {metric: best, M.EPOCH_SECONDS: max(r.get(M.EPOCH_SECONDS, 0.0) for r in reports),
            M.IMAGES_PER_SECOND: sum(r.get(M.IMAGES_PER_SECOND, 0.0) for r in reports)}


def run_pack(config: dict, dataset: Optional[Dataset] = None, checkpoint_every: int = 1, quiet: bool = True,
             metric: str = M.VAL_ACC, mode: str = "max") -> None:
    """Tune function trainable of a fused sweep: one Tune trial trains a pack of members (cifar_ray.fuse)
    and reports, each epoch, every member's report under M.MEMBERS (the driver writes each member's
    record, cifar_ray.callbacks) with one checkpoint holding every member's state."""
    started_at = time.perf_counter()
    from ray import tune

    from cifar_ray.fuse import fit_pack

    pending: list[str] = []
    warn = _setup(quiet, pending)
    ctx = tune.get_context()
    pack_id = ctx.get_trial_id()
    members = member_configs(config) or []
    cfgs = [TrialConfig.from_flat(m, where=f"trial {member_id(pack_id, i)}") for i, m in enumerate(members)]
    device = select_device(cfgs[0].train.device, ray_grant(), warn)
    files = [member_state_file(i) for i in range(len(cfgs))]
    resume = _checkpoint_states(tune.get_checkpoint(), warn, files)
    where = _where(device)

    def on_epoch(epoch: int, reports: dict[int, dict], make_states) -> None:
        # the members that did not report this epoch left the pack before it: the pack ends with its last
        done = all(r[M.STATUS] != M.RUNNING for r in reports.values())
        flat = {M.EPOCH: epoch, M.STATUS: M.COMPLETED if done else M.RUNNING, **where,
                **pack_summary(list(reports.values()), metric, mode),
                M.MEMBERS: {member_id(pack_id, i): _flat_metrics(r) | where for i, r in reports.items()}}
        _carry(flat, pending)
        if done:
            flat["done"] = True
        ended = any(r[M.STATUS] != M.RUNNING for r in reports.values())
        if epoch % checkpoint_every and not ended:
            tune.report(flat)
            return
        with scratch_folder() as d:
            for name, state in zip(files, make_states(), strict=True):
                save_state(state, Path(d) / name)
            tune.report(flat, checkpoint=tune.Checkpoint.from_directory(d))

    fit_pack(cfgs, dataset, device, on_epoch=on_epoch, resume=resume, started_at=started_at)

