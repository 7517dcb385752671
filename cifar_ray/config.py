"""Typed configuration: the one place where every default lives.

A trial is described by `TrialConfig` (model, data, train). Sweep files (`cifar_ray.sweep_config`)
use the same keys in their model/data/train sections, so a key has one spelling and one default everywhere.
"""
from __future__ import annotations

import difflib
import types
from typing import Any, Callable, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

Activation = Literal["relu", "leaky_relu", "elu", "gelu", "sigmoid"]
Optimizer = Literal["sgd", "adam", "adamw", "muon"]  # muon: Muon on conv filters, SGD on the rest
Schedule = Literal["none", "step", "cosine", "onecycle", "triangle"]
Tta = Literal["none", "flip", "flip_translate"]
Stem = Literal["cifar", "imagenet"]
Amp = Literal["auto", "bf16", "fp16", "off"]


class Strict(BaseModel):
    """Unknown keys are errors; finite numbers only (a NaN learning rate is never intended)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads true/false, yes/no and on/off as booleans, and pydantic would take them as 1 and 0:
        # `hflip: true` would mirror every image (a probability of 1), `epochs: yes` train one epoch
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and boolean_for_a_number(value, field.annotation):
            raise ValueError("expects a number, not true/false (YAML reads true, false, yes, no, on and off as "
                             "booleans); write the number")
        return value


def boolean_for_a_number(value: Any, annotation: Any) -> bool:
    """Whether `value` holds a boolean where `annotation` (int or float, optional, or a list or dict of
    them) asks for a number."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return len(kinds) == 1 and boolean_for_a_number(value, kinds[0])
    if origin is list and args and isinstance(value, list):
        return any(boolean_for_a_number(v, args[0]) for v in value)
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return any(boolean_for_a_number(v, args[1]) for v in value.values())
    return annotation in (int, float) and isinstance(value, bool)


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
    # airbench's alternating flip: each image is mirrored at random in the first epoch, then the other
    # way round every epoch after, so every two epochs see both views of every image (no repeat draws)
    alternate_flip: bool = Field(False, description="mirror each image at random in the first epoch, then "
                                 "alternate its view every epoch (in place of hflip)")
    crop_reflect: bool = Field(False, description="crop_padding pads by reflection (the image's own edge) "
                               "instead of zeros")

    @model_validator(mode="after")
    def _one_flip(self) -> "AugmentConfig":
        if self.alternate_flip and self.hflip:
            raise ValueError("alternate_flip and hflip both set; keep one (alternate_flip mirrors every other "
                             "epoch, hflip draws each epoch anew)")
        if self.crop_reflect and not self.crop_padding:
            raise ValueError("crop_reflect needs crop_padding > 0 (it says how the padding is filled)")
        return self

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
    # at most ten CIFAR-10s (1.8 GB of uint8 pixels): 10^9 images would ask for 3 TB
    synthetic_size: int = Field(12_000, ge=20, le=600_000,
                                description="images made by source=synthetic (5/6 train, 1/6 test)")
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


def device_name(value: str) -> str:
    """`value` if it names a device the engine can pick (train.device, Sweep.evaluate), else ValueError."""
    ok = value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit())
    if not ok:
        raise ValueError(f"unknown device {value!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    return value


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
    # optimizer muon: the conv filters' Muon group (the rest takes lr, momentum and nesterov as SGD);
    # Jordan's defaults for Muon, whose orthogonalised step has a fixed size: its lr is not SGD's
    muon_lr: float = Field(0.02, gt=0, le=10, description="optimizer muon: lr of the conv filters' Muon steps")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="optimizer muon: momentum (Nesterov) of Muon's steps")
    weight_decay: float = Field(0.0, ge=0, le=1)
    schedule: Schedule = "none"
    step_size: int = Field(10, ge=1, description="epochs between lr drops for schedule=step")
    gamma: float = Field(0.1, gt=0, le=1, description="lr factor at each step for schedule=step")
    # schedule=triangle, stepped per batch: lr * start_factor rising linearly to lr over the first
    # warmup_fraction of the run's steps, then falling linearly to lr * end_factor at its last step.
    # The defaults are airbench's (Jordan 2024): a short ramp, then a long straight decay.
    warmup_fraction: float = Field(0.23, ge=0, lt=1, description="schedule=triangle: fraction of steps rising to lr")
    start_factor: float = Field(0.2, ge=0, le=1, description="schedule=triangle: lr factor at the first step")
    end_factor: float = Field(0.07, ge=0, le=1, description="schedule=triangle: lr factor at the last step")
    # Biases and normalisation parameters (1-D tensors) as their own parameter group. Their gradients
    # are small next to their scale, so a fast run raises their lr (airbench: 64x) and lowers their
    # decay by the same factor, keeping the decay per step (lr x weight_decay) that of the weights.
    bias_lr_factor: float = Field(1.0, gt=0, le=1000, description="lr multiplier for biases and norm parameters")
    bias_decay_factor: float = Field(1.0, ge=0, le=1000,
                                     description="weight_decay multiplier for biases and norm parameters; 0: none")
    # Lookahead (Zhang et al. 2019) as airbench runs it: every lookahead_every steps the running average
    # of the weights (and BN statistics) moves towards them and is copied back into the model. Its decay
    # per step ramps up as (progress)^3, so the run moves freely early and averages strongly at the end.
    lookahead_decay: float = Field(0.0, ge=0, lt=1, description="per-step decay of the weights' average; 0: off")
    lookahead_every: int = Field(5, ge=1, description="steps between lookahead updates")
    lookahead_start: float = Field(0.3, ge=0, lt=1, description="fraction of the run's steps before lookahead starts")
    # The whitening layer's bias trained for the first epochs only (airbench: 3), then frozen: early on it
    # centres the whitened patches, later its large lr (bias_lr_factor) only adds noise.
    whiten_bias_epochs: Optional[int] = Field(None, ge=0, description="epochs the whitening layer's bias "
                                              "trains, then it is frozen; unset: throughout (whitened_cnn)")
    # torch's convention: the weight of each new batch in the running statistics (airbench's 0.6 is 0.4
    # here); a run of a few hundred steps needs faster statistics than the default 0.1
    bn_momentum: Optional[float] = Field(None, gt=0, le=1, description="BatchNorm running-statistics momentum "
                                         "of every BN layer (torch's convention); unset: the model's own")
    data_init_images: int = Field(5000, ge=0, description="training images a model's data-dependent initialisation "
                                  "(a whitening layer) sees before the first step; 0 skips it")
    # Test-time views cost a forward pass each (flip_translate: 6), so the per-epoch validation stays
    # plain, comparable across epochs and cheap, as airbench does; the evaluation after training uses them.
    tta: Tta = Field("none", description="test-time augmentation of the evaluation after training (test report, "
                     "Sweep.evaluate): flip averages the logits of the image and its mirror; flip_translate adds "
                     "both shifted one pixel up-left and down-right (6 views)")
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
    eval_batch_size: int = Field(256, ge=1, le=65_536)  # as batch_size; 10^7 would ask for 147 GB

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_off(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads a bare `off` as false: `amp: off` and `--set train.amp=off` mean "off"
        return "off" if value is False else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return device_name(value)

    @model_validator(mode="after")
    def _nesterov(self) -> "TrainConfig":
        # Under Adam/AdamW nesterov does nothing (cifar_ray.applies): a trial may hold it, as a grid over the
        # optimizer gives every trial the file's nesterov: true; a sweep where it can never act is refused
        # there (space._check_acting). torch's SGD refuses Nesterov without momentum.
        if self.nesterov and self.optimizer in ("sgd", "muon") and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0 (set momentum, or nesterov: false)")
        return self

    def effective_lr(self) -> float:
        if self.lr_reference_batch is None:
            return self.lr
        return self.lr * self.batch_size / self.lr_reference_batch

    def bias_group(self) -> bool:
        """Whether biases and norm parameters get a parameter group of their own (engine.param_groups):
        not when both factors are 1."""
        return not (self.bias_lr_factor == 1 and self.bias_decay_factor == 1)


class TrialConfig(Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _whitening(self) -> "TrialConfig":
        from cifar_ray.models import list_models, model_spec

        if self.train.whiten_bias_epochs is not None and not model_spec(self.model.name).whitening:
            having = [m for m in list_models() if model_spec(m).whitening]
            raise ValueError(f"train.whiten_bias_epochs: model {self.model.name!r} has no whitening layer; "
                             f"models with one: {', '.join(having)}")
        return self

    @classmethod
    def from_flat(cls, flat: dict[str, Any], where: str = "config") -> "TrialConfig":
        """From flat dotted keys (`train.lr`), the form of sweep files' searched keys, Tune's trial
        configs and the results' config columns: the one crossing from flat to typed."""
        return trial_config(unflatten(flat), where)


def idle_model_setting(values_of: Callable[[str], list[Any]]) -> Optional[str]:
    """A setting for a kind of layer that no model of the sweep has (`values_of(key)`: every value the key
    takes; one value each for a single configuration), as "key: problem; the way out"; None when each may
    act somewhere. A model in a sweep over models that lacks the layer holds it inert, as Adam holds
    nesterov. Checked for sweep files and options, not for a results folder's record of what ran."""
    from cifar_ray.models import has_batch_norm, model_spec

    names = [n for n in values_of("model.name") if isinstance(n, str)]
    shown = ", ".join(repr(n) for n in names)
    which, has = (f"model {shown}", "has") if len(names) == 1 else (f"models {shown}", "have")
    if any(v is not None for v in values_of("train.bn_momentum")):
        def options(name: str, bn: Any) -> dict[str, Any]:
            return {"batch_norm": bn} if bn is not None and "batch_norm" in model_spec(name).options() else {}

        if not any(has_batch_norm(n, options(n, bn)) for n in names for bn in values_of("model.batch_norm")):
            switchable = any("batch_norm" in model_spec(n).options() for n in names)
            way = ("set model.batch_norm: true, or leave train.bn_momentum unset" if switchable
                   else "leave it unset")
            off = " with batch_norm off" if switchable else ""
            return f"train.bn_momentum: {which}{off} {has} no BatchNorm layer, so it changes nothing; {way}"
    if "muon" in values_of("train.optimizer") and not any(model_spec(n).convolutions for n in names):
        # muon steps the convolution filters and SGD the rest: without filters it is SGD alone, a run
        # that the record would call Muon's
        return (f"train.optimizer: muon steps convolution filters, and {which} {has} none (it would train as "
                "plain SGD); use sgd, or a model with convolutions")
    return None


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
            model = schema_at(root or TrialConfig, loc[:-1])
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
        # a check across sections (TrialConfig's own validators) has no location: its message names the keys
        lines.append(f"{where}: {'.'.join(loc)}: {msg}" if loc else f"{where}: {msg}")
    return "\n".join(lines)


def schema_at(model: type[BaseModel], path: list[str]) -> Optional[type[BaseModel]]:
    """The section model at `path` below `model` (["data", "augment"] -> AugmentConfig); None where the
    path names a single value or nothing."""
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


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{"train.lr": 0.1} -> {"train": {"lr": 0.1}}."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def default(key: str) -> Any:
    """The schema's default for a dotted trial key, e.g. default("train.epochs") -> 10."""
    node: Any = TrialConfig()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def trial_config(data: dict[str, Any], where: str = "config") -> TrialConfig:
    """Validate a nested dict into a TrialConfig, raising ConfigError with readable lines."""
    try:
        return TrialConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_errors(err, where)) from None


__all__ = [
    "Activation", "Amp", "AugmentConfig", "AUGMENT_PRESETS", "ConfigError", "DataConfig", "ModelConfig", "Optimizer",
    "Schedule", "Stem", "Strict", "Tta", "TrainConfig", "TrialConfig", "default", "describe_errors", "device_name",
    "did_you_mean", "idle_model_setting", "schema_at", "trial_config", "unflatten",
]
