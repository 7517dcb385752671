"""What made a results folder: the code's commit (and whether its tree had changes), the versions of
cifar_ray and the libraries it trains with, the Python and the machine that drove the sweep. The sweep
CLI writes it (provenance.json) when a sweep starts and adds an entry on each --resume; analysis reads
it (`Sweep.provenance()`), the report shows it, `train --from RESULTS_DIR` compares against it."""
from __future__ import annotations

import datetime as dt
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

# the distributions whose versions decide a run's numbers or its record
PACKAGES = ("cifar_ray", "torch", "torchvision", "ray", "wandb", "optuna", "numpy", "pydantic")
CODE_PATHS = ("cifar_ray", "pyproject.toml")  # what "the code" is, for the dirty check
GIT_TIMEOUT_S = 10.0  # git on a slow network share still answers in well under this
MAX_CHANGED = 20  # changed paths listed in the record (the count is always whole)


def versions() -> dict[str, Optional[str]]:
    """Installed version of each of PACKAGES (None where absent) and Python's."""
    out: dict[str, Optional[str]] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def _git(root: Path, *args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return done.stdout if done.returncode == 0 else None


def code_state(root: Optional[Path] = None) -> dict[str, Any]:
    """The commit of the checkout cifar_ray is imported from, and its uncommitted changes to the code
    (tracked or new files under CODE_PATHS); commit None for an installed copy outside git."""
    root = root or Path(__file__).resolve().parent.parent
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "changed": []}
    status = _git(root, "status", "--porcelain", "--", *CODE_PATHS) or ""
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit.strip(), "dirty": bool(changed), "changed": changed[:MAX_CHANGED],
            "changed_count": len(changed)}


def collect(kind: str = "start", root: Optional[Path] = None) -> dict[str, Any]:
    """One entry: what ran (`start` or `resume`), when, on which machine, from which code, with which
    libraries. A folder whose first run kept no provenance starts its record with a `resume` entry."""
    return {"kind": kind, "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "driver_host": socket.gethostname(),
            "platform": platform.platform(), **code_state(root), "versions": versions(),
            "argv": [Path(sys.argv[0]).name, *sys.argv[1:]]}


def recorded(existing: Any, entry: dict[str, Any]) -> dict[str, Any]:
    """The folder's record with `entry` added: the first run's entry at the top level, each resume's in
    `resumed` (an earlier record that is not a mapping is replaced)."""
    if not isinstance(existing, dict) or "versions" not in existing:
        return {**entry, "resumed": []}
    resumed = existing.get("resumed")
    return {**existing, "resumed": [*(resumed if isinstance(resumed, list) else []), entry]}


def latest(record: dict[str, Any]) -> dict[str, Any]:
    """The entry of the run that wrote the folder's newest rows: the last resume's, else the first run's."""
    resumed = [r for r in record.get("resumed") or [] if isinstance(r, dict)]
    return resumed[-1] if resumed else record


def differences(record: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """What differs between a folder's newest entry and `here` (a collect()): the commit, uncommitted
    changes, each library version; phrased for a console line."""
    then = latest(record)
    out = []
    if then.get("commit") and here.get("commit") and then["commit"] != here["commit"]:
        out.append(f"commit {str(then['commit'])[:10]} -> {str(here['commit'])[:10]}")
    if then.get("dirty"):
        out.append("the sweep ran with uncommitted changes")
    old, new = then.get("versions") or {}, here.get("versions") or {}
    for name in (*PACKAGES, "python"):
        if isinstance(old, dict) and old.get(name) != new.get(name) and old.get(name) is not None:
            out.append(f"{name} {old.get(name)} -> {new.get(name)}")
    return out
