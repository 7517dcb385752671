"""Resource requests per trial and their feasibility against the connected Ray cluster.

A request that no node can ever satisfy would stay PENDING forever in Tune; we refuse it up front.
"""
from __future__ import annotations

from typing import Any

from cifar_ray.config import ConfigError, ResourcesConfig, SweepConfig
from cifar_ray.models import model_spec
from cifar_ray.space import Domain, Space

ACCELERATOR_PREFIX = "accelerator_type:"
ACCELERATOR_AMOUNT = 0.001  # Ray's convention: a token amount of the label pins the node type
DEVICE_TAGS = ("mps", "cuda")  # tags that name the device a trial will use


class InfeasibleError(RuntimeError):
    """No node of the cluster can ever run some trial; the message lists the nodes."""


def model_names(space: Space) -> list[str]:
    name = space.values.get("model.name", "netconv")
    return list(dict.fromkeys(name.values)) if isinstance(name, Domain) else [name]


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
    if r.tags.get("mps") or train_device == "mps":
        return "mps"
    return "cpu"


def check_placement(sweep: SweepConfig, space: Space, where: str) -> None:
    """Refuse a model sent to a device it cannot run on (inception on MPS), or an unknown model in
    resources_by_model."""
    names = model_names(space)
    for extra in sweep.resources_by_model:
        if extra not in names:
            raise ConfigError(f"{where}: resources_by_model.{extra}: not a model of this sweep; its models: {', '.join(names)}")
    for name in names:
        device = trial_device(sweep.resources_for(name), space.values.get("train.device", "auto"))
        if device in model_spec(name).unsupported_devices:
            key = f"resources_by_model.{name}" if name in sweep.resources_by_model else "resources"
            raise ConfigError(f"{where}: {key}: model {name!r} cannot run on {device}; give it resources "
                              f"on another device (e.g. resources_by_model: {{{name}: {{gpu: 1, tags: {{cuda: 1}}}}}})")


def _node_offers(resources: dict[str, float]) -> dict[str, float]:
    return {("cpu" if k == "CPU" else "gpu" if k == "GPU" else k): v for k, v in resources.items()}


def fits(req: dict[str, float], offers: dict[str, float]) -> bool:
    return all(amount <= 0 or offers.get(key, 0) >= amount - 1e-9 for key, amount in req.items())


def infeasible(requests: dict[str, dict[str, float]], nodes: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """The requests that fit on none of the nodes (each node: its total resources, Ray's names)."""
    offers = [_node_offers(n) for n in nodes]
    return {model: req for model, req in requests.items() if not any(fits(req, o) for o in offers)}


def cluster_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _short(resources: dict[str, float]) -> str:
    keep = {k: v for k, v in resources.items() if not k.startswith(("node:", "memory", "object_store_memory"))}
    return ", ".join(f"{k}={v:g}" for k, v in sorted(keep.items()))


def check_feasible(requests: dict[str, dict[str, float]]) -> None:
    nodes = cluster_nodes()
    bad = infeasible(requests, [n["Resources"] for n in nodes])
    if bad:
        lines = [f"no node of the cluster can ever run these trials (they would wait forever):"]
        lines += [f"  {model}: needs {_short(req)}" for model, req in bad.items()]
        lines += ["nodes:"] + [f"  {n.get('NodeManagerAddress', '?')}: {_short(n['Resources'])}" for n in nodes]
        lines.append("lower the request in resources:/resources_by_model:, add a node that offers it, "
                     "or pass --allow-pending on an autoscaling cluster")
        raise InfeasibleError("\n".join(lines))
