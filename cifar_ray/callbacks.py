"""The sweep's record, kept by the driver: each trial's history.jsonl, W&B run and outcome.json.

Tune stops, pauses, restores and reuses trial workers without waiting for what they run (an ASHA stop
ends the worker's thread with SystemExit and does not join it), so a W&B run kept in a worker loses
its history when the worker goes first. The driver sees every result Tune records whatever happens to
the worker: the history file and the W&B run are written from those results here, side by side.

The history and outcome files are written straight into the results folder, never into Tune's
staging folder: Tune copies that folder over the results folder, and a resumed sweep starts a new,
empty one, whose copy used to replace a trial's whole history with the epochs run since the resume.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ray import tune

from cifar_ray import metrics as M
from cifar_ray.files import atomic_write_text, read_text_nofollow
from cifar_ray.record import (
    HISTORY_FILE,
    OUTCOME_FILE,
    PACK,
    PARAMS_FILE,
    STATE_FILE,
    ended_status,
    member_configs,
    member_dir_name,
    member_id,
    member_state_file,
    read_json,
    read_rows,
)
from cifar_ray.storage import disk_full, disk_full_text
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
    """One line per result, appended as it arrives; the file is never rewritten, so it keeps every
    report. A line cut short (a killed driver, a full disk) is skipped by readers, and the next line
    starts on a line of its own so it is not lost with it."""
    line = json.dumps({**result, RECORDED_AT: time.time()}, default=str, allow_nan=True) + "\n"
    Path(trial_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(trial_dir) / HISTORY_FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size and os.pread(f.fileno(), 1, size - 1) != b"\n":
            line = "\n" + line
        f.write(line.encode())


def write_outcome(trial_dir: str | Path, trial_id: str, status: str, epochs: int, error: Optional[str]) -> None:
    doc = {"trial_id": trial_id, "status": status, "epochs": epochs, "error": error}
    Path(trial_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(trial_dir) / OUTCOME_FILE, json.dumps(doc) + "\n")


def clear_outcome(trial_dir: str | Path) -> None:
    """A trial that runs again (a resumed sweep retrying an errored trial) has no outcome yet."""
    (Path(trial_dir) / OUTCOME_FILE).unlink(missing_ok=True)


def last_per_epoch(rows: list[dict]) -> dict[int, dict]:
    """epoch -> the trial's last report of it (a retry reports the epoch in flight again)."""
    out: dict[int, dict] = {}
    for row in rows:
        epoch = row.get(M.EPOCH)
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            out[epoch] = row
    return out


def same_row(a: Optional[dict], b: dict) -> bool:
    """W&B already holds `b` when it holds a row for that epoch with the same model numbers (NaN
    equals NaN; timings, M.RUN_MEASUREMENTS, differ whenever an epoch is trained again and are not
    compared); None stands for a row W&B holds whose values are not known here (an online run's
    summary names its epoch)."""
    if a is None:
        return True
    for key, value in b.items():
        if key in M.RUN_MEASUREMENTS:
            continue
        other = a.get(key)
        both_nan = isinstance(value, float) and isinstance(other, float) and math.isnan(value) and math.isnan(other)
        if other != value and not both_nan:
            return False
    return True


class Member:
    """A pack's member as the recorder and the journal mirror see a trial: its own id, name, config,
    folder (beside the pack's) and last report."""

    def __init__(self, pack, index: int, config: dict):
        self.pack_id = pack.trial_id
        self.index = index
        self.trial_id = member_id(pack.trial_id, index)
        self.config = config
        self.name = member_dir_name(config, self.trial_id)
        self.last_result: dict = {}

    def __str__(self) -> str:
        return self.name


class Packs:
    """The members of each pack trial of a fused sweep (resources.fuse), made once per pack."""

    def __init__(self) -> None:
        self._members: dict[str, list[Member]] = {}

    def of(self, trial) -> Optional[list[Member]]:
        """The trial's members; None for a trial that is not a pack."""
        members = self._members.get(trial.trial_id)
        if members is None:
            configs = member_configs(dict(trial.config))
            if configs is None:
                return None
            members = self._members[trial.trial_id] = [Member(trial, i, c) for i, c in enumerate(configs)]
        return members

    def rows(self, trial, result: dict) -> list[tuple[Member, dict]]:
        """Each member's row of a pack's report: its own epoch report, named as a trial's would be."""
        reported = result.get(M.MEMBERS)
        out = []
        for member in self.of(trial) or []:
            row = reported.get(member.trial_id) if isinstance(reported, dict) else None
            if not isinstance(row, dict):
                continue
            row = {**row, "trial_id": member.trial_id, PACK: member.pack_id, "training_iteration": row.get(M.EPOCH),
                   "time_total_s": result.get("time_total_s"), "timestamp": result.get("timestamp")}
            if NODE_TYPE in result:
                row[NODE_TYPE] = result[NODE_TYPE]
            if row.get(M.STATUS) != M.RUNNING:
                row["done"] = True
            member.last_result = row
            out.append((member, row))
        return out


def never_fails(method):
    """A recorder error warns once and never fails the sweep (Tune would end the run on it)."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if not self._warned:
                self._warned = True
                print(f"warning: the sweep's record keeper failed ({type(exc).__name__}: {exc}); "
                      "result.json and Tune's state still hold every result", file=sys.stderr)
    return guarded


class TrialRecorder(tune.Callback):
    """One W&B run per trial, fed every result in the order Tune records it, and an outcome file
    (outcome.json) in each trial's folder when the trial ends. Never fails the sweep."""

    def __init__(self, wandb_settings: dict, sweep_name: str, node_types: Optional[dict] = None,
                 record_root: Optional[str] = None, metric: str = M.VAL_ACC, mode: str = "max", keep: int = 2):
        from cifar_ray.cluster import NodeTypes

        self.wandb_settings = wandb_settings
        self.sweep_name = sweep_name
        self.node_types = node_types or {}  # autoscaler node type -> its resources (cluster.node_type_offers)
        self.record_root = record_root  # the results folder on this machine; None: Tune's trial folder
        self.metric, self.mode, self.keep = metric, mode, keep  # a pack member's checkpoints: checkpoint.keep best
        self._nodes = NodeTypes(self.node_types)
        self._trackers: dict[str, TrialTracker] = {}
        self._configs: dict[str, dict] = {}
        self._logged: dict[str, dict[int, Optional[dict]]] = {}  # trial -> epoch -> the row its W&B run holds
        self._packs = Packs()
        self._pack_parent: dict[str, str] = {}  # pack id -> the folder holding its folder (no record_root)
        self._ended: set[str] = set()  # members whose end this driver recorded
        self.disk_full = False  # a write of the record, or a trial's checkpoint, found the disk full
        self.on_disk_full: Optional[Callable[[], None]] = None  # the driver stops the sweep (sweep.run)
        self._warned = False

    def _full(self) -> None:
        """The disk is full: say so once and let the driver stop the sweep as Ctrl-C would (trials stay
        unfinished, --resume continues them) rather than fail every trial that writes next."""
        if self.disk_full:
            return
        self.disk_full = True
        if self.on_disk_full is not None:
            self.on_disk_full()

    def __getstate__(self) -> dict:  # Tune pickles the run config: no live W&B runs in it
        return {"wandb_settings": self.wandb_settings, "sweep_name": self.sweep_name, "node_types": self.node_types,
                "record_root": self.record_root, "metric": self.metric, "mode": self.mode, "keep": self.keep}

    def __setstate__(self, state: dict) -> None:
        TrialRecorder.__init__(self, state["wandb_settings"], state["sweep_name"], state.get("node_types"),
                               state.get("record_root"), state.get("metric", M.VAL_ACC), state.get("mode", "max"),
                               state.get("keep", 2))

    def folder(self, trial) -> Path:
        """Where the trial's history and outcome live: its folder in the results folder itself (a pack's
        member: its own folder beside the pack's)."""
        if isinstance(trial, Member):
            return self._member_folder(trial)
        if self.record_root is None or getattr(trial, "storage", None) is None:
            return Path(trial.local_path)
        return Path(self.record_root) / trial.storage.trial_dir_name

    def _member_folder(self, member: Member) -> Path:
        return Path(self.record_root or self._pack_parent.get(member.pack_id, ".")) / member.name

    def _tracker(self, trial, result: dict) -> TrialTracker:
        tracker = self._trackers.get(trial.trial_id)
        if tracker is None:
            tracker = TrialTracker(self.wandb_settings)
            tracker.start(str(trial), run_id(self.sweep_name, trial.trial_id), dict(trial.config))
            self._trackers[trial.trial_id] = tracker
            self._configs[trial.trial_id] = dict(trial.config)
            self._logged[trial.trial_id] = tracker.held()
            self._replay_earlier(trial, result, tracker)
        return tracker

    def _log(self, trial, tracker: TrialTracker, row: dict) -> bool:
        """Log one epoch's row unless the run already holds it; a row that differs from the one the
        run holds (PBT restored another trial's checkpoint) is logged again: the later one stands."""
        logged = self._logged[trial.trial_id]
        epoch = int(row.get(M.EPOCH, 0))
        if epoch in logged and same_row(logged[epoch], row):
            return False
        tracker.log(row)
        logged[epoch] = row
        return True

    def _replay_earlier(self, trial, result: dict, tracker: TrialTracker) -> None:
        """A trial this driver did not start (a resumed sweep): the epochs its run lacks are logged
        first, from history.jsonl. A killed driver's W&B service loses what it buffered (it flushes
        every 15 s), so the run may hold fewer epochs than the history; a clean stop loses none, and
        nothing the run holds is logged twice."""
        current = result.get(M.EPOCH)
        earlier = last_per_epoch(read_rows(self.folder(trial) / HISTORY_FILE))
        replayed = sum(self._log(trial, tracker, epoch_row(row)) for epoch, row in sorted(earlier.items())
                       if epoch != current)
        if replayed:
            tracker.note({"replayed_reports": replayed})

    @never_fails
    def on_trial_start(self, iteration, trials, trial, **info):
        members = self._packs.of(trial)
        if members is None:
            clear_outcome(self.folder(trial))
            return
        self._pack_parent[trial.trial_id] = str(Path(trial.local_path).parent)
        for member in members:  # a member that ended keeps its outcome; one that errored runs again
            folder = self.folder(member)
            outcome = read_json(folder / OUTCOME_FILE)
            if isinstance(outcome, dict) and outcome.get("status") == M.ERRORED:
                clear_outcome(folder)
                self._ended.discard(member.trial_id)
            if not (folder / PARAMS_FILE).exists():
                self._write(folder / PARAMS_FILE, json.dumps({**member.config, PACK: member.pack_id}, default=str))

    def _write(self, path: Path, text: str) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text + "\n")
        except OSError as exc:
            if disk_full(exc):
                self._full()
            else:
                print(f"warning: could not write {path} ({exc})", file=sys.stderr)

    @never_fails
    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.node_types and NODE_TYPE not in result:  # the autoscaler node type the trial ran on
            result[NODE_TYPE] = self._nodes.of(result.get("node_id"))
        if result.get(M.WARNINGS):  # the worker's own console is not forwarded (see ray_process.start_ray)
            print(f"warning: trial {trial.trial_id}: {result[M.WARNINGS]}", file=sys.stderr)
        if self._packs.of(trial) is not None:
            for member, row in self._packs.rows(trial, result):
                self._record(member, row)
                if row[M.STATUS] != M.RUNNING:
                    self._end(member, ended_status(row), None)
            return
        self._record(trial, result)

    def _record(self, trial, result: dict) -> None:
        """A trial's (or a pack member's) report: its history line, then its W&B run."""
        self._append(trial, result)
        tracker = self._tracker(trial, result)
        if dict(trial.config) != self._configs[trial.trial_id]:  # PBT explored new values
            self._configs[trial.trial_id] = dict(trial.config)
            tracker.update_config(trial.config)
        self._log(trial, tracker, epoch_row(result))

    def _append(self, trial, result: dict) -> None:
        """The history line. A full disk stops the sweep (the driver says so in one line at the end); any
        other failure warns and the sweep goes on: W&B, the journal and Tune's own result.json still
        receive the report."""
        try:
            append_history(self.folder(trial), result)
        except OSError as exc:
            if disk_full(exc):
                self._full()
            else:
                print(f"warning: could not append to {self.folder(trial) / HISTORY_FILE} ({exc})", file=sys.stderr)

    @never_fails
    def on_trial_complete(self, iteration, trials, trial, **info):
        members = self._packs.of(trial)
        if members is not None:  # members still open (a pack resumed after its last report): their last row
            for member in self._open(members):
                last = member.last_result or self._last_row(member)
                if last:
                    member.last_result = last
                    self._end(member, ended_status(last), None)
            return
        status = ended_status(trial.last_result)
        if status == M.STOPPED:
            trial.last_result[M.STATUS] = M.STOPPED  # what the live table's outcome column shows
        self._end(trial, status, None)

    def _open(self, members: list[Member]) -> list[Member]:
        """Members whose end is not recorded yet (by this driver, or by the one before a resume)."""
        out = []
        for member in members:
            if member.trial_id in self._ended:
                continue
            outcome = read_json(self.folder(member) / OUTCOME_FILE)
            if isinstance(outcome, dict) and outcome.get("status") not in (None, M.ERRORED):
                continue
            out.append(member)
        return out

    def _last_row(self, member: Member) -> dict:
        rows = last_per_epoch(read_rows(self.folder(member) / HISTORY_FILE))
        return rows[max(rows)] if rows else {}

    @never_fails
    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        """A pack's checkpoint holds every member's state: each member's folder gets its own
        checkpoint_<epoch> (a hard link, no copy), kept as an unfused trial's are: its `keep` best by the
        sweep's metric, plus its latest. Tune prunes the pack's own checkpoints (its latest `keep`)."""
        members = self._packs.of(trial)
        source = Path(getattr(checkpoint, "path", ""))
        if members is None or not source.is_dir():  # cloud storage: the members' states stay in the pack's
            return
        for member in members:
            state = source / member_state_file(member.index)
            epoch = member.last_result.get(M.EPOCH)
            if isinstance(epoch, int) and state.is_file():
                self._keep_member_checkpoint(member, state, epoch)

    def _keep_member_checkpoint(self, member: Member, state: Path, epoch: int) -> None:
        folder = self.folder(member)
        final = folder / f"checkpoint_{epoch:06d}"
        if final.exists():
            return
        partial = folder / f".checkpoint_{epoch:06d}.partial"
        try:
            partial.mkdir(parents=True, exist_ok=True)
            (partial / STATE_FILE).unlink(missing_ok=True)
            try:
                os.link(state, partial / STATE_FILE)
            except OSError:  # another filesystem: a copy, written whole before it takes its name
                import shutil

                shutil.copyfile(state, partial / STATE_FILE)
            os.replace(partial, final)
        except OSError as exc:
            if disk_full(exc):
                self._full()
            else:
                print(f"warning: could not keep the checkpoint of {member.trial_id} ({exc})", file=sys.stderr)
            return
        self._prune(member, folder)

    def _prune(self, member: Member, folder: Path) -> None:
        import shutil

        metric, mode = self.metric, self.mode
        rows = last_per_epoch(read_rows(folder / HISTORY_FILE))
        held = sorted((int(p.name.split("_")[1]), p) for p in folder.glob("checkpoint_*") if p.name[11:].isdigit())
        if len(held) <= self.keep + 1:
            return

        def score(epoch: int) -> float:
            v = rows.get(epoch, {}).get(metric)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                return -math.inf
            return v if mode == "max" else -v
        latest = held[-1][0]
        best = {e for e, _ in sorted(held, key=lambda t: (score(t[0]), t[0]), reverse=True)[:self.keep]}
        for epoch, path in held:
            if epoch not in best and epoch != latest:
                shutil.rmtree(path, ignore_errors=True)

    @never_fails
    def on_trial_recover(self, iteration, trials, trial, **info):
        """A failure Tune will retry: a full disk stops the sweep now rather than after every retry."""
        error = last_error_line(trial.error_file)
        if error and disk_full_text(error):
            self._full()

    @never_fails
    def on_trial_error(self, iteration, trials, trial, **info):
        error = last_error_line(trial.error_file)
        if error and disk_full_text(error):
            self._full()
        members = self._packs.of(trial)
        for member in [trial] if members is None else self._open(members):
            self._end(member, M.ERRORED, error)

    @never_fails
    def on_experiment_end(self, trials, **info):
        """An interrupted sweep: runs of trials still going are closed as unfinished; --resume reopens them."""
        for trial_id in list(self._trackers):
            self._trackers.pop(trial_id).finish({"outcome": M.UNFINISHED})

    def _end(self, trial, status: str, error: Optional[str]) -> None:
        last = trial.last_result or {}
        epochs = int(last.get(M.EPOCH, 0) or 0)
        try:
            write_outcome(self.folder(trial), trial.trial_id, status, epochs, error)
        except OSError as exc:  # the record in result.json and Tune's state still stands
            if disk_full(exc):
                self._full()
            else:
                print(f"warning: could not write the outcome of trial {trial.trial_id} ({exc})", file=sys.stderr)
        if isinstance(trial, Member):
            self._ended.add(trial.trial_id)
        tracker = self._trackers.pop(trial.trial_id, None)
        if tracker is not None:  # a trial that never reported has no run
            tracker.finish({"outcome": status, "epochs": epochs}, exit_code=1 if status == M.ERRORED else 0)


class JournalCallback(tune.Callback):
    """Mirrors the sweep into results/NAME/optuna.journal (cifar_ray.journal) for optuna-dashboard.
    An error warns once and stops the mirror; the sweep and its other records go on."""

    def __init__(self, mirror):
        self.mirror = mirror
        self._broken = False
        self._packs = Packs()

    def __getstate__(self) -> dict:  # Tune pickles the run config: no open storage in it
        return {"settings": self.mirror.settings()}

    def __setstate__(self, state: dict) -> None:
        from cifar_ray.journal import JournalMirror

        JournalCallback.__init__(self, JournalMirror(**state["settings"]))

    def _guard(self, write, *args) -> None:
        if self._broken:
            return
        try:
            write(*args)
        except Exception as exc:
            self._broken = True
            print(f"warning: the Optuna journal mirror stopped ({type(exc).__name__}: {exc}); the sweep and its "
                  "other records go on", file=sys.stderr)

    def on_trial_start(self, iteration, trials, trial, **info):
        members = self._packs.of(trial)
        for member in [trial] if members is None else members:
            self._guard(self.mirror.trial, member.trial_id, dict(member.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self._packs.of(trial) is None:
            self._guard(self.mirror.result, trial.trial_id, dict(trial.config), result)
            return
        for member, row in self._packs.rows(trial, result):
            self._guard(self.mirror.result, member.trial_id, member.config, row)
            if row[M.STATUS] != M.RUNNING:
                self._guard(self.mirror.end, member.trial_id, member.config, ended_status(row))

    def on_trial_complete(self, iteration, trials, trial, **info):
        members = self._packs.of(trial)
        if members is None:
            self._guard(self.mirror.end, trial.trial_id, dict(trial.config), ended_status(trial.last_result))
            return
        for member in members:  # a member whose end the mirror recorded is left as it is (JournalMirror.end)
            if member.last_result:
                self._guard(self.mirror.end, member.trial_id, member.config, ended_status(member.last_result))

    def on_trial_error(self, iteration, trials, trial, **info):
        members = self._packs.of(trial)
        for member in [trial] if members is None else members:
            if isinstance(member, Member) and member.last_result.get(M.STATUS, M.RUNNING) != M.RUNNING:
                continue  # it ended before the pack failed
            self._guard(self.mirror.end, member.trial_id, dict(member.config), M.ERRORED)
