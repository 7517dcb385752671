"""Resume equals a straight run: one sweep interrupted again and again, at moments chosen from its own
progress (the epochs its record holds), by Ctrl-C, SIGTERM, kill -9 of the driver or kill -9 of a
trial's worker, resumed after each, ends with the record of the same sweep run straight through: every
epoch of every trial with identical values (CPU, exact resume), the same best trial, and W&B, the
journal, history.jsonl and trials() agreeing. Local Ray, synthetic data, W&B offline."""
import json
import os
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import pytest

from cifar_ray import analysis
from cifar_ray.record import STATE_GLOB
from cifar_ray.sweep import main
from conftest import (
    SLOWER_DATA,
    WAIT_S,
    SweepProcess,
    alive,
    assert_same_as_straight_run,
    tune_statuses,
    wait_for,
    write_sweep,
)

EPOCHS = 6
LRS = [0.02, 0.05]
# The interruption moments: how many (trial, epoch) reports the record holds when the signal is sent,
# 8 distinct points of the sweep's 12, from its first report to one before its last. The trials run one
# at a time, so at each moment one trial is training (7: the second trial's first epoch is recorded).
MOMENTS = (1, 2, 4, 5, 7, 8, 10, 11)
SWEEP = dict(train__epochs=EPOCHS, train__lr={"grid": LRS}, data=SLOWER_DATA, failures={"max_retries": 10},
             max_concurrent_trials=1)


@pytest.fixture(scope="module")
def straight(ray_session, tmp_path_factory) -> Path:
    """The same sweep run straight through: what happened when nothing went wrong."""
    tmp = tmp_path_factory.mktemp("straight")
    path = write_sweep(tmp, "straight", **SWEEP)
    assert main([str(path), "--storage-path", str(tmp / "results")]) == 0
    return tmp / "results" / "straight"


def recorded(exp: Path) -> int:
    """Distinct (trial, epoch) reports in the results folder's history files."""
    seen = set()
    for history in exp.glob("base_*/history.jsonl"):
        seen |= {(history.parent.name, row.get("epoch")) for row in analysis.read_rows(history)}
    return len(seen)


def group_left(pgid: int) -> list[str]:
    """The processes still in process group `pgid`, as 'PID NAME' (zombies are ended)."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # ended meanwhile
            continue
        head, _, tail = text.rpartition(")")  # PID (NAME) STATE PPID PGRP ...; a name may hold ")"
        state, _, group = tail.split()[:3]
        if int(group) == pgid and state != "Z":
            left.append(f"{stat.parent.name} {head.partition('(')[2]}")
    return left


def reports(exp: Path) -> dict[str, int]:
    """Trial folder -> lines in its history (every report, repeats included)."""
    return {h.parent.name: len(analysis.read_rows(h)) for h in exp.glob("base_*/history.jsonl")}


def checkpointed(exp: Path) -> Optional[dict[str, tuple[str, dict]]]:
    """Trial folder -> (status, metrics of its newest checkpoint) in Tune's newest saved state, the one a
    resume starts from, decoded with Tune's own reader (the newest checkpoint is pickled in it); None
    when that file is not whole."""
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    files = sorted(exp.glob(STATE_GLOB))
    try:
        doc = json.loads(files[-1].read_text())
    except (IndexError, ValueError):
        return None
    out = {}
    for trial_json, meta_json in doc["trial_data"]:
        trial = json.loads(trial_json)
        manager = _TrainingRunMetadata.from_json_state(meta_json).checkpoint_manager
        newest = manager.latest_checkpoint_result if manager is not None else None
        out[trial["relative_logdir"]] = (trial["status"], newest.metrics if newest is not None else {})
    return out


def unsaved_epochs(exp: Path) -> int:
    """The reports a resume after kill -9 makes again: over the trials Tune's saved state has not
    finished, the epochs the record holds beyond the newest checkpoint that state names (the trial is
    trained again from it, with the same values), plus one for a trial whose newest checkpoint there is
    its last epoch (restored from it, the trial trains nothing and reports its last epoch again, so that
    its record ends with its outcome: engine.fit). Tune saves its state on a stop, when it makes a trial
    and at most every 10 s otherwise, and it registers a function trainable's checkpoint one event after
    the report that carried it (its `save` call), so a killed driver's state can name a checkpoint a few
    epochs older than the record, and even older than the last result the same state holds."""
    from cifar_ray import metrics as M

    states = checkpointed(exp)
    behind = 0
    for history in exp.glob("base_*/history.jsonl"):
        held = max((row.get("epoch", 0) for row in analysis.read_rows(history)), default=0)
        if states is None:  # no whole state: every epoch may be trained again
            behind += held
            continue
        status, newest = states.get(history.parent.name, ("", {}))
        if status == "TERMINATED":
            continue
        behind += held - int(newest.get(M.EPOCH, 0))
        behind += newest.get(M.STATUS, M.RUNNING) != M.RUNNING  # its final report, made again
    return behind


def running_worker(exp: Path) -> int:
    """The pid of a trial worker that has epochs left: the last report of a trial still training."""
    def find():
        for history in sorted(exp.glob("base_*/history.jsonl")):
            rows = analysis.read_rows(history)
            if rows and rows[-1].get("epoch", EPOCHS) < EPOCHS and alive(rows[-1].get("pid")):
                return rows[-1]["pid"]
        return None
    return wait_for(find, "a trial worker with epochs left")


def interrupt(proc: SweepProcess, how: str) -> tuple[int, str]:
    """Send the interruption to the process this test started; (exit code, output)."""
    if how == "sigkill":
        proc.kill()
        return -9, proc.output()
    proc.proc.send_signal(signal.SIGINT if how == "sigint" else signal.SIGTERM)
    return proc.finish()


def interrupted_sweep(ray_session, tmp_path: Path, how: str) -> tuple[Path, dict[str, int], int]:
    """The sweep interrupted at each of MOMENTS by `how` and resumed after each, to its end: its results
    folder, the reports of each trial Tune's saved state had finished at an interruption, and the epochs
    the saved states were behind the record at the kills (sigkill; unsaved_epochs)."""
    name = f"cut_{how}"
    path = write_sweep(tmp_path, name, **SWEEP)
    exp = tmp_path / "results" / name
    sweep = SweepProcess(path, tmp_path, ray_session)
    held = 0  # what the record held when this driver started: a moment is reached by its own progress
    finished: dict[str, int] = {}
    behind = 0
    for moment in MOMENTS:
        target = max(moment, held + 1)
        wait_for(lambda t=target, p=sweep.proc: recorded(exp) >= t or p.poll() is not None,
                 f"{how}: {target} reports recorded")
        assert sweep.proc.poll() is None, f"{how}: the sweep ended before moment {moment}: {sweep.output()[-2000:]}"
        if how == "worker_sigkill":
            os.kill(running_worker(exp), signal.SIGKILL)  # a trial worker of the sweep this test started
            continue
        code, out = interrupt(sweep, how)
        if how == "sigkill":
            behind += unsaved_epochs(exp)
        done = [name for name, status in tune_statuses(exp).items() if status == "TERMINATED"]
        finished |= {name: n for name, n in reports(exp).items() if name in done and name not in finished}
        if how != "sigkill":
            assert code == 130, out[-3000:]
            assert "resume with:" in out and "Traceback" not in out, out[-3000:]
            # Tune's own stop notice and its note on trials without results: the sweep's lines instead
            assert "Stop signal received" not in out and "Failed to fetch metrics" not in out, out[-3000:]
        held = recorded(exp)
        sweep = SweepProcess(path, tmp_path, ray_session, "--resume")
    code, out = sweep.finish()
    assert code == 0, out[-3000:]
    assert "Traceback" not in out
    return exp, finished, behind


HOWS = ("sigint", "sigterm", "sigkill", "worker_sigkill")


@pytest.fixture(scope="module")
def interrupted(ray_session, tmp_path_factory, straight) -> dict[str, Future]:
    """The four interrupted sweeps, run at the same time on the session's Ray: each is a chain of drivers
    and trial workers started one after another, which keeps about one core busy, so four at once take
    about half the time of four in turn. A chain's failure is raised by its own test."""
    with ThreadPoolExecutor(len(HOWS)) as pool:
        return {how: pool.submit(interrupted_sweep, ray_session, tmp_path_factory.mktemp(how), how) for how in HOWS}


@pytest.mark.slow
@pytest.mark.parametrize("how", HOWS)
def test_a_sweep_interrupted_at_eight_moments_ends_as_a_straight_run(interrupted, straight, how):
    exp, finished, behind = interrupted[how].result()
    assert_same_as_straight_run(exp, straight, ("train.lr",))
    now = reports(exp)
    for name, n in finished.items():  # a finished trial is not trained again by a resume
        assert now[name] == n, f"{name} had finished ({n} reports) and was trained again ({now[name]})"
    if how == "sigkill":  # a resume continues from the newest checkpoint of the state it finds, no older one
        assert sum(now.values()) <= EPOCHS * len(LRS) + behind, (now, behind)
    else:  # each interruption repeats at most the epoch in flight (no trial restarts from scratch)
        assert sum(now.values()) <= EPOCHS * len(LRS) + len(MOMENTS), now


# One trial after another, the second made between two of Tune's timed state snapshots: grid search
# (the trial is made again with its id) and Optuna (the searcher's state comes from the same snapshot).
LOST_SEARCH = {"grid": dict(train__lr={"grid": LRS}),
               "optuna": dict(train__lr={"loguniform": [0.01, 0.1]},
                              search={"kind": "optuna", "samples": 2, "seed": 0})}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(LOST_SEARCH))
def test_a_trial_tunes_timed_snapshot_missed_is_continued_after_kill_9(ray_session, tmp_path, kind):
    """kill -9 of the driver just after a trial's first report, with Tune's timed state snapshots
    throttled to one a day (as between two of its 10 s snapshots; a trial forces one only after
    `checkpoint.keep` checkpoints): the resumed sweep continues that trial with its id, in the folder it
    had (not a second one with a suffix, nor, under Optuna, a new proposal in its place while it stays
    unfinished), exits 0, and its record equals a straight run of the same file."""
    epochs = 3
    changes = dict(train__epochs=epochs, data=SLOWER_DATA, max_concurrent_trials=1, checkpoint={"keep": epochs},
                   **LOST_SEARCH[kind])
    straight = tmp_path / "straight"
    straight.mkdir()
    assert main([str(write_sweep(straight, "lost", **changes)), "--storage-path", str(straight / "results")]) == 0
    path = write_sweep(tmp_path, "lost", **changes)
    exp = tmp_path / "results" / "lost"
    slow_snapshots = {"TUNE_GLOBAL_CHECKPOINT_S": "86400"}
    sweep = SweepProcess(path, tmp_path, ray_session, env=slow_snapshots)
    # the second trial's first report: Tune's last timed snapshot predates that trial
    wait_for(lambda: recorded(exp) >= epochs + 1 or sweep.proc.poll() is not None, "the second trial's report")
    assert sweep.proc.poll() is None, sweep.output()[-2000:]
    sweep.kill()
    code, out = SweepProcess(path, tmp_path, ray_session, "--resume", env=slow_snapshots).finish()
    assert code == 0, out[-3000:]
    folders = sorted(p.name for p in exp.glob("base_*") if p.is_dir())
    assert len(folders) == 2, folders  # one folder per trial, no `_1a2b` twin, no orphan beside a new proposal
    for folder in folders:
        epochs_seen = {row.get("epoch") for row in analysis.read_rows(exp / folder / "history.jsonl")}
        assert epochs_seen == set(range(1, epochs + 1)), (folder, epochs_seen)
    assert set(analysis.load(exp).trials()["status"]) == {"completed"}
    assert_same_as_straight_run(exp, straight / "results" / "lost", ("train.lr",))


def test_trials_the_search_had_not_made_run_after_a_resume_without_the_old_staging_folder(ray_session, tmp_path):
    """kill -9 of the driver while the second of three trials trains (max_concurrent_trials 1: the search
    makes each trial when a slot frees), its staging folder gone, as on a resume with a new Ray or on
    another machine: the search's state comes from the results folder, the resumed sweep continues the
    second trial with its own policy and makes the third, which it had not made, as a straight run
    does. Ray's pickled searcher state was dropped by the check for whole JSON, and the resume ended,
    exit 0, with two trials of three."""
    epochs = 4  # the second trial's first report leaves it three epochs to train before the third is made
    changes = dict(train__epochs=epochs, data={**SLOWER_DATA, "augment": {"hflip": 0.5}}, max_concurrent_trials=1,
                   configurations=[{}, {"train.lr": 0.02, "data.augment": {"alternate_flip": True}},
                                   {"train.lr": 0.01}])
    straight = tmp_path / "straight"
    straight.mkdir()
    assert main([str(write_sweep(straight, "made", **changes)), "--storage-path", str(straight / "results")]) == 0
    path = write_sweep(tmp_path, "made", **changes)
    exp = tmp_path / "results" / "made"
    sweep = SweepProcess(path, tmp_path, ray_session)
    wait_for(lambda: recorded(exp) >= epochs + 1 or sweep.proc.poll() is not None, "the second trial's first report")
    assert sweep.proc.poll() is None, sweep.output()[-2000:]
    staged = sweep.kill()
    assert len(staged) == 1, staged  # the killed driver's own staging folder, removed
    assert len(list(exp.glob("base_*"))) == 2  # the search had made two trials
    code, out = SweepProcess(path, tmp_path, ray_session, "--resume").finish()
    assert code == 0, out[-3000:]
    assert len([p for p in exp.glob("base_*") if p.is_dir()]) == 3
    assert set(analysis.load(exp).trials()["status"]) == {"completed"}
    assert_same_as_straight_run(exp, straight / "results" / "made", ("train.lr", "data.augment"))


def own_ray_sweep(tmp_path: Path, name: str, act) -> tuple[Path, int, str]:
    """Run SWEEP as a command that starts its own Ray, in a session and process group of its own (led
    by the driver); at its second report call act(driver's pid), then wait for the command to end and for
    every process of its group to end. (the sweep file, its exit code, its console)."""
    import shutil
    import subprocess
    import sys
    import tempfile

    path = write_sweep(tmp_path, name, **SWEEP)
    exp = tmp_path / "results" / name
    ray_tmp = Path(tempfile.mkdtemp(prefix="rg", dir="/tmp"))  # short: Ray's socket paths are limited
    home = tmp_path / "home"  # its Ray's token goes there, not to this user's ~/.ray
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HOME": str(home)}
    log = tmp_path / f"{name}.log"
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "cifar_ray.sweep", str(path), "--storage-path",
                                     str(tmp_path / "results")], stdout=out, stderr=subprocess.STDOUT,
                                    env=env | {"RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"},
                                    start_new_session=True)
            try:
                wait_for(lambda: recorded(exp) >= 2 or proc.poll() is not None, "two reports")
                assert proc.poll() is None, log.read_text()[-3000:]
                act(proc.pid)
                code = proc.wait(timeout=WAIT_S)
                wait_for(lambda: not group_left(proc.pid), "every process of the sweep's Ray to end")
            finally:
                if proc.poll() is None or group_left(proc.pid):
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return path, code, log.read_text()


@pytest.mark.slow
def test_sigterm_to_the_sweeps_whole_process_group_stops_it_with_the_resume_line(ray_session, tmp_path, straight):
    """`timeout`, `kill -TERM -PGID` and systemd signal every process of a group or unit, the Ray a sweep
    started included. That Ray keeps running (its processes block SIGTERM), so the sweep stops as on a
    SIGTERM to the driver alone: Tune's clean stop, the summary and the resume line, exit 130, no process
    of it left, and --resume finishes it as a straight run. Before, the signal ended its GCS and raylet
    too: the stop hung on the dead GCS for 60 s and ended with "Failed to connect to GCS", or, later,
    with the sweep's own line for its lost Ray, or at times with Ray's exit code 1 and no line at all."""
    # the driver, its Ray's GCS, raylet, agents and workers
    path, code, text = own_ray_sweep(tmp_path, "group", lambda pid: os.killpg(pid, signal.SIGTERM))
    assert code == 130, text[-3000:]
    assert "stopping: saving the sweep's state" in text and "resume with:" in text, text[-3000:]
    assert "this sweep's Ray stopped" not in text, text[-3000:]  # its Ray outlived the signal
    assert "Failed to connect to GCS" not in text and "Traceback" not in text, text[-3000:]
    code, out = SweepProcess(path, tmp_path, ray_session, "--resume").finish()
    assert code == 0, out[-3000:]
    assert_same_as_straight_run(tmp_path / "results" / "group", straight, ("train.lr",))


@pytest.mark.slow
def test_a_sweep_whose_own_ray_loses_its_gcs_stops_at_once_and_resumes(ray_session, tmp_path, straight):
    """kill -9 of the GCS of the Ray a sweep started (the kernel's OOM killer picks a big process): the
    sweep stops at once with its line for the lost Ray, the summary and the resume line, exit 130, no
    process of that Ray is left, and --resume finishes it as a straight run. (That it ends the raylet's
    agents itself, rather than their ending 60 s later on their own, is a matter of time this test does
    not measure: it waits for the group to empty, however long that takes.)"""
    def kill_gcs(pid: int) -> None:
        gcs = [int(p.split()[0]) for p in group_left(pid) if p.split()[1] == "gcs_server"]
        assert len(gcs) == 1, group_left(pid)
        os.kill(gcs[0], signal.SIGKILL)  # a process of the group this test started

    path, code, text = own_ray_sweep(tmp_path, "nogcs", kill_gcs)
    assert code == 130, text[-3000:]
    assert "this sweep's Ray stopped: its gcs_server ended (signal 9)" in text, text[-3000:]
    assert "resume with:" in text and "Traceback" not in text, text[-3000:]
    code, out = SweepProcess(path, tmp_path, ray_session, "--resume").finish()
    assert code == 0, out[-3000:]
    assert_same_as_straight_run(tmp_path / "results" / "nogcs", straight, ("train.lr",))
