"""Shared fixtures: an isolated cache per test, small generated data sets on disk."""
from __future__ import annotations

import io
import os
import pickle
import sys
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

REAL_DATA = os.environ.get("CIFAR_RAY_DATA")

# One torch thread in each test process, and in the drivers and Ray processes it starts (they inherit
# it; a trial sets its own count from resources.cpu). `make test` runs two workers on two cores beside
# Ray's trial processes: with more OpenMP threads than free cores, torch's threads wait on each other.
# Measured 2026-12-04 on the 2-core machine, the resnet18 pack of tests/test_fuse.py's float64 case (one
# epoch): with one busy loop beside, 18.3 s and 19.1 s with 2 threads, 10.0 s and 10.5 s with 1 (with
# both cores free 2 threads win, 5.8 s against 9.3 s, but the two workers keep both cores busy).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    """Once, before `make test`'s two workers (pytest-xdist) start their Rays: Ray's token file. Each local
    Ray writes ~/.ray/auth_token when there is none, so two workers starting at once could each write
    their own, and a sweep started by one would carry the other's token."""
    if "torch" in sys.modules:  # imported before this file (a plugin): the thread count above, all the same
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if hasattr(config, "workerinput"):  # a worker: the controller has done it
        return
    if os.environ.get("RAY_AUTH_MODE", "token") == "token" and not (Path.home() / ".ray" / "auth_token").exists():
        from ray._private.authentication.authentication_token_setup import generate_and_save_token

        generate_and_save_token()


def pytest_collection_modifyitems(items):
    """Files with the most slow tests first (stable: each file's tests keep their order): the workers
    take whole files (--dist loadfile), so the longest start first instead of ending the run alone."""
    slow: dict[Path, int] = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.path])


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder and no CIFAR_RAY_DATA unless it asks for it."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CIFAR_RAY_CACHE", str(cache))
    monkeypatch.delenv("CIFAR_RAY_DATA", raising=False)
    return cache


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    """(32, 32, 3) uint8 -> encoded image bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def class_pixels(label: int, i: int) -> np.ndarray:
    """A deterministic, class-distinct 32x32 RGB image."""
    rng = np.random.default_rng(1000 * label + i)
    img = rng.integers(0, 40, size=(32, 32, 3), dtype=np.uint8)
    img[..., label % 3] += np.uint8(20 * label)
    return img


def write_tree(root: Path, classes=("cat", "dog", "frog"), per_class=(6, 2)) -> Path:
    """An image-folder tree train/<class>/*.png, test/<class>/*.png."""
    for split, n in zip(("train", "test"), per_class, strict=True):
        for label, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (d / f"{i:04d}.png").write_bytes(png_bytes(class_pixels(label, i + (100 if split == "test" else 0))))
    return root


def write_tar(path: Path, tree: Path, prefix: str = "") -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tar:
        for p in sorted(tree.rglob("*")):
            tar.add(p, arcname=prefix + p.relative_to(tree).as_posix(), recursive=False)
    return path


def write_batches(root: Path, per_batch: int = 20, test: int = 10) -> Path:
    """A cifar-10-batches-py folder in the official pickled format."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, f)
    return d


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    """One decoded-pixel cache for every real-data test of the session (decoding takes ~12 s)."""
    return tmp_path_factory.mktemp("real-cache")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs), W&B offline, short socket paths."""
    import tempfile

    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    os.environ["WANDB_MODE"] = "offline"  # before ray.init: the workers inherit it
    os.environ["WANDB_SILENT"] = "true"
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    from cifar_ray.ray_process import WORKER_NICENESS

    os.environ[WORKER_NICENESS] = "0"  # trials at the tests' priority, as a sweep's own Ray runs them
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ctx
    ray.shutdown()


# ---------------------------------------------------------------- sweeps in tests

TINY = {
    "metric": "val_acc", "mode": "max",
    "model": {"name": "base"},
    "data": {"source": "synthetic", "synthetic_size": 1200, "val_size": 200},
    "train": {"epochs": 2, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "device": "cpu"},
    "resources": {"cpu": 1},
    "wandb": {"mode": "offline"},
}
SLOWER_DATA = {**TINY["data"], "synthetic_size": 6000, "val_size": 500}  # about a second an epoch
# A safety net against a hang, never a time limit: a broken run fails here, not a slow one. With both
# cores busy (two busy loops beside .ci/run) a 2-trial sweep took over 10 minutes, so it is generous.
WAIT_S = 1800


def write_sweep(tmp_path: Path, name: str, **changes) -> Path:
    """TINY with changes: `train__lr=...` sets one key of a section, `scheduler={...}` a whole one."""
    import json

    import yaml

    doc = json.loads(json.dumps(TINY)) | {"name": name}
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            doc.setdefault(section, {})[leaf] = value
        else:
            doc[section] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def results_of(tmp_path: Path, name: str):
    import pandas as pd

    return pd.read_parquet(tmp_path / "results" / name / "trials.parquet")


def result_rows(trial_dir: Path) -> list[dict]:
    """The rows of a trial's result.json; a line still being written is skipped."""
    import json

    path = trial_dir / "result.json"
    rows = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def trial_dirs(exp: Path, prefix: str) -> list[Path]:
    return sorted(exp.glob(f"{prefix}_*"))


def tune_statuses(exp: Path) -> dict[str, str]:
    """trial folder name -> status, from Tune's newest experiment state snapshot (plain JSON)."""
    from cifar_ray.record import tune_states

    return {s["dir"]: s["status"] for s in tune_states(exp).values()}


def alive(pid) -> bool:
    """A running process, not a zombie waiting to be reaped."""
    try:
        return isinstance(pid, int) and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


HOLD_DRIVER_LOCK = """
import sys
from pathlib import Path
from cifar_ray import driver_lock
fd = driver_lock.take(Path(sys.argv[1]))
print("held" if fd is not None else "none", flush=True)
sys.stdin.read()  # until the test closes stdin or kills this process
"""


def hold_driver_lock(folder: Path):
    """A process of the test's holding the folder's driver lock as a sweep's driver does (it said so);
    the test kills it by its Popen."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD_DRIVER_LOCK, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def wait_for(condition, what: str, timeout: float = WAIT_S):
    """Poll until condition() is truthy and return its value."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class SweepProcess:
    """`python -m cifar_ray.sweep` in its own process on the session's Ray; its output goes to a file,
    so it never blocks on a pipe nobody reads."""

    def __init__(self, path: Path, tmp_path: Path, ray_session, *extra, env: Optional[dict] = None):
        import subprocess
        import sys

        self.artifacts = Path(ray_session.address_info["session_dir"]) / "artifacts"  # Tune's staging folders
        self.log = tmp_path / f"{path.stem}-{len(list(tmp_path.glob(path.stem + '-*.log')))}.log"
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cifar_ray.sweep", str(path), "--storage-path", str(tmp_path / "results"),
             "--address", ray_session.address_info["address"], *extra],
            stdout=self._out, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text()

    def finish(self, timeout: float = WAIT_S) -> tuple[int, str]:
        """Wait for the exit; (exit code, everything it printed)."""
        self.proc.wait(timeout=timeout)
        self._out.close()
        return self.proc.returncode, self.output()

    def kill(self) -> list[Path]:
        """SIGKILL to the process this test started, then its staging folder in the session's Ray goes too,
        as on a resume with a new Ray (a sweep that starts its own) or on another machine: a resume must
        find all it needs in the results folder. The folders removed (the killed driver's pid ends the
        name; none when it died before Tune made one)."""
        import shutil

        self.proc.kill()
        self.finish()
        staged = list(self.artifacts.glob(f"*_{self.pid}"))
        for folder in staged:
            shutil.rmtree(folder)
        return staged


# ---------------------------------------------------------------- W&B against the record

def wandb_rows(exp: Path, trial_id: str, sweep_name: Optional[str] = None) -> list[dict]:
    """Every history row of the trial's W&B run, in order: a resumed sweep writes a second offline
    folder for the same run, which `wandb sync` appends."""
    from cifar_ray.tracking import offline_history as history
    from cifar_ray.tracking import run_id

    key = run_id(sweep_name or exp.name, trial_id)
    files = sorted(exp.glob(f"wandb/wandb/offline-run-*-{key}/run-{key}.wandb"))
    return [row for f in files for row in history(f)]


def assert_records_agree(exp: Path) -> None:
    """Each trial's W&B run holds exactly the epochs analysis.curves() holds, with the same values
    (where an epoch was reported twice, the later report stands in both), no report twice, and no W&B
    file is empty;
    the Optuna journal agrees with trials() and curves() (assert_journal_matches)."""
    assert_journal_matches(exp)
    import math

    from cifar_ray import analysis
    from cifar_ray.tracking import offline_history as history

    files = list(exp.glob("wandb/wandb/offline-run-*/run-*.wandb"))
    for f in files:
        # a killed driver's W&B service dies with what it buffered; the resumed sweep's folder for the
        # same run replays it, so only a run with one folder must hold history in it
        if sum(g.name == f.name for g in files) == 1:
            assert history(f), f"{f} holds no history"
    curves = analysis.load(exp).curves()
    assert not curves.empty
    for trial_id, curve in curves.groupby("trial_id"):
        rows = wandb_rows(exp, trial_id)
        # each epoch once per run: a repeat is logged only with other values (PBT restored another
        # trial's checkpoint), never the same report again (a resume's replay, a retried epoch)
        logged = [(row["epoch"], repr([row.get(c) for c in ("train_loss", "val_loss", "val_acc", "lr")]))
                  for row in rows]
        assert len(logged) == len(set(logged)), f"{trial_id}: W&B holds a report twice: {logged}"
        last = {row["epoch"]: row for row in rows}
        assert sorted(last) == list(curve["epoch"]), f"{trial_id}: W&B epochs {sorted(last)}"
        for col in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "val_class_acc/cat"):
            logged = [last[e][col] for e in curve["epoch"]]
            recorded = list(curve[col])
            same = all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(logged, recorded, strict=True))
            assert same, f"{trial_id} {col}: W&B {logged} != curves {recorded}"


JOURNAL_STATES = {"completed": "COMPLETE", "early_stopped": "COMPLETE", "stopped": "PRUNED", "diverged": "PRUNED",
                  "errored": "FAIL", "unfinished": "RUNNING"}


def journal_trials(exp: Path, study: Optional[str] = None) -> dict:
    """Tune trial id -> Optuna FrozenTrial, from the sweep's optuna.journal (a read-only open); the
    study is named after the folder unless `study` says otherwise."""
    import optuna

    from cifar_ray.journal import TUNE_TRIAL_ID, open_journal

    storage = open_journal(exp / "optuna.journal", read_only=True)
    study = optuna.load_study(study_name=study or exp.name, storage=storage)
    newest: dict = {}
    for t in study.get_trials(deepcopy=False):  # in number order
        earlier = newest.get(t.user_attrs[TUNE_TRIAL_ID])
        if earlier is not None:  # a retry of a failed attempt (journal.JournalMirror._retry), never a double
            assert earlier.state.name == "FAIL" and t.system_attrs.get("failed_trial") == earlier.number, \
                f"trial {t.number} repeats Tune trial {t.user_attrs[TUNE_TRIAL_ID]}"
        newest[t.user_attrs[TUNE_TRIAL_ID]] = t
    return newest


def assert_journal_matches(exp: Path) -> None:
    """The journal holds one Optuna trial per started Tune trial, once each; its intermediate values are
    curves()' metric per epoch (finite values), its state follows the outcome and its value is the
    trial's best metric in trials()."""
    import math

    from cifar_ray import analysis

    sweep = analysis.load(exp)
    trials, curves = sweep.trials(), sweep.curves()
    journal = journal_trials(exp)
    started = set(curves["trial_id"]) | set(trials.loc[trials["status"] == "errored", "trial_id"])
    assert set(journal) == started, f"journal {sorted(journal)} != started trials {sorted(started)}"
    for trial_id, frozen in journal.items():
        curve = curves[curves["trial_id"] == trial_id]
        expected = {int(e): float(v) for e, v in zip(curve["epoch"], curve[sweep.metric], strict=True)
                    if math.isfinite(v)}
        assert frozen.intermediate_values == expected, f"{trial_id}: {frozen.intermediate_values} != {expected}"
        row = trials.set_index("trial_id").loc[trial_id]
        state = JOURNAL_STATES[row["status"]]
        if state == "COMPLETE" and not expected:
            state = "FAIL"
        assert frozen.state.name == state, f"{trial_id}: {frozen.state.name} for outcome {row['status']}"
        if state in ("COMPLETE", "PRUNED") and expected:
            assert frozen.value == row[f"best_{sweep.metric}"], f"{trial_id}: {frozen.value} != trials()"


# ---------------------------------------------------------------- a record against what happened

CURVE_COLUMNS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "val_class_acc/cat")


def curves_by_config(exp: Path, keys: tuple[str, ...]) -> dict:
    """(values of `keys`) -> the trial's curve (epoch -> {column: value}), from analysis.curves()."""
    import json

    from cifar_ray import analysis

    sweep = analysis.load(exp)
    trials = sweep.trials().set_index("trial_id")
    out = {}
    for trial_id, curve in sweep.curves().groupby("trial_id"):
        config = tuple(json.dumps(v, sort_keys=True) if isinstance(v := trials.loc[trial_id, k], dict) else v
                       for k in keys)  # an augment policy is a mapping
        assert config not in out, f"{exp}: two trials with {dict(zip(keys, config, strict=True))}"
        out[config] = {int(r["epoch"]): {c: r[c] for c in CURVE_COLUMNS} for _, r in curve.iterrows()}
    return out


def assert_same_as_straight_run(exp: Path, straight: Path, keys: tuple[str, ...]) -> None:
    """The interrupted-and-resumed sweep's record equals a straight run of the same file: the same
    trials (matched by their searched values), every epoch, identical values (CPU, exact resume), and
    the same best trial; then its own stores agree with each other (assert_records_agree)."""
    import math

    from cifar_ray import analysis

    got, want = curves_by_config(exp, keys), curves_by_config(straight, keys)
    assert sorted(got) == sorted(want), f"trials {sorted(got)} != straight run's {sorted(want)}"
    for config, curve in want.items():
        assert sorted(got[config]) == sorted(curve), f"{config}: epochs {sorted(got[config])} != {sorted(curve)}"
        for epoch, row in curve.items():
            for col, value in row.items():
                other = got[config][epoch][col]
                assert other == value or (math.isnan(other) and math.isnan(value)), \
                    f"{config} epoch {epoch} {col}: {other} != straight run's {value}"
    best = [analysis.load(e).best() for e in (exp, straight)]
    assert [tuple(b.config[k] for k in keys) for b in best][0] == [tuple(b.config[k] for k in keys) for b in best][1]
    assert best[0].score == best[1].score
    statuses = analysis.load(exp).trials()["status"]
    assert set(statuses) == set(analysis.load(straight).trials()["status"]), list(statuses)
    assert_records_agree(exp)


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 MB filesystem (tmpfs) at tmp_path/disk; needs root, as CI and the project machines
    have. Unmounted afterwards."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill_disk(disk: Path) -> Path:
    """Write a ballast file until the filesystem refuses more (ENOSPC); returns it."""
    import errno

    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        chunk = b"\0" * (1 << 20)
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                chunk = chunk[: len(chunk) // 2]
                if len(chunk) < 512:
                    break
    return ballast
