"""The seed's lab for real: scripts/lab.sh builds a head and three hosts on this machine (each its own
address, hostname, process table, /tmp and home, and an sshd), `ray up clusters/lab.yaml` brings them up
over SSH with Ray's `local` provider, sweeps run on the head through `ray exec`, and hosts are unplugged,
killed and reset mid-sweep. Each fault test ends by checking the record against a straight run of the
same file on the test session's local Ray (every epoch, identical values on the CPU) and the stores
against each other. Needs root, sshd and rsync (.ci/run installs them)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import WAIT_S, alive, assert_same_as_straight_run, tune_statuses, wait_for

ROOT = Path(__file__).resolve().parents[1]
LAB_SH = ROOT / "scripts" / "lab.sh"
LAB_YAML = ROOT / "clusters" / "lab.yaml"
LAB_DIR = Path(os.environ.get("CIFAR_RAY_LAB", "/var/tmp/cifar-ray-lab"))
SHARED = Path("/mnt/cifar-ray")
RESULTS = SHARED / "results"
VENV_BIN = ROOT / ".venv" / "bin"
HOSTS = {"head": "198.18.0.10", "desktop-1080ti": "198.18.0.21", "m1-laptop": "198.18.0.22", "t4-box": "198.18.0.23"}
WORKERS = [h for h in HOSTS if h != "head"]
MODEL_HOST = {"net1": "m1-laptop", "base": "desktop-1080ti", "netconv": "t4-box"}  # sweeps/lab.yaml's placement

pytestmark = pytest.mark.slow


def _why_no_lab() -> str:
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, a bridge, mounts)"
    for tool in ("/usr/sbin/sshd", shutil.which("rsync") or "rsync", shutil.which("ssh") or "ssh"):
        if not Path(tool).exists():
            return f"{tool} missing: apt-get install openssh-server rsync (.ci/run does)"
    if not (VENV_BIN / "ray").exists():
        return "no .venv: make setup"
    return ""


def env() -> dict:
    """This machine's shell for `ray up/exec/down`: the venv's ray on PATH, as the README says."""
    return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}


def sh(*args: str, check: bool = True, timeout: float = WAIT_S) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
    return done


def lab(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("bash", str(LAB_SH), *args, check=check)


def on_head(command: str, check: bool = True) -> subprocess.CompletedProcess:
    """A command on the head over SSH, as a user runs it: `ray exec clusters/lab.yaml '...'`."""
    return sh(str(VENV_BIN / "ray"), "exec", str(LAB_YAML), command, check=check)


def host_pids(host: str) -> set[int]:
    """The live processes of a lab host (its PID namespace), seen from this machine."""
    try:
        init = int((LAB_DIR / host / "init.pid").read_text())
        ns = os.readlink(f"/proc/{init}/ns/pid_for_children")
    except (OSError, ValueError):
        return set()
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.readlink(proc / "ns" / "pid") == ns and alive(int(proc.name)):
                    found.add(int(proc.name))
            except OSError:
                continue
    return found


def ray_pids(host: str) -> set[int]:
    """The host's Ray processes (raylet, GCS, log monitor, Ray's agents and workers, `ray start --block`)."""
    out = set()
    for pid in host_pids(host):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "/ray/" in cmd or cmd.startswith("ray::") or "bin/ray start" in cmd:
            out.add(pid)
    return out


def alive_nodes() -> dict[str, bool]:
    """Node address -> alive, from the head's GCS (a short driver on the head)."""
    script = ("import json, ray; ray.init(address='auto', logging_level='ERROR'); "
              "print('NODES', json.dumps({n['NodeManagerAddress']: n['Alive'] for n in ray.nodes()}))")
    done = lab("exec", "head", f"python -c \"{script}\"", check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("NODES ")]
    return json.loads(lines[-1].removeprefix("NODES ")) if lines else {}


def all_up() -> bool:
    nodes = alive_nodes()
    return all(nodes.get(ip) for ip in HOSTS.values())


def rows(exp: Path, prefix: str) -> list[dict]:
    """The reports in the history of the (one) trial of a model, in order."""
    from cifar_ray import analysis

    return [r for h in sorted(exp.glob(f"{prefix}_*/history.jsonl")) for r in analysis.read_rows(h)]


def lab_sweep(tmp_path: Path, name: str, epochs: int) -> tuple[Path, Path]:
    """sweeps/lab.yaml at one learning rate (one trial per host), on the shared folder so the head
    reads it; and the same file without the hosts' tags, for the straight run on the local Ray."""
    doc = yaml.safe_load((ROOT / "sweeps" / "lab.yaml").read_text())
    doc["name"] = name
    doc["train"].update(epochs=epochs, lr=0.05)
    doc["data"]["synthetic_size"] = 2000  # a few seconds an epoch with three hosts training at once
    path = SHARED / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    local = {k: v for k, v in doc.items() if k != "resources_by_model"}
    straight = tmp_path / f"{name}.yaml"
    straight.write_text(yaml.safe_dump(local))
    return path, straight


def start_on_head(path: Path, *extra: str) -> subprocess.Popen:
    command = (f"cd ~/cifar_ray && python -m cifar_ray.sweep {path} --address auto --storage-path {RESULTS} "
               + " ".join(extra))
    log = open(path.with_suffix(".log"), "a")
    return subprocess.Popen([str(VENV_BIN / "ray"), "exec", str(LAB_YAML), command], stdout=log,
                            stderr=subprocess.STDOUT, env=env(), cwd=ROOT, text=True)


def straight_run(ray_session, path: Path) -> Path:
    from cifar_ray.sweep import main

    assert main([str(path), "--storage-path", str(path.parent / "results")]) == 0
    return path.parent / "results" / yaml.safe_load(path.read_text())["name"]


def timing(what: str, seconds: float) -> None:
    print(f"LAB {what}: {seconds:.1f} s")


@pytest.fixture(scope="module")
def the_lab(ray_session):
    """scripts/lab.sh up and `ray up clusters/lab.yaml -y`; afterwards `ray down` and lab.sh down, each
    checked to leave nothing behind. After the session's Ray: `ray up` keeps its state under the same
    RAY_TMPDIR throughout."""
    why = _why_no_lab()
    if why:
        pytest.skip(why)
    if not Path.home().joinpath(".ray", "auth_token").is_file():  # the token the cluster file carries
        sh(str(VENV_BIN / "ray"), "get-auth-token", "--generate")
    started = time.monotonic()
    lab("up")
    timing("scripts/lab.sh up", time.monotonic() - started)
    try:
        started = time.monotonic()
        sh(str(VENV_BIN / "ray"), "up", str(LAB_YAML), "-y")
        timing("ray up (head)", time.monotonic() - started)
        wait_for(all_up, "the head's autoscaler to bring every worker up")
        timing("ray up (head and the three workers)", time.monotonic() - started)
        yield
        started = time.monotonic()
        sh(str(VENV_BIN / "ray"), "down", str(LAB_YAML), "-y")
        wait_for(lambda: not any(ray_pids(h) for h in HOSTS), "no Ray process on any host after ray down")
        timing("ray down, until no Ray process on any host", time.monotonic() - started)
    finally:
        made = {h: host_pids(h) for h in HOSTS}
        lab("down")
    assert not any(alive(p) for pids in made.values() for p in pids), "a process of the lab outlived lab.sh down"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "cifar-lab-" not in netns, netns
    assert subprocess.run(["ip", "link", "show", "crlab0"], capture_output=True).returncode != 0
    assert "198.18.0." not in subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    assert f" {SHARED} " not in Path("/proc/mounts").read_text()
    assert not LAB_DIR.exists() and not LAB_YAML.exists()


def test_a_sweep_runs_on_the_lab_each_model_on_its_host(the_lab, tmp_path):
    started = time.monotonic()
    done = on_head(f"cd ~/cifar_ray && python -m cifar_ray.sweep sweeps/lab.yaml --address auto "
                   f"--storage-path {RESULTS} --set train.epochs=2")
    timing("sweeps/lab.yaml (6 trials x 2 epochs) through ray exec", time.monotonic() - started)
    assert "6 completed" in done.stdout, done.stdout[-3000:]
    import pandas as pd

    trials = pd.read_parquet(RESULTS / "lab" / "trials.parquet")
    assert len(trials) == 6
    for model, host in MODEL_HOST.items():
        ran = trials[trials["model.name"] == model]
        assert set(ran["host"]) == {host} and set(ran["node"]) == {HOSTS[host]}, ran[["host", "node"]]
    assert set(trials["device"]) == {"cpu"}  # no GPU or MPS here: each fell back to the CPU, with a warning
    from conftest import assert_records_agree

    assert_records_agree(RESULTS / "lab")
    # a folder only the head has (its own /tmp) is refused as storage: the workers do not see it
    refused = on_head("cd ~/cifar_ray && python -m cifar_ray.sweep sweeps/lab.yaml --address auto "
                      "--name elsewhere --storage-path /tmp/results", check=False)
    out = refused.stdout + refused.stderr
    assert "3 of the cluster's 4 machines do not see" in out and "Traceback" not in out, out[-2000:]


def test_an_unplugged_and_a_killed_worker_are_retried_and_the_record_is_whole(the_lab, ray_session, tmp_path):
    epochs = 4
    path, local = lab_sweep(tmp_path, "lab_faults", epochs=epochs)
    exp = RESULTS / "lab_faults"
    sweep = start_on_head(path)
    training = {m: (lambda m=m: 1 <= len(rows(exp, m)) < epochs) for m in ("base", "netconv")}
    struck: dict[str, tuple[int, float]] = {}  # model -> (reports when struck, when)

    def strike() -> bool:
        """Each fault as soon as its host's trial has reported its first epoch (and has epochs left)."""
        if "netconv" not in struck and training["netconv"]():  # 1. t4-box leaves the network
            struck["netconv"] = (len(rows(exp, "netconv")), time.monotonic())
            lab("unplug", "t4-box")
        if "base" not in struck and training["base"]():  # 2. desktop-1080ti's Ray killed (a lid closed)
            raylets = [p for p in ray_pids("desktop-1080ti")
                       if b"raylet/raylet" in Path(f"/proc/{p}/cmdline").read_bytes()]
            assert raylets, "no raylet on desktop-1080ti"
            struck["base"] = (len(rows(exp, "base")), time.monotonic())
            os.kill(raylets[0], 9)  # a process of the lab this test built
        assert sweep.poll() is None, path.with_suffix(".log").read_text()[-3000:]
        return len(struck) == 2

    wait_for(strike, "both trials' first epochs")
    wait_for(lambda: alive_nodes().get(HOSTS["t4-box"]) is False, "the head to find t4-box gone")
    timing("unplugged worker detected (node marked dead)", time.monotonic() - struck["netconv"][1])
    wait_for(lambda: len(rows(exp, "base")) > struck["base"][0], "base to go on after its raylet was killed")
    timing("killed raylet -> its trial reports again", time.monotonic() - struck["base"][1])
    lab("plug", "t4-box")
    plugged = time.monotonic()
    wait_for(lambda: len(rows(exp, "netconv")) > struck["netconv"][0], "netconv to go on on t4-box")
    timing("plugged back in -> its trial reports again", time.monotonic() - plugged)
    assert sweep.wait(timeout=WAIT_S) == 0, path.with_suffix(".log").read_text()[-3000:]
    trials = analysis_trials(exp)
    assert set(trials["status"]) == {"completed"}
    for model, host in MODEL_HOST.items():
        assert set(trials.loc[trials["model.name"] == model, "host"]) == {host}
    assert_same_as_straight_run(exp, straight_run(ray_session, local), ("model.name", "train.lr"))


def test_the_head_reset_then_ray_up_and_resume_finish_the_sweep(the_lab, ray_session, tmp_path):
    path, local = lab_sweep(tmp_path, "lab_reset", epochs=4)
    exp = RESULTS / "lab_reset"
    sweep = start_on_head(path)

    def one_done_one_running() -> bool:
        states = tune_statuses(exp) if exp.exists() else {}
        finished = [n for n, s in states.items() if s == "TERMINATED"]
        running = [p for p in exp.glob("*/history.jsonl") if p.parent.name not in finished and p.read_text()]
        return bool(finished) and bool(running)

    # (on a fast machine every trial may end first: then the reset and the resume find nothing to do)
    wait_for(lambda: one_done_one_running() or sweep.poll() is not None, "a trial finished and another training")
    finished = {n: len(rows(exp, n.split("_")[0])) for n, s in tune_statuses(exp).items() if s == "TERMINATED"}
    lab("reset", "head")  # every process of the head killed: the driver, GCS, the autoscaler
    sweep.wait(timeout=WAIT_S)
    started = time.monotonic()
    sh(str(VENV_BIN / "ray"), "up", str(LAB_YAML), "-y")
    wait_for(all_up, "every worker back after the head's reset")
    timing("head reset -> ray up -> every node up", time.monotonic() - started)
    resumed = start_on_head(path, "--resume")
    assert resumed.wait(timeout=WAIT_S) == 0, path.with_suffix(".log").read_text()[-3000:]
    for name, n in finished.items():  # finished trials are not trained again
        assert len(rows(exp, name.split("_")[0])) == n, name
    assert_same_as_straight_run(exp, straight_run(ray_session, local), ("model.name", "train.lr"))


def test_a_client_without_the_token_is_refused_and_no_lab_port_is_on_this_machine(the_lab):
    head = f"{HOSTS['head']}:6379"
    with socket.create_connection((HOSTS["head"], 6379), timeout=10):
        pass  # the GCS answers on the lab's address
    for token_env in ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32}, {"RAY_AUTH_MODE": "disabled"}):
        done = subprocess.run([str(VENV_BIN / "ray"), "status", "--address", head], capture_output=True, text=True,
                              env={**env(), **token_env, "HOME": "/nonexistent"}, timeout=WAIT_S)
        assert done.returncode != 0 and "InvalidAuthToken" in done.stdout + done.stderr, token_env
    ok = subprocess.run([str(VENV_BIN / "ray"), "status", "--address", head], capture_output=True, text=True,
                        env={**env(), "RAY_AUTH_MODE": "token"}, timeout=WAIT_S)
    assert ok.returncode == 0 and "Active" in ok.stdout, ok.stderr[-2000:]  # with the cluster's token
    # no socket of a lab process listens in this machine's own network namespace
    lab_pids = set().union(*(host_pids(h) for h in HOSTS))
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    owners = {int(p) for p in re.findall(r"pid=(\d+)", listening)}
    assert not owners & lab_pids, listening
    # and the dashboard stays on the head's loopback
    with pytest.raises(OSError):
        socket.create_connection((HOSTS["head"], 8265), timeout=10).close()


def analysis_trials(exp: Path):
    from cifar_ray import analysis

    return analysis.load(exp).trials()
