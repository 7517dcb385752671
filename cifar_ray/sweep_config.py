"""The sweep-file schema and reading sweep files: safe YAML, --set overrides, errors that name the key.

    from cifar_ray.sweep_config import read_sweep
    sweep = read_sweep("sweeps/quickstart.yaml", ["train.lr=0.01"])
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml
from pydantic import Field, ValidationError, field_validator

from cifar_ray.config import ConfigError, Strict, describe_errors, did_you_mean

SearchKind = Literal["grid", "random", "optuna"]
SchedulerKind = Literal["fifo", "asha", "pbt"]
SearchOrder = Literal["auto", "given", "shuffled"]
WandbMode = Literal["auto", "online", "offline", "disabled"]
MAX_TRIALS = 10_000  # a grid larger than this is almost surely a typo
MAX_FUSE = 64  # members of one pack at most (resources.fuse)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class SearchConfig(Strict):
    kind: SearchKind = "grid"
    samples: int = Field(1, ge=1, le=MAX_TRIALS, description="grid: rounds of the grid, each with new draws of its "
                         "random keys; random/optuna: trials drawn")
    seed: Optional[int] = Field(None, description="seed of the random or optuna sampler, and of a shuffled grid order")
    order: SearchOrder = Field("auto", description="grid: the order trials start in: given (the file's, first key "
                               "outermost), shuffled (seeded by search.seed), auto (shuffled under asha, else given)")


class SchedulerConfig(Strict):
    kind: SchedulerKind = "fifo"
    grace_period: int = Field(1, ge=1, description="asha: epochs every trial gets before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, le=100)
    max_t: Optional[int] = Field(None, ge=1, description="asha: epochs at most; default train.epochs")
    brackets: int = Field(1, ge=1, le=10)
    perturbation_interval: int = Field(2, ge=1, description="pbt: epochs between exploit/explore steps")
    mutations: dict[str, Any] = Field(default_factory=dict, description="pbt: key -> list or domain to resample from")
    synch: bool = Field(False, description="pbt: wait until every trial reaches the perturbation point, then "
                                           "exploit (deterministic, slower on mixed hardware); default: asynchronous")


class ResourcesConfig(Strict):
    cpu: float = Field(1.0, ge=0, le=1024)
    gpu: float = Field(0.0, ge=0, le=64, description="fractions pack trials onto one GPU (0.25: four per GPU)")
    accelerator: Optional[str] = Field(None, description="GPU model, Ray's accelerator_type (A100, T4, ...)")
    tags: dict[str, float] = Field(default_factory=dict,
                                   description="custom node resources, e.g. {cuda: 1} or {mps: 1}")
    fuse: int = Field(1, ge=1, le=MAX_FUSE, description="train up to this many trials of one architecture as one "
                                                       "wide network on one device (cifar_ray.fuse); 1: no fusion. "
                                                       "A pack takes the resources above once, not once per member")

    @field_validator("tags")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for k, v in value.items():
            if not (v > 0):
                raise ValueError(f"tag {k!r}: amount must be > 0")
        return value


class CheckpointSettings(Strict):
    keep: int = Field(2, ge=1, description="checkpoints kept per trial, best by the sweep's metric (plus the latest)")
    every: int = Field(1, ge=1, description="epochs between checkpoints")


class FailureSettings(Strict):
    max_retries: int = Field(2, ge=0, le=100, description="restarts of a failed trial from its last checkpoint")


class WandbSettings(Strict):
    project: str = "cifar-ray"
    entity: Optional[str] = None
    group: Optional[str] = Field(None, description="default: the sweep's name")
    tags: list[str] = Field(default_factory=list)
    mode: WandbMode = Field("auto", description="auto: online when a W&B key exists, else offline")


class SweepConfig(Strict):
    name: str = Field(..., pattern=NAME_PATTERN)
    metric: str = "val_acc"
    mode: Literal["max", "min"] = "max"
    model: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    seeds: Optional[list[int]] = Field(None, min_length=1,
                                       description="repeat every configuration with these train.seed values")
    configurations: Optional[list[Any]] = Field(None, min_length=1, max_length=MAX_TRIALS,
                                                description="whole configurations to run, each the keys it changes "
                                                "in the sections (train.lr: 0.1); checked by cifar_ray.space")
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    resources: ResourcesConfig = ResourcesConfig()
    resources_by_model: dict[str, ResourcesConfig] = Field(default_factory=dict)
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    checkpoint: CheckpointSettings = CheckpointSettings()
    failures: FailureSettings = FailureSettings()
    wandb: WandbSettings = WandbSettings()

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        seen: set[int] = set()
        for seed in value or []:
            if seed in seen:
                raise ValueError(f"{seed} is given twice, which would run the same trials twice; list each seed once")
            seen.add(seed)
        return value

    @field_validator("metric")
    @classmethod
    def _reported(cls, value: str) -> str:
        from cifar_ray.metrics import EPOCH_METRICS

        if value not in EPOCH_METRICS:
            raise ValueError(f"{value!r} is never reported{did_you_mean(value, EPOCH_METRICS)}; allowed: "
                             f"{', '.join(EPOCH_METRICS)}")
        return value

    @field_validator("resources_by_model")
    @classmethod
    def _one_fuse(cls, value: dict[str, ResourcesConfig]) -> dict[str, ResourcesConfig]:
        for model, res in value.items():
            if res.fuse != 1:
                raise ValueError(f"{model}.fuse: packs are set for the whole sweep; use resources.fuse")
        return value

    def resources_for(self, model_name: str) -> ResourcesConfig:
        return self.resources_by_model.get(model_name, self.resources)


# ---------------------------------------------------------------- reading sweep files

MAX_SWEEP_BYTES = 1 << 20  # sweep files are a few KB; refuse megabytes before parsing them
MAX_EXPANDED_NODES = 100_000  # YAML nodes after aliases are expanded: refuses "billion laughs" bombs


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes the document has once every alias is expanded (linear time: aliases share nodes)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once rather than looping
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, 10 * MAX_EXPANDED_NODES)
    return memo[id(node)]


def _repeated_key(node: yaml.Node, path: str, seen: set[int]) -> Optional[str]:
    """The first key given twice in one mapping, as "train.lr: given twice (lines 5 and 9)": YAML keeps
    the later value without a word, so a file's earlier line would be silently ignored."""
    if id(node) in seen:  # an alias: its node was looked at where it was defined
        return None
    seen.add(id(node))
    children: list[tuple[str, yaml.Node]] = []
    if isinstance(node, yaml.MappingNode):
        lines: dict[Any, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name != "<<":  # a merge key brings values an explicit key may override
                at = f"{path}.{name}" if path else str(name)
                if name in lines:
                    return f"{at}: given twice (lines {lines[name]} and {key.start_mark.line + 1}); keep one"
                lines[name] = key.start_mark.line + 1
                children.append((at, value))
    elif isinstance(node, yaml.SequenceNode):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(node.value)]
    for at, child in children:
        found = _repeated_key(child, at, seen)
        if found:
            return found
    return None


def parse_yaml(text: str, where: str) -> Any:
    """yaml's SafeLoader (no tags that build Python objects), refusing alias bombs."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_EXPANDED_NODES:
            raise ConfigError(f"{where}: more than {MAX_EXPANDED_NODES} values once YAML aliases are expanded; "
                              "refusing a possible alias bomb")
        repeated = _repeated_key(node, "", set())
        if repeated:
            raise ConfigError(f"{where}: {repeated}")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{where}: not valid YAML: {detail}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nesting too deep") from None
    finally:
        loader.dispose()


def read_sweep_tree(path: str) -> dict[str, Any]:
    """The sweep file as a plain mapping, or ConfigError naming the problem."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{path}: a folder, not a sweep file (a sweep's results folder is resumed with its file: "
                          "python -m cifar_ray.sweep FILE --resume)")
    if not p.is_file():
        raise ConfigError(f"{path}: no such file")
    size = p.stat().st_size
    if size > MAX_SWEEP_BYTES:
        raise ConfigError(f"{path}: {size / 2**20:.1f} MiB; a sweep file is at most {MAX_SWEEP_BYTES // 1024} KiB")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    tree = parse_yaml(text, path)
    if tree is None:
        raise ConfigError(f"{path}: empty; a sweep needs at least name: and model:")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: must be a mapping of keys (name:, model:, train:, ...), not a "
                          f"{type(tree).__name__}")
    return tree


def apply_overrides(tree: dict[str, Any], sets: list[str], where: str = "--set") -> dict[str, Any]:
    """`KEY.PATH=VALUE` overrides, VALUE read as YAML (so `{grid: [0.1, 0.01]}` works)."""
    tree = copy.deepcopy(tree)
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where} {item!r}: expected KEY=VALUE, e.g. train.lr=0.01")
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{where} {item!r}: {part} is not a mapping")
            node = nxt
        node[leaf] = parse_yaml(raw, f"{where} {key}")
    return tree


def read_sweep(path: str, sets: Sequence[str] = (), data: Optional[str] = None) -> SweepConfig:
    """Read, override and validate a sweep file's schema (the search space is checked by space.py)."""
    tree = apply_overrides(read_sweep_tree(path), list(sets))
    if data is not None:
        section = tree.setdefault("data", {})
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: data: must be a mapping")
        section["source"] = data
    try:
        return SweepConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(describe_errors(err, path, root=SweepConfig)) from None
