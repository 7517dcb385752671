"""Sweep results as DataFrames and Parquet: read a results folder (finished, running or interrupted)
as data only (JSON, YAML, Parquet, weights-only checkpoints), without Ray, the trainable or a cluster.

    from cifar_ray import analysis
    sweep = analysis.load("results/quickstart")
    sweep.trials(); sweep.curves(); sweep.best()
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from cifar_ray import metrics as M
from cifar_ray.files import LinkError, atomic_write, printable, read_text_nofollow

SWEEP_FILE = "sweep.yaml"
TRIALS_FILE = "trials.parquet"
CURVES_FILE = "curves.parquet"
OUTCOME_FILE = "outcome.json"  # written by the driver when a trial ends (cifar_ray.callbacks)
HISTORY_FILE = "history.jsonl"  # every report, appended by the driver as it arrives (cifar_ray.callbacks)
RESULT_FILE = "result.json"  # Tune's rows, the same form; can lose rows when a trial restarts
PARAMS_FILE = "params.json"  # the trial's starting config, as JSON
ERROR_FILE = "error.txt"
JOURNAL_FILE = "optuna.journal"  # the sweep mirrored for optuna-dashboard (cifar_ray.journal)
STATE_FILE = "state.pt"  # in each checkpoint_* folder
STATE_GLOB = "experiment_state-*.json"
TUNE_ROW_KEYS = ("trial_id", "done", "training_iteration", "timestamp", "date", "time_this_iter_s", "time_total_s",
                 "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore", "checkpoint_dir_name",
                 "should_checkpoint", "config")


@dataclass(frozen=True)
class BestTrial:
    trial_id: str
    score: float  # the metric that made it best
    config: dict  # the sweep file's keys
    metrics: dict  # its row of trials()
    checkpoint: Optional[Path]  # its best retained checkpoint folder


class AnalysisError(ValueError):
    """A path that is not a sweep, an unknown trial, a trial without a checkpoint, a link where a
    plain file belongs."""


def _read_text(path: Path) -> Optional[str]:
    """A file of the results folder as text, None when absent; a link is refused, never followed."""
    try:
        return read_text_nofollow(path)
    except FileNotFoundError:
        return None
    except LinkError:
        raise AnalysisError(f"{path} is a symbolic link; a results folder holds plain files only "
                            "(refusing to follow it)") from None


def _read_json(path: Path) -> Optional[Any]:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None  # half-written by a running sweep, or damaged: treated as absent


def read_rows(path: Path) -> list[dict]:
    """result.json: one JSON object a line. A last line cut short by a running sweep is skipped."""
    rows = []
    for line in (_read_text(path) or "").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _tune_states(folder: Path) -> dict[str, dict]:
    """Each trial's status, folder name and last result from Tune's newest experiment_state file,
    read as plain JSON: the fields Tune pickles (results, resources, ...) are never decoded."""
    files = sorted(folder.glob(STATE_GLOB))
    doc = _read_json(files[-1]) if files else None
    out: dict[str, dict] = {}
    for entry in (doc or {}).get("trial_data", []) if isinstance(doc, dict) else []:
        try:
            trial = json.loads(entry[0])
            meta = json.loads(entry[1])
        except (ValueError, TypeError, IndexError):
            continue
        if not isinstance(trial, dict) or not isinstance(trial.get("trial_id"), str):
            continue
        last = meta.get("last_result") if isinstance(meta, dict) else None
        out[trial["trial_id"]] = {"status": str(trial.get("status", "")), "dir": trial.get("relative_logdir"),
                                  "config": trial.get("config") if isinstance(trial.get("config"), dict) else {},
                                  "last": last if isinstance(last, dict) else {}}
    return out


def ended_status(last_result: Optional[dict]) -> str:
    """The outcome of a trial Tune terminated without an error: what the engine reported last, or
    `stopped` when the scheduler ended it while it was still running."""
    reported = (last_result or {}).get(M.STATUS)
    if reported in (M.COMPLETED, M.DIVERGED, M.EARLY_STOPPED, M.STOPPED):
        return reported
    return M.STOPPED if reported == M.RUNNING else M.COMPLETED


def tune_outcome(tune_status: str, last: Optional[dict], has_error: bool) -> str:
    """The user's outcome of a trial from Tune's status, for trials without an outcome file (a
    running or interrupted sweep). Tune's state snapshot can lag behind a final error, so an error
    file beside a trial that did not terminate also means errored."""
    if tune_status == "ERROR" or (has_error and tune_status != "TERMINATED"):
        return M.ERRORED
    if tune_status == "TERMINATED":
        return ended_status(last)
    return M.UNFINISHED


@dataclass(frozen=True)
class TrialRecord:
    """One trial as its folder records it: plain JSON files only."""

    trial_id: str
    folder: Optional[Path]  # None for a trial Tune has not started yet
    status: str
    config: dict  # flat sweep-file keys; PBT's latest values
    rows: tuple[dict, ...]  # every report, in order
    error: Optional[str]

    @property
    def last(self) -> dict:
        return self.rows[-1] if self.rows else {}


def _last_line(text: Optional[str]) -> Optional[str]:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else None


def _trial_folders(folder: Path, states: dict[str, dict]) -> dict[str, tuple[Path, list[dict]]]:
    """trial id -> (folder, its reports), for each sub-folder Tune made for a trial (it holds params.json)."""
    by_name = {state["dir"]: trial_id for trial_id, state in states.items() if isinstance(state.get("dir"), str)}
    out = {}
    for sub in sorted(folder.iterdir()):
        if not any((sub / name).exists() for name in (PARAMS_FILE, RESULT_FILE, HISTORY_FILE)):
            continue
        if sub.is_symlink():
            raise AnalysisError(f"{sub} is a symbolic link; a results folder holds plain folders only "
                                "(refusing to follow it)")
        rows = _rows_of(sub)
        trial_id = next((r["trial_id"] for r in rows if isinstance(r.get("trial_id"), str)), None)
        # <model>_<experiment>_<index>, Tune's trial id being the last two parts
        out[trial_id or by_name.get(sub.name) or "_".join(sub.name.split("_")[-2:])] = (sub, rows)
    return out


def _rows_of(trial_folder: Path) -> list[dict]:
    """The trial's reports: the driver's history where it kept one, else Tune's result.json (folders
    written before the history existed, or by plain Ray Tune)."""
    history = trial_folder / HISTORY_FILE
    return read_rows(history if history.exists() or history.is_symlink() else trial_folder / RESULT_FILE)


def read_trials(folder: Path) -> list[TrialRecord]:
    states = _tune_states(folder)
    folders = _trial_folders(folder, states)
    records = []
    for trial_id in sorted(set(folders) | set(states)):
        sub, rows = folders.get(trial_id, (None, []))
        state = states.get(trial_id, {})
        last_state = state.get("last") or {}
        # Tune's state can hold a final report that result.json lost when a trial was restarted
        if M.EPOCH in last_state and (not rows or last_state[M.EPOCH] > max(r.get(M.EPOCH, 0) for r in rows)):
            rows.append(last_state)
        config = dict(state.get("config") or {})
        params = _read_json(sub / PARAMS_FILE) if sub else None
        config.update(params if isinstance(params, dict) else {})
        if rows and isinstance(rows[-1].get("config"), dict):
            config.update(rows[-1]["config"])
        outcome = _read_json(sub / OUTCOME_FILE) if sub else None
        error = _last_line(_read_text(sub / ERROR_FILE)) if sub else None
        if isinstance(outcome, dict) and isinstance(outcome.get("status"), str):
            status = outcome["status"]
            error = outcome.get("error") or error if status == M.ERRORED else error
        else:
            status = tune_outcome(state.get("status", ""), rows[-1] if rows else None, error is not None)
        records.append(TrialRecord(trial_id, sub, status, config, tuple(rows), error))
    return records


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
        for rec in self.records():
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
        df = self.trials()
        curves = self.curves()
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
        config = {k: v for k, v in row.items() if "." in k}
        ckpt = self._best_checkpoint(trial_id, metric, mode, curves)
        return BestTrial(trial_id, float(score[trial_id]), config, row.to_dict(), ckpt)

    def checkpoints(self, trial_id: str) -> list[tuple[Path, int]]:
        """(folder, epoch) of every checkpoint the trial still has; links and damaged files are skipped."""
        from cifar_ray.train import load_state

        rec = self._record(trial_id)
        out = []
        for ckpt in sorted(rec.folder.glob("checkpoint_*")) if rec.folder else []:
            state_file = ckpt / STATE_FILE
            if ckpt.is_symlink() or state_file.is_symlink() or not state_file.is_file():
                continue
            try:
                out.append((ckpt, int(load_state(state_file)["epoch"])))  # weights_only=True
            except Exception:  # noqa: BLE001 - a damaged checkpoint is skipped, not fatal
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
        records = self.records()
        for rec in records:
            if rec.trial_id == trial_id:
                return rec
        known = ", ".join(r.trial_id for r in records)
        raise AnalysisError(f"no trial {trial_id!r} in {self.path}; trials: {known}")

    def evaluate(self, trial_id: Optional[str] = None, split: str = "test", data: Optional[str] = None,
                 device: Optional[str] = None):
        """Load the trial's best checkpoint (weights_only) and evaluate it on `split` (test or val).
        trial_id defaults to the best trial. The data is this machine's: `data`, else the sweep's
        cifar10 or synthetic source, else $CIFAR_RAY_DATA; paths stored in the folder are never used."""
        import torch

        from cifar_ray.config import TrialConfig
        from cifar_ray.data import load_dataset
        from cifar_ray.models import build_model
        from cifar_ray.train import evaluate_split, load_state, select_device

        if trial_id is None:
            best = self.best()
            trial_id, ckpt = best.trial_id, best.checkpoint
        else:
            ckpt = self._best_checkpoint(trial_id, self.metric, self.mode)
        rec = self._record(trial_id)
        if ckpt is None:
            raise AnalysisError(f"trial {trial_id} has no checkpoint to evaluate")
        state = load_state(ckpt / STATE_FILE)
        cfg = TrialConfig.from_flat(local_data(rec.config, data, trial_id), where=f"trial {trial_id}")
        dev = select_device(device or "auto")
        dataset = load_dataset(cfg.data)
        model = build_model(cfg.model.name, num_classes=len(dataset.classes), **cfg.model.options())
        model.load_state_dict(state["model"])
        model.to(dev)
        with torch.no_grad():
            return evaluate_split(model, cfg, dataset, split, dev)

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

    def domains(self) -> dict:
        """The searched keys' domains (cifar_ray.space.Domain) from the stored sweep file, seeds as a grid."""
        from cifar_ray.space import stored_domains

        return stored_domains(self.stored())

    def importance(self, method: str = "ped_anova") -> pd.DataFrame:
        """key, importance (sums to 1, highest first), method: how much each searched key explains the
        trials' best metric. PED-ANOVA by default; "fanova" needs scikit-learn. ValueError when the
        sweep has fewer than 4 finished trials or fewer than two keys with two values or more."""
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


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    """Write through pyarrow to a new temporary file, then rename: readers never see half a file and
    a link at `path` is replaced, not written through."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    return atomic_write(path, lambda f: pq.write_table(table, f))


def read_stored_sweep(folder: Path) -> dict:
    """A results folder's sweep.yaml as a mapping ({} when absent), read like a sweep file: bounded in
    size, YAML's safe loader, alias bombs refused (cifar_ray.sweep_config.parse_yaml)."""
    from cifar_ray.config import ConfigError
    from cifar_ray.sweep_config import MAX_SWEEP_BYTES, parse_yaml

    path = folder / SWEEP_FILE
    text = _read_text(path)
    if text is None:
        return {}
    if len(text) > MAX_SWEEP_BYTES:
        raise AnalysisError(f"{path}: {len(text) / 2**20:.1f} MiB; a stored sweep file is at most "
                            f"{MAX_SWEEP_BYTES // 1024} KiB")
    try:
        doc = parse_yaml(text, str(path))
    except ConfigError as err:
        raise AnalysisError(printable(err)) from None
    return doc if isinstance(doc, dict) else {}


def load(path: str | os.PathLike, metric: Optional[str] = None, mode: Optional[str] = None) -> Sweep:
    """Open a sweep folder (`<storage>/<name>`); metric and mode default to the sweep file's. Only
    plain JSON, YAML (safe_load, size- and alias-bounded), Parquet and weights-only checkpoints are
    read: opening a folder from someone else runs none of its content."""
    p = Path(path)
    if not p.is_dir():
        raise AnalysisError(f"{path}: no such folder")
    stored_text = _read_text(p / SWEEP_FILE)
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
