"""The sweep's record, kept by the driver: each trial's history.jsonl, W&B run and outcome.json.

Tune stops, pauses, restores and reuses trial workers without waiting for what they run (an ASHA stop
ends the worker's thread with SystemExit and does not join it), so a W&B run kept in a worker loses
its history when the worker goes first. The driver sees every result Tune records whatever happens to
the worker: the history file and the W&B run are written from those results here, side by side.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from ray import tune

from cifar_ray import metrics as M
from cifar_ray.analysis import HISTORY_FILE, OUTCOME_FILE, ended_status, read_rows
from cifar_ray.files import atomic_write_text, read_text_nofollow
from cifar_ray.tracking import TrialTracker, run_id

NODE_TYPE = "node_type"  # history.jsonl and trials(): the autoscaler node type of the trial's node
RECORDED_AT = "recorded_at"  # history.jsonl: when the driver received the report, Unix seconds (float)


def epoch_row(result: dict) -> dict:
    """The numbers a trial reported for one epoch, without Tune's bookkeeping keys."""
    keep = {M.EPOCH, *M.EPOCH_METRICS}
    return {k: v for k, v in result.items()
            if (k in keep or k.startswith(M.VAL_CLASS_ACC + "/")) and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def last_error_line(error_file: Optional[str]) -> Optional[str]:
    if not error_file or not Path(error_file).is_file():
        return None
    try:
        lines = [ln for ln in read_text_nofollow(error_file).strip().splitlines() if ln.strip()]
    except OSError:
        return None
    return lines[-1][:500] if lines else None


def append_history(trial_dir: str | Path, result: dict) -> None:
    """One line per result, appended and flushed as it arrives. Tune's own result.json is copied back
    from storage when a trial restarts (PBT, retries) and can lose its newest rows there; this file is
    only ever appended to, so it keeps every report. A line cut short by a killed driver is skipped
    by readers."""
    line = json.dumps({**result, RECORDED_AT: time.time()}, default=str, allow_nan=True) + "\n"
    fd = os.open(Path(trial_dir) / HISTORY_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(line)


def write_outcome(trial_dir: str | Path, trial_id: str, status: str, epochs: int, error: Optional[str]) -> None:
    doc = {"trial_id": trial_id, "status": status, "epochs": epochs, "error": error}
    atomic_write_text(Path(trial_dir) / OUTCOME_FILE, json.dumps(doc) + "\n")


def never_fails(method):
    """A recorder error warns once and never fails the sweep (Tune would end the run on it)."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if not self._warned:
                self._warned = True
                print(f"warning: the sweep's record keeper failed ({type(exc).__name__}: {exc}); "
                      "result.json and Tune's state still hold every result", file=sys.stderr)
    return guarded


class TrialRecorder(tune.Callback):
    """One W&B run per trial, fed every result in the order Tune records it, and an outcome file
    (outcome.json) in each trial's folder when the trial ends. Never fails the sweep."""

    def __init__(self, wandb_settings: dict, sweep_name: str, node_types: Optional[dict] = None):
        from cifar_ray.cluster import NodeTypes

        self.wandb_settings = wandb_settings
        self.sweep_name = sweep_name
        self.node_types = node_types or {}  # autoscaler node type -> its resources (cluster.node_type_offers)
        self._nodes = NodeTypes(self.node_types)
        self._trackers: dict[str, TrialTracker] = {}
        self._configs: dict[str, dict] = {}
        self._warned = False

    def __getstate__(self) -> dict:  # Tune pickles the run config: no live W&B runs in it
        return {"wandb_settings": self.wandb_settings, "sweep_name": self.sweep_name, "node_types": self.node_types}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["wandb_settings"], state["sweep_name"], state.get("node_types"))

    def _tracker(self, trial, result: dict) -> TrialTracker:
        tracker = self._trackers.get(trial.trial_id)
        if tracker is None:
            tracker = TrialTracker(self.wandb_settings)
            tracker.start(str(trial), run_id(self.sweep_name, trial.trial_id), dict(trial.config))
            self._trackers[trial.trial_id] = tracker
            self._configs[trial.trial_id] = dict(trial.config)
            self._replay_earlier(trial, result, tracker)
        return tracker

    def _replay_earlier(self, trial, result: dict, tracker: TrialTracker) -> None:
        """A trial this driver did not start (a resumed sweep): its earlier reports are logged again
        first. W&B's service buffers the run file (x_transaction_log_flush_interval, 15 s) and a killed
        driver loses what it held, so the reopened run is made whole from result.json."""
        current = (result.get("training_iteration"), result.get("time_total_s"))
        earlier = [row for row in read_rows(Path(trial.local_path) / HISTORY_FILE)
                   if (row.get("training_iteration"), row.get("time_total_s")) != current]
        for row in earlier:
            tracker.log(epoch_row(row))
        if earlier:
            tracker.note({"replayed_reports": len(earlier)})

    @never_fails
    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.node_types and NODE_TYPE not in result:  # the autoscaler node type the trial ran on
            result[NODE_TYPE] = self._nodes.of(result.get("node_id"))
        append_history(trial.local_path, result)
        if result.get(M.WARNINGS):  # the worker's own console is not forwarded (see sweep.start_ray)
            print(f"warning: trial {trial.trial_id}: {result[M.WARNINGS]}", file=sys.stderr)
        tracker = self._tracker(trial, result)
        if dict(trial.config) != self._configs[trial.trial_id]:  # PBT explored new values
            self._configs[trial.trial_id] = dict(trial.config)
            tracker.update_config(trial.config)
        tracker.log(epoch_row(result))

    @never_fails
    def on_trial_complete(self, iteration, trials, trial, **info):
        status = ended_status(trial.last_result)
        if status == M.STOPPED:
            trial.last_result[M.STATUS] = M.STOPPED  # what the live table's outcome column shows
        self._end(trial, status, None)

    @never_fails
    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, M.ERRORED, last_error_line(trial.error_file))

    @never_fails
    def on_experiment_end(self, trials, **info):
        """An interrupted sweep: runs of trials still going are closed as unfinished; --resume reopens them."""
        for trial in trials:
            tracker = self._trackers.pop(trial.trial_id, None)
            if tracker is not None:
                tracker.finish({"outcome": M.UNFINISHED})

    def _end(self, trial, status: str, error: Optional[str]) -> None:
        last = trial.last_result or {}
        epochs = int(last.get(M.EPOCH, 0) or 0)
        try:
            write_outcome(trial.local_path, trial.trial_id, status, epochs, error)
        except OSError as exc:  # the record in result.json and Tune's state still stands
            print(f"warning: could not write the outcome of trial {trial.trial_id} ({exc})", file=sys.stderr)
        tracker = self._trackers.pop(trial.trial_id, None)
        if tracker is not None:  # a trial that never reported has no run
            tracker.finish({"outcome": status, "epochs": epochs}, exit_code=1 if status == M.ERRORED else 0)


class JournalCallback(tune.Callback):
    """Mirrors the sweep into results/NAME/optuna.journal (cifar_ray.journal) for optuna-dashboard.
    An error warns once and stops the mirror; the sweep and its other records go on."""

    def __init__(self, mirror):
        self.mirror = mirror
        self._broken = False

    def __getstate__(self) -> dict:  # Tune pickles the run config: no open storage in it
        return {"settings": self.mirror.settings()}

    def __setstate__(self, state: dict) -> None:
        from cifar_ray.journal import JournalMirror

        self.__init__(JournalMirror(**state["settings"]))

    def _guard(self, write, *args) -> None:
        if self._broken:
            return
        try:
            write(*args)
        except Exception as exc:  # noqa: BLE001
            self._broken = True
            print(f"warning: the Optuna journal mirror stopped ({type(exc).__name__}: {exc}); the sweep and its "
                  "other records go on", file=sys.stderr)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._guard(self.mirror.trial, trial.trial_id, dict(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._guard(self.mirror.result, trial.trial_id, dict(trial.config), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._guard(self.mirror.end, trial.trial_id, dict(trial.config), ended_status(trial.last_result))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._guard(self.mirror.end, trial.trial_id, dict(trial.config), M.ERRORED)
