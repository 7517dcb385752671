"""Cluster files, placement rules, and a real multi-node Ray cluster on this machine."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cifar_ray.cluster import check_storage, check_sweep_tags, infeasible, node_type_offers, validate_cluster_file
from cifar_ray.cluster import main as cluster_main
from cifar_ray.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = [ROOT / "cluster.yaml", ROOT / "clusters" / "onprem.yaml"]


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


def test_a_not_yet_started_node_type_makes_a_request_feasible():
    offers = node_type_offers(validate_cluster_file(str(ROOT / "cluster.yaml")))
    live = [{"CPU": 4.0}]  # only the head-like CPU node is up
    req = {"model": {"cpu": 1, "gpu": 0.25, "a10g": 0.25}}
    assert infeasible(req, live) == req
    from cifar_ray.cluster import _unprefixed

    assert infeasible(req, live + [_unprefixed(o) for o in offers.values()]) == {}


def test_multi_node_cluster_refuses_local_storage(tmp_path):
    two_hosts = [{"NodeManagerAddress": "10.0.0.1"}, {"NodeManagerAddress": "10.0.0.2"}]
    with pytest.raises(ConfigError, match="shared storage"):
        check_storage(str(tmp_path), two_hosts)
    check_storage("s3://bucket/results", two_hosts)
    check_storage(str(tmp_path), [{"NodeManagerAddress": "10.0.0.1"}] * 3)  # one machine, several raylets


@pytest.mark.slow
def test_placement_on_a_real_multi_node_cluster(tmp_path):
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "cluster_run.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
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
