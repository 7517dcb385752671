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


class AnalysisError(ValueError):
    """A path that is not a sweep, an unknown trial, a trial without a checkpoint."""


def trial_status(tune_status: str, last: Optional[dict]) -> str:
    if tune_status == "ERROR":
        return ERRORED
    reported = (last or {}).get(M.STATUS)
    if tune_status == "TERMINATED":
        if reported in (M.COMPLETED, M.DIVERGED, M.EARLY_STOPPED):
            return reported
        return STOPPED if reported == M.RUNNING else M.COMPLETED
    return UNFINISHED


def _error_text(trial) -> Optional[str]:
    path = getattr(trial, "error_file", None)
    if not path or not os.path.exists(path):
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

    def trials(self) -> pd.DataFrame:
        """One row per trial: id, status, config (the sweep file's key names), final and best metrics,
        epochs run, seconds, node/device, error."""
        rows = []
        curves = self._analysis.trial_dataframes
        for trial in self._analysis.trials:
            last = trial.last_result or {}
            curve = curves.get(trial.trial_id, pd.DataFrame())
            row: dict[str, Any] = {"trial_id": trial.trial_id,
                                   "status": trial_status(trial.status, last)}
            row.update({k: v for k, v in trial.config.items()})
            for m in M.EPOCH_METRICS:
                row[m] = last.get(m, math.nan)
            row[f"best_{self.metric}"] = _best(curve[self.metric], self.mode) if self.metric in curve else math.nan
            row["epochs"] = int(last.get(M.EPOCH, 0) or 0)
            row["seconds"] = float(last.get("time_total_s", math.nan))
            for k in ("node", "device", "accelerator"):
                row[k] = last.get(k)
            row["error"] = _error_text(trial)
            rows.append(row)
        return pd.DataFrame(rows).sort_values("trial_id", ignore_index=True) if rows else pd.DataFrame(rows)

    def curves(self) -> pd.DataFrame:
        """Long format: one row per trial and epoch, every per-epoch metric."""
        frames = []
        for trial_id, df in self._analysis.trial_dataframes.items():
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
