"""Resource requests per trial, their feasibility against the connected Ray cluster, and cluster files.

    python -m cifar_ray.cluster validate cluster.yaml clusters/onprem.yaml   # offline, against Ray's schema

A request that no node can ever satisfy would stay PENDING forever in Tune; we refuse it up front.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from cifar_ray.config import ConfigError
from cifar_ray.files import printable
from cifar_ray.models import model_spec
from cifar_ray.pipes import run_main
from cifar_ray.space import Space
from cifar_ray.sweep_config import ResourcesConfig, SweepConfig

ACCELERATOR_PREFIX = "accelerator_type:"
ACCELERATOR_AMOUNT = 0.001  # Ray's convention: a token amount of the label pins the node type


class InfeasibleError(RuntimeError):
    """No node of the cluster can ever run some trial; the message lists the nodes."""


def model_names(space: Space) -> list[str]:
    return list(dict.fromkeys(space.values_of("model.name")))


def request(r: ResourcesConfig) -> dict[str, float]:
    """The dict tune.with_resources takes: cpu, gpu and custom resources."""
    out: dict[str, float] = {"cpu": r.cpu, "gpu": r.gpu}
    out.update(r.tags)
    if r.accelerator:
        out[ACCELERATOR_PREFIX + r.accelerator] = ACCELERATOR_AMOUNT
    return out


def requests_by_model(sweep: SweepConfig, space: Space) -> dict[str, dict[str, float]]:
    return {name: request(sweep.resources_for(name)) for name in model_names(space)}


def trial_device(r: ResourcesConfig, train_device: Any) -> str:
    """The device type a trial with these resources will train on."""
    if train_device == "cpu":
        return "cpu"
    if r.gpu > 0 or r.tags.get("cuda"):
        return "cuda"
    if r.tags.get("mps"):  # (an mps device without the tag is refused first: ungranted)
        return "mps"
    return "cpu"


def check_placement(sweep: SweepConfig, space: Space, where: str) -> None:
    """Refuse a model sent to a device it cannot run on (inception on MPS), a train.device the resources
    never get from Ray (cuda without a GPU, mps without the tag), or an unknown model in resources_by_model."""
    names = model_names(space)
    for extra in sweep.resources_by_model:
        if extra not in names:
            raise ConfigError(f"{where}: resources_by_model.{extra}: not a model of this sweep; its models: "
                              f"{', '.join(names)}")
    wanted = space.values_of("train.device")[0]  # one device per sweep (sweep_config refuses a search)
    for name in names:
        key = f"resources_by_model.{name}" if name in sweep.resources_by_model else "resources"
        problem = ungranted(sweep.resources_for(name), wanted)
        if problem:
            raise ConfigError(f"{where}: train.device: {wanted} {problem.format(key=key)}")
        device = trial_device(sweep.resources_for(name), wanted)
        if device in model_spec(name).unsupported_devices:
            raise ConfigError(f"{where}: {key}: model {name!r} cannot run on {device}; give it resources "
                              f"on another device (e.g. resources_by_model: {{{name}: {{gpu: 1, tags: {{cuda: 1}}}}}})")


def ungranted(r: ResourcesConfig, wanted: Any) -> str:
    """Why a trial asking for device `wanted` would not get it from Ray with resources `r` ('' when it
    would): inside a trial the device follows Ray's grant (device.select_device), so without it the
    trial trains on the CPU, silently and for hours. `{key}` in the text is the resources' key."""
    kind = str(wanted).split(":")[0]
    if kind == "cuda" and r.gpu <= 0:
        return ("needs a GPU for each trial, but {key}.gpu is 0: Ray would give the trial none and it would train "
                "on the CPU; set {key}.gpu: 1 (or 0.25 to share a GPU among 4 trials), or train.device: auto")
    if kind == "mps" and not r.tags.get("mps"):
        return ("needs an Apple-silicon host, but {key}.tags has no mps: Ray places a trial on one only by that tag "
                "(ray start --resources '{{\"mps\": 1}}'), elsewhere it trains on the CPU; set {key}.tags: "
                "{{mps: 1}}, or train.device: auto")
    return ""


def _node_offers(resources: dict[str, float]) -> dict[str, float]:
    return {("cpu" if k == "CPU" else "gpu" if k == "GPU" else k): v for k, v in resources.items()}


def fits(req: dict[str, float], offers: dict[str, float]) -> bool:
    return all(amount <= 0 or offers.get(key, 0) >= amount - 1e-9 for key, amount in req.items())


def infeasible(requests: dict[str, dict[str, float]], nodes: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """The requests that fit on none of the nodes (each node: its total resources, Ray's names)."""
    offers = [_node_offers(n) for n in nodes]
    return {model: req for model, req in requests.items() if not any(fits(req, o) for o in offers)}


def _unprefixed(offers: dict[str, float]) -> dict[str, float]:
    """A node type's offers, plus Ray's accelerator label that a GPU node gets when it starts."""
    return {("CPU" if k == "cpu" else "GPU" if k == "gpu" else k): v for k, v in offers.items()}


def cluster_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _signature(offers: dict[str, float]) -> dict[str, float]:
    """What tells node types apart: every resource but CPUs, memory and Ray's own node/accelerator labels."""
    return {k: float(v) for k, v in _node_offers(offers).items()
            if v and k != "cpu" and not k.startswith(("node:", "memory", "object_store_memory", ACCELERATOR_PREFIX))}


def match_node_type(node_resources: dict[str, float], types: dict[str, dict[str, float]]) -> Optional[str]:
    """The autoscaler node type whose resources a node has (GPUs and tags; CPUs decide a tie)."""
    sig = _signature(node_resources)
    same = [name for name, offers in types.items() if _signature(offers) == sig]
    if len(same) > 1:
        cpus = _node_offers(node_resources).get("cpu", 0)
        same = [name for name in same if types[name].get("cpu", 0) == cpus] or same[:0]
    return same[0] if len(same) == 1 else None


class NodeTypes:
    """node id -> autoscaler node type, for a cluster with node types (--cluster-config or a `ray up`
    head); always None on a plain Ray. Ray's node list is read again when an unknown node appears."""

    def __init__(self, types: dict[str, dict[str, float]]):
        self.types = types
        self._known: dict[str, Optional[str]] = {}

    def of(self, node_id: Optional[str]) -> Optional[str]:
        if not self.types or not node_id:
            return None
        if node_id not in self._known:
            for node in cluster_nodes():
                self._known[node["NodeID"]] = match_node_type(node.get("Resources") or {}, self.types)
        return self._known.get(node_id)


def _short(resources: dict[str, float]) -> str:
    keep = {k: v for k, v in resources.items() if not k.startswith(("node:", "memory", "object_store_memory"))}
    return ", ".join(f"{k}={v:g}" for k, v in sorted(keep.items()))


def check_feasible(requests: dict[str, dict[str, float]],
                   node_types: Optional[dict[str, dict[str, float]]] = None) -> None:
    """Exit-4 check: each request must fit a live node or a node type the autoscaler could start."""
    nodes = cluster_nodes()
    offers = [n["Resources"] for n in nodes] + [_unprefixed(o) for o in (node_types or {}).values()]
    bad = infeasible(requests, offers)
    if bad:
        lines = ["no node of the cluster can ever run these trials (they would wait forever):"]
        lines += [f"  {model}: needs {_short(req)}" for model, req in bad.items()]
        lines += ["nodes:"] + [f"  {n.get('NodeManagerAddress', '?')}: {_short(n['Resources'])}" for n in nodes]
        lines += [f"  node type {name} (not started): {_short(o)}" for name, o in (node_types or {}).items()]
        lines.append("lower the request in resources:/resources_by_model:, add a node that offers it, "
                     "or pass --allow-pending on an autoscaling cluster")
        raise InfeasibleError("\n".join(lines))


# ---------------------------------------------------------------- cluster files

FAKE_PROVIDER = "fake_multinode"  # Ray's provider that starts node types as raylets on this machine
# the node type that provider tags the head it runs with: a config's head type must bear this name, else
# the autoscaler counts no head of its head type and starts extra head-type raylets, one after another
FAKE_HEAD_TYPE = "ray.head.default"
TWIN_OF = "cluster.yaml"  # a fake-multinode file in clusters/ mirrors the repository's cluster.yaml
AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the cluster file on the head
SHARED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smbfs", "smb3", "fuse.sshfs", "lustre", "gpfs", "ceph", "glusterfs",
                      "fuse.glusterfs", "beegfs", "fuse.s3fs", "fuse.gcsfuse", "9p", "virtiofs")


def validate_cluster_file(path: str) -> dict:
    """Validate a cluster YAML against Ray's own schema (offline); returns the prepared config."""
    from cifar_ray.sweep_config import parse_yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: {'a folder, not a cluster file' if p.is_dir() else 'no such file'}")
    raw = parse_yaml(p.read_text(), path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping (a Ray cluster file)")
    fake = (raw.get("provider") or {}).get("type") == FAKE_PROVIDER
    if fake and raw.get("head_node_type") != FAKE_HEAD_TYPE:
        raise ConfigError(f"{path}: head_node_type is {raw.get('head_node_type')!r}; Ray's {FAKE_PROVIDER} provider "
                          f"names its head's type {FAKE_HEAD_TYPE!r}, and under another name the autoscaler starts "
                          f"extra head nodes: name the head's entry in available_node_types {FAKE_HEAD_TYPE} and set "
                          f"head_node_type: {FAKE_HEAD_TYPE}")
    try:
        # Ray's validator is private API: this is the one place that calls it.
        import logging

        from ray.autoscaler._private.util import prepare_config, validate_config

        # its "setting max workers for head node type to 0" is not news to someone validating a file
        logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)
        if fake:
            # prepare_config merges a defaults file the wheel lacks for this provider; such a file is
            # complete on its own (clusters/local.yaml), so the schema is checked as it stands
            config = copy.deepcopy(raw)
        else:
            config = prepare_config(copy.deepcopy(raw))
        validate_config(config)
    except Exception as exc:  # jsonschema.ValidationError, ValueError, KeyError from Ray
        detail = " ".join(str(exc).split())[:400]
        raise ConfigError(f"{path}: not a valid Ray cluster file: {detail}") from None
    # hosts/<hostname>.json describe the machines of an on-prem (provider: local) file beside them
    config["_host_tags"] = host_tags(p) if (raw.get("provider") or {}).get("type") == "local" else {}
    return config


def host_tags(cluster_file: Path) -> dict[str, dict[str, float]]:
    """Per-host tag files (`hosts/<hostname>.json` beside an on-prem cluster file)."""
    out = {}
    for f in sorted((cluster_file.parent / "hosts").glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{f}: not JSON ({exc})") from None
        if not isinstance(data, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in data.values()):
            raise ConfigError(f"{f}: must be an object of tag -> positive amount, e.g. {{\"mps\": 1}}")
        out[f.stem] = data
    return out


def node_type_offers(config: dict) -> dict[str, dict[str, float]]:
    """What each node type (or on-prem host) offers, in the names tune.with_resources uses."""
    offers = {}
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == config.get("head_node_type") and config.get("provider", {}).get("type") == "local":
            continue
        offers[name] = _node_offers(spec.get("resources") or {})
    for host, tags in (config.get("_host_tags") or {}).items():
        # a host file's "GPU" is its GPU count (ray start --num-gpus); without it, one per `cuda` tag
        gpus = tags.get("GPU", tags.get("cuda", 0))
        offers[f"host {host}"] = {"cpu": 1e9, "gpu": gpus, **{k: v for k, v in tags.items() if k != "GPU"}}
    return offers


def twin_problems(local_path: str, local: dict, cloud_path: str, cloud: dict) -> list[str]:
    """A fake-multinode twin must offer the same node type names, GPU counts and tags as the cloud
    file (CPUs are scaled to the machine), so a sweep placed correctly on it is placed correctly there.
    The heads are compared as heads: the twin's bears the name its provider gives it (FAKE_HEAD_TYPE)."""
    mine, theirs = node_type_offers(local), node_type_offers(cloud)
    if local.get("head_node_type") in mine and cloud.get("head_node_type") in theirs:
        mine[cloud["head_node_type"]] = mine.pop(local["head_node_type"])
    problems = []
    if set(mine) != set(theirs):
        problems.append(f"{local_path}: node types {', '.join(sorted(mine))} differ from {cloud_path}'s "
                        f"{', '.join(sorted(theirs))}")
    for name in sorted(set(mine) & set(theirs)):
        if _signature(mine[name]) != _signature(theirs[name]):
            problems.append(f"{local_path}: node type {name} offers {_short(_signature(mine[name]))}; {cloud_path} "
                            f"offers {_short(_signature(theirs[name]))} (GPUs and tags must match; CPUs may differ)")
    return problems


def twin_of(path: str) -> Optional[Path]:
    """The cloud file a fake-multinode cluster file in clusters/ mirrors: the repository's cluster.yaml."""
    twin = Path(path).resolve().parent.parent / TWIN_OF
    return twin if twin.is_file() and twin != Path(path).resolve() else None


LAB_FILE, ONPREM_FILE = "lab.yaml", "onprem.yaml"  # scripts/lab.sh writes the one from the other
# what may differ between them: where the hosts are and how to log in to them
LAB_KEYS = (("provider", "head_ip"), ("provider", "worker_ips"), ("auth", "ssh_user"), ("auth", "ssh_private_key"))


def lab_twin_of(path: str) -> Optional[Path]:
    """The on-prem file a lab file (clusters/lab.yaml, written by scripts/lab.sh) mirrors."""
    p = Path(path).resolve()
    twin = p.parent / ONPREM_FILE
    return twin if p.name == LAB_FILE and twin.is_file() else None


def _without_lab_keys(doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    for section, key in LAB_KEYS:
        (doc.get(section) or {}).pop(key, None)
    return doc


def lab_problems(lab_path: str, onprem_path: str) -> list[str]:
    """A lab file must be its on-prem file with other addresses, SSH user and key, and nothing else:
    then what runs on the lab (setup, start commands, file mounts, tags) is what runs on the real hosts."""
    from cifar_ray.sweep_config import parse_yaml

    lab, onprem = (_without_lab_keys(parse_yaml(Path(f).read_text(), f) or {}) for f in (lab_path, onprem_path))
    differ = sorted(k for k in set(lab) | set(onprem) if lab.get(k) != onprem.get(k))
    if not differ:
        return []
    return [f"{lab_path}: {', '.join(differ)} differ from {onprem_path} (only "
            f"{', '.join('.'.join(k) for k in LAB_KEYS)} may); write it again with scripts/lab.sh yaml"]


def tags_used(sweep: SweepConfig) -> set[str]:
    used = set()
    for r in [sweep.resources, *sweep.resources_by_model.values()]:
        used |= set(r.tags)
    return used


def check_sweep_tags(sweep_files: list[Path], cluster_configs: dict[str, dict]) -> list[str]:
    """Problems: a tag a sweep asks for that no node type of any cluster file offers."""
    from cifar_ray.sweep_config import read_sweep

    offered = set()
    for config in cluster_configs.values():
        for offers in node_type_offers(config).values():
            offered |= {k for k, v in offers.items() if v}
    problems = []
    for f in sweep_files:
        for tag in sorted(tags_used(read_sweep(str(f))) - offered):
            problems.append(f"{f}: resources tag {tag!r} is offered by no node type of {', '.join(cluster_configs)}")
    return problems


def autoscaler_node_types(path: Optional[str] = None) -> dict[str, dict[str, float]]:
    """Node types of the cluster this driver runs on, when it was started by `ray up` (the file is
    on the head) or given with --cluster-config: they count as nodes that could still start."""
    if path:  # the user's file: it must be there and valid (a file of the wrong name would be passed over)
        return node_type_offers(validate_cluster_file(str(Path(path).expanduser())))
    p = Path(AUTOSCALER_CONFIG).expanduser()
    if not p.is_file():
        return {}
    import yaml

    return node_type_offers(yaml.safe_load(p.read_text()) or {})


def is_shared_path(path: Path) -> bool:
    """True when `path` lies on a network filesystem (from /proc/mounts), so every node sees it."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    target, best = str(path.resolve()), ("", "")
    for _dev, mount, fstype in mounts:
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best[0]):
            best = (mount, fstype)
    return best[1] in SHARED_FILESYSTEMS


PROBE_TIMEOUT_S = 300  # a node's answer to the storage probe: a worker process may have to start there first


def nodes_not_seeing(folder: Path, nodes: list[dict]) -> list[str]:
    """The addresses of the nodes that do not see a file written here in `folder`: a zero-CPU Ray task
    pinned to each node reads it back. The truth for any mount (NFS, a bind mount, sshfs), where the
    filesystem's type is only a hint."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = folder / f".cifar_ray-storage-probe-{token}"
    probe.write_text(token)

    @ray.remote(num_cpus=0, max_retries=0)
    def read(path: str) -> Optional[str]:
        try:
            return Path(path).read_text()
        except OSError:
            return None

    try:
        answers = {n.get("NodeManagerAddress", "?"): read.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(probe))
            for n in nodes}
        missing = []
        for address, ref in answers.items():
            try:
                seen = ray.get(ref, timeout=PROBE_TIMEOUT_S)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
                seen = None
            if seen != token:
                missing.append(address)
        return sorted(missing)
    finally:
        probe.unlink(missing_ok=True)


def check_storage(storage: str, nodes: list[dict], not_seeing=nodes_not_seeing) -> None:
    """Multi-node sweeps checkpoint to shared storage (Ray >= 2.7): a local path must be one folder that
    every machine of the cluster sees (a network filesystem is taken on its type; any other mount is
    probed from each machine)."""
    hosts = {n.get("NodeManagerAddress") for n in nodes}
    path = Path(storage).expanduser()
    if len(hosts) <= 1 or "://" in storage or is_shared_path(path):
        return
    one_per_host = list({n.get("NodeManagerAddress"): n for n in nodes}.values())
    missing = not_seeing(path, one_per_host)
    if not missing:
        return
    raise ConfigError(f"--storage-path {storage}: a local folder that {len(missing)} of the cluster's {len(hosts)} "
                      f"machines do not see ({', '.join(missing)}); trials there could not save checkpoints. Use "
                      "shared storage: --storage-path s3://BUCKET/PATH (or gs://), or a folder on a mount every "
                      "node has (NFS)")


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m cifar_ray.cluster")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check cluster files offline, and the tags the sweeps ask for")
    v.add_argument("files", nargs="+")
    v.add_argument("--sweeps", default="sweeps", help="folder of sweep files whose tags must be offered")
    v.add_argument("--no-sweeps", action="store_true",
                   help="check the cluster files only (sweeps/lab.yaml asks for the lab's tags, cluster.yaml "
                        "offers others)")
    args = p.parse_args(argv)
    try:
        configs = {f: validate_cluster_file(f) for f in args.files}
        for f, config in configs.items():
            for name, offers in node_type_offers(config).items():
                print(f"{f}: {name}: {_short({k: v for k, v in offers.items() if v < 1e9})}")
        problems = [] if args.no_sweeps else check_sweep_tags(sorted(Path(args.sweeps).glob("*.yaml")), configs)
        for f, config in configs.items():
            onprem = lab_twin_of(f) if (config.get("provider") or {}).get("type") == "local" else None
            if onprem is not None:
                found = lab_problems(f, str(onprem))
                problems += found
                if not found:
                    print(f"{f}: the twin of {onprem.name}: only the addresses, SSH user and key differ")
            twin = twin_of(f) if (config.get("provider") or {}).get("type") == FAKE_PROVIDER else None
            if twin is not None:
                found = twin_problems(f, config, str(twin), validate_cluster_file(str(twin)))
                problems += found
                if not found:
                    print(f"{f}: the twin of {twin.name}: the same node types, GPU counts and tags")
    except ConfigError as err:
        print(f"error: {printable(err)}", file=sys.stderr)
        return 2
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if not problems:
        tags = "" if args.no_sweeps else f"; every tag used in {args.sweeps}/ is offered"
        print(f"ok: {len(configs)} cluster files valid{tags}")
    return 2 if problems else 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
