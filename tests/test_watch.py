"""The sweep's Optuna journal (cifar_ray.journal) and the dashboard serving it (cifar_ray.watch)."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cifar_ray import metrics as M
from cifar_ray.journal import JournalMirror, open_journal
from cifar_ray.space import Domain, optuna_distribution
from cifar_ray.watch import main as watch_main
from conftest import SLOWER_DATA, WAIT_S, SweepProcess, assert_records_agree, journal_trials, wait_for, write_sweep

DISTRIBUTIONS = {"train.lr": optuna_distribution(Domain("loguniform", (1e-4, 1e-1))),
                 "train.optimizer": optuna_distribution(Domain("choice", ("sgd", "adam")))}


def mirror_at(tmp_path: Path, name: str = "demo") -> JournalMirror:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return JournalMirror(tmp_path / "optuna.journal", name, M.VAL_ACC, "max", DISTRIBUTIONS).open()


def report(mirror: JournalMirror, trial: str, config: dict, values: list[float]) -> None:
    for epoch, v in enumerate(values, 1):
        mirror.result(trial, config, {M.EPOCH: epoch, M.VAL_ACC: v, "node": "node-a", "device": "cpu"})


def test_mirror_maps_outcomes_to_optuna_states_with_params_and_values(tmp_path):
    m = mirror_at(tmp_path)
    cfg = {"train.lr": 0.01, "train.optimizer": "sgd", "train.epochs": 3}
    report(m, "t0", cfg, [0.2, 0.5, 0.4])
    m.end("t0", cfg, M.COMPLETED)
    report(m, "t1", cfg, [0.1])
    m.end("t1", cfg, M.STOPPED)
    report(m, "t2", cfg, [0.3])
    m.end("t2", cfg, M.ERRORED)
    report(m, "t3", cfg, [float("nan")])
    m.end("t3", cfg, M.DIVERGED)
    report(m, "t4", {"train.lr": 0.5, "train.optimizer": "sgd"}, [0.2])  # 0.5: outside the domain (a PBT mutation)

    trials = journal_trials(tmp_path, "demo")
    t0 = trials["t0"]
    assert (t0.state.name, t0.value, t0.intermediate_values) == ("COMPLETE", 0.5, {1: 0.2, 2: 0.5, 3: 0.4})
    assert t0.params == {"train.lr": 0.01, "train.optimizer": "sgd"}  # searched keys only
    assert t0.distributions["train.lr"].log and t0.user_attrs["node"] == "node-a"
    assert (trials["t1"].state.name, trials["t1"].value) == ("PRUNED", 0.1)
    assert (trials["t2"].state.name, trials["t2"].value) == ("FAIL", None)
    assert (trials["t3"].state.name, trials["t3"].value, trials["t3"].intermediate_values) == ("PRUNED", None, {})
    assert trials["t4"].state.name == "RUNNING" and "train.lr" not in trials["t4"].params


def test_a_resumed_mirror_continues_the_same_trials_without_duplicates(tmp_path):
    cfg = {"train.lr": 0.001, "train.optimizer": "adam"}
    first = mirror_at(tmp_path)
    report(first, "a", cfg, [0.1, 0.2])
    report(first, "b", cfg, [0.3])
    first.end("b", cfg, M.COMPLETED)
    # the driver was killed; the resumed sweep reports a's epoch 2 again (the epoch in flight), then 3
    again = mirror_at(tmp_path)
    again.result("a", cfg, {M.EPOCH: 2, M.VAL_ACC: 0.25})
    again.result("a", cfg, {M.EPOCH: 3, M.VAL_ACC: 0.35})
    again.end("a", cfg, M.COMPLETED)
    again.result("b", cfg, {M.EPOCH: 2, M.VAL_ACC: 0.9})  # an ended trial is never reopened
    trials = journal_trials(tmp_path, "demo")
    assert sorted(trials) == ["a", "b"]
    assert trials["a"].intermediate_values == {1: 0.1, 2: 0.25, 3: 0.35} and trials["a"].value == 0.35
    assert trials["b"].intermediate_values == {1: 0.3} and trials["b"].value == 0.3


def test_the_read_only_journal_refuses_writes(tmp_path):
    mirror_at(tmp_path)
    before = (tmp_path / "optuna.journal").read_bytes()
    storage = open_journal(tmp_path / "optuna.journal", read_only=True)
    with pytest.raises(NotImplementedError, match="read-only"):
        storage.delete_study(0)
    with pytest.raises(NotImplementedError, match="read-only"):
        storage.create_new_trial(0)
    assert (tmp_path / "optuna.journal").read_bytes() == before
    assert not list(tmp_path.glob("*.lock"))  # the file lock leaves nothing behind


def test_distributions_follow_the_sweep_domains():
    assert optuna_distribution(Domain("grid", (0.001, 0.01, 0.1))).log  # an lr grid spans decades
    assert not optuna_distribution(Domain("grid", (0.5, 0.9))).log
    assert optuna_distribution(Domain("randint", (1, 5))).high == 5  # inclusive, like the sweep file
    assert optuna_distribution(Domain("grid", (16, 64))).__class__.__name__ == "IntDistribution"
    augment = optuna_distribution(Domain("grid", ({"hflip": 0.5}, None)))
    assert augment.choices == ('{"hflip": 0.5}', None)


def test_watch_refuses_a_missing_folder_a_folder_without_journal_and_a_busy_port(tmp_path, capsys):
    assert watch_main([str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert watch_main([str(tmp_path)]) == 2
    assert "no optuna.journal" in capsys.readouterr().err
    mirror_at(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert watch_main([str(tmp_path), "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen" in capsys.readouterr().err
    assert watch_main([str(tmp_path), "--port", "70000"]) == 2


def get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def dashboard_url(log: Path) -> str:
    match = re.search(r"dashboard: (http://\S+)", log.read_text() if log.exists() else "")
    return match.group(1) if match else ""


def start_watch(folder: Path, log: Path, *extra: str) -> subprocess.Popen:
    """`python -m cifar_ray.watch FOLDER --port 0 ...` in its own process, its output in `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "cifar_ray.watch", str(folder), "--port", "0", *extra],
                                stdout=out, stderr=subprocess.STDOUT)


def test_watch_serves_read_only_and_stops_on_ctrl_c(tmp_path):
    m = mirror_at(tmp_path)
    report(m, "t0", {"train.lr": 0.01, "train.optimizer": "sgd"}, [0.2, 0.4])
    journal = tmp_path / "optuna.journal"
    digest = hashlib.sha256(journal.read_bytes()).hexdigest()
    log = tmp_path / "watch.log"
    proc = start_watch(tmp_path, log)
    try:
        url = wait_for(lambda: dashboard_url(log), "the dashboard's URL")
        assert url.startswith("http://127.0.0.1:") and url.endswith("/dashboard/")
        base = url.removesuffix("/dashboard/")
        status, body = get(f"{base}/api/studies")
        assert status == 200 and [s["study_name"] for s in json.loads(body)["study_summaries"]] == ["demo"]
        status, body = get(f"{base}/api/studies/0")
        trial = json.loads(body)["trials"][0]
        assert [(v["step"], v["value"]) for v in trial["intermediate_values"]] == [(1, 0.2), (2, 0.4)]
        delete = urllib.request.Request(f"{base}/api/studies/0", method="DELETE")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(delete, timeout=120)
        assert refused.value.code == 403
        assert hashlib.sha256(journal.read_bytes()).hexdigest() == digest
    finally:
        proc.send_signal(signal.SIGINT)  # the process this test started
        assert proc.wait(timeout=WAIT_S) == 0
    assert "Traceback" not in log.read_text()


def chromium() -> str:
    return shutil.which("chromium") or shutil.which("chromium-browser") or ""


def page_text(url: str, screenshot: Path | None = None) -> str:
    """The page as headless Chromium renders it (scripts run, up to 20 s of virtual time): its text."""
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
            "--virtual-time-budget=20000"]
    if screenshot is not None:
        subprocess.run([*args, f"--screenshot={screenshot}", url], capture_output=True, timeout=WAIT_S, check=True)
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=WAIT_S,
                         check=True).stdout
    dom = re.sub(r"<(style|script|svg)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.mark.slow
@pytest.mark.skipif(not chromium(), reason="Chromium is not installed (apt-get install chromium; .ci/run does)")
def test_watch_a_running_sweep_in_a_real_browser(ray_session, tmp_path):
    # 100 epochs a trial: the sweep is still running when the browser has looked, whatever the machine's
    # speed; the test then stops it with Ctrl-C
    path = write_sweep(tmp_path, "live", data=SLOWER_DATA, train__epochs=100, train__lr={"grid": [0.01, 0.05]},
                       train__momentum={"grid": [0.5, 0.9]})
    sweep = SweepProcess(path, tmp_path, ray_session, "--watch", "--watch-port", "0")
    url = wait_for(lambda: dashboard_url(sweep.log), "the dashboard's URL")
    assert "dashboard:" in sweep.output().split("== Status ==")[0]  # printed before the first trial starts
    base = url.removesuffix("/dashboard/")

    def reported(n: int):
        status, body = get(f"{base}/api/studies/0")
        trials = json.loads(body)["trials"] if status == 200 else []
        return [t for t in trials if len(t["intermediate_values"]) >= n]

    wait_for(lambda: reported(2), "a trial's second epoch in the dashboard's API")
    listing = page_text(url)
    assert "live" in listing and "MAXIMIZE" in listing
    trials_page = page_text(f"{url}studies/0/trials", screenshot=tmp_path / "trials.png")
    assert re.search(r"\d+ Trials", trials_page) and "Trial 0" in trials_page and "tune_trial_id" in trials_page
    assert "Running" in trials_page and "Intermediate Values" in trials_page
    assert (tmp_path / "trials.png").stat().st_size > 10_000
    assert sweep.proc.poll() is None
    grown = len(reported(1)[0]["intermediate_values"])
    wait_for(lambda: any(len(t["intermediate_values"]) > grown for t in reported(1)), "the curves to grow")
    sweep.proc.send_signal(signal.SIGINT)  # the process this test started
    code, out = sweep.finish()
    assert code == 130, out
    assert_records_agree(tmp_path / "results" / "live")  # running trials stay RUNNING in the journal


# ---------------------------------------------------------------- a stranger's journal, round two

def _raw_get(port: int, path: str, host_header: str, family=socket.AF_INET, address: str = "127.0.0.1"):
    """(status, body) of a GET with the Host header given (urllib always sends the URL's own)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(120)
        s.connect((address, port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host_header}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


BAD_JOURNAL_LINES = {
    "not_json": b"{this is not json\n",
    "wrong_types": b'{"op_code": 0, "worker_id": "w", "study_name": 7, "directions": "up"}\n',
    "unknown_op": b'{"op_code": 999, "worker_id": "w"}\n',
    "not_utf8": b'{"op_code": 0, "study_name": "\xff\xfe"}\n',
    "a_list": b"[1, 2, 3]\n",
}


@pytest.mark.parametrize("bad", sorted(BAD_JOURNAL_LINES))
def test_watch_refuses_a_malformed_journal_in_one_line(tmp_path, capsys, bad):
    m = mirror_at(tmp_path)
    report(m, "t0", {"train.lr": 0.01, "train.optimizer": "sgd"}, [0.2])
    journal = tmp_path / "optuna.journal"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + BAD_JOURNAL_LINES[bad] + b"".join(lines[1:]))  # in the middle
    assert watch_main([str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "not a readable Optuna journal" in err, err
    assert "Traceback" not in err


def test_watch_keeps_serving_when_a_bad_line_is_appended_checks_the_host_and_serves_ipv6(tmp_path):
    m = mirror_at(tmp_path)
    report(m, "t0", {"train.lr": 0.01, "train.optimizer": "sgd"}, [0.2, 0.4])
    journal = tmp_path / "optuna.journal"
    log = tmp_path / "watch.log"
    proc = start_watch(tmp_path, log)
    try:
        url = wait_for(lambda: dashboard_url(log), "the dashboard's URL")
        port = int(url.split(":")[2].split("/")[0])
        status, body = _raw_get(port, "/api/studies/0", f"127.0.0.1:{port}")
        assert status == 200 and len(json.loads(body)["trials"]) == 1
        # DNS rebinding: a page on another site reaching 127.0.0.1 under its own name is refused
        assert _raw_get(port, "/api/studies/0", f"attacker.example:{port}")[0] == 421
        assert _raw_get(port, "/api/studies/0", f"localhost:{port}")[0] == 200
        good = {"op_code": 7, "worker_id": "w", "trial_id": 0, "step": 3, "intermediate_value": 0.6}
        with open(journal, "ab") as f:  # a stranger appends garbage, then a good record follows
            f.write(BAD_JOURNAL_LINES["not_json"] + BAD_JOURNAL_LINES["wrong_types"] + json.dumps(good).encode()
                    + b"\n")
        def served_steps():  # the dashboard caches trials for 2 s: every answer meanwhile must still be good
            status, body = _raw_get(port, "/api/studies/0", f"127.0.0.1:{port}")
            assert status == 200, body[:300]
            return [(v["step"], v["value"]) for v in json.loads(body)["trials"][0]["intermediate_values"]]

        # the last good state, then what followed the bad lines
        wait_for(lambda: served_steps() == [(1, 0.2), (2, 0.4), (3, 0.6)], "the record after the bad lines")
    finally:
        proc.send_signal(signal.SIGINT)  # the process this test started
        assert proc.wait(timeout=WAIT_S) == 0
    assert "Traceback" not in log.read_text()
    if not socket.has_ipv6:
        return
    clean = tmp_path / "clean"
    report(mirror_at(clean), "t0", {"train.lr": 0.01, "train.optimizer": "sgd"}, [0.2])
    log6 = tmp_path / "watch6.log"
    proc = start_watch(clean, log6, "--host", "::1")
    try:
        url = wait_for(lambda: dashboard_url(log6) or ("error" in log6.read_text() and "error"), "the IPv6 URL")
        assert url.startswith("http://[::1]:"), log6.read_text()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert _raw_get(port, "/api/studies", f"[::1]:{port}", socket.AF_INET6, "::1")[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=WAIT_S) == 0
    assert "warning" not in log6.read_text()  # loopback: not exposed


def test_loopback_addresses_are_not_exposed_and_hosts_follow_the_bind():
    from cifar_ray.watch import allowed_hosts, exposure_warning

    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert exposure_warning(host) is None, host
    assert exposure_warning("0.0.0.0") and exposure_warning("198.18.0.5")
    assert allowed_hosts("0.0.0.0", 80) is None
    assert allowed_hosts("127.0.0.2", 8080) == {"127.0.0.2", "127.0.0.2:8080"}
    assert "localhost:8080" in allowed_hosts("127.0.0.1", 8080) and "[::1]:81" in allowed_hosts("::1", 81)


def test_a_failed_trial_that_resume_retries_gets_a_retry_trial_not_a_double(tmp_path):
    m = mirror_at(tmp_path)
    config = {"train.lr": 0.01, "train.optimizer": "sgd"}
    report(m, "t0", config, [0.2])
    m.end("t0", config, M.ERRORED)
    resumed = mirror_at(tmp_path)  # a resumed sweep's driver, running t0 again
    resumed.trial("t0", config)
    resumed.result("t0", config, {M.EPOCH: 2, M.VAL_ACC: 0.5})
    resumed.end("t0", config, M.COMPLETED)
    again = mirror_at(tmp_path)  # a third driver sees the retry as the trial's record, ended
    assert again.trial("t0", config) is None
    trials = journal_trials(tmp_path, "demo")  # checks the retry names the failed attempt
    assert set(trials) == {"t0"}
    retry = trials["t0"]
    assert retry.state.name == "COMPLETE" and retry.value == 0.5 and retry.intermediate_values == {1: 0.2, 2: 0.5}
    assert retry.params == {"train.lr": 0.01, "train.optimizer": "sgd"} and retry.system_attrs["failed_trial"] == 0


def test_a_new_journal_trial_is_one_line_so_a_killed_driver_leaves_none_without_its_tune_id(tmp_path):
    """The trial, its params and its Tune id in one append: a driver killed between separate appends left a
    RUNNING trial that no resume could match (seen in a fused Optuna sweep killed with kill -9)."""
    from optuna.distributions import FloatDistribution

    from cifar_ray.journal import TUNE_TRIAL_ID, JournalMirror, open_journal

    path = tmp_path / "optuna.journal"
    mirror = JournalMirror(path, "s", "val_acc", "max", {"train.lr": FloatDistribution(0.001, 0.1, log=True)}).open()
    before = path.read_text().splitlines()
    mirror.trial("abc_00000", {"train.lr": 0.01})
    assert len(path.read_text().splitlines()) == len(before) + 1
    import optuna

    (trial,) = optuna.load_study(study_name="s", storage=open_journal(path, read_only=True)).get_trials()
    assert trial.user_attrs[TUNE_TRIAL_ID] == "abc_00000" and trial.params == {"train.lr": 0.01}
