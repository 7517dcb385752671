"""Sweep results as DataFrames and Parquet: read a Tune experiment folder (finished, running or
interrupted) without the trainable or a running cluster.

    from cifar_ray import analysis
    sweep = analysis.load("results/quickstart")
    sweep.trials(); sweep.curves(); sweep.best()
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from cifar_ray import metrics as M

SWEEP_FILE = "sweep.yaml"
TRIALS_FILE = "trials.parquet"
CURVES_FILE = "curves.parquet"

# Outcome of a trial as the user reads it.
ERRORED = "errored"
STOPPED = "stopped"  # stopped early by the scheduler (ASHA)
UNFINISHED = "unfinished"  # pending, running or paused: an interrupted or running sweep
FINISHED_OK = (M.COMPLETED, M.DIVERGED, M.EARLY_STOPPED, STOPPED)


@dataclass(frozen=True)
class BestTrial:
    trial_id: str
    score: float  # the metric that made it best
    config: dict  # the sweep file's keys
    metrics: dict  # its row of trials()
    checkpoint: Optional[Path]  # its best retained checkpoint folder


class AnalysisError(ValueError):
    """A path that is not a sweep, an unknown trial, a trial without a checkpoint."""


def trial_status(tune_status: str, last: Optional[dict], has_error: bool = False) -> str:
    """The user's outcome of a trial. Tune's last state snapshot can lag behind a final error, so an
    error file beside a trial that did not terminate also means errored."""
    if tune_status == "ERROR" or (has_error and tune_status != "TERMINATED"):
        return ERRORED
    reported = (last or {}).get(M.STATUS)
    if tune_status == "TERMINATED":
        if reported in (M.COMPLETED, M.DIVERGED, M.EARLY_STOPPED):
            return reported
        return STOPPED if reported == M.RUNNING else M.COMPLETED
    return UNFINISHED


def _error_text(trial) -> Optional[str]:
    """The last line of the trial's error.txt (Tune writes it in the trial folder), if any."""
    path = Path(trial.storage.trial_fs_path) / "error.txt"
    if not path.exists():
        return None
    lines = [ln for ln in Path(path).read_text(errors="replace").strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else None


def _best(values: pd.Series, mode: str) -> float:
    finite = pd.to_numeric(values, errors="coerce").dropna()
    finite = finite[finite.map(math.isfinite)]
    if finite.empty:
        return math.nan
    return float(finite.max() if mode == "max" else finite.min())


@dataclass
class Sweep:
    path: Path
    metric: str
    mode: str
    _analysis: Any

    def trials(self, aggregate: bool = False) -> pd.DataFrame:
        """One row per trial: id, status, config (the sweep file's key names), final and best metrics,
        epochs run, seconds, node/device, error."""
        if aggregate:
            return self.trials_aggregated()
        rows = []
        for trial in self._analysis.trials:
            last = trial.last_result or {}
            curve = self._curve(trial)
            error = _error_text(trial)
            row: dict[str, Any] = {"trial_id": trial.trial_id,
                                   "status": trial_status(trial.status, last, error is not None)}
            row.update({k: v for k, v in trial.config.items()})
            for m in M.EPOCH_METRICS:
                row[m] = last.get(m, math.nan)
            row[f"best_{self.metric}"] = _best(curve[self.metric], self.mode) if self.metric in curve else math.nan
            row["epochs"] = int(last.get(M.EPOCH, 0) or 0)
            row["seconds"] = float(last.get("time_total_s", math.nan))
            for k in ("node", "node_id", "device", "accelerator"):
                row[k] = last.get(k)
            row["error"] = error
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
        epoch. Trials whose metric is NaN never win."""
        metric, mode = metric or self.metric, mode or self.mode
        if scope not in ("all", "last"):
            raise AnalysisError(f"scope: {scope!r} is not one of all, last")
        df = self.trials()
        curves = self.curves()
        if scope == "all":
            score = curves.groupby("trial_id")[metric].agg(lambda v: _best(v, mode)) if metric in curves else pd.Series()
        else:
            score = df.set_index("trial_id")[metric] if metric in df else pd.Series()
        score = pd.to_numeric(score, errors="coerce").dropna()
        score = score[score.map(math.isfinite)]
        if score.empty:
            raise AnalysisError(f"{self.path}: no trial has reported a finite {metric} yet")
        trial_id = score.idxmax() if mode == "max" else score.idxmin()
        row = df.set_index("trial_id").loc[trial_id]
        config = {k: v for k, v in row.items() if "." in k}
        ckpt = self._best_checkpoint(trial_id, metric, mode, curves)
        return BestTrial(trial_id, float(score[trial_id]), config, row.to_dict(), ckpt)

    def checkpoints(self, trial_id: str) -> list[tuple[Path, int]]:
        """(folder, epoch) of every checkpoint the trial still has."""
        from cifar_ray.train import load_state

        trial = self._trial(trial_id)
        folder = Path(trial.storage.trial_fs_path)
        out = []
        for ckpt in sorted(folder.glob("checkpoint_*")):
            state_file = ckpt / "state.pt"
            if state_file.exists():
                try:
                    out.append((ckpt, int(load_state(state_file)["epoch"])))
                except Exception:  # noqa: BLE001 - a damaged checkpoint is skipped, not fatal
                    continue
        return out

    def _best_checkpoint(self, trial_id: str, metric: str, mode: str,
                         curves: Optional[pd.DataFrame] = None) -> Optional[Path]:
        ckpts = self.checkpoints(trial_id)
        if not ckpts:
            return None
        curve = self.curves() if curves is None else curves
        curve = curve[curve["trial_id"] == trial_id].drop_duplicates(M.EPOCH, keep="last").set_index(M.EPOCH)
        scored = [(curve[metric].get(epoch, math.nan) if metric in curve else math.nan, path) for path, epoch in ckpts]
        finite = [(v, p) for v, p in scored if isinstance(v, (int, float)) and math.isfinite(v)]
        if not finite:
            return ckpts[-1][0]
        return (max if mode == "max" else min)(finite, key=lambda t: t[0])[1]

    def _trial(self, trial_id: str):
        for trial in self._analysis.trials:
            if trial.trial_id == trial_id:
                return trial
        known = ", ".join(t.trial_id for t in self._analysis.trials)
        raise AnalysisError(f"no trial {trial_id!r} in {self.path}; trials: {known}")

    def evaluate(self, trial_id: Optional[str] = None, split: str = "test", data: Optional[str] = None,
                 device: Optional[str] = None):
        """Load the trial's best checkpoint (weights_only) and evaluate it on `split` (test or val).
        trial_id defaults to the best trial; data overrides the data source (another machine)."""
        import torch

        from cifar_ray.config import trial_config
        from cifar_ray.data import load_dataset
        from cifar_ray.models import build_model
        from cifar_ray.space import unflatten
        from cifar_ray.train import evaluate_split, load_state, select_device

        if trial_id is None:
            best = self.best()
            trial_id, ckpt = best.trial_id, best.checkpoint
        else:
            ckpt = self._best_checkpoint(trial_id, self.metric, self.mode)
        trial = self._trial(trial_id)
        if ckpt is None:
            raise AnalysisError(f"trial {trial_id} has no checkpoint to evaluate")
        state = load_state(ckpt / "state.pt")
        nested = unflatten(dict(trial.config))
        if data is not None:
            nested.setdefault("data", {})["source"] = data
        cfg = trial_config(nested, where=f"trial {trial_id}")
        dev = select_device(device or "auto")
        dataset = load_dataset(cfg.data)
        model = build_model(cfg.model.name, num_classes=len(dataset.classes), **cfg.model.options())
        model.load_state_dict(state["model"])
        model.to(dev)
        with torch.no_grad():
            return evaluate_split(model, cfg, dataset, split, dev)

    def curves(self) -> pd.DataFrame:
        """Long format: one row per trial and epoch, every per-epoch metric."""
        frames = []
        for trial in self._analysis.trials:
            trial_id, df = trial.trial_id, self._curve(trial)
            if df.empty or M.EPOCH not in df:
                continue
            cols = [M.EPOCH, *[c for c in df.columns if c in M.EPOCH_METRICS or c.startswith(M.VAL_CLASS_ACC + "/")],
                    *[c for c in ("status", "time_total_s") if c in df]]
            part = df[cols].copy()
            part.insert(0, "trial_id", trial_id)
            frames.append(part)
        if not frames:
            return pd.DataFrame(columns=["trial_id", M.EPOCH])
        return pd.concat(frames, ignore_index=True).sort_values(["trial_id", M.EPOCH], ignore_index=True)

    def _curve(self, trial) -> pd.DataFrame:
        """The trial's per-epoch results. Tune re-copies result.json from storage when it restarts a
        trial (PBT pauses, retries), and a copy taken before the last sync loses rows; the trial's
        last result, kept in the experiment state, restores a missing final epoch."""
        df = self._analysis.trial_dataframes.get(trial.trial_id, pd.DataFrame())
        last = trial.last_result or {}
        if M.EPOCH in last and (df.empty or M.EPOCH not in df or last[M.EPOCH] > df[M.EPOCH].max()):
            df = pd.concat([df, pd.json_normalize([last], sep="/")], ignore_index=True)
        return df

    def to_parquet(self, out: str | os.PathLike) -> tuple[Path, Path]:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        return write_parquet(self.trials(), out / TRIALS_FILE), write_parquet(self.curves(), out / CURVES_FILE)


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    """Write through pyarrow to a temporary name, then rename: readers never see half a file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike, metric: Optional[str] = None, mode: Optional[str] = None) -> Sweep:
    """Open a sweep folder (`<storage>/<name>`); metric and mode default to the sweep file's."""
    import yaml
    from ray.tune import ExperimentAnalysis

    p = Path(path)
    if not p.is_dir():
        raise AnalysisError(f"{path}: no such folder")
    if not list(p.glob("experiment_state-*.json")):
        raise AnalysisError(f"{path}: not a sweep folder (no experiment_state-*.json); expected <storage>/<name>")
    stored = {}
    if (p / SWEEP_FILE).exists():
        stored = yaml.safe_load((p / SWEEP_FILE).read_text()) or {}
    metric = metric or stored.get("metric", M.VAL_ACC)
    mode = mode or stored.get("mode", "max")
    return Sweep(p.resolve(), metric, mode, ExperimentAnalysis(str(p.resolve())))
