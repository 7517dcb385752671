"""Faults provoked for real: killed workers and drivers, Ctrl-C, damaged checkpoints, W&B outages,
a full disk, secrets, and a 200-trial load. Local Ray, synthetic data."""
import errno
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from cifar_ray import analysis
from cifar_ray.sweep import main
from conftest import (
    SLOWER_DATA,
    TINY,
    WAIT_S,
    SweepProcess,
    assert_records_agree,
    assert_same_as_straight_run,
    fill_disk,
    result_rows,
    results_of,
    trial_dirs,
    wait_for,
    write_sweep,
)


def _kill_worker_after(exp: Path, prefix: str, epoch: int, last: int) -> int:
    def ready():
        for d in trial_dirs(exp, prefix):
            rows = result_rows(d)
            if rows and epoch <= rows[-1]["epoch"] < last and list(d.glob("checkpoint_*")):
                return rows[-1]["pid"]
        return None

    pid = wait_for(ready, f"epoch {epoch}")
    os.kill(pid, signal.SIGKILL)  # a trial worker of the sweep this test started
    return pid


@pytest.mark.slow
def test_killed_worker_resumes_and_matches_an_undisturbed_run(ray_session, tmp_path):
    common = dict(train__epochs=5, data=SLOWER_DATA, model={"name": "netconv", "width": 0.5},
                  failures={"max_retries": 2})
    path = write_sweep(tmp_path, "killed", **common)
    sweep = SweepProcess(path, tmp_path, ray_session)
    exp = tmp_path / "results" / "killed"
    _kill_worker_after(exp, "netconv", 2, 5)
    code, out = sweep.finish()
    assert code == 0, out
    assert "Traceback" not in out
    killed = results_of(tmp_path, "killed")
    assert killed.loc[0, "status"] == "completed" and killed.loc[0, "epochs"] == 5
    epochs = [r["epoch"] for r in result_rows(trial_dirs(exp, "netconv")[0])]
    assert epochs.count(1) == 1, f"restarted from scratch: {epochs}"
    assert sorted(set(epochs)) == [1, 2, 3, 4, 5]
    assert_records_agree(exp)  # the retried trial continued its one W&B run

    calm = write_sweep(tmp_path, "calm", **common)
    assert main([str(calm), "--storage-path", str(tmp_path / "results")]) == 0
    undisturbed = results_of(tmp_path, "calm")
    for m in ("val_acc", "val_loss", "train_loss", "train_acc"):
        assert killed.loc[0, m] == undisturbed.loc[0, m], m


@pytest.mark.slow
def test_killed_worker_without_retries_errors_and_exits_3(ray_session, tmp_path):
    path = write_sweep(tmp_path, "no_retry", train__epochs=4, train__lr={"grid": [0.01, 0.02]}, data=SLOWER_DATA,
                       failures={"max_retries": 0})
    sweep = SweepProcess(path, tmp_path, ray_session)
    exp = tmp_path / "results" / "no_retry"
    _kill_worker_after(exp, "base", 1, 4)
    code, out = sweep.finish()
    assert code == 3, out
    assert "Traceback" not in out
    df = results_of(tmp_path, "no_retry")
    assert sorted(df["status"]) == ["completed", "errored"]
    errored = df[df["status"] == "errored"].iloc[0]
    assert f"errored: {errored['trial_id']}" in out
    assert_records_agree(exp)  # the errored trial's run holds the epochs it reported


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    from ray import tune

    from cifar_ray.engine import save_state
    from cifar_ray.trainable import _checkpoint_state

    for i, epoch in enumerate((1, 2)):
        d = tmp_path / f"checkpoint_{i:06d}"
        d.mkdir()
        save_state({"epoch": epoch, "w": torch.full((3,), float(epoch))}, d / "state.pt")
    newest = tmp_path / "checkpoint_000001" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:40])  # truncated
    state = _checkpoint_state(tune.Checkpoint.from_directory(str(tmp_path / "checkpoint_000001")))
    assert state["epoch"] == 1
    assert "unreadable" in capsys.readouterr().err


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from cifar_ray import engine
    from cifar_ray.engine import load_state, save_state

    path = tmp_path / "state.pt"
    save_state({"epoch": 1}, path)

    def full_disk(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine.torch, "save", full_disk)
    with pytest.raises(OSError, match="disk full while writing checkpoint .* previous checkpoint is intact"):
        save_state({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_state(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_unreachable_wandb_warns_and_the_sweep_completes(ray_session, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    path = write_sweep(tmp_path, "wandb_down", wandb={"mode": "online", "project": "p"})
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 0
    assert "W&B is not usable" in capsys.readouterr().err
    assert len(results_of(tmp_path, "wandb_down")) == 1
    assert list((tmp_path / "results" / "wandb_down").glob("wandb/wandb/offline-run-*"))


def test_no_secret_reaches_results_logs_or_wandb(ray_session, tmp_path, monkeypatch, capfd):
    """Canary secrets in the environment of a real sweep: in no file of the results folder or of Ray's
    session folder (Tune would pass AWS variables to every trial, and Ray's runtime-env agent logs them)."""
    import ray

    secrets = ["wandb-SECRET-0123456789abcdef0123456789abcdef", "aws-SECRET-9876543210", "aws-KEYID-CANARY"]
    monkeypatch.setenv("WANDB_API_KEY", secrets[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets[1])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", secrets[2])
    path = write_sweep(tmp_path, "secrets", wandb={"mode": "offline"})
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 0
    out, err = capfd.readouterr()
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    files = [f for root in (tmp_path / "results", session) for f in root.rglob("*") if f.is_file()]
    assert any("runtime_env" in f.name for f in files), "the runtime-env agent's log was not searched"
    for s in secrets:
        assert s not in out + err
        for f in files:
            assert s.encode() not in f.read_bytes(), f


def _tree_rss_mib(root: int) -> int:
    """Resident memory of process `root` and all its descendants (here: the test process, the local
    Ray it started and the sweep's workers), MiB, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total // 1024


@pytest.mark.slow
def test_200_short_trials_are_all_accounted_for(ray_session, tmp_path):
    path = write_sweep(tmp_path, "load", seeds=list(range(200)), train__epochs=1,
                       data={**TINY["data"], "synthetic_size": 240, "val_size": 40}, wandb={"mode": "disabled"},
                       checkpoint={"keep": 1})
    used: list[int] = []
    stop = threading.Event()

    def sample():  # memory of this process tree, every half second
        while not stop.is_set():
            used.append(_tree_rss_mib(os.getpid()))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 0
    finally:
        stop.set()
        sampler.join()
    df = results_of(tmp_path, "load")
    assert len(df) == 200 and sorted(df["train.seed"]) == list(range(200))
    assert set(df["status"]) == {"completed"}
    quarter = max(len(used) // 4, 1)
    first, last = max(used[:quarter]), max(used[-quarter:])
    print(f"memory of the sweep's processes: peak {max(used)} MiB, first quarter {first} MiB, last quarter {last} MiB")
    assert last < first + 1024, "the sweep's memory grew over the sweep"
    assert len(analysis.load(tmp_path / "results" / "load").trials()) == 200


@pytest.mark.slow
def test_one_ctrl_c_says_what_happens_in_the_sweeps_words(ray_session, tmp_path):
    """Ctrl-C once while the first trials train and others wait: the sweep's own line on what happens
    next, once, instead of Tune's timestamped warnings (its stop notice with "press CTRL+C to skip", and
    a FileNotFoundError line per trial that never reported); the last progress line says stopped."""
    path = write_sweep(tmp_path, "once", train__epochs=20, train__lr={"grid": [0.01, 0.02, 0.03, 0.04]},
                       data=SLOWER_DATA)
    exp = tmp_path / "results" / "once"
    sweep = SweepProcess(path, tmp_path, ray_session)
    wait_for(lambda: any(result_rows(d) for d in trial_dirs(exp, "base")) or sweep.proc.poll() is not None,
             "a trial's first epoch")
    sweep.proc.send_signal(signal.SIGINT)
    code, out = sweep.finish()
    assert code == 130, out
    assert out.count("stopping: saving the sweep's state for --resume, then the summary") == 1, out
    for noise in ("WARNING", "Stop signal received", "Failed to fetch metrics", "FileNotFoundError", "Traceback"):
        assert noise not in out, (noise, out)
    progress = [line for line in out.splitlines() if " done, " in line and " elapsed, " in line]
    assert progress[-1].endswith("elapsed, stopped"), progress
    assert "resume with:" in out


GAPS = (0.2, 0.5, 1.5, 3.0)  # seconds between the two presses


def ctrl_c_twice(ray_session, tmp_path: Path, gap: float) -> Path:
    """A sweep Ctrl-C'd twice at epoch 2, `gap` seconds apart, then resumed: its results folder."""
    # a name of its own: Ray stages a driver's files under the experiment's name and the second it began,
    # so same-named sweeps started in one second on one Ray share that folder (docs/reliability.md)
    name = f"ctrl_c_twice_{gap:g}".replace(".", "_")
    path = write_sweep(tmp_path, name, train__epochs=6, data=SLOWER_DATA)
    exp = tmp_path / "results" / name
    sweep = SweepProcess(path, tmp_path, ray_session)
    wait_for(lambda: any(r["epoch"] >= 2 for d in trial_dirs(exp, "base") for r in result_rows(d)), "epoch 2")
    sweep.proc.send_signal(signal.SIGINT)
    time.sleep(gap)  # the gap between the two presses is what this test varies
    if sweep.proc.poll() is None:
        sweep.proc.send_signal(signal.SIGINT)
    code, out = sweep.finish()
    assert code == 130, f"gap {gap}: {out}"
    assert "--resume" in out and "Traceback" not in out and "Stop signal received" not in out, out
    code, out = SweepProcess(path, tmp_path, ray_session, "--resume").finish()
    assert code == 0, out
    return exp


@pytest.fixture(scope="module")
def pressed_twice(ray_session, tmp_path_factory) -> dict[float, Future]:
    """The four gaps at the same time on the session's Ray (each sweep mostly starts processes one after
    another on one core); a sweep's failure is raised by its own test."""
    with ThreadPoolExecutor(len(GAPS)) as pool:
        return {gap: pool.submit(ctrl_c_twice, ray_session, tmp_path_factory.mktemp(f"gap{gap}"), gap)
                for gap in GAPS}


@pytest.mark.slow
@pytest.mark.parametrize("gap", GAPS)
def test_second_ctrl_c_exits_at_once_and_the_sweep_still_resumes(pressed_twice, gap):
    """The second Ctrl-C lands, depending on the gap, in training, Tune's final save, the summary or
    Ray's shutdown: each time exit 130 with the resume line and no traceback."""
    exp = pressed_twice[gap].result()
    assert results_of(exp.parents[1], exp.name).loc[0, "epochs"] == 6
    assert_records_agree(exp)


# Tune's clock for the names of its folders, held at one second in a driver that starts with this on its
# path: two drivers with it begin "in the same second" however far apart they run
FROZEN_SECOND = """import ray.tune.utils
ray.tune.utils.date_str = lambda: "2026-01-01_00-00-00"
"""


@pytest.mark.slow
def test_same_named_sweeps_begun_in_one_second_keep_their_own_records(ray_session, tmp_path):
    """Two sweeps of one name, each with its own results folder, begun in the same second on one Ray:
    Tune stages a driver's files under the sweep's name and that second, so without a folder of each
    driver's own the second sweep copied the first's trial into its results. Each folder holds its own
    trial only, and its stores agree."""
    hook = tmp_path / "frozen_second"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FROZEN_SECOND)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)}
    for lr, where in ((0.02, "first"), (0.05, "second")):
        (tmp_path / where).mkdir()
        path = write_sweep(tmp_path / where, "twin", train__lr=lr)
        code, out = SweepProcess(path, tmp_path / where, ray_session, env=env).finish()
        assert code == 0, out[-3000:]
    for lr, where in ((0.02, "first"), (0.05, "second")):
        exp = tmp_path / where / "results" / "twin"
        folders = [p.name for p in exp.iterdir() if p.is_dir() and p.name.startswith("base_")]
        assert len(folders) == 1, (where, folders)
        trials = analysis.load(exp).trials()
        assert list(trials["train.lr"]) == [lr], trials
        assert_records_agree(exp)


@pytest.mark.slow
def test_a_second_driver_on_a_running_sweeps_folder_exits_2_and_writes_nothing(ray_session, tmp_path):
    """`--resume` typed in a second terminal while the sweep still runs, or the same sweep started again:
    before the folder's driver lock, the second driver trained the running trial too (two histories of
    its epochs in one file) and Tune errored on checkpoints the other driver had rotated away. Each is
    refused in one line naming the running driver, exit 2, having written nothing; the first goes on."""
    import json
    import signal

    path = write_sweep(tmp_path, "twice", train__epochs=10_000, checkpoint={"keep": 1},
                       data={**TINY["data"], "synthetic_size": 240, "val_size": 40})
    exp = tmp_path / "results" / "twice"

    def reports() -> list[dict]:
        return [row for h in exp.glob("base_*/history.jsonl") for row in analysis.read_rows(h)]

    first = SweepProcess(path, tmp_path, ray_session)
    wait_for(lambda: len(reports()) >= 2 or first.proc.poll() is not None, "the first driver's second epoch")
    assert first.proc.poll() is None, first.output()[-3000:]
    written = {name: (exp / name).read_bytes() for name in ("sweep.yaml", "provenance.json")}
    for extra in (("--resume",), ()):
        code, out = SweepProcess(path, tmp_path, ray_session, *extra).finish()
        assert code == 2, out[-3000:]
        assert f"another sweep driver is running on it (pid {first.pid} on host " in out, out
        assert "Traceback" not in out and "resume with: python -m cifar_ray.sweep" in out, out
    assert first.proc.poll() is None, first.output()[-3000:]  # the first went on throughout
    assert {name: (exp / name).read_bytes() for name in written} == written  # no resume entry, no new copy
    epochs = [row["epoch"] for row in reports()]
    assert epochs == list(range(1, len(epochs) + 1)), epochs  # each epoch once: one driver trained it

    first.proc.send_signal(signal.SIGINT)  # (a kill -9 frees the folder too: tests/test_resume_property.py)
    code, out = first.finish()
    assert code == 130, out[-3000:]
    assert json.loads((exp / "provenance.json").read_text())["resumed"] == []


@pytest.mark.slow
def test_a_ray_the_sweep_starts_is_private_to_the_user(tmp_path):
    """Without --address the sweep starts its own Ray: its session folder, logs and auth token are the
    user's only (a 0777 session folder and a 0644 token let other users read logs or join the cluster)."""
    import stat
    import subprocess
    import sys
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="rp", dir="/tmp"))  # short: Ray's socket paths are limited
    home = tmp_path / "home"
    home.mkdir()
    path = write_sweep(tmp_path, "private", train__epochs=1, wandb={"mode": "disabled"})
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "cifar_ray.sweep", str(path), "--storage-path", str(tmp_path / "results")]
    r = subprocess.run(command, capture_output=True, text=True, env=env, timeout=WAIT_S)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    root = ray_tmp / f"cifar_ray-{os.getuid()}"  # Ray's temporary root, inside a folder of the user's alone
    assert stat.S_IMODE(root.stat().st_mode) == 0o700, oct(root.stat().st_mode)
    sessions = [p for p in (root / "ray").glob("session_2*") if p.is_dir() and not p.is_symlink()]
    assert sessions
    for log in (f for folder in sessions for f in (folder / "logs").iterdir() if f.is_file()):
        assert stat.S_IMODE(log.stat().st_mode) & 0o077 == 0, (log, oct(log.stat().st_mode))
    token = home / ".ray" / "auth_token"
    assert token.is_file()
    assert stat.S_IMODE(token.stat().st_mode) & 0o077 == 0, oct(token.stat().st_mode)


def test_trials_of_a_ray_the_sweep_starts_run_at_the_sweeps_priority(tmp_path):
    """Ray starts workers 15 nice levels below the raylet; a local Ray the sweep starts does not, so a
    busy machine shares its cores with the trials instead of starving them (ray_process.WORKER_NICENESS).
    Started under `nice -n 3`, the sweep's Ray and its workers run at 3, its own priority."""
    import shutil
    import subprocess
    import sys
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))  # short: Ray's socket paths are limited
    code = ("import os, ray; from cifar_ray.ray_process import start_ray; start_ray(None, False); "
            "print('niceness', os.nice(0), ray.get(ray.remote(lambda: os.nice(0)).remote()))")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    try:
        done = subprocess.run(["nice", "-n", "3", sys.executable, "-c", code], capture_output=True, text=True,
                              env=env | {"RAY_TMPDIR": str(ray_tmp), "HOME": str(tmp_path)}, timeout=WAIT_S)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["niceness", "3", "3"], done.stdout


def _snapshot(exp: Path) -> dict[Path, bytes]:
    """Every plain file of the running sweep's results folder (W&B's own files aside) and its bytes.
    A write in flight (`.<name>.<random>.tmp`, renamed to its name when whole) is not a file written
    yet, and a file renamed or rotated away while the folder is read was not there."""
    files = {}
    for p in exp.rglob("*"):
        if not p.is_file() or "wandb" in p.relative_to(exp).parts or p.name.endswith(".tmp"):
            continue
        try:
            files[p] = p.read_bytes()
        except FileNotFoundError:
            continue
    return files


def _is_json(data: bytes) -> bool:
    import json

    try:
        json.loads(data)
        return True
    except ValueError:
        return False


def _assert_intact(before: dict[Path, bytes]) -> None:
    """Each file that was there is still whole: appended-to files start with what they held, files Tune
    rewrites (result.json, progress.csv, params, its state) are complete documents, checkpoints load;
    a file may be gone only where Tune rotates it (older checkpoints beyond `keep`)."""
    import json

    from cifar_ray.engine import load_state

    for path, old in before.items():
        if not path.exists():
            assert path.parent.name.startswith("checkpoint_") or not path.parent.exists(), f"{path} vanished"
            continue
        new = path.read_bytes()
        assert len(new) >= (1 if old else 0), f"{path}: emptied"
        if path.name in ("history.jsonl", "optuna.journal"):
            assert new.startswith(old), f"{path}: rewritten, not appended to"
        elif path.suffix == ".json" and path.name != "result.json" and _is_json(old):  # Tune pickles some
            assert _is_json(new), f"{path}: no longer a whole JSON document: {new[:80]!r}"
        elif path.name == "result.json":
            for line in new.decode().splitlines():
                json.loads(line)
        elif path.name == "state.pt":
            load_state(path)


@pytest.mark.slow
def test_a_full_disk_stops_the_sweep_in_one_line_keeps_every_file_and_resume_completes(ray_session, tmp_path,
                                                                                        small_disk):
    common = dict(train__epochs=8, train__lr={"grid": [0.02, 0.05]}, data=SLOWER_DATA)
    storage = small_disk / "results"
    path = write_sweep(tmp_path, "full", **common)
    exp = storage / "full"
    sweep = SweepProcess(path, tmp_path, ray_session, "--storage-path", str(storage))

    def recorded_with_checkpoints():
        dirs = trial_dirs(exp, "base")
        return len(dirs) == 2 and all(list(d.glob("checkpoint_*/state.pt")) and
                                      len(analysis.read_rows(d / "history.jsonl")) >= 2 for d in dirs)

    wait_for(recorded_with_checkpoints, "two epochs recorded and a checkpoint for each trial")
    before = _snapshot(exp)
    ballast = fill_disk(small_disk)
    code, out = sweep.finish()
    assert code == 1, out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"the disk holding {exp} is full (" in errors[0] and "--resume" in errors[0], out
    _assert_intact(before)
    assert not [p for p in exp.rglob("*.tmp")], "a temporary file was left behind"

    ballast.unlink()
    code, out = SweepProcess(path, tmp_path, ray_session, "--storage-path", str(storage), "--resume").finish()
    assert code == 0, out
    _assert_intact(before)

    straight = write_sweep(tmp_path, "straight", **common)
    assert main([str(straight), "--storage-path", str(tmp_path / "results")]) == 0
    assert_same_as_straight_run(exp, tmp_path / "results" / "straight", ("train.lr",))


def test_a_failed_upload_of_rays_sync_thread_is_one_line_without_traceback():
    """A disk that fills during one of Tune's background uploads: Ray's syncer logs the failure with
    its traceback written into the message (seen in a loaded run of the full-disk test above)."""
    import io
    import logging

    from ray.train._internal.syncer import _BackgroundSyncer

    from cifar_ray.ray_process import quiet_logs

    def upload():
        raise OSError(errno.ENOSPC, "No space left on device")

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    ray_logger = logging.getLogger("ray")
    ray_logger.addHandler(handler)
    try:
        quiet_logs(verbose=False)
        syncer = _BackgroundSyncer()
        syncer._current_cmd = (upload, {})
        syncer.retry()  # Ray's own thread runs the failing upload
        syncer._launch_sync_process((lambda: None, {}))  # the next upload finds the last one failed
        syncer.wait()
    finally:
        ray_logger.removeHandler(handler)
    lines = stream.getvalue().strip().splitlines()
    assert lines == ["Last sync command failed with the following error: OSError: [Errno 28] No space left on device"]


def test_tune_saves_its_state_only_once_its_last_upload_has_ended(ray_session, tmp_path, monkeypatch, capfd):
    """Tune's upload thread lists its staging folder and copies it file after file while its loop goes
    on; a save into the folder meanwhile (the searcher's state goes through a temporary file renamed at
    once) failed an upload that had listed the temporary file: an ERROR line on the console (seen under
    load). Here each upload is held until the loop either saves or waits for it, and the loop snapshots
    at every step (TUNE_GLOBAL_CHECKPOINT_S=0): without cifar_ray.tune_search.finish_upload nearly every
    save begins while an upload is held."""
    from ray.train._internal import syncer as ray_syncer
    from ray.tune.execution.tune_controller import TuneController

    lock = threading.Lock()
    uploads: list[threading.Event] = []  # one per upload in flight: set to let it go on
    saves_during_upload, let_go_by_a_wait, stuck = [], [], []
    thread = ray_syncer._BackgroundProcess
    start, save, join = thread.start, TuneController.save_to_dir, thread.wait

    def held(upload):
        def held_upload(*args, **kwargs):
            go = threading.Event()
            with lock:
                uploads.append(go)
            try:
                if not go.wait(WAIT_S):  # a safety net: neither a save nor a wait came
                    stuck.append(1)
                return upload(*args, **kwargs)
            finally:
                with lock:
                    uploads.remove(go)
        return held_upload

    def held_start(self, *args, **kwargs):  # the thread of one upload (the syncer, pickled, keeps Ray's)
        self._fn = held(self._fn)
        return start(self, *args, **kwargs)

    def watched_save(self):
        with lock:
            if uploads:
                saves_during_upload.append(len(uploads))
            for go in uploads:
                go.set()
        return save(self)

    def watched_wait(self, timeout=None):
        with lock:
            let_go_by_a_wait.extend(1 for go in uploads if not go.is_set())
            for go in uploads:
                go.set()
        return join(self, timeout)

    monkeypatch.setattr(thread, "start", held_start)
    monkeypatch.setattr(TuneController, "save_to_dir", watched_save)
    monkeypatch.setattr(thread, "wait", watched_wait)
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")
    path = write_sweep(tmp_path, "uploads", train__epochs=2, train__lr={"grid": [0.01, 0.02]})
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 0
    out = capfd.readouterr()
    assert not stuck
    assert saves_during_upload == [], f"{len(saves_during_upload)} saves began while an upload ran"
    assert len(let_go_by_a_wait) >= 3, "the loop did not wait for its uploads"  # a snapshot per step
    assert "Saving experiment state" not in out.out + out.err
    df = results_of(tmp_path, "uploads")
    assert sorted(df["epochs"]) == [2, 2] and set(df["status"]) == {"completed"}


def test_a_missing_ray_tmpdir_is_one_line(tmp_path):
    import subprocess
    import sys

    path = write_sweep(tmp_path, "tmpdir")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(tmp_path / "missing")}
    done = subprocess.run([sys.executable, "-m", "cifar_ray.sweep", str(path), "--storage-path",
                           str(tmp_path / "results")], env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"error: RAY_TMPDIR={tmp_path / 'missing'}: no such folder; create it, "
                                                f"or unset RAY_TMPDIR to use /tmp"]
    assert not (tmp_path / "missing").exists()
