"""Cluster files, placement rules, and a real multi-node Ray cluster on this machine."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cifar_ray.cluster import check_storage, check_sweep_tags, infeasible, node_type_offers, validate_cluster_file
from cifar_ray.cluster import main as cluster_main
from cifar_ray.config import ConfigError
from conftest import WAIT_S, alive, wait_for

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = [ROOT / "cluster.yaml", ROOT / "clusters" / "onprem.yaml", ROOT / "clusters" / "local.yaml"]


def _processes_with_env(key: str, value: str) -> dict[int, str]:
    """pid -> command of this user's processes whose environment holds key=value exactly."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"{key}={value}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
        except OSError:
            continue
    return found


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_files_validate_against_rays_schema(path):
    config = validate_cluster_file(str(path))
    offers = node_type_offers(config)
    assert any(o.get("cuda") for o in offers.values())


def test_aws_cluster_shape():
    config = validate_cluster_file(str(ROOT / "cluster.yaml"))
    offers = node_type_offers(config)
    assert offers["head"] == {"cpu": 0}  # the head runs no trials
    assert {"t4", "a10g", "a100"} <= {k for o in offers.values() for k in o}
    assert all(t.get("min_workers", 0) == 0 for n, t in config["available_node_types"].items() if n != "head")
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_onprem_hosts_carry_their_tags():
    offers = node_type_offers(validate_cluster_file(str(ROOT / "clusters" / "onprem.yaml")))
    assert offers["host m1-laptop"]["mps"] == 1
    assert offers["host desktop-1080ti"]["gtx1080ti"] == 1 and offers["host desktop-1080ti"]["gpu_mem_11g"] == 1


def stand_in_ray(tmp_path: Path, agent: bool = False) -> Path:
    """`ray` for scripts/ray-start-worker.sh: says it started and blocks; with agent=True it first starts
    a child that ignores SIGTERM, as Ray's agents outlive a raylet whose head is gone."""
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    child = (f"import subprocess\nsubprocess.Popen([{sys.executable!r}, '-c', 'import signal, time; "
             f"signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)', {str(fake)!r}])\n") if agent else ""
    fake.write_text(f"#!{sys.executable}\nimport time\n{child}print('Ray runtime started.', flush=True)\n"
                    "time.sleep(3600)\n")
    fake.chmod(0o755)
    return fake


def start_worker(tmp_path: Path, fake: Path) -> int:
    """Run scripts/ray-start-worker.sh with the stand-in; the pid its pid file names."""
    hosts = tmp_path / "host.json"
    hosts.write_text(json.dumps({"cuda": 1, "t4": 1}))
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "ray-start-worker.sh"), "198.18.0.10:6379", str(hosts)],
                          capture_output=True, text=True, env=env, timeout=WAIT_S)
    assert done.returncode == 0 and "Ray runtime started" in done.stdout, done.stderr
    return int((tmp_path / "cifar_ray-worker-start.pid").read_text())


def stand_ins(fake: Path) -> list[int]:
    """The stand-in processes this test started (their command line holds its tmp path)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(fake).encode() in (proc / "cmdline").read_bytes() and alive(int(proc.name)):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def kill_stand_ins(fake: Path) -> None:
    for pid in stand_ins(fake):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue


def test_a_worker_started_again_ends_its_earlier_block_process(tmp_path):
    """The autoscaler may start a host twice (`ray stop`, then scripts/ray-start-worker.sh). `ray stop`
    ends the node's processes but not `ray start --block`, which then waits for ever; the second start
    must end the first. Here `ray` on PATH is a stand-in that says it started and blocks, so the test is
    about the script's own process handling (the lab, tests/test_lab.py, runs it with the real Ray)."""
    fake = stand_in_ray(tmp_path)
    try:
        first = start_worker(tmp_path, fake)
        first_ray = stand_ins(fake)
        # the pid file names the supervisor of `ray start --block`, the group's leader
        cmd = Path(f"/proc/{first}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert "--supervise" in cmd and "--block" in cmd and "--resources=" in cmd, cmd
        assert len(first_ray) == 1 and os.getpgid(first_ray[0]) == first
        second = start_worker(tmp_path, fake)
        wait_for(lambda: not alive(first) and not alive(first_ray[0]), "the first start's processes to end")
        assert alive(second) and len(stand_ins(fake)) == 1
    finally:
        kill_stand_ins(fake)


def test_what_a_worker_leaves_when_its_ray_ends_is_ended(tmp_path):
    """When `ray start --block` ends (its raylet lost the head), the node's processes it did not start
    itself, Ray's agents, are ended with it: here a stand-in child that ignores SIGTERM."""
    fake = stand_in_ray(tmp_path, agent=True)
    try:
        supervisor = start_worker(tmp_path, fake)
        both = wait_for(lambda: len(stand_ins(fake)) == 2 and stand_ins(fake), "the stand-in agent")
        agent, = (p for p in both if b"SIG_IGN" in Path(f"/proc/{p}/cmdline").read_bytes())
        ray, = set(both) - {agent}
        assert os.getpgid(agent) == supervisor
        os.kill(ray, signal.SIGKILL)
        wait_for(lambda: not alive(agent) and not alive(supervisor), "the agent and the supervisor to end")
    finally:
        kill_stand_ins(fake)


def test_typo_in_cluster_file_is_refused(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text((ROOT / "cluster.yaml").read_text().replace("max_workers: 12", "max_wokers: 12"))
    with pytest.raises(ConfigError, match="Additional properties"):
        validate_cluster_file(str(bad))


def test_every_sweep_tag_is_offered_and_a_missing_one_is_named(tmp_path):
    configs = {str(p): validate_cluster_file(str(p)) for p in CLUSTER_FILES}
    assert check_sweep_tags(sorted((ROOT / "sweeps").glob("*.yaml")), configs) == []
    odd = tmp_path / "odd.yaml"
    odd.write_text("name: odd\nmodel: {name: netconv}\nresources: {cpu: 1, tags: {tpu_v5: 1}}\n")
    problems = check_sweep_tags([odd], configs)
    assert len(problems) == 1 and "'tpu_v5'" in problems[0]
    assert cluster_main(["validate", *map(str, CLUSTER_FILES), "--sweeps", str(ROOT / "sweeps")]) == 0


@pytest.mark.parametrize("device, resources, problem", [
    ("cuda", {"cpu": 1}, "needs a GPU for each trial, but resources.gpu is 0"),
    ("cuda:1", {"cpu": 1, "gpu": 0.25}, None),
    ("mps", {"cpu": 1}, "needs an Apple-silicon host, but resources.tags has no mps"),
    ("mps", {"cpu": 1, "tags": {"mps": 1}}, None),
    ("auto", {"cpu": 1}, None),
    ("cpu", {"cpu": 1, "gpu": 1}, None),  # an explicit cpu is honoured, as in the trial
])
def test_a_device_the_resources_never_grant_is_refused_at_the_dry_run(tmp_path, device, resources, problem, capsys):
    """Inside a trial the device follows Ray's grant, so `device: cuda` without resources.gpu trained on the
    CPU, silently; the dry run refuses it naming the key to set."""
    from cifar_ray.sweep import main as sweep_main
    from conftest import write_sweep

    path = write_sweep(tmp_path, "dev", train__device=device, resources=resources)
    code = sweep_main([str(path), "--dry-run"])
    err = capsys.readouterr().err
    if problem is None:
        assert code == 0, err
    else:
        assert code == 2 and f"train.device: {device} {problem}" in err and "Traceback" not in err, err


def test_a_not_yet_started_node_type_makes_a_request_feasible():
    offers = node_type_offers(validate_cluster_file(str(ROOT / "cluster.yaml")))
    live = [{"CPU": 4.0}]  # only the head-like CPU node is up
    req = {"model": {"cpu": 1, "gpu": 0.25, "a10g": 0.25}}
    assert infeasible(req, live) == req
    from cifar_ray.cluster import _unprefixed

    assert infeasible(req, live + [_unprefixed(o) for o in offers.values()]) == {}


def test_multi_node_cluster_refuses_storage_a_machine_does_not_see(tmp_path):
    two_hosts = [{"NodeManagerAddress": "198.18.0.21"}, {"NodeManagerAddress": "198.18.0.22"}]
    asked = []

    def second_blind(path, nodes):
        asked.append((path, [n["NodeManagerAddress"] for n in nodes]))
        return ["198.18.0.22"]

    with pytest.raises(ConfigError, match=r"1 of the cluster's 2 machines do not see \(198.18.0.22\).*shared storage"):
        check_storage(str(tmp_path), two_hosts, second_blind)
    assert asked == [(tmp_path, ["198.18.0.21", "198.18.0.22"])]
    check_storage(str(tmp_path), two_hosts, lambda path, nodes: [])  # a mount every machine sees
    check_storage("s3://bucket/results", two_hosts, second_blind)
    check_storage(str(tmp_path), [{"NodeManagerAddress": "198.18.0.21"}] * 3, second_blind)  # one machine, 3 raylets


def test_a_lab_file_may_differ_from_onprem_only_in_addresses_user_and_key(tmp_path, capsys):
    import shutil

    from cifar_ray.cluster import lab_problems

    shutil.copytree(ROOT / "clusters", tmp_path / "clusters")
    onprem = (ROOT / "clusters" / "onprem.yaml").read_text()
    lab = tmp_path / "clusters" / "lab.yaml"
    lab.write_text(onprem.replace("head_ip: 192.168.1.10", "head_ip: 198.18.0.10")
                   .replace("ssh_user: student", "ssh_user: root"))
    assert lab_problems(str(lab), str(tmp_path / "clusters" / "onprem.yaml")) == []
    assert cluster_main(["validate", str(lab), "--no-sweeps"]) == 0
    assert "the twin of onprem.yaml" in capsys.readouterr().out
    lab.write_text(onprem.replace("head_ip: 192.168.1.10", "head_ip: 198.18.0.10").replace("min_workers: 3",
                                                                                           "min_workers: 2"))
    assert cluster_main(["validate", str(lab), "--no-sweeps"]) == 2
    assert "min_workers differ from" in capsys.readouterr().err


def test_the_storage_probe_reads_the_folder_from_each_node(ray_session, tmp_path):
    from cifar_ray.cluster import cluster_nodes, nodes_not_seeing

    nodes = cluster_nodes()
    assert nodes_not_seeing(tmp_path / "results", nodes) == []
    assert not list((tmp_path / "results").iterdir())  # the probe file is removed again


@pytest.mark.slow
def test_placement_on_a_real_multi_node_cluster(tmp_path):
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "cluster_run.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=WAIT_S, cwd=tmp_path)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(line[0].removeprefix("RESULT "))
    assert out["cuda_rc"] == 0 and out["mps_rc"] == 0
    assert out["inception_mps_rc"] == 2  # refused before anything starts
    assert out["nobody_rc"] == 4
    cuda = pd.read_parquet(tmp_path / "results" / "on_cuda" / "trials.parquet")
    assert len(cuda) == 4 and (cuda["node_id"] == out["gpu_node_id"]).all()
    # the four gpu: 0.25 trials ran on the one GPU at the same time: every trial's first epoch began
    # before any trial's last report reached the driver (recorded_at: the driver's clock, float seconds)
    spans = []
    for d in (tmp_path / "results" / "on_cuda").glob("netconv_*"):
        rows = [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]
        spans.append((rows[0]["recorded_at"] - rows[0]["time_this_iter_s"], rows[-1]["recorded_at"]))
    assert len(spans) == 4 and max(s for s, _ in spans) < min(e for _, e in spans)
    mps = pd.read_parquet(tmp_path / "results" / "on_mps" / "trials.parquet")
    mps_node = [nid for nid, res in out["nodes"].items() if res.get("mps")][0]
    assert (mps["node_id"] == mps_node).all()


def test_the_local_twin_mirrors_cluster_yaml_and_a_drift_is_named(tmp_path, capsys):
    from cifar_ray.cluster import twin_problems

    assert cluster_main(["validate", str(ROOT / "cluster.yaml"), str(ROOT / "clusters" / "local.yaml"),
                         "--no-sweeps"]) == 0
    assert "the twin of cluster.yaml" in capsys.readouterr().out
    local = validate_cluster_file(str(ROOT / "clusters" / "local.yaml"))
    cloud = validate_cluster_file(str(ROOT / "cluster.yaml"))
    assert local["provider"]["type"] == "fake_multinode"
    assert all(t["resources"].get("CPU", 0) <= 1 for t in local["available_node_types"].values())
    local["available_node_types"]["a10g"]["resources"]["a10g"] = 2
    del local["available_node_types"]["a100x8"]
    problems = twin_problems("local.yaml", local, "cluster.yaml", cloud)
    assert any("node types" in p for p in problems) and any("node type a10g" in p for p in problems)


def test_a_fake_multinode_head_under_another_name_is_refused(tmp_path):
    import yaml

    doc = yaml.safe_load((ROOT / "clusters" / "local.yaml").read_text())
    doc["available_node_types"]["head"] = doc["available_node_types"].pop("ray.head.default")
    doc["head_node_type"] = "head"
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as refused:
        validate_cluster_file(str(path))
    assert str(refused.value) == (
        f"{path}: head_node_type is 'head'; Ray's fake_multinode provider names its head's type "
        "'ray.head.default', and under another name the autoscaler starts extra head nodes: name the head's "
        "entry in available_node_types ray.head.default and set head_node_type: ray.head.default")


def test_a_node_is_matched_to_its_node_type():
    from cifar_ray.cluster import match_node_type

    types = node_type_offers(validate_cluster_file(str(ROOT / "cluster.yaml")))
    node = {"CPU": 4.0, "GPU": 1.0, "cuda": 1.0, "t4": 1.0, "gpu_mem_16g": 1.0, "memory": 1e9,
            "node:10.0.0.5": 1.0, "accelerator_type:T4": 1.0}
    assert match_node_type(node, types) == "t4_spot"
    assert match_node_type({"CPU": 0.0, "memory": 1e9}, types) == "head"
    assert match_node_type({"CPU": 8.0, "GPU": 2.0}, types) is None  # no such type


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _cluster_nodes(env: dict, address: str) -> list[dict]:
    """Ray's list of the cluster's nodes, gone ones too (their Resources empty), asked from a separate
    process (this one may hold the session's Ray)."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps([{k: n[k] for k in ('NodeID', 'Alive', 'Resources')} for n in ray.nodes()]))" % address)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_local_autoscaling_cluster_places_trials_by_tag_and_scales_to_zero(tmp_path):
    import os
    import shutil
    import tempfile

    from cifar_ray.cluster import match_node_type
    from conftest import wait_for, write_sweep

    if not _port_free(6379):
        pytest.skip("port 6379 is in use; the local cluster's head needs it (Ray's fake provider connects there)")
    ray_tmp = tempfile.mkdtemp(prefix="crl", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env |= {"PY": sys.executable, "CIFAR_RAY_LOCAL_TMPDIR": ray_tmp}
    script = [str(ROOT / "scripts" / "local-cluster.sh")]
    address = "auto"  # found through RAY_TMPDIR: the head advertises a fake node address
    sweep_env = env | {"RAY_TMPDIR": ray_tmp}
    local = validate_cluster_file(str(ROOT / "clusters" / "local.yaml"))
    types, head = node_type_offers(local), local["head_node_type"]

    def running_types() -> list:
        return sorted(str(match_node_type(n["Resources"], types)) for n in _cluster_nodes(sweep_env, address)
                      if n["Alive"])

    passed = False
    up = subprocess.run([*script, "up"], env=env, capture_output=True, text=True, timeout=WAIT_S)
    try:
        assert up.returncode == 0, up.stderr
        assert f"RAY_TMPDIR={ray_tmp} python -m cifar_ray.sweep" in up.stdout
        assert "--address auto --cluster-config clusters/local.yaml" in up.stdout
        assert running_types() == [head]  # the worker types start from zero
        (head_id,) = [n["NodeID"] for n in _cluster_nodes(sweep_env, address) if n["Alive"]]
        path = write_sweep(tmp_path, "twin", model={"name": {"grid": ["base", "net3"]}},
                           resources={"cpu": 1, "gpu": 1, "tags": {"t4": 1}},
                           resources_by_model={"net3": {"cpu": 1, "gpu": 1, "tags": {"a100": 1}}})
        cmd = [sys.executable, "-m", "cifar_ray.sweep", str(path), "--storage-path", str(tmp_path / "results"),
               "--address", address, "--cluster-config", str(ROOT / "clusters" / "local.yaml")]
        run = subprocess.run(cmd, env=sweep_env, capture_output=True, text=True, timeout=WAIT_S, cwd=ROOT)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        df = pd.read_parquet(tmp_path / "results" / "twin" / "trials.parquet").set_index("model.name")
        assert df.loc["base", "node_type"] == "t4_spot" and df.loc["net3", "node_type"] == "a100x8"
        assert set(df["status"]) == {"completed"}
        # a tag no node type offers is still refused before anything starts, naming the node types
        bad = write_sweep(tmp_path, "h100", resources={"cpu": 1, "gpu": 1, "tags": {"h100": 1}})
        refused = subprocess.run([*cmd[:3], str(bad), *cmd[4:]], env=sweep_env, capture_output=True, text=True,
                                 timeout=WAIT_S, cwd=ROOT)
        assert refused.returncode == 4, refused.stderr[-2000:]
        assert "t4_spot" in refused.stderr and "h100" in refused.stderr
        # after the idle timeout (15 s) the autoscaler removes the workers again
        wait_for(lambda: running_types() == [head], "the idle worker nodes to go away")
        # and the cluster never had a node besides the head and those the trials ran on (with another name
        # for the head's type, the autoscaler started head-type nodes one after another: 9-15 in this test)
        ever = {n["NodeID"] for n in _cluster_nodes(sweep_env, address)}
        assert ever == {head_id, *df["node_id"]}, "nodes started that no trial ran on"
        passed = True
    finally:
        started = _processes_with_env("RAY_TMPDIR", ray_tmp)  # the cluster's, its agents included
        down = subprocess.run([*script, "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        left = subprocess.run(["pgrep", "-f", "--", ray_tmp + "/"], capture_output=True, text=True)
        assert not left.stdout.strip(), f"processes of the local cluster left: {left.stdout}"
        running = {pid: name for pid, name in started.items() if alive(pid)}
        assert not running, f"down returned while these of its processes still ran: {running}"
        if passed:  # a failed run keeps the cluster's Ray folder (its logs) for a look
            shutil.rmtree(ray_tmp)
