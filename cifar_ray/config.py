"""Typed configuration: the one place where every default lives.

A trial is described by `TrialConfig` (model, data, train); a sweep file by `SweepConfig` (below),
whose model/data/train sections use the same keys, so a key has one spelling and one default everywhere.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Activation = Literal["relu", "leaky_relu", "elu", "gelu", "sigmoid"]
Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["none", "step", "cosine", "onecycle"]
Stem = Literal["cifar", "imagenet"]
Amp = Literal["auto", "bf16", "fp16", "off"]


class Strict(BaseModel):
    """Unknown keys are errors; finite numbers only (a NaN learning rate is never intended)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class AugmentConfig(Strict):
    """Per-sample random augmentations, applied to whole batches on the training device."""

    hflip: float = Field(0.0, ge=0, le=1, description="probability of a horizontal flip")
    crop_padding: int = Field(0, ge=0, le=16, description="random crop after zero padding, px")
    rotation: float = Field(0.0, ge=0, le=180, description="max rotation, degrees either way")
    perspective: float = Field(0.0, ge=0, le=1,
                               description="max perspective distortion (torchvision's distortion_scale)")
    brightness: float = Field(0.0, ge=0, le=1, description="colour jitter: factor in [1-b, 1+b]")
    contrast: float = Field(0.0, ge=0, le=1)
    saturation: float = Field(0.0, ge=0, le=1)
    hue: float = Field(0.0, ge=0, le=0.5, description="hue shift, fraction of a full turn")
    cutout: int = Field(0, ge=0, le=32, description="side of the square zeroed at a random place, px")

    def enabled(self) -> bool:
        return self != AugmentConfig()

    def needs_float(self) -> bool:
        """Anything beyond flip and crop, which run on uint8 by index."""
        return bool(self.rotation or self.perspective or self.brightness or self.contrast or self.saturation
                    or self.hue or self.cutout)


# Named sets, so a sweep can search `data.augment: {choice: [none, flip_crop, seed]}`.
AUGMENT_PRESETS: dict[str, dict[str, float]] = {
    "none": {},
    "flip_crop": {"hflip": 0.5, "crop_padding": 4},
    # The seed's four: RandomHorizontalFlip, RandomRotation(10), RandomPerspective, ColorJitter.
    "seed": {"hflip": 0.5, "rotation": 10, "perspective": 0.2, "brightness": 0.2, "contrast": 0.2,
             "saturation": 0.2, "hue": 0.05},
    "flip_crop_cutout": {"hflip": 0.5, "crop_padding": 4, "cutout": 8},
}


class DataConfig(Strict):
    source: str = Field("cifar10",
                        description="cifar10, synthetic, or a path to an image-folder tree/archive or pickled batches")
    val_size: int = Field(10_000, ge=1, description="validation images taken from the training set")
    train_size: Optional[int] = Field(None, ge=1, description="cap on training images (stratified, seeded subset)")
    split_seed: int = Field(0, description="seed of the train/val split: the same for every trial")
    synthetic_size: int = Field(12_000, ge=20, description="images made by source=synthetic (5/6 train, 1/6 test)")
    data_dir: Optional[str] = Field(
        None, description="where cifar10 is looked for and downloaded; default <cache_dir>/downloads")
    cache_dir: Optional[str] = Field(None,
                                     description="decoded-pixel cache; default $CIFAR_RAY_CACHE or ~/.cache/cifar_ray")
    augment: AugmentConfig = AugmentConfig()

    @field_validator("augment", mode="before")
    @classmethod
    def _preset(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in AUGMENT_PRESETS:
                raise ValueError(f"unknown augmentation preset {value!r}; allowed: {', '.join(AUGMENT_PRESETS)}")
            return AUGMENT_PRESETS[value]
        return value


class ModelConfig(Strict):
    """Options left as None take the architecture's own value (net1's dropout is 0.2, for example)."""

    name: str = "netconv"
    stem: Stem = "cifar"
    activation: Optional[Activation] = None
    dropout: Optional[float] = Field(None, ge=0, lt=1)
    batch_norm: Optional[bool] = None
    width: Optional[float] = Field(None, gt=0, le=8, description="channel/unit multiplier")

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        from cifar_ray.models import list_models

        known = list_models()
        if value not in known:
            raise ValueError(f"unknown model {value!r}{did_you_mean(value, known)}; allowed: {', '.join(known)}")
        return value

    def options(self) -> dict[str, Any]:
        """The architecture options that were set, as build_model keyword arguments."""
        return {k: v for k, v in self.model_dump(exclude={"name"}).items() if v is not None}


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1, le=65_536)
    optimizer: Optimizer = "sgd"
    lr: float = Field(0.01, gt=0, le=10)
    # lr is for this batch size; with lr_reference_batch set, lr is scaled linearly:
    # lr_used = lr * batch_size / lr_reference_batch (Goyal et al. 2017), so a sweep can vary batch size.
    lr_reference_batch: Optional[int] = Field(None, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0, le=1)
    schedule: Schedule = "none"
    step_size: int = Field(10, ge=1, description="epochs between lr drops for schedule=step")
    gamma: float = Field(0.1, gt=0, le=1, description="lr factor at each step for schedule=step")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    early_stopping_patience: Optional[int] = Field(None, ge=1,
                                                   description="stop after this many epochs without a lower val_loss")
    seed: int = 0
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    amp: Amp = Field("auto", description="auto: bf16 where the GPU has it, fp16 with a grad scaler on older CUDA GPUs, "
                     "bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else off; off on mps")
    channels_last: bool = Field(True, description="channels_last memory format on cuda and cpu")
    compile: bool = False
    # 256: on the CPU, netconv evaluates at 6,600 img/s in batches of 256 and 3,200 in batches of 1,000
    # (bf16, one thread; the larger batch falls out of cache); on a GPU 256 is already past launch cost.
    eval_batch_size: int = Field(256, ge=1)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        ok = value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit())
        if not ok:
            raise ValueError(f"unknown device {value!r}; allowed: auto, cpu, cuda, cuda:N, mps")
        return value

    @model_validator(mode="after")
    def _nesterov(self) -> "TrainConfig":
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer sgd with momentum > 0")
        return self

    def effective_lr(self) -> float:
        if self.lr_reference_batch is None:
            return self.lr
        return self.lr * self.batch_size / self.lr_reference_batch


class TrialConfig(Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()


class ConfigError(ValueError):
    """A configuration problem, already phrased for the user (`where: key.path: problem`)."""


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    prefixed = [c for c in choices if c.startswith(word) or word.startswith(c)]
    close = prefixed[:1] or difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe_errors(err: ValidationError, where: str, root: Optional[type[BaseModel]] = None) -> str:
    """One line per problem: `where: key.path: message`, with unknown keys given a suggestion."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            model = _schema_at(root or TrialConfig, loc[:-1])
            allowed = list(model.model_fields) if model else []
            msg = f"unknown key{did_you_mean(loc[-1], allowed)}"
            if allowed:
                msg += f"; allowed: {', '.join(allowed)}"
        elif e["type"] == "literal_error":
            msg = f"{e['input']!r} is not one of {e['ctx']['expected'].replace(' or ', ', ')}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] in ("finite_number",):
            msg = "must be a finite number (NaN and inf are not allowed)"
        lines.append(f"{where}: {'.'.join(loc)}: {msg}")
    return "\n".join(lines)


def _schema_at(model: type[BaseModel], path: list[str]) -> Optional[type[BaseModel]]:
    for part in path:
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = getattr(ann, "__args__", (ann,))
        nxt = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nxt:
            return None
        model = nxt[0]
    return model


def default(key: str) -> Any:
    """The schema's default for a dotted trial key, e.g. default("train.epochs") -> 10."""
    node: Any = TrialConfig()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def trial_config(data: dict, where: str = "config") -> TrialConfig:
    """Validate a nested dict into a TrialConfig, raising ConfigError with readable lines."""
    try:
        return TrialConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_errors(err, where)) from None


__all__ = [
    "Activation", "AugmentConfig", "AUGMENT_PRESETS", "ConfigError", "DataConfig", "ModelConfig",
    "TrainConfig", "TrialConfig", "default", "describe_errors", "did_you_mean", "trial_config",
    "CheckpointSettings", "FailureSettings", "ResourcesConfig", "SchedulerConfig", "SearchConfig", "SweepConfig",
    "WandbSettings", "MAX_TRIALS", "apply_overrides", "parse_yaml", "read_sweep", "read_sweep_tree",
]


# ================================================================ sweep files

SearchKind = Literal["grid", "random", "optuna"]
SchedulerKind = Literal["fifo", "asha", "pbt"]
SearchOrder = Literal["auto", "given", "shuffled"]
WandbMode = Literal["auto", "online", "offline", "disabled"]
MAX_TRIALS = 10_000  # a grid larger than this is almost surely a typo
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class SearchConfig(Strict):
    kind: SearchKind = "grid"
    samples: int = Field(1, ge=1, le=MAX_TRIALS, description="grid: repeats of the grid; random/optuna: trials drawn")
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


class ResourcesConfig(Strict):
    cpu: float = Field(1.0, ge=0, le=1024)
    gpu: float = Field(0.0, ge=0, le=64, description="fractions pack trials onto one GPU (0.25: four per GPU)")
    accelerator: Optional[str] = Field(None, description="GPU model, Ray's accelerator_type (A100, T4, ...)")
    tags: dict[str, float] = Field(default_factory=dict,
                                   description="custom node resources, e.g. {cuda: 1} or {mps: 1}")

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
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    resources: ResourcesConfig = ResourcesConfig()
    resources_by_model: dict[str, ResourcesConfig] = Field(default_factory=dict)
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    checkpoint: CheckpointSettings = CheckpointSettings()
    failures: FailureSettings = FailureSettings()
    wandb: WandbSettings = WandbSettings()

    @field_validator("metric")
    @classmethod
    def _reported(cls, value: str) -> str:
        from cifar_ray.metrics import EPOCH_METRICS

        if value not in EPOCH_METRICS:
            raise ValueError(f"{value!r} is never reported{did_you_mean(value, EPOCH_METRICS)}; allowed: "
                             f"{', '.join(EPOCH_METRICS)}")
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
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{where}: not valid YAML: {detail}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nesting too deep") from None
    finally:
        loader.dispose()


def read_sweep_tree(path: str) -> dict:
    """The sweep file as a plain mapping, or ConfigError naming the problem."""
    p = Path(path)
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


def apply_overrides(tree: dict, sets: list[str], where: str = "--set") -> dict:
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


def read_sweep(path: str, sets: list[str] = (), data: Optional[str] = None) -> SweepConfig:
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
