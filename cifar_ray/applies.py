"""Keys that act only under some value of another key: Adam has no momentum, only the step schedule
has step_size, and OneCycleLR sets the momentum of every step itself. A trial trains the same whatever
value such a key holds where it does not act, so a grid runs it once (cifar_ray.space.grid_points), Optuna
asks for it only where it acts (tune_search.ActingSpace), and importance and refine read it only there."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Optional


@dataclass(frozen=True)
class ActsWhen:
    """The key acts when `parent` takes one of `values` (unless=True: when it takes none of them)."""

    parent: str
    values: tuple[Any, ...]
    unless: bool = False
    why: str = ""  # said with the condition where it is not plain

    def holds(self, value: Any) -> bool:
        return (value in self.values) != self.unless

    def text(self) -> str:
        shown = str(self.values[0]) if self.unless else " or ".join(map(str, self.values))  # unless: one value
        return f"{self.parent} is {'not ' if self.unless else ''}{shown}" + (f" ({self.why})" if self.why else "")


_SGD_PART = ActsWhen("train.optimizer", ("sgd", "muon"))  # muon: SGD on everything but the conv filters
_MUON = ActsWhen("train.optimizer", ("muon",))
# torch's OneCycleLR cycles the momentum of every parameter group between 0.85 and 0.95 (cycle_momentum),
# replacing the optimizer's, from its first step: with momentum 0.5 or 0 alike (checked, torch 2.14.1)
_OWN_MOMENTUM = ActsWhen("train.schedule", ("onecycle",), unless=True,
                         why="OneCycleLR sets the momentum itself, cycling it between 0.85 and 0.95")
_STEP = ActsWhen("train.schedule", ("step",))
_TRIANGLE = ActsWhen("train.schedule", ("triangle",))
_LOOKAHEAD = ActsWhen("train.lookahead_decay", (0, 0.0), unless=True, why="0 is lookahead off")

# key -> every condition under which it acts (all must hold); a key not here always acts
CONDITIONS: dict[str, tuple[ActsWhen, ...]] = {
    "train.momentum": (_SGD_PART, _OWN_MOMENTUM),
    "train.nesterov": (_SGD_PART,),
    "train.muon_lr": (_MUON,),
    "train.muon_momentum": (_MUON, _OWN_MOMENTUM),
    "train.step_size": (_STEP,),
    "train.gamma": (_STEP,),
    "train.warmup_fraction": (_TRIANGLE,),
    "train.start_factor": (_TRIANGLE,),
    "train.end_factor": (_TRIANGLE,),
    "train.lookahead_every": (_LOOKAHEAD,),
    "train.lookahead_start": (_LOOKAHEAD,),
}


# Switches a file turns on (nesterov: true). One on where it can never act is a slip, not a setting: it is
# refused (idle_switch), where a key with a default of its own (momentum under Adam) may simply be left
SWITCHES = ("train.nesterov",)


def _value(config: Mapping[str, Any], key: str) -> Any:
    from cifar_ray.config import default

    return config[key] if key in config else default(key)


def acts(key: str, config: Mapping[str, Any]) -> bool:
    """Whether `key` changes what a trial of this flat config (sweep-file keys; the schema's defaults
    for keys it lacks) trains."""
    return all(c.holds(_value(config, c.parent)) for c in CONDITIONS.get(key, ()))


def why_inert(key: str, config: Mapping[str, Any]) -> str:
    """The conditions `key` needs that this config does not meet, as text ("" when it acts)."""
    return "; ".join(f"acts only when {c.text()}" for c in CONDITIONS.get(key, ())
                     if not c.holds(_value(config, c.parent)))


def row_config(row: Mapping[Any, Any]) -> dict[str, Any]:
    """The config keys (dotted: `train.lr`) of a results row (a trials() row), as acts() reads them."""
    return {k: v for k, v in row.items() if isinstance(k, str) and "." in k}


def never_acting(key: str, values_of: Callable[[str], list[Any]]) -> Optional[ActsWhen]:
    """A condition of `key` that no value its parent takes in the sweep meets (`values_of(parent)`):
    searching such a key searches nothing. None when the key may act."""
    for c in CONDITIONS.get(key, ()):
        if not any(c.holds(v) for v in values_of(c.parent)):
            return c
    return None


def switches(key: str, keys: Collection[str], values_of: Callable[[str], list[Any]]) -> list[ActsWhen]:
    """The conditions of `key` on another of `keys` that takes, in the sweep (`values_of`), a value where
    `key` does not act: momentum's on optimizer {choice: [sgd, adam]}, none on {choice: [sgd, muon]}."""
    return [c for c in CONDITIONS.get(key, ())
            if c.parent in keys and not all(c.holds(v) for v in values_of(c.parent))]


def depends_within(keys: Collection[str], values_of: Callable[[str], list[Any]]) -> bool:
    """Whether some of `keys` is switched off by another in some trials: a searcher then asks for it only
    where it acts (tune_search.ActingSpace)."""
    return any(switches(k, keys, values_of) for k in keys)


def idle_switch(values_of: Callable[[str], list[Any]]) -> Optional[tuple[str, ActsWhen]]:
    """A switch on in every trial (`values_of(key)` is [True]) with a condition that no value its parent
    takes (`values_of(parent)`) meets: (key, that condition); None when every switch on may act."""
    for key in SWITCHES:
        if values_of(key) == [True]:
            cond = never_acting(key, values_of)
            if cond is not None:
                return key, cond
    return None


def idle_switch_text(key: str, cond: ActsWhen, scope: str = "no trial of this sweep has that") -> str:
    return (f"{key}: true does nothing here: it acts only when {cond.text()}, and {scope}; set {key}: false, "
            f"or change {cond.parent}")
