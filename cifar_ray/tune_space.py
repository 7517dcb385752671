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


# The keys PBT may change while a trial trains: a trial cloned from another one's checkpoint keeps its
# weights and optimizer moments and takes these new values (trainable._adopt_new_hyperparameters; the loss
# reads label smoothing afresh). Any other key would not fit what it copies: the model, the optimizer's
# kind and state, the data, the schedule's length.
PBT_MUTABLE = ("train.lr", "train.momentum", "train.weight_decay", "train.muon_lr", "train.muon_momentum",
               "train.label_smoothing", "train.bias_lr_factor", "train.bias_decay_factor")


def mutations(sweep: SweepConfig, space: Space, where: str) -> dict[str, Any]:
    """PBT's hyperparam_mutations: keys PBT can change in a running trial (PBT_MUTABLE) that the trials
    have, each value (a list's every one, a domain's ends) one a trial accepts."""
    from ray import tune

    out = {}
    for key, spec in sweep.scheduler.mutations.items():
        at = f"{where}: scheduler.mutations.{key}"
        if key not in PBT_MUTABLE:
            raise ConfigError(f"{at}: PBT can change only {', '.join(PBT_MUTABLE)} while a trial trains (a cloned "
                              f"trial keeps the weights and optimizer state it copies); search {key} instead")
        if key not in space.values:
            raise ConfigError(f"{at}: the trials have no {key}; give it a value or a domain in the "
                              f"{key.split('.')[0]} section for PBT to start from")
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"{at}: empty list")
            dom = Domain("choice", tuple(spec))
        elif is_domain(spec):
            dom = parse_domain(f"scheduler.mutations.{key}", spec, where)
        else:
            raise ConfigError(f"{at}: give a list or a domain such as {{uniform: [0.1, 1]}}")
        _check_mutation(space, key, dom, at)
        out[key] = tune.choice(list(dom.values)) if dom.kind == "choice" else to_tune(dom)
    return out


def _check_mutation(space: Space, key: str, dom: Domain, at: str) -> None:
    """Each value PBT may give `key` (a list's values, a domain's ends) makes a valid trial with the same
    parameter groups as the trial it is cloned from (a bias factor of 1 merges the bias group away)."""
    from cifar_ray.space import first_candidate, format_value, trial_from

    first = first_candidate(space)
    bias_group = trial_from(first, at).train.bias_group()
    for value in dom.candidates():
        try:
            cfg = trial_from(first | {key: value}, at)
        except ConfigError as err:
            raise ConfigError(f"{err} (the value {format_value(value)} PBT may give it)") from None
        if cfg.train.bias_group() != bias_group:
            raise ConfigError(f"{at}: {format_value(value)} changes the optimizer's parameter groups (bias_lr_factor "
                              "and bias_decay_factor both 1 merge the bias group away); keep both away from 1 "
                              "or both at 1")
