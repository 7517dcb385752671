"""The sweep mirrored into an Optuna journal (results/NAME/optuna.journal), for optuna-dashboard.

The driver writes it, from the results Tune records (the same stream as history.jsonl): one Optuna
study named after the sweep; one Optuna trial per Tune trial with the searched keys as params, the
Tune trial id, node and device as user attributes, the sweep's metric at each epoch as intermediate
values and, when the trial ends, its best metric as value with state COMPLETE (completed, stopped
early by the engine), PRUNED (stopped by ASHA/PBT, diverged) or FAIL (errored). Each write is one
appended, flushed line: a killed driver loses at most the epoch in flight, and --resume continues the
same study, matching trials by their Tune id. A trial recorded FAIL that a resumed sweep runs again
gets a new Optuna trial, as Optuna's RetryFailedTrialCallback makes one (system attribute
`failed_trial` names the failed one; params, attributes and intermediate values carried over): Optuna
never reopens a finished trial, and the dashboard shows both attempts.

Readers (cifar_ray.watch) open the journal read-only: a dashboard button cannot rewrite the record.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from cifar_ray import metrics as M
from cifar_ray.applies import acts

TUNE_TRIAL_ID = "tune_trial_id"  # user attribute naming the Tune trial
USER_ATTRS = ("node", "host", "device", "accelerator", "node_type")  # copied from a trial's reports when present
STATES = {M.COMPLETED: "COMPLETE", M.EARLY_STOPPED: "COMPLETE", M.STOPPED: "PRUNED", M.DIVERGED: "PRUNED",
          M.ERRORED: "FAIL"}


def drop_torn_tail(fd: int) -> None:
    """A write cut short (a full disk, a killed driver) leaves a last line without its newline, which
    no reader applies; Optuna would append after it and then refuse the whole journal ("Invalid log
    format"). The writer, holding the lock, cuts that torn line off before it appends."""
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return
    start = max(0, size - (1 << 20))
    tail = os.pread(fd, size - start, start)
    os.ftruncate(fd, start + tail.rfind(b"\n") + 1 if b"\n" in tail else start)


def _backend_lock():
    from optuna.storages.journal._file import BaseJournalFileLock  # the base of its public locks

    class FlockLock(BaseJournalFileLock):
        """An advisory lock on the journal file itself: released by the kernel when the holder dies,
        so a killed driver leaves no lock file behind (Optuna's own locks are files or links that a
        kill leaves in the results folder)."""

        def __init__(self, path: str):
            self._path = path
            self._fd: Optional[int] = None

        def acquire(self) -> bool:
            self._fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            drop_torn_tail(self._fd)
            return True

        def release(self) -> None:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None

    return FlockLock


def open_journal(path: str | os.PathLike, read_only: bool = False):
    """An Optuna JournalStorage on `path` (a plain file; a link there is refused)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    p = Path(path)
    if p.is_symlink():
        raise OSError(f"{p} is a symbolic link; a results folder holds plain files only (refusing to follow it)")
    if read_only and not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    if not read_only:
        return JournalStorage(JournalFileBackend(str(p), lock_obj=_backend_lock()(str(p))))
    return _read_only(_tolerant(JournalStorage))(_tolerant_backend(JournalFileBackend)(str(p)))


def check_journal(path: str | os.PathLike) -> None:
    """ValueError naming the first line of `path` that is not an Optuna journal record (not UTF-8, not
    a JSON object, no known op code) or that Optuna cannot apply. A last line without its newline is a
    write in progress, not an error."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal._storage import JournalOperation

    known = {op.value for op in JournalOperation}
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                break
            try:
                log = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"line {number} is not JSON ({type(exc).__name__})") from None
            if not isinstance(log, dict) or log.get("op_code") not in known:
                raise ValueError(f"line {number} is not an Optuna journal record")
    try:
        JournalStorage(JournalFileBackend(str(path), lock_obj=_backend_lock()(str(path)))).get_all_studies()
    except Exception as exc:  # whatever Optuna raises on a record it cannot apply
        raise ValueError(f"Optuna cannot replay it ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") \
            from None


def _tolerant_backend(base: Any) -> Any:  # base: Optuna's file backend class, chosen at run time
    """A file backend that reads every complete line as one record and gives None for a line that is
    not a JSON object (Optuna's own reader refuses the whole file from such a line on)."""
    class TolerantFileBackend(base):
        def read_logs(self, log_number_from: int):
            offsets = self.__dict__.setdefault("_offsets", {0: 0})
            start = max((n for n in offsets if n <= log_number_from), default=0)
            with open(self._file_path, "rb") as f:
                f.seek(offsets[start])
                position, number = offsets[start], start
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # a write in progress
                    position += len(line)
                    number += 1
                    offsets[number] = position
                    if number - 1 < log_number_from:
                        continue
                    try:
                        log = json.loads(line)
                    except ValueError:
                        log = None
                    yield log if isinstance(log, dict) else None

    return TolerantFileBackend


def _tolerant(base: Any) -> Any:  # base: Optuna's JournalStorage
    """A storage that, while it serves, skips a record it cannot read or apply (a bad line appended to
    a journal being watched) and goes on from the state it had, instead of failing every request."""
    class TolerantJournalStorage(base):
        skipped = 0

        def _sync_with_backend(self) -> None:
            replay = self._replay_result
            for log in self._backend.read_logs(replay.log_number_read):
                if log is None:
                    replay.log_number_read += 1
                    type(self).skipped += 1
                    continue
                try:
                    replay.apply_logs([log])  # counts the record as read before applying it
                except Exception:  # a record Optuna cannot apply is passed over
                    type(self).skipped += 1

    return TolerantJournalStorage


def _read_only(base):
    """`base` with every write refused: the dashboard's delete/note/tell buttons answer with an error
    and the journal file stays as the sweep wrote it."""
    writes = ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "create_new_trial",
              "set_trial_param", "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr",
              "set_trial_system_attr")

    def refuse(name):
        def method(self, *args, **kwargs):
            raise NotImplementedError(f"{name}: this view of the sweep's journal is read-only")
        return method

    return type("ReadOnlyJournalStorage", (base,), {name: refuse(name) for name in writes})


def finite(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def best_of(values: dict[int, float], mode: str) -> Optional[float]:
    kept = [v for v in values.values() if finite(v) is not None]
    return (max if mode == "max" else min)(kept) if kept else None


def params_of(config: dict, distributions: dict) -> dict[str, tuple[Any, Any]]:
    """key -> (internal value, distribution) for the searched keys the config holds a value of inside
    its distribution (a PBT-mutated value outside it is left out)."""
    from cifar_ray.space import choice_value

    out = {}
    for key, dist in distributions.items():
        if key not in config or not acts(key, config):  # a key where it does nothing is no param of the trial
            continue
        try:
            internal = dist.to_internal_repr(choice_value(config[key]))
        except (ValueError, TypeError):
            continue
        if dist._contains(internal):
            out[key] = (internal, dist)
    return out


class JournalMirror:
    """Writes trials into the journal as Tune reports them (driven by callbacks.JournalCallback)."""

    def __init__(self, path: str | os.PathLike, study_name: str, metric: str, mode: str, distributions: dict):
        self.path = str(path)
        self.study_name = study_name
        self.metric = metric
        self.mode = mode
        self.distributions = distributions  # flat key -> optuna distribution
        self._storage: Any = None  # optuna JournalStorage once open()ed
        self._study_id: Optional[int] = None
        self._ids: dict[str, int] = {}  # Tune trial id -> Optuna trial id
        self._done: set[str] = set()  # Tune trials whose (newest) Optuna trial has ended
        self._failed: set[str] = set()  # ... ended as FAIL: reopened as a retry if the trial runs again
        self._attrs: dict[str, dict] = {}

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in ("path", "study_name", "metric", "mode", "distributions")}

    def open(self) -> "JournalMirror":
        """Create or reopen the study; trials already in it are matched by their Tune id."""
        from optuna.study import StudyDirection
        from optuna.trial import TrialState

        if self._storage is not None:
            return self
        storage = open_journal(self.path)
        direction = StudyDirection.MAXIMIZE if self.mode == "max" else StudyDirection.MINIMIZE
        try:
            study_id = storage.get_study_id_from_name(self.study_name)
        except KeyError:
            study_id = storage.create_new_study([direction], self.study_name)
            storage.set_study_user_attr(study_id, "metric", self.metric)
        for trial in storage.get_all_trials(study_id, deepcopy=False):  # in number order: the newest wins
            tune_id = trial.user_attrs.get(TUNE_TRIAL_ID)
            if isinstance(tune_id, str):
                self._ids[tune_id] = trial._trial_id
                self._attrs[tune_id] = dict(trial.user_attrs)
                self._done.discard(tune_id)
                self._failed.discard(tune_id)
                if trial.state != TrialState.RUNNING:
                    self._done.add(tune_id)
                if trial.state == TrialState.FAIL:
                    self._failed.add(tune_id)
        self._storage, self._study_id = storage, study_id
        return self

    def _retry(self, tune_id: str) -> int:
        """A new RUNNING Optuna trial continuing the failed one of `tune_id`."""
        from optuna.trial import TrialState, create_trial

        failed = self._storage.get_trial(self._ids[tune_id])
        history = [*failed.system_attrs.get("retry_history", []), failed.number]
        template = create_trial(state=TrialState.RUNNING, params=failed.params, distributions=failed.distributions,
                                user_attrs={k: v for k, v in failed.user_attrs.items() if k != "outcome"},
                                system_attrs={"failed_trial": failed.number, "retry_history": history},
                                intermediate_values=dict(failed.intermediate_values))
        number = self._storage.create_new_trial(self._study_id, template_trial=template)
        self._ids[tune_id] = number
        self._attrs[tune_id] = dict(template.user_attrs)
        self._done.discard(tune_id)
        self._failed.discard(tune_id)
        return number

    def trial(self, tune_id: str, config: dict) -> Optional[int]:
        """The Optuna trial of a Tune trial, created with its params on first sight (or as a retry of
        a failed one when the trial runs again); None once ended."""
        self.open()
        if tune_id in self._failed:
            return self._retry(tune_id)
        if tune_id in self._done:
            return None
        if tune_id not in self._ids:
            from optuna.trial import TrialState, create_trial

            # one journal line (a template trial): a driver killed between separate lines for the trial,
            # its params and its Tune id left a RUNNING trial no resume could match, for ever in the dashboard
            params = params_of(config, self.distributions)
            template = create_trial(state=TrialState.RUNNING,
                                    params={k: d.to_external_repr(internal) for k, (internal, d) in params.items()},
                                    distributions={k: d for k, (_, d) in params.items()},
                                    user_attrs={TUNE_TRIAL_ID: tune_id})
            number = self._storage.create_new_trial(self._study_id, template_trial=template)
            self._ids[tune_id] = number
            self._attrs[tune_id] = {TUNE_TRIAL_ID: tune_id}
        return self._ids[tune_id]

    def result(self, tune_id: str, config: dict, result: dict) -> None:
        number = self.trial(tune_id, config)
        if number is None:
            return
        attrs = self._attrs[tune_id]
        for key in USER_ATTRS:
            value = result.get(key)
            if isinstance(value, str) and attrs.get(key) != value:
                self._storage.set_trial_user_attr(number, key, value)
                attrs[key] = value
        epoch, value = result.get(M.EPOCH), finite(result.get(self.metric))
        if isinstance(epoch, int) and value is not None:
            self._storage.set_trial_intermediate_value(number, epoch, value)

    def end(self, tune_id: str, config: dict, status: str) -> None:
        """The trial's final state (STATES) and value: its best intermediate value (none for FAIL)."""
        from optuna.trial import TrialState

        number = self.trial(tune_id, config)
        if number is None:
            return
        state = TrialState[STATES.get(status, "COMPLETE")]
        value = None
        if state != TrialState.FAIL:
            value = best_of(self._storage.get_trial(number).intermediate_values, self.mode)
        if state == TrialState.COMPLETE and value is None:
            state = TrialState.FAIL  # Optuna's COMPLETE needs a value: nothing finite was ever reported
        self._storage.set_trial_user_attr(number, "outcome", status)
        self._storage.set_trial_state_values(number, state, [value] if value is not None else None)
        self._done.add(tune_id)
        if state == TrialState.FAIL:
            self._failed.add(tune_id)
