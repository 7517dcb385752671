"""The results folder's vocabulary, written once: its file names, how a trial's rows are read back, and
the rules that turn Tune's status into the user's outcome. The writers (the trainable, the driver's
callbacks, the sweep CLI, watch) and the readers (analysis, report, refine, retrain) all import it; it
imports neither pandas nor Ray, so a Ray worker that needs a file name pays for no more."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cifar_ray import metrics as M
from cifar_ray.files import LinkError, printable, read_text_nofollow
from cifar_ray.sweep_config import MAX_FUSE  # a folder claiming a bigger pack is not read as one

SWEEP_FILE = "sweep.yaml"
TRIALS_FILE = "trials.parquet"
CURVES_FILE = "curves.parquet"
OUTCOME_FILE = "outcome.json"  # written by the driver when a trial ends (cifar_ray.callbacks)
HISTORY_FILE = "history.jsonl"  # every report, appended by the driver as it arrives (cifar_ray.callbacks)
RESULT_FILE = "result.json"  # Tune's rows, the same form; can lose rows when a trial restarts
PARAMS_FILE = "params.json"  # the trial's starting config, as JSON
ERROR_FILE = "error.txt"
PROVENANCE_FILE = "provenance.json"  # the commit and library versions that made the folder (cifar_ray.provenance)
JOURNAL_FILE = "optuna.journal"  # the sweep mirrored for optuna-dashboard (cifar_ray.journal)
STATE_FILE = "state.pt"  # in each checkpoint_* folder
STATE_GLOB = "experiment_state-*.json"
# Fused sweeps (resources.fuse): a pack is one Tune trial whose config holds its members' configs; each
# member is a trial of the record with a folder of its own, written by the driver.
PACK_MEMBERS = "pack.members"  # a pack trial's config: the list of its members' flat configs
PACK = "pack"  # a member's history rows and trials(): the id of the pack it trained in
PACK_PREFIX = "pack_"  # a pack's own folder: pack_<model>_<pack id> (Tune's result.json, the packs' checkpoints)
TUNE_ROW_KEYS = ("trial_id", "done", "training_iteration", "timestamp", "date", "time_this_iter_s", "time_total_s",
                 "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore", "checkpoint_dir_name",
                 "should_checkpoint", "config")


def member_id(pack_id: str, index: int) -> str:
    """Member `index` (0-based) of the pack whose Tune trial id is `pack_id`: `<pack id>_<index>`."""
    return f"{pack_id}_{index}"


def member_state_file(index: int) -> str:
    """Member `index`'s state in a pack's checkpoint folder."""
    return f"member_{index:02d}.pt"


def member_configs(config: dict[str, Any]) -> Optional[list[dict[str, Any]]]:
    """A pack trial's members' flat configs; None for a trial that is not a pack. Tune's config holds
    them as one JSON string (pack_value): Tune resolves the search space inside lists and dicts, never
    inside a string."""
    members = config.get(PACK_MEMBERS) if isinstance(config, dict) else None
    if isinstance(members, str):
        try:
            members = json.loads(members)
        except ValueError:
            return None
    if not isinstance(members, list) or not 0 < len(members) <= MAX_FUSE or \
            not all(isinstance(m, dict) for m in members):
        return None
    return members


def pack_value(members: list[dict[str, Any]]) -> str:
    """The members' configs as a pack trial's config holds them (member_configs reads them back)."""
    return json.dumps(members, sort_keys=True)


def member_dir_name(config: dict[str, Any], trial_id: str) -> str:
    """A member's folder: `<model>_<member id>`, as an unfused trial's is `<model>_<trial id>`."""
    return f"{config.get('model.name', 'trial')}_{trial_id}"


class AnalysisError(ValueError):
    """A path that is not a sweep, an unknown trial, a trial without a checkpoint, a link where a
    plain file belongs. Raised here and by cifar_ray.analysis alike, under the name its users catch."""


def read_text(path: Path) -> Optional[str]:
    """A file of the results folder as text, None when absent; a link is refused, never followed."""
    try:
        return read_text_nofollow(path)
    except FileNotFoundError:
        return None
    except LinkError:
        raise AnalysisError(f"{path} is a symbolic link; a results folder holds plain files only "
                            "(refusing to follow it)") from None


def read_json(path: Path) -> Optional[Any]:
    text = read_text(path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None  # half-written by a running sweep, or damaged: treated as absent


def read_rows(path: Path) -> list[dict[str, Any]]:
    """result.json: one JSON object a line. A last line cut short by a running sweep is skipped."""
    rows = []
    for line in (read_text(path) or "").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def tune_states(folder: Path) -> dict[str, dict[str, Any]]:
    """Each trial's status, folder name and last result from Tune's newest experiment_state file,
    read as plain JSON: the fields Tune pickles (results, resources, ...) are never decoded."""
    files = sorted(folder.glob(STATE_GLOB))
    doc = read_json(files[-1]) if files else None
    out: dict[str, dict[str, Any]] = {}
    for entry in (doc or {}).get("trial_data", []) if isinstance(doc, dict) else []:
        try:
            trial = json.loads(entry[0])
            meta = json.loads(entry[1])
        except (ValueError, TypeError, IndexError):
            continue
        if not isinstance(trial, dict) or not isinstance(trial.get("trial_id"), str):
            continue
        last = meta.get("last_result") if isinstance(meta, dict) else None
        config: dict[str, Any] = trial["config"] if isinstance(trial.get("config"), dict) else {}
        members = member_configs(config)
        if members is not None:  # a pack (resources.fuse): its members are the trials of the record
            for i, member in enumerate(members):
                mid = member_id(trial["trial_id"], i)
                out[mid] = {"status": str(trial.get("status", "")), "dir": member_dir_name(member, mid),
                            "config": member, "last": {}, "pack": trial["trial_id"],
                            "pack_dir": trial.get("relative_logdir")}
            continue
        out[trial["trial_id"]] = {"status": str(trial.get("status", "")), "dir": trial.get("relative_logdir"),
                                  "config": config, "last": last if isinstance(last, dict) else {}}
    return out


def ended_status(last_result: Optional[dict[str, Any]]) -> str:
    """The outcome of a trial Tune terminated without an error: what the engine reported last, or
    `stopped` when the scheduler ended it while it was still running."""
    reported = (last_result or {}).get(M.STATUS)
    if reported in (M.COMPLETED, M.DIVERGED, M.EARLY_STOPPED, M.STOPPED):
        return str(reported)
    return M.STOPPED if reported == M.RUNNING else M.COMPLETED


def tune_outcome(tune_status: str, last: Optional[dict[str, Any]], has_error: bool) -> str:
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
    config: dict[str, Any]  # flat sweep-file keys; PBT's latest values
    rows: tuple[dict[str, Any], ...]  # every report, in order
    error: Optional[str]
    pack: Optional[str] = None  # the pack it trained in (resources.fuse), None for a trial of its own

    @property
    def last(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}


def find_trial(records: list[TrialRecord], wanted: str) -> list[TrialRecord]:
    """The trials `wanted` names, as a user copies it: Tune's trial id (`6910e_00003`), the trial's folder
    name (`net1_6910e_00003`, what the console's `started`/`ended` lines and the results folder show) or
    a trial id's end (`00003`). The first form that matches anything wins; more than one trial back means
    `wanted` is ambiguous."""
    exact = [r for r in records if r.trial_id == wanted]
    by_folder = [r for r in records if r.folder is not None and r.folder.name == wanted]
    by_end = [r for r in records if wanted and r.trial_id.endswith(wanted)]
    return exact or by_folder or by_end


def last_line(text: Optional[str]) -> Optional[str]:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else None


def trial_folders(folder: Path, states: dict[str, dict[str, Any]]) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """trial id -> (folder, its reports), for each sub-folder Tune made for a trial (it holds params.json)."""
    by_name = {state["dir"]: trial_id for trial_id, state in states.items() if isinstance(state.get("dir"), str)}
    out = {}
    for sub in sorted(folder.iterdir()):
        if not any((sub / name).exists() for name in (PARAMS_FILE, RESULT_FILE, HISTORY_FILE)):
            continue
        if sub.is_symlink():
            raise AnalysisError(f"{sub} is a symbolic link; a results folder holds plain folders only "
                                "(refusing to follow it)")
        if is_pack_folder(sub):  # Tune's record of a pack; its members have folders of their own
            continue
        rows = rows_of(sub)
        trial_id = next((r["trial_id"] for r in rows if isinstance(r.get("trial_id"), str)), None)
        # <model>_<experiment>_<index>, Tune's trial id being the last two parts
        out[trial_id or by_name.get(sub.name) or "_".join(sub.name.split("_")[-2:])] = (sub, rows)
    return out


def is_plain_name(name: str) -> bool:
    """A folder name from a results folder's state that names a folder inside it, never one elsewhere."""
    return Path(name).name == name and name not in ("", ".", "..")


def is_pack_folder(sub: Path) -> bool:
    params = read_json(sub / PARAMS_FILE) if sub.name.startswith(PACK_PREFIX) else None
    return isinstance(params, dict) and member_configs(params) is not None


def rows_of(trial_folder: Path) -> list[dict[str, Any]]:
    """The trial's reports: the driver's history where it kept one, else Tune's result.json (folders
    written before the history existed, or by plain Ray Tune)."""
    history = trial_folder / HISTORY_FILE
    return read_rows(history if history.exists() or history.is_symlink() else trial_folder / RESULT_FILE)


def read_trials(folder: Path) -> list[TrialRecord]:
    states = tune_states(folder)
    folders = trial_folders(folder, states)
    records = []
    for trial_id in sorted(set(folders) | set(states)):
        sub, rows = folders.get(trial_id, (None, []))
        state = states.get(trial_id, {})
        last_state = state.get("last") or {}
        # Tune's state can hold a final report that result.json lost when a trial was restarted
        if M.EPOCH in last_state and (not rows or last_state[M.EPOCH] > max(r.get(M.EPOCH, 0) for r in rows)):
            rows.append(last_state)
        config = dict(state.get("config") or {})
        params = read_json(sub / PARAMS_FILE) if sub else None
        config.update(params if isinstance(params, dict) else {})
        if rows and isinstance(rows[-1].get("config"), dict):
            config.update(rows[-1]["config"])
        pack = config.pop(PACK, None) or state.get("pack")
        outcome = read_json(sub / OUTCOME_FILE) if sub else None
        error = last_line(read_text(sub / ERROR_FILE)) if sub else None
        pack_dir = state.get("pack_dir")
        if error is None and isinstance(pack_dir, str) and is_plain_name(pack_dir):
            error = last_line(read_text(folder / pack_dir / ERROR_FILE))  # a member fails with its pack
        if isinstance(outcome, dict) and isinstance(outcome.get("status"), str):
            status = outcome["status"]
            error = outcome.get("error") or error if status == M.ERRORED else error
        else:
            status = tune_outcome(state.get("status", ""), rows[-1] if rows else None, error is not None)
        records.append(TrialRecord(trial_id, sub, status, config, tuple(rows), error,
                                   pack if isinstance(pack, str) else None))
    return records


def read_stored_sweep(folder: Path) -> dict[str, Any]:
    """A results folder's sweep.yaml as a mapping ({} when absent), read like a sweep file: bounded in
    size, YAML's safe loader, alias bombs refused (cifar_ray.sweep_config.parse_yaml)."""
    from cifar_ray.config import ConfigError
    from cifar_ray.sweep_config import MAX_SWEEP_BYTES, parse_yaml

    path = folder / SWEEP_FILE
    text = read_text(path)
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
