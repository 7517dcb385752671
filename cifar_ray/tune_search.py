"""The search algorithm grid and random sweeps run under: Tune's BasicVariantGenerator, with each trial's
folder named when the trial is made. Tune names a trial's folder only when it first schedules the trial,
and adds a random suffix (`_1a2b`) when that name already exists. After a kill -9 of the driver, a
trial Tune's last state snapshot did not hold (made in the seconds between two snapshots) is made again
by the restored generator with the same id, and its folder, from the run before the kill, exists: the
trial's reports then went to a second folder (`base_1b2c3_00001_1a2b`), and a third after another kill.
Naming the folder at creation makes Tune reuse it (Trial.init_local_path only invents a name for a trial
that has none), so the record keeps one folder per trial id. Pickled in the sweep's tuner.pkl: a resumed
sweep imports it by this path.

A searcher that draws (Optuna) is restored from the same snapshot, so a trial made after it was drawn
again in a new trial's place while the old one's folder stayed unfinished for ever; `new_trials_snapshot`
makes Tune save its state, searcher included, in the step that makes a trial; `staging_of_its_own` keeps
two sweeps of one name begun in the same second from sharing Tune's staging folder."""
from __future__ import annotations

import contextlib
import copy
import math
import pickle
from typing import Any, Iterator, Optional

from ray.tune.search import BasicVariantGenerator, Searcher

from cifar_ray import metrics as M
from cifar_ray.record import PACK_MEMBERS, PACK_PREFIX, member_id, pack_value


def trial_name(trial: Any) -> str:
    """A trial's name and folder name: `<model>_<trial id>` (the id is unique within the sweep); a pack's
    (resources.fuse) `pack_<model>_<trial id>`, its members' folders being `<model>_<trial id>_<k>`."""
    name = f"{trial.config.get('model.name', 'trial')}_{trial.trial_id}"
    return PACK_PREFIX + name if PACK_MEMBERS in trial.config else name


def name_folder(trial: Any) -> Any:
    """Give a trial its folder name now, unless it has one (a restored trial keeps the name it had)."""
    if trial is not None and not trial.relative_logdir:
        trial.relative_logdir = trial_name(trial)
        trial.storage.trial_dir_name = trial.relative_logdir
    return trial


@contextlib.contextmanager
def new_trials_snapshot() -> Iterator[None]:
    """While open, the Tuner's loop saves its experiment state (trials and searcher) to storage, and
    waits for it, at the end of every step that made a trial, besides Tune's timed snapshots (every
    10 s or more). A kill -9 of the driver then finds every trial that has started in the saved
    state: the resumed sweep continues it under its id, in its folder, with the searcher that drew it.
    Costs one snapshot per step that makes trials: tests/test_reliability.py's 200-trial sweep took 96.7 s
    with it, 114.3 s without (fresh-clone `.ci/run`s, 2-core machine, 2026-12-03/04). Tune 2.60 has no
    option for it, so its controller class is replaced by a subclass in `ray.tune.tune` (the module
    that makes it) for the duration, in this process only. The subclass also tells cifar_ray.storage
    when a state was written to Tune's staging folder: checkpoints Tune rotated out are deleted only once
    a state written after that is whole on storage. And it saves only once Tune's last upload of the
    staging folder has ended (`finish_upload`)."""
    from ray.tune import tune as tune_module

    from cifar_ray.storage import snapshot_serialized

    made = tune_module.TuneController

    class SnapshotNewTrials(made):  # type: ignore[misc,valid-type]
        _made_trial = False

        def add_trial(self, trial: Any) -> None:
            super().add_trial(trial)
            self._made_trial = True

        def checkpoint(self, force: bool = False, wait: bool = False) -> None:
            made_trial, self._made_trial = self._made_trial, False
            super().checkpoint(force=force or made_trial, wait=wait or made_trial)

        def save_to_dir(self) -> None:
            finish_upload(self._storage)
            super().save_to_dir()
            # checkpoints rotated out before this state may go once it is on storage
            snapshot_serialized(self.experiment_state_file_name)

    tune_module.TuneController = SnapshotNewTrials  # type: ignore[misc]
    try:
        yield
    finally:
        tune_module.TuneController = made  # type: ignore[misc]


def finish_upload(storage: Any) -> None:
    """Waits for the upload of the driver's staging folder that Tune's thread may still be running.
    Tune saves its state into that folder (the searcher's through a temporary file it renames at once)
    while that upload, in a thread, lists the folder and copies it file after file; it waits for the
    upload only after saving (a forced snapshot), or not at all (a timed one). An upload that had listed
    a temporary file then failed "[Errno 2] Failed to open local file '.../.<uuid>-tmp-basic-variant-
    state-...json'": an ERROR line on a user's console and an upload round lost (seen under load,
    2026-12-04). An upload that fails for another reason (a full disk) is logged as Tune logs it."""
    import logging

    try:
        storage.syncer.wait()
    except Exception:
        logging.getLogger("ray.tune.execution.experiment_state").error(
            f"Saving experiment state to storage at '{storage.experiment_fs_path}' failed with exception: ",
            exc_info=True)


@contextlib.contextmanager
def staging_of_its_own() -> Iterator[None]:
    """While open, the folder Tune stages this driver's files in (experiment state, each trial's
    params.json and result.json, before it copies them to the results folder) carries this process's id.
    Tune names it `<Ray session folder>/artifacts/<the second the sweep began>/<sweep name>/driver_artifacts`,
    so two sweeps of one name begun in the same second on one machine's Ray (two terminals, a script that
    starts several, two users of one head) staged into one folder, and each copied the other's trials into
    its own results folder: a resumed 1-trial sweep found 4 trials there, 3 of them "unfinished" for ever.
    A resumed sweep stages where its trials say (Tune takes the folder from them). Tune 2.60 has no
    option for it, so `StorageContext.__init__` is wrapped for the duration, in this process only."""
    import os

    from ray.train._internal import storage

    made = storage.StorageContext.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        self._timestamp = f"{self._timestamp}_{os.getpid()}"

    storage.StorageContext.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        storage.StorageContext.__init__ = made  # type: ignore[method-assign]


class FolderPerTrialGenerator(BasicVariantGenerator):
    """BasicVariantGenerator whose trials carry their folder name from the moment they are made, and
    whose points may hold mappings as values (a grid of augment policies). Tune reads a mapping in a
    point as nested keys to look up in the param_space ("KeyError: 'hflip'"), so such values are kept
    aside here, by point, and put in the trial's config when Tune makes it: the n-th trial it makes is
    the n-th point (`%05d` in its id counts them). Saved with the generator's state for a resume."""

    def __init__(self, points_to_evaluate: Optional[list[dict]] = None, **kwargs: Any):
        points = [dict(p) for p in points_to_evaluate or []]
        keys = {k for p in points for k, v in p.items() if isinstance(v, dict)}  # a policy's name beside them too
        self._whole = [{k: p.pop(k) for k in keys if k in p} for p in points]
        super().__init__(points_to_evaluate=points or None, **kwargs)

    def next_trial(self) -> Optional[Any]:
        trial = super().next_trial()
        whole = getattr(self, "_whole", [])  # a generator pickled before it held them has none
        n = int(trial.trial_id.rsplit("_", 1)[1]) if trial is not None else len(whole)
        if n < len(whole):
            trial.config.update(copy.deepcopy(whole[n]))
        return name_folder(trial)


class PackedSearch(Searcher):
    """Optuna in a fused sweep (resources.fuse): each Tune trial is a pack whose members Optuna proposes
    one by one (`inner.suggest` once per member, under the member's id), so the study holds one Optuna
    trial per member, each told its own reports and its own end: a member's intermediate values as it
    reports them, its completion when it leaves the pack (diverged, stopped early) or the pack ends.
    Only searched keys a pack carries per member can be searched (cifar_ray.packs checks), so every
    proposal fits the pack. Pickled in the sweep's searcher state: a resumed sweep imports it by this path."""

    def __init__(self, inner: Searcher, fuse: int, total: int, shared: dict, head: dict, metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.inner = inner  # OptunaSearch over the searched keys, metric and mode set
        self.fuse, self.total, self.shared = fuse, total, shared  # pack size, trials in all, the fixed keys
        self.head = head  # what a pack's config shows Tune (sweep.pack_points): model.name, train.epochs
        self.issued = 0
        self.members: dict[str, list[str]] = {}  # pack id -> its members' ids
        self.last: dict[str, dict] = {}  # member id -> its latest report, as the inner searcher reads one
        self.done: set[str] = set()

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], config: dict, **spec: Any) -> bool:
        return True  # configured when made: the Tuner's param_space holds packs, not the searched keys

    def suggest(self, trial_id: str) -> Optional[Any]:
        n = min(self.fuse, self.total - self.issued)
        if n <= 0:
            return Searcher.FINISHED
        ids, configs = [], []
        for j in range(n):
            mid = member_id(trial_id, j)
            params = self.inner.suggest(mid)
            if not isinstance(params, dict):
                break
            ids.append(mid)
            configs.append({**self.shared, **params})
        if not ids:
            return None
        self.issued += len(ids)
        self.members[trial_id] = ids
        return {**self.head, PACK_MEMBERS: pack_value(configs)}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        for mid in self.members.get(trial_id, []):
            prefix = f"{M.MEMBERS}/{mid}/"
            if prefix + M.EPOCH not in result:
                continue  # it did not train this epoch (it left the pack before)
            row = {self.metric: result.get(prefix + str(self.metric)), "training_iteration": result[prefix + M.EPOCH]}
            self.last[mid] = row
            if mid in self.done:
                continue
            value = row[self.metric]
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.inner.on_trial_result(mid, row)
            if result.get(prefix + M.STATUS) != M.RUNNING:
                self._complete(mid, row, False)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if result:
            self.on_trial_result(trial_id, result)
        for mid in self.members.get(trial_id, []):
            if mid not in self.done:
                self._complete(mid, self.last.get(mid), error)

    def _complete(self, mid: str, row: Optional[dict], error: bool) -> None:
        value = (row or {}).get(self.metric)
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        self.inner.on_trial_complete(mid, row if finite else None, error=error)
        self.done.add(mid)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class ActingSpace:
    """Optuna's define-by-run search space for a sweep with keys that act only under some value of
    another searched key (cifar_ray.applies): a trial is asked for such a key only where it acts, so an
    SGD trial has no muon_lr and Optuna's model of muon_lr learns from Muon's trials alone. The keys
    they depend on come first. Pickled in the sweep's searcher state: a resumed sweep imports it by this path."""

    def __init__(self, domains: dict[str, Any], constants: dict[str, Any]):
        from cifar_ray.applies import CONDITIONS

        # (key, kind, values) in the order asked: the keys others depend on before those
        self.domains = sorted(((k, d.kind, tuple(d.values)) for k, d in domains.items()),
                              key=lambda item: item[0] in CONDITIONS)
        self.constants = dict(constants)

    def __call__(self, trial: Any) -> None:
        from cifar_ray.applies import acts

        picked: dict[str, Any] = {}
        for key, kind, values in self.domains:
            if not acts(key, self.constants | picked):
                continue
            if kind == "choice":
                picked[key] = trial.suggest_categorical(key, list(values))
            elif kind == "randint":  # inclusive both ends, as the sweep file writes it
                picked[key] = trial.suggest_int(key, values[0], values[1])
            else:
                picked[key] = trial.suggest_float(key, values[0], values[1], log=kind == "loguniform")
        return None
