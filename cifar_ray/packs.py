"""Which trials of a sweep share a pack (`resources.fuse: K`): the rules of fusion, the sweep's every trial
drawn up front, and those trials grouped into packs of at most K. Pure: no torch, no Ray. The wide
network itself is cifar_ray.fuse; the trainable that runs a pack is cifar_ray.trainable.run_pack.

A pack's members share every key but the per-member ones (PER_MEMBER_KEYS): each of those is read only
by a member's own optimizer, schedule, lookahead, loss, evaluation or random streams, never by the
fused forward. Trials are packed in the order they would start unfused, so the first pack holds the
first trials of the dry run.
"""
from __future__ import annotations

import math
import random
from typing import Any, Optional

from cifar_ray.config import ConfigError, TrialConfig
from cifar_ray.space import RANDOM_KINDS, Domain, Space, first_candidate, grid_points
from cifar_ray.sweep_config import SweepConfig

PER_MEMBER_KEYS = frozenset({
    "train.lr", "train.momentum", "train.nesterov", "train.weight_decay", "train.seed", "train.label_smoothing",
    "train.step_size", "train.gamma", "train.warmup_fraction", "train.start_factor", "train.end_factor",
    "train.bias_lr_factor", "train.bias_decay_factor", "train.lookahead_decay", "train.lookahead_every",
    "train.lookahead_start", "train.muon_lr", "train.muon_momentum", "train.early_stopping_patience",
    "train.optimizer", "train.schedule", "train.lr_reference_batch", "train.tta", "train.eval_batch_size",
    "train.data_init_images",
})
UNFUSABLE_MODELS = {"inception": "it concatenates its branches' channels, which mixes the members' channels"}


class FuseError(ValueError):
    """A configuration that cannot be fused, with the reason and what to change."""


def flat(cfg: TrialConfig) -> dict[str, Any]:
    """Every key of a trial config, dotted (`train.lr`), with its value."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value
    walk("", cfg.model_dump(mode="json"))
    return out


def pack_key(cfg: TrialConfig) -> tuple[tuple[str, str], ...]:
    """What members of one pack share: every key but the per-member ones."""
    return tuple(sorted((k, repr(v)) for k, v in flat(cfg).items() if k not in PER_MEMBER_KEYS))


def fusion_problem(cfg: TrialConfig) -> Optional[str]:
    """Why this configuration cannot be trained in a pack, or None."""
    t = cfg.train
    if cfg.model.name in UNFUSABLE_MODELS:
        return f"model {cfg.model.name} cannot be fused: {UNFUSABLE_MODELS[cfg.model.name]}; set resources.fuse: 1"
    if t.amp == "fp16":
        return "train.amp fp16 scales each member's loss with its own GradScaler; use bf16 or fp32 to fuse"
    if t.compile:
        return "train.compile is not applied to a pack; set train.compile: false to fuse"
    return None


def pack_problems(cfgs: list[TrialConfig]) -> list[str]:
    problems = [f"member {i}: {p}" for i, c in enumerate(cfgs) if (p := fusion_problem(c))]
    keys = {pack_key(c) for c in cfgs}
    if len(keys) > 1:
        first = dict(pack_key(cfgs[0]))
        differ = sorted({k for c in cfgs[1:] for k, v in pack_key(c) if first.get(k) != v})
        problems.append(f"members differ in keys a pack cannot carry per member: {', '.join(differ)}")
    return problems


# ---------------------------------------------------------------- the sweep's trials, drawn up front

def draw(dom: Domain, rng: random.Random) -> Any:
    """One value of a random domain (randint inclusive, as the sweep file says)."""
    if dom.kind == "choice":
        return rng.choice(list(dom.values))
    lo, hi = dom.values
    if dom.kind == "uniform":
        return rng.uniform(lo, hi)
    if dom.kind == "loguniform":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return rng.randint(lo, hi)


def all_trials(space: Space, sweep: SweepConfig) -> list[dict[str, Any]]:
    """Every trial's flat config in start order: the grid points (search.samples times; dry-run order) with
    each random domain drawn per trial from search.seed. Unfused, Tune draws the random values itself;
    a pack needs its members' values before it starts."""
    rng = random.Random(sweep.search.seed)
    constants = {k: v for k, v in space.values.items() if not isinstance(v, Domain)}
    randoms = {k: d for k, d in space.domains().items() if d.kind in RANDOM_KINDS}
    points = grid_points(space, sweep) or [{}] * sweep.search.samples
    return [constants | point | {k: draw(d, rng) for k, d in randoms.items()} for point in points]


def group(configs: list[dict[str, Any]], k: int, where: str) -> list[list[dict[str, Any]]]:
    """Trials in packs of at most k: members share a pack_key; packs in the order of their first member.
    A trial that cannot be fused is refused with the reason (ConfigError)."""
    packs: list[list[dict[str, Any]]] = []
    open_pack: dict[tuple[tuple[str, str], ...], int] = {}  # pack key -> index of its pack still filling
    for i, flat_cfg in enumerate(configs, 1):
        cfg = TrialConfig.from_flat(flat_cfg, where=f"{where}: trial {i}")
        problem = fusion_problem(cfg)
        if problem:
            raise ConfigError(f"{where}: resources.fuse: trial {i}: {problem}")
        key = pack_key(cfg)
        at = open_pack.get(key)
        if at is None or len(packs[at]) >= k:
            open_pack[key] = len(packs)
            packs.append([])
        packs[open_pack[key]].append(flat_cfg)
    return packs


def check_fusable_sweep(space: Space, sweep: SweepConfig, where: str) -> None:
    """What a fused sweep cannot do, refused with the alternative."""
    fuse = sweep.resources.fuse
    kind = sweep.scheduler.kind
    if kind == "asha":
        raise ConfigError(f"{where}: resources.fuse: {fuse} with scheduler.kind: asha: ASHA compares trials at each "
                          "rung and would stop a whole pack for one member; fuse with scheduler.kind: fifo "
                          "(train.early_stopping_patience stops each member on its own), or set resources.fuse: 1 "
                          "to run ASHA")
    if kind == "pbt":
        raise ConfigError(f"{where}: resources.fuse: {fuse} with scheduler.kind: pbt: PBT copies one trial's "
                          "checkpoint into another, and a pack's checkpoint is K trials; set resources.fuse: 1 "
                          "to run PBT")
    if sweep.search.kind == "optuna":
        shared = sorted(k for k in space.domains() if k not in PER_MEMBER_KEYS)
        if shared:
            raise ConfigError(f"{where}: resources.fuse: {fuse} with search.kind: optuna: Optuna proposes each "
                              f"trial as the sweep runs, and {', '.join(shared)} would split its proposals into "
                              "packs of one; search only keys a pack carries per member (README, Fused trials), "
                              "use search.kind: random, or set resources.fuse: 1")


def plan_packs(space: Space, sweep: SweepConfig, where: str) -> Optional[list[list[dict[str, Any]]]]:
    """The sweep's packs, each a list of member configs (flat), in start order; None under Optuna, whose
    packs are filled as it proposes (cifar_ray.tune_search.PackedSearch)."""
    check_fusable_sweep(space, sweep, where)
    if sweep.search.kind == "optuna":
        group([first_candidate(space)], 1, where)  # what every pack shares can be fused
        return None
    return group(all_trials(space, sweep), sweep.resources.fuse, where)


def optuna_packs(sweep: SweepConfig) -> int:
    """Tune trials of a fused Optuna sweep: its trials in packs of resources.fuse, the last maybe smaller."""
    return -(-sweep.search.samples // sweep.resources.fuse)
