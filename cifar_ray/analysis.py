"""Sweep results as DataFrames and Parquet: read a results folder (finished, running or interrupted)
as data only (JSON, YAML, Parquet, weights-only checkpoints), without Ray, the trainable or a cluster.

    from cifar_ray import analysis
    sweep = analysis.load("results/quickstart")
    sweep.trials(); sweep.curves(); sweep.best()
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from cifar_ray import metrics as M
from cifar_ray.files import atomic_write
from cifar_ray.record import (  # the record's names, importable from here as before
    CURVES_FILE,
    ERROR_FILE,
    HISTORY_FILE,
    JOURNAL_FILE,
    OUTCOME_FILE,
    PARAMS_FILE,
    PROVENANCE_FILE,
    RESULT_FILE,
    STATE_FILE,
    STATE_GLOB,
    SWEEP_FILE,
    TRIALS_FILE,
    TUNE_ROW_KEYS,
    AnalysisError,
    TrialRecord,
    ended_status,
    find_trial,
    read_json,
    read_rows,
    read_stored_sweep,
    read_text,
    read_trials,
    tune_outcome,
    tune_states,
)

_tune_states = tune_states  # its earlier name (the record's readers moved to cifar_ray.record)

# Picks of a running trial's best checkpoint before evaluate gives up: each pick lists the checkpoints
# there are now, so a second fails only if Tune removed that one too within the same moment
CHECKPOINT_PICKS = 5

__all__ = ["load", "Sweep", "BestTrial", "AnalysisError", "ranked", "write_parquet", "local_data", "read_stored_sweep",
           "read_trials", "read_rows", "read_text", "TrialRecord", "ended_status", "tune_outcome", "SWEEP_FILE",
           "TRIALS_FILE", "CURVES_FILE", "OUTCOME_FILE", "HISTORY_FILE", "RESULT_FILE", "PARAMS_FILE", "ERROR_FILE",
           "JOURNAL_FILE", "STATE_FILE", "STATE_GLOB", "TUNE_ROW_KEYS", "PROVENANCE_FILE"]


@dataclass(frozen=True)
class BestTrial:
    trial_id: str
    score: float  # the metric that made it best
    config: dict  # the sweep file's keys
    metrics: dict  # its row of trials()
    checkpoint: Optional[Path]  # its best retained checkpoint folder


def ranked(df: pd.DataFrame, column: str, mode: str) -> pd.DataFrame:
    """Trials best first by `column` (NaN last); equal scores go to the lowest trial id, the
    earliest-made trial. The one rule for ties: best(), the summary, the report and refine use it."""
    return df.sort_values([column, "trial_id"], ascending=[mode == "min", True], na_position="last", kind="stable",
                          ignore_index=True)


def _best(values: pd.Series, mode: str) -> float:
    finite = pd.to_numeric(values, errors="coerce").dropna()
    finite = finite[finite.map(math.isfinite)]
    if finite.empty:
        return math.nan
    return float(finite.max() if mode == "max" else finite.min())


@dataclass
class Sweep:
    """A results folder, read afresh at each call (a running sweep keeps growing)."""

    path: Path
    metric: str
    mode: str

    def records(self) -> list[TrialRecord]:
        return read_trials(self.path)

    def trials(self, aggregate: bool = False) -> pd.DataFrame:
        """One row per trial: id, status, config (the sweep file's key names), final and best metrics,
        epochs run, seconds, node (address), host (hostname), device, error."""
        if aggregate:
            return self.trials_aggregated()
        rows = []
        records = self.records()
        fused = any(rec.pack for rec in records)
        for rec in records:
            last = rec.last
            curve = pd.DataFrame(list(rec.rows))
            if M.EPOCH in curve:  # an epoch reported again (a retry repeats the epoch in flight): the later stands
                curve = curve.drop_duplicates(M.EPOCH, keep="last")
            row: dict[str, Any] = {"trial_id": rec.trial_id, "status": rec.status}
            row.update(rec.config)
            for m in M.EPOCH_METRICS:
                row[m] = last.get(m, math.nan)
            row[f"best_{self.metric}"] = _best(curve[self.metric], self.mode) if self.metric in curve else math.nan
            row["epochs"] = int(last.get(M.EPOCH, 0) or 0)
            row["seconds"] = float(last.get("time_total_s", math.nan))
            for k in ("node", "host", "node_id", "node_type", "device", "accelerator"):
                row[k] = last.get(k)  # node_type: the autoscaler node type; None on a plain Ray
            row["error"] = rec.error
            if fused:
                row["pack"] = rec.pack  # resources.fuse: the pack the trial trained in
            rows.append(row)
        return pd.DataFrame(rows).sort_values("trial_id", ignore_index=True) if rows else pd.DataFrame(rows)

    def trials_aggregated(self) -> pd.DataFrame:
        """One row per configuration (trials that differ only in train.seed): mean, std and count."""
        df = self.trials()
        keys = [c for c in df.columns if "." in c and c != "train.seed"]
        values = [m for m in (*M.EPOCH_METRICS, f"best_{self.metric}", "epochs", "seconds") if m in df]
        if df.empty:
            return df
        grouped = df.groupby([df[k].astype(str) for k in keys], dropna=False)[values]
        out = grouped.agg(["mean", "std", "count"])
        out.columns = [f"{m}_{stat}" for m, stat in out.columns]
        out = out.reset_index()
        # the groupby keys were stringified to group None/NaN safely: restore the original values
        firsts = df.groupby([df[k].astype(str) for k in keys], dropna=False)[keys].first().reset_index(drop=True)
        out[keys] = firsts[keys]
        return out.sort_values(f"best_{self.metric}_mean", ascending=self.mode == "min", ignore_index=True)

    def best(self, metric: Optional[str] = None, mode: Optional[str] = None, scope: str = "all") -> "BestTrial":
        """The best trial by metric: scope "all" compares each trial's best epoch, "last" its final
        epoch. Trials whose metric is NaN never win; a tie goes to the lowest trial id (ranked())."""
        metric, mode = metric or self.metric, mode or self.mode
        if scope not in ("all", "last"):
            raise AnalysisError(f"scope: {scope!r} is not one of all, last")
        if mode not in ("max", "min"):
            raise AnalysisError(f"mode: {mode!r} is not one of max, min")
        df = self.trials()
        curves = self.curves()
        if metric not in M.EPOCH_METRICS and metric not in curves:  # per-class accuracies are in the curves
            reported = [c for c in curves.columns if c in M.EPOCH_METRICS or c.startswith(M.VAL_CLASS_ACC + "/")]
            raise AnalysisError(f"metric: {metric!r} is not a reported metric; reported: "
                                f"{', '.join(reported or M.EPOCH_METRICS)}")
        if scope == "all":
            by_trial = curves.groupby("trial_id")[metric] if metric in curves else None
            score = by_trial.agg(lambda v: _best(v, mode)) if by_trial is not None else pd.Series()
        else:
            score = df.set_index("trial_id")[metric] if metric in df else pd.Series()
        score = pd.to_numeric(score, errors="coerce").dropna()
        score = score[score.map(math.isfinite)]
        if score.empty:
            raise AnalysisError(f"{self.path}: no trial has reported a finite {metric} yet")
        trial_id = ranked(score.rename("score").rename_axis("trial_id").reset_index(), "score", mode).loc[0, "trial_id"]
        row = df.set_index("trial_id").loc[trial_id]
        # The trial's own keys as it recorded them: plain Python values (json.dump takes them), and no
        # NaN for a key other trials had and this one did not (a key where it does not act)
        config = {k: v for k, v in self._record(trial_id).config.items() if "." in k}
        ckpt = self._best_checkpoint(trial_id, metric, mode, curves)
        return BestTrial(trial_id, float(score[trial_id]), config, row.to_dict(), ckpt)

    def checkpoints(self, trial_id: str) -> list[tuple[Path, int]]:
        """(folder, epoch) of every checkpoint the trial still has; links and damaged files are skipped."""
        from cifar_ray.engine import load_state

        rec = self._record(trial_id)
        out = []
        for ckpt in sorted(rec.folder.glob("checkpoint_*")) if rec.folder else []:
            state_file = ckpt / STATE_FILE
            if ckpt.is_symlink() or state_file.is_symlink() or not state_file.is_file():
                continue
            try:
                out.append((ckpt, int(load_state(state_file)["epoch"])))  # weights_only=True
            except Exception:  # a damaged checkpoint is skipped, not fatal
                continue
        return out

    def _best_checkpoint(self, trial_id: str, metric: str, mode: str,
                         curves: Optional[pd.DataFrame] = None) -> Optional[Path]:
        ckpts = self.checkpoints(trial_id)
        if not ckpts:
            return None
        curve = self.curves() if curves is None else curves
        curve = curve[curve["trial_id"] == trial_id].set_index(M.EPOCH)
        scored = [(curve[metric].get(epoch, math.nan) if metric in curve else math.nan, path) for path, epoch in ckpts]
        finite = [(v, p) for v, p in scored if isinstance(v, (int, float)) and math.isfinite(v)]
        if not finite:
            return ckpts[-1][0]
        return (max if mode == "max" else min)(finite, key=lambda t: t[0])[1]

    def _record(self, trial_id: str) -> TrialRecord:
        """The trial `trial_id` names: its id, its folder's name or the unique end of its id (find_trial)."""
        records = self.records()
        found = find_trial(records, trial_id)
        if len(found) == 1:
            return found[0]
        if found:
            raise AnalysisError(f"{trial_id!r} names several trials in {self.path}: "
                                f"{', '.join(r.trial_id for r in found)}; give more of the id")
        raise AnalysisError(f"no trial {trial_id!r} in {self.path} (a trial id, its folder's name or the id's "
                            f"unique end); trials: {', '.join(r.trial_id for r in records)}")

    def evaluate(self, trial_id: Optional[str] = None, split: str = "test", data: Optional[str] = None,
                 device: Optional[str] = None):
        """Load the trial's best checkpoint (weights_only) and evaluate it on `split` (test or val).
        trial_id defaults to the best trial. The data is this machine's: `data`, else the sweep's
        cifar10 or synthetic source, else $CIFAR_RAY_DATA; paths stored in the folder are never used."""
        import torch

        from cifar_ray.config import TrialConfig, device_name
        from cifar_ray.data import load_dataset
        from cifar_ray.device import select_device
        from cifar_ray.evaluation import evaluate_split
        from cifar_ray.models import build_model

        if split not in ("test", "val"):
            raise AnalysisError(f"split: {split!r} is not one of test, val")
        try:
            device_name(device or "auto")
        except ValueError as err:
            raise AnalysisError(f"device: {err}") from None
        if trial_id is None:
            best = self.best()
            trial_id, ckpt = best.trial_id, best.checkpoint
        else:
            ckpt = self._best_checkpoint(trial_id, self.metric, self.mode)
        rec = self._record(trial_id)
        state = self._load_checkpoint(trial_id, ckpt)
        cfg = TrialConfig.from_flat(local_data(rec.config, data, trial_id), where=f"trial {trial_id}")
        dev = select_device(device or "auto")
        dataset = load_dataset(cfg.data)
        model = build_model(cfg.model.name, num_classes=len(dataset.classes), **cfg.model.options())
        model.load_state_dict(state["model"])
        model.to(dev)
        with torch.no_grad():
            return evaluate_split(model, cfg, dataset, split, dev)

    def _load_checkpoint(self, trial_id: str, ckpt: Optional[Path]) -> dict:
        """The state saved in `ckpt`, the trial's best checkpoint when it was picked. A running sweep's
        Tune removes a checkpoint that drops out of the best `checkpoint.keep` at any moment, so one
        gone by the time it is read is picked again from those the trial has then."""
        from cifar_ray.engine import load_state

        for _ in range(CHECKPOINT_PICKS):
            if ckpt is None:
                break
            try:
                return load_state(ckpt / STATE_FILE)  # an open file stays readable after Tune removes it
            except FileNotFoundError:
                ckpt = self._best_checkpoint(trial_id, self.metric, self.mode)
        if ckpt is None:
            raise AnalysisError(f"trial {trial_id} has no checkpoint to evaluate")
        raise AnalysisError(f"trial {trial_id}: its checkpoints were removed as fast as they were read "
                            f"({CHECKPOINT_PICKS} tries); evaluate it again, or once the sweep has ended")

    def curves(self) -> pd.DataFrame:
        """Long format: one row per trial and epoch, every per-epoch metric. Where a trial reported an
        epoch again (a retry or resume repeats the epoch in flight), the later report stands."""
        frames = []
        for rec in self.records():
            df = pd.DataFrame(list(rec.rows))
            if df.empty or M.EPOCH not in df:
                continue
            cols = [M.EPOCH, *[c for c in df.columns if c in M.EPOCH_METRICS or c.startswith(M.VAL_CLASS_ACC + "/")],
                    *[c for c in ("status", "time_total_s") if c in df]]
            part = df[cols].drop_duplicates(M.EPOCH, keep="last").copy()
            part.insert(0, "trial_id", rec.trial_id)
            frames.append(part)
        if not frames:
            return pd.DataFrame(columns=["trial_id", M.EPOCH])
        return pd.concat(frames, ignore_index=True).sort_values(["trial_id", M.EPOCH], ignore_index=True)

    def stored(self) -> dict:
        """The sweep file as the sweep stored it (sweep.yaml, through the guarded YAML reader); {} when
        absent or unreadable."""
        try:
            return read_stored_sweep(self.path)
        except AnalysisError:
            return {}

    def driver(self) -> Optional[str]:
        """The sweep driver running on the folder now (its lock, cifar_ray.driver_lock), as `pid 4242 on
        host vm since 2026-12-05 18:13:45 UTC`; None when none is. With `unfinished` trials, None means the
        sweep was interrupted (its `--resume` continues it); with a driver, they are running or pending."""
        from cifar_ray.driver_lock import running_driver

        return running_driver(self.path)

    def provenance(self) -> dict:
        """What made the folder (provenance.json): `commit`, `dirty`, `changed`, `versions` (cifar_ray, torch,
        torchvision, ray, wandb, optuna, numpy, pydantic, python), `at`, `driver_host`, `platform`, and
        `resumed`, one such entry per --resume. {} for a folder written before provenance was kept.
        Per trial, `trials()` has the host and device it ran on."""
        doc = read_json(self.path / PROVENANCE_FILE)
        return doc if isinstance(doc, dict) else {}

    def domains(self) -> dict:
        """The searched keys' domains (cifar_ray.space.Domain) from the stored sweep file, seeds as a grid."""
        from cifar_ray.space import stored_domains

        return stored_domains(self.stored())

    def importance(self, method: str = "ped_anova") -> pd.DataFrame:
        """key, importance (sums to 1, highest first), method: how much each searched key explains the
        trials' best metric. PED-ANOVA by default; "fanova" needs scikit-learn. ValueError when the
        sweep has fewer than two keys each with 4 finished trials where it acts (cifar_ray.applies) and two
        values or more there."""
        from cifar_ray.insight import importance

        return importance(self.trials(), self.domains(), self.metric, self.mode, method)

    def compare(self) -> pd.DataFrame:
        """A row per configuration (searched keys without train.seed): mean, std, n, ci_low, ci_high
        (95%) of the trials' best metric and p_vs_best (Welch's t-test against the best by mean)."""
        from cifar_ray.insight import compare

        return compare(self.trials(), self.domains(), self.metric, self.mode)

    def early_vs_final(self) -> pd.DataFrame:
        """A row per epoch: epoch, spearman (rank correlation of the metric then with the final one,
        over trials that reached the last epoch), n. See stopped_early() for ASHA/PBT sweeps."""
        from cifar_ray.insight import early_vs_final

        return early_vs_final(self.curves(), self.metric)

    def stopped_early(self) -> pd.DataFrame:
        """ASHA/PBT: each trial the scheduler stopped beside the eventual best at the same epoch;
        `contender` marks one that was at least as good then (it may have been cut too soon)."""
        from cifar_ray.insight import stopped_early

        return stopped_early(self.trials(), self.curves(), self.metric, self.mode)

    def to_parquet(self, out: str | os.PathLike) -> tuple[Path, Path]:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        return write_parquet(self.trials(), out / TRIALS_FILE), write_parquet(self.curves(), out / CURVES_FILE)


def local_data(config: dict, data: Optional[str], trial_id: str) -> dict:
    """A stored trial config with this machine's data settings: the folder's cache and download
    paths are dropped, and a source that is a path is replaced by `data` or $CIFAR_RAY_DATA."""
    from cifar_ray.data import ENV_DATA

    out = {k: v for k, v in config.items() if k not in ("data.cache_dir", "data.data_dir")}
    stored = out.get("data.source", "cifar10")
    if data is not None:
        out["data.source"] = data
    elif stored not in ("cifar10", "synthetic"):
        if not os.environ.get(ENV_DATA):
            raise AnalysisError(f"trial {trial_id} was trained on a local path; a results folder does not choose "
                                f"what is read here: pass the data (--data SOURCE, or data=...) or set {ENV_DATA}")
        out["data.source"] = "cifar10"  # resolved from $CIFAR_RAY_DATA by the data layer
    return out


def as_json_mappings(df: pd.DataFrame) -> pd.DataFrame:
    """Config columns holding a mapping (an augment policy) with their cells as JSON text. Parquet has
    no type for "a policy's name or a mapping of any keys": pyarrow refuses a column that mixes the two
    (a grid of [flip_crop, {hflip: 0.5}]), and stores mappings of different keys as one struct whose
    absent keys read back as null ({alternate_flip: true} became {..., hflip: None}), a value the
    schema refuses. `json.loads` gives the mapping back; a name stays plain text."""
    import json

    keys = [c for c in df.columns if str(c).split(".", 1)[0] in ("model", "data", "train")
            and df[c].map(lambda v: isinstance(v, dict)).any()]
    if not keys:
        return df
    return df.assign(**{c: df[c].map(lambda v: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v)
                        for c in keys})


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    """Write through pyarrow to a new temporary file, then rename: readers never see half a file and
    a link at `path` is replaced, not written through."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(as_json_mappings(df), preserve_index=False)
    return atomic_write(path, lambda f: pq.write_table(table, f))


def load(path: str | os.PathLike, metric: Optional[str] = None, mode: Optional[str] = None) -> Sweep:
    """Open a sweep folder (`<storage>/<name>`); metric and mode default to the sweep file's. Only
    plain JSON, YAML (safe_load, size- and alias-bounded), Parquet and weights-only checkpoints are
    read: opening a folder from someone else runs none of its content."""
    p = Path(path)
    if not p.is_dir():
        raise AnalysisError(f"{path}: no such folder")
    stored_text = read_text(p / SWEEP_FILE)
    if stored_text is None and not list(p.glob(STATE_GLOB)):
        raise AnalysisError(f"{path}: not a sweep folder (no {SWEEP_FILE} or experiment_state-*.json); "
                            "expected <storage>/<name>")
    for state in p.glob(STATE_GLOB):
        if state.is_symlink():
            raise AnalysisError(f"{state} is a symbolic link; a results folder holds plain files only "
                                "(refusing to follow it)")
    stored = read_stored_sweep(p) if stored_text is not None else {}
    metric = metric or stored.get("metric", M.VAL_ACC)
    mode = mode or stored.get("mode", "max")
    if metric not in M.EPOCH_METRICS or mode not in ("max", "min"):
        raise AnalysisError(f"{p / SWEEP_FILE}: metric {metric!r} / mode {mode!r} are not a reported metric and "
                            "max/min")
    return Sweep(p.resolve(), metric, mode)
