"""The sweep's search space as Ray Tune's objects: domains, the param_space, PBT's mutations. The one
place the pure space (cifar_ray.space) meets Ray; only the sweep CLI imports it."""
from __future__ import annotations

from typing import Any

from cifar_ray.config import ConfigError
from cifar_ray.space import Domain, Space, is_domain, listed_domains, parse_domain
from cifar_ray.sweep_config import SweepConfig


def to_tune(dom: Domain) -> Any:  # a Tune search domain or grid_search dict
    from ray import tune

    if dom.kind == "grid":
        return tune.grid_search(list(dom.values))
    if dom.kind == "choice":
        return tune.choice(list(dom.values))
    if dom.kind == "uniform":
        return tune.uniform(*dom.values)
    if dom.kind == "loguniform":
        return tune.loguniform(*dom.values)
    return tune.randint(dom.values[0], dom.values[1] + 1)  # Tune's upper bound is exclusive


def param_space(space: Space) -> dict[str, Any]:
    """Tune's param_space: flat dotted keys, domains as Tune search objects. A grid of mappings (augment
    policies) stands as its first value: every trial's point gives its own (tune_search.FolderPerTrialGenerator).
    A key `configurations:` lists is a grid of its values there, so Tune accepts each point's value."""
    from ray import tune

    out = {k: (v.values[0] if _grid_of_mappings(v) else to_tune(v)) if isinstance(v, Domain) else v
           for k, v in space.values.items()}
    for key, dom in listed_domains(space.listed).items():  # every trial's point gives its value
        mappings = _grid_of_mappings(Domain("grid", dom.values))
        out[key] = dom.values[0] if mappings else tune.grid_search(list(dom.values))
    if space.seeds:
        out["train.seed"] = tune.grid_search(list(space.seeds))
    return out


def _grid_of_mappings(dom: Domain) -> bool:
    return dom.kind == "grid" and any(isinstance(v, dict) for v in dom.values)


def mutations(sweep: SweepConfig, space: Space, where: str) -> dict[str, Any]:
    """PBT's hyperparam_mutations: each key must be a searched numeric train key."""
    from ray import tune

    out = {}
    for key, spec in sweep.scheduler.mutations.items():
        if key not in space.values:
            raise ConfigError(f"{where}: scheduler.mutations.{key}: not a key of the sweep; searched keys: "
                              f"{', '.join(space.searched_keys()) or 'none'}")
        if isinstance(spec, list):
            out[key] = tune.choice(spec) if spec else None
        elif is_domain(spec):
            out[key] = to_tune(parse_domain(f"scheduler.mutations.{key}", spec, where))
        else:
            raise ConfigError(f"{where}: scheduler.mutations.{key}: give a list or a domain such as "
                              "{uniform: [0.1, 1]}")
        if out[key] is None:
            raise ConfigError(f"{where}: scheduler.mutations.{key}: empty list")
    return out
