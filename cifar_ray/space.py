"""Search spaces: the `model`/`data`/`train` sections of a sweep file -> validated domains -> Tune's
param_space. Pure functions; Ray is imported only where the Tune objects are made.

Keys are flat and dotted (`train.lr`), the same spelling as in the sweep file, in Tune's config, in
W&B and in the results' columns.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import ValidationError

from cifar_ray.config import ConfigError, TrialConfig, describe_errors, unflatten
from cifar_ray.models import ModelError, check_options
from cifar_ray.sweep_config import MAX_TRIALS, SweepConfig

DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
RANDOM_KINDS = ("choice", "uniform", "loguniform", "randint")
# One data set per sweep: it is decoded once and shared by every trial through the object store.
UNSEARCHABLE = ("data.source", "data.synthetic_size", "data.cache_dir", "data.data_dir", "train.device")
SECTIONS = ("model", "data", "train")
FULL_CHECK_LIMIT = 4096  # combinations of candidate values checked exhaustively up to this many


@dataclass(frozen=True)
class Domain:
    kind: str  # one of DOMAIN_KINDS
    values: tuple[Any, ...]  # grid/choice: the values; uniform/loguniform/randint: (lo, hi), randint inclusive

    def candidates(self) -> list[Any]:
        """Values that stand for the domain when checking it: every listed value, or both ends."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        return [self.values[0], self.values[1]]

    def describe(self) -> str:
        if self.kind in ("grid", "choice"):
            return f"{self.kind}[{', '.join(map(format_value, self.values))}]"
        return f"{self.kind}({format_value(self.values[0])}, {format_value(self.values[1])})"


@dataclass(frozen=True)
class Space:
    """Constants and domains by flat key, plus the seeds that repeat every configuration."""

    values: dict[str, Any]  # key -> constant or Domain
    seeds: Optional[tuple[int, ...]]

    def domains(self) -> dict[str, Domain]:
        return {k: v for k, v in self.values.items() if isinstance(v, Domain)}

    def searched_keys(self) -> list[str]:
        keys = list(self.domains())
        return keys + (["train.seed"] if self.seeds and "train.seed" not in keys else [])

    def has_random(self) -> bool:
        return any(d.kind in RANDOM_KINDS for d in self.domains().values())

    def grid_size(self) -> int:
        n = math.prod(len(d.values) for d in self.domains().values() if d.kind == "grid")
        return n * (len(self.seeds) if self.seeds else 1)

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a sweep and its --resume."""
        return {k: (v.describe() if isinstance(v, Domain) else v) for k, v in sorted(self.values.items())} | {
            "seeds": list(self.seeds) if self.seeds else None}


def format_value(v: Any) -> str:
    """A value as the dry run, errors and the summary show it: floats in %g, None as the file writes it."""
    if v is None:
        return "null"
    return f"{v:g}" if isinstance(v, float) else str(v)


def first_candidate(space: "Space") -> dict[str, Any]:
    """Each key's first value (a domain's first candidate): the trial the dry run checks first and the
    one whose data the driver loads."""
    return {k: (v.candidates()[0] if isinstance(v, Domain) else v) for k, v in space.values.items()}


def max_epochs(space: "Space") -> int:
    """The most epochs any trial of the space trains."""
    from cifar_ray.config import default

    epochs = space.values.get("train.epochs", default("train.epochs"))
    return int(max(epochs.values)) if isinstance(epochs, Domain) else int(epochs)


def is_domain(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DOMAIN_KINDS


def flatten(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    """{'lr': 1, 'augment': {'hflip': 0.5}} -> {'train.lr': 1, 'train.augment.hflip': 0.5}; domains stay leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}"
        if isinstance(value, dict) and not is_domain(value) and value:
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_domain(key: str, spec: dict[str, Any], where: str) -> Domain:
    kind, raw = next(iter(spec.items()))
    at = f"{where}: {key}.{kind}"
    if kind in ("grid", "choice"):
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{at}: must be a non-empty list of values")
        if len(raw) > MAX_TRIALS:
            raise ConfigError(f"{at}: {len(raw)} values; at most {MAX_TRIALS}")
        for v in raw:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{at}: {v} is not a finite number")
            if isinstance(v, (dict, list)) and not (key.endswith("augment") and isinstance(v, dict)):
                raise ConfigError(f"{at}: values must be scalars, got {v!r}")
        return Domain(kind, tuple(raw))
    if not isinstance(raw, list) or len(raw) != 2 or not all(_is_number(v) for v in raw):
        raise ConfigError(f"{at}: must be [lo, hi], two numbers")
    lo, hi = raw
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(f"{at}: bounds must be finite numbers (NaN and inf are not allowed)")
    if lo > hi or (kind == "randint" and lo == hi):
        raise ConfigError(f"{at}: lo ({format_value(lo)}) must be below hi ({format_value(hi)})")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{at}: loguniform needs lo > 0")
    if kind == "randint" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise ConfigError(f"{at}: randint bounds must be integers")
    return Domain(kind, (int(lo), int(hi)) if kind == "randint" else (float(lo), float(hi)))


def build_space(sweep: SweepConfig, where: str) -> Space:
    """Parse and check the search space: every candidate value must make a valid TrialConfig."""
    values: dict[str, Any] = {}
    for section in SECTIONS:
        for key, value in flatten(getattr(sweep, section), section).items():
            values[key] = parse_domain(key, value, where) if is_domain(value) else value
            if isinstance(values[key], Domain) and key in UNSEARCHABLE:
                raise ConfigError(f"{where}: {key}: cannot be searched (one data set and device per sweep); give "
                                  "one value")
    seeds = tuple(sweep.seeds) if sweep.seeds else None
    if seeds and "train.seed" in values:
        raise ConfigError(f"{where}: seeds: and train.seed: both set; keep one")
    space = Space(values, seeds)
    _check_candidates(space, where)
    _check_search(space, sweep, where)
    return space


def trial_from(flat: dict[str, Any], where: str) -> TrialConfig:
    """One trial's flat sweep-file keys as a checked TrialConfig (schema and model options); a
    ConfigError naming `where` and the key otherwise."""
    try:
        cfg = TrialConfig.model_validate(unflatten(flat))
    except ValidationError as err:
        raise ConfigError(describe_errors(err, where)) from None
    try:
        check_options(cfg.model.name, cfg.model.options())
    except ModelError as err:
        raise ConfigError(f"{where}: model: {err}") from None
    return cfg


def _check_candidates(space: Space, where: str) -> None:
    domains = space.domains()
    first = first_candidate(space)
    trial_from(first, where)
    combos = math.prod(len(d.candidates()) for d in domains.values())
    if combos <= FULL_CHECK_LIMIT:  # every combination, so model x option clashes are found
        keys = list(domains)
        for picks in itertools.product(*(domains[k].candidates() for k in keys)):
            _check_one(first | dict(zip(keys, picks, strict=True)), dict(zip(keys, picks, strict=True)), domains, where)
    else:  # one domain at a time
        for key, dom in domains.items():
            for v in dom.candidates():
                _check_one(first | {key: v}, {key: v}, domains, where)


def _check_one(flat: dict[str, Any], picked: dict[str, Any], domains: dict[str, Domain], where: str) -> None:
    try:
        trial_from(flat, where)
    except ConfigError as err:
        shown = ", ".join(f"{k}={format_value(v)} from {domains[k].kind}" for k, v in picked.items())
        raise ConfigError(f"{err} (with {shown})" if shown else str(err)) from None


def _check_search(space: Space, sweep: SweepConfig, where: str) -> None:
    kinds = {d.kind for d in space.domains().values()}
    if sweep.search.kind == "optuna" and ("grid" in kinds or space.seeds):
        raise ConfigError(f"{where}: search.kind: optuna samples its own points and cannot run a grid or seeds:; "
                          "use choice instead of grid, or search.kind: grid")
    if sweep.search.kind == "optuna" and sweep.search.order == "shuffled":
        raise ConfigError(f"{where}: search.order: optuna chooses its own order; remove search.order")
    if sweep.search.kind != "grid" and not space.domains() and not space.seeds:
        raise ConfigError(f"{where}: search.kind: {sweep.search.kind} has nothing to search; add a domain such as "
                          "train.lr: {loguniform: [0.0001, 0.1]}")
    n = trial_count(space, sweep)
    if n > MAX_TRIALS:
        raise ConfigError(f"{where}: the space makes {n} trials; at most {MAX_TRIALS} (shrink the grid or samples)")


def trial_count(space: Space, sweep: SweepConfig) -> int:
    return space.grid_size() * sweep.search.samples


def shuffles(sweep: SweepConfig) -> bool:
    """ASHA stops a trial when it is worse than those that reached the same rung before it. In the
    file's order the first trials share the outer keys' values, so early rungs compare like with like
    and let most trials through; a seeded shuffle gives every rung a spread from the start."""
    order = sweep.search.order
    return order == "shuffled" or (order == "auto" and sweep.scheduler.kind == "asha")


def grid_points(space: Space, sweep: SweepConfig) -> list[dict[str, Any]]:
    """The grid keys (and train.seed) of every trial in the order trials start: the grid in the file's
    order (first key outermost, seeds innermost), `search.samples` times, shuffled when shuffles().
    Empty when nothing is a grid."""
    grid = {k: d.values for k, d in space.domains().items() if d.kind == "grid"}
    if space.seeds:
        grid["train.seed"] = space.seeds
    if not grid:
        return []
    one = [dict(zip(grid, picks, strict=True)) for picks in itertools.product(*grid.values())]
    points = one * sweep.search.samples
    if shuffles(sweep):
        random.Random(sweep.search.seed or 0).shuffle(points)
    return points


def expand_grid(space: Space, sweep: SweepConfig) -> Optional[list[dict[str, Any]]]:
    """Every trial's flat config, in start order, when the space has no random domain; None otherwise."""
    if space.has_random():
        return None
    constants = {k: v for k, v in space.values.items() if not isinstance(v, Domain)}
    return [constants | point for point in grid_points(space, sweep)] or [constants] * sweep.search.samples


def stored_domains(doc: dict[str, Any]) -> dict[str, Domain]:
    """The searched keys' domains of a stored sweep copy (results/NAME/sweep.yaml), seeds included as a
    grid, read without building trials: what an analysis of a finished folder needs to know of them.
    Entries that do not parse are left out."""
    out: dict[str, Domain] = {}
    for section in SECTIONS:
        tree = doc.get(section) if isinstance(doc, dict) else None
        for key, value in flatten(tree, section).items() if isinstance(tree, dict) else ():
            if is_domain(value):
                try:
                    out[key] = parse_domain(key, value, "sweep.yaml")
                except ConfigError:
                    continue
    seeds = doc.get("seeds") if isinstance(doc, dict) else None
    if isinstance(seeds, list) and seeds and "train.seed" not in out:
        out["train.seed"] = Domain("grid", tuple(seeds))
    return out


def searched_domains(space: Space) -> dict[str, Domain]:
    """Every searched key's domain, the seeds as a grid of their own."""
    out = dict(space.domains())
    if space.seeds and "train.seed" not in out:
        out["train.seed"] = Domain("grid", space.seeds)
    return out


def choice_value(value: Any) -> Any:
    """A listed value as Optuna can hold it in a categorical distribution (scalars only): dicts, such
    as an augment policy, become their JSON text."""
    import json

    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value, sort_keys=True)


def is_numeric(dom: Domain) -> bool:
    return dom.kind in ("uniform", "loguniform", "randint") or all(_is_number(v) for v in dom.values)


def is_log(dom: Domain) -> bool:
    """A domain read on a log scale: loguniform, or listed positive numbers spanning a factor of 10 or
    more (an lr grid such as [0.001, 0.01, 0.1])."""
    if dom.kind == "loguniform":
        return True
    if dom.kind not in ("grid", "choice") or not all(_is_number(v) for v in dom.values):
        return False
    lo, hi = min(dom.values), max(dom.values)
    return bool(lo > 0 and hi >= 10 * lo)


def optuna_distribution(dom: Domain) -> Any:  # an optuna BaseDistribution
    """The Optuna distribution of a domain: uniform/loguniform -> float (log for loguniform), randint
    -> int (inclusive both ends, like the sweep file); a grid/choice of numbers -> int or float over
    their range (log when they are positive and span a factor of 10 or more, as lr grids do), so
    slice, contour and importance plots order them; any other grid/choice -> categorical."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if dom.kind in ("grid", "choice"):
        values = list(dom.values)
        if all(_is_number(v) for v in values):
            lo, hi = min(values), max(values)
            if all(isinstance(v, int) for v in values):
                return IntDistribution(int(lo), int(hi))
            return FloatDistribution(float(lo), float(hi), log=is_log(dom))
        return CategoricalDistribution(list(dict.fromkeys(choice_value(v) for v in values)))
    if dom.kind == "randint":
        return IntDistribution(int(dom.values[0]), int(dom.values[1]))
    return FloatDistribution(float(dom.values[0]), float(dom.values[1]), log=dom.kind == "loguniform")
