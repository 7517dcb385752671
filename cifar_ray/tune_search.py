"""The search algorithm grid and random sweeps run under: Tune's BasicVariantGenerator, with each trial's
folder named when the trial is made. Tune names a trial's folder only when it first schedules the trial,
and adds a random suffix (`_1a2b`) when that name already exists. After a kill -9 of the driver, a
trial Tune's last state snapshot did not hold (made in the seconds between two snapshots) is made again
by the restored generator with the same id, and its folder, from the run before the kill, exists: the
trial's reports then went to a second folder (`base_1b2c3_00001_1a2b`), and a third after another kill.
Naming the folder at creation makes Tune reuse it (Trial.init_local_path only invents a name for a trial
that has none), so the record keeps one folder per trial id. Pickled in the sweep's tuner.pkl: a resumed
sweep imports it by this path."""
from __future__ import annotations

from typing import Any, Optional

from ray.tune.search import BasicVariantGenerator


def trial_name(trial: Any) -> str:
    """A trial's name and folder name: `<model>_<trial id>` (the id is unique within the sweep)."""
    return f"{trial.config.get('model.name', 'trial')}_{trial.trial_id}"


def name_folder(trial: Any) -> Any:
    """Give a trial its folder name now, unless it has one (a restored trial keeps the name it had)."""
    if trial is not None and not trial.relative_logdir:
        trial.relative_logdir = trial_name(trial)
        trial.storage.trial_dir_name = trial.relative_logdir
    return trial


class FolderPerTrialGenerator(BasicVariantGenerator):
    """BasicVariantGenerator whose trials carry their folder name from the moment they are made."""

    def next_trial(self) -> Optional[Any]:
        return name_folder(super().next_trial())
