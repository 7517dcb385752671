"""Where `python -m cifar_ray.train --from` finds its one configuration: a sweep file (its only trial,
or the N-th of the dry run's list) or a results folder (a trial of a finished sweep, by id). No Ray here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cifar_ray import metrics as M
from cifar_ray.config import ConfigError, TrialConfig, default
from cifar_ray.device import trial_threads
from cifar_ray.files import printable
from cifar_ray.record import find_trial
from cifar_ray.space import build_space, expand_grid, flatten, format_value
from cifar_ray.sweep_config import apply_overrides, read_sweep


@dataclass
class Chosen:
    """One configuration to train, where it came from, and what a results folder recorded for it."""

    config: TrialConfig
    label: str  # "sweeps/fast.yaml" or "results/x trial 1a2b3_00004"
    threads: Optional[int] = None  # the CPU threads the recorded trial had (resources.cpu)
    recorded: list[dict] = field(default_factory=list)  # the trial's reports, one per epoch
    warnings: list[str] = field(default_factory=list)
    provenance: Optional[dict] = None  # the folder's provenance.json ({} when it kept none); None for a file
    device: Optional[str] = None  # the device the recorded trial trained on


def from_source(path: str, trial: Optional[str], sets: list[str], data: Optional[str]) -> Chosen:
    if Path(path).is_dir():
        return from_results(path, trial, sets, data)
    return from_sweep_file(path, trial, sets, data)


def from_sweep_file(path: str, trial: Optional[str], sets: list[str], data: Optional[str]) -> Chosen:
    """The sweep file's single configuration, or its `trial`-th (1-based, as `--dry-run` numbers them)."""
    sweep = read_sweep(path, sets, data)
    space = build_space(sweep, path)
    trials = expand_grid(space, sweep)
    if trials is None:
        raise ConfigError(f"{path}: its trials are drawn at random when the sweep runs ({sweep.search.kind} search), "
                          "so no list exists to pick from; fix the searched keys with --set KEY=VALUE, or run the "
                          "sweep and retrain one of its trials with --from RESULTS_DIR --trial ID")
    if trial is None:
        if len(trials) > 1:
            raise ConfigError(f"{path}: describes {len(trials)} trials; pick one with --trial N (1-{len(trials)}; "
                              f"python -m cifar_ray.sweep {path} --dry-run lists them)")
        n = 1
    else:
        if not trial.isdigit() or not 1 <= int(trial) <= len(trials):
            raise ConfigError(f"--trial {trial}: {path} has trials 1-{len(trials)} "
                              f"(python -m cifar_ray.sweep {path} --dry-run lists them)")
        n = int(trial)
    flat = trials[n - 1]
    shown = "  ".join(f"{k}={format_value(flat[k])}" for k in space.searched_keys())
    label = path if len(trials) == 1 else f"{path} trial {n}/{len(trials)}: {shown}"
    return Chosen(TrialConfig.from_flat(flat, where=path), label)


def from_results(folder: str, trial: Optional[str], sets: list[str], data: Optional[str]) -> Chosen:
    """A trial of a sweep's results folder with the configuration it ran with, its recorded reports and
    the threads it had, so training it again here repeats it (on the CPU, epoch for epoch)."""
    from cifar_ray import analysis

    try:
        sweep = analysis.load(folder)
        records = [r for r in sweep.records() if r.config]
    except analysis.AnalysisError as err:
        raise ConfigError(str(err)) from None
    if not records:
        raise ConfigError(f"{folder}: no trial has started yet; nothing to retrain")
    rec = _pick(records, trial, folder)
    flat = {k: v for k, v in rec.config.items() if k.split(".")[0] in ("model", "data", "train")}
    try:
        flat = analysis.local_data(flat, data, rec.trial_id)
    except analysis.AnalysisError as err:
        raise ConfigError(str(err)) from None
    flat = _override(flat, sets)
    stored = sweep.stored()
    warnings = []
    if (stored.get("scheduler") or {}).get("kind") == "pbt":
        warnings.append(f"trial {printable(rec.trial_id)} ran under PBT, which changed its hyperparameters and "
                        "weights during the sweep; this trains its last configuration from scratch, "
                        "not the recorded run")
    by_model = stored.get("resources_by_model") or {}
    name = flat.get("model.name", default("model.name"))
    cpu = (by_model.get(name) or stored.get("resources") or {}).get("cpu", 1)
    threads = trial_threads(cpu if isinstance(cpu, (int, float)) else 1)
    rows = _by_epoch(rec.rows)
    label = f"{printable(folder)} trial {printable(rec.trial_id)}"  # a folder's ids are never printed raw
    cfg = TrialConfig.from_flat(flat, where=label)
    device = next((r.get("device") for r in reversed(rows) if isinstance(r.get("device"), str)), None)
    return Chosen(cfg, label, threads, rows, warnings, sweep.provenance(), device)


def _pick(records, trial: Optional[str], folder: str):
    ids = [printable(r.trial_id) for r in records]
    if trial is None:
        if len(records) == 1:
            return records[0]
        raise ConfigError(f"{folder}: {len(records)} trials; pick one with --trial ID: {', '.join(ids)}")
    found = find_trial(records, trial)
    if len(found) != 1:
        what = "matches several trials" if found else "is not a trial of it"
        raise ConfigError(f"--trial {printable(trial)}: {what} in {folder}; its trials: {', '.join(ids)}")
    return found[0]


def _by_epoch(rows) -> list[dict]:
    """One report per epoch, the later one where an epoch was reported twice (a retried epoch)."""
    out: dict[int, dict] = {}
    for row in rows:
        if isinstance(row.get(M.EPOCH), int):
            out[row[M.EPOCH]] = row
    return [out[e] for e in sorted(out)]


def _override(flat: dict, sets: list[str]) -> dict:
    """The --set KEY=VALUE overrides applied to a flat config."""
    tree = apply_overrides({}, sets)
    for section, value in tree.items():
        flat = flat | (flatten(value, section) if isinstance(value, dict) else {section: value})
    return flat
