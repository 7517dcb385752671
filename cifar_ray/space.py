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

from cifar_ray.config import (
    ConfigError,
    TrialConfig,
    describe_errors,
    did_you_mean,
    idle_model_setting,
    schema_at,
    unflatten,
)
from cifar_ray.models import ModelError, check_options
from cifar_ray.sweep_config import MAX_TRIALS, SweepConfig

DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
RANDOM_KINDS = ("choice", "uniform", "loguniform", "randint")
# One data set per sweep: it is decoded once and shared by every trial through the object store.
UNSEARCHABLE = ("data.source", "data.synthetic_size", "data.cache_dir", "data.data_dir", "train.device")
SECTIONS = ("model", "data", "train")
FULL_CHECK_LIMIT = 4096  # combinations of candidate values checked exhaustively up to this many
ENUMERATE_LIMIT = 20 * MAX_TRIALS  # grid points listed to leave out repeats; a larger grid is refused unlisted


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
    """Constants and domains by flat key, the listed configurations, and the seeds that repeat every
    configuration."""

    values: dict[str, Any]  # key -> constant or Domain; a listed key holds the first configuration's value
    seeds: Optional[tuple[int, ...]]
    # `configurations:`: each one's value of every key any of them lists (the sections' value where it
    # lists none), the same keys in the same order in each; empty when the file lists none
    listed: tuple[dict[str, Any], ...] = ()

    def domains(self) -> dict[str, Domain]:
        return {k: v for k, v in self.values.items() if isinstance(v, Domain)}

    def listed_keys(self) -> list[str]:
        return list(self.listed[0]) if self.listed else []

    def searched_keys(self) -> list[str]:
        keys = self.listed_keys() + list(self.domains())
        return keys + (["train.seed"] if self.seeds and "train.seed" not in keys else [])

    def values_of(self, key: str) -> list[Any]:
        """Every value `key` takes in the sweep: a domain's candidates, the configurations' values, or the
        one constant (the schema's default where the file gives none)."""
        from cifar_ray.config import default

        value = self.values.get(key, default(key))
        if isinstance(value, Domain):
            return value.candidates()
        return distinct([c[key] for c in self.listed]) if key in self.listed_keys() else [value]

    def has_random(self) -> bool:
        return any(d.kind in RANDOM_KINDS for d in self.domains().values())

    def grid_size(self) -> int:
        """Trials one round of the grid makes (a point of `search.samples`): the grid, seeds and
        configurations multiplied out, less the points that repeat another in every key that acts."""
        if self.product_size() > ENUMERATE_LIMIT:  # refused as too large anyway (MAX_TRIALS)
            return self.product_size()
        return max(len(one_round(self)), 1)

    def product_size(self) -> int:
        n = math.prod(len(d.values) for d in self.domains().values() if d.kind == "grid")
        return n * (len(self.seeds) if self.seeds else 1) * (len(self.listed) or 1)

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a sweep and its --resume."""
        out = {k: (v.describe() if isinstance(v, Domain) else v) for k, v in sorted(self.values.items())} | {
            "seeds": list(self.seeds) if self.seeds else None}
        return out | ({"configurations": [dict(c) for c in self.listed]} if self.listed else {})


def format_value(v: Any) -> str:
    """A value as the dry run, errors and the summary show it: floats in %g, None as the file writes it."""
    if v is None:
        return "null"
    return f"{v:g}" if isinstance(v, float) else str(v)


def distinct(values: list[Any]) -> list[Any]:
    """Values without repeats, in their first order; mappings (augment policies) compared by content."""
    import json

    seen: dict[str, Any] = {}
    for v in values:
        seen.setdefault(json.dumps(v, sort_keys=True, default=str), v)
    return list(seen.values())


def same(a: Any, b: Any) -> bool:
    """Whether two values are one, compared as distinct() compares them."""
    return len(distinct([a, b])) == 1


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


def _repeated(values: list[Any]) -> Optional[Any]:
    """The first value listed again (2 and 2.0 are one number; mappings compared by content, as distinct()
    compares them), or None. Linear: a grid may hold 10,000 values."""
    import json

    seen: set[str] = set()
    for v in values:
        key = repr(float(v)) if _is_number(v) else json.dumps(v, sort_keys=True, default=str)
        if key in seen:
            return v
        seen.add(key)
    return None


def parse_domain(key: str, spec: dict[str, Any], where: str, stored: bool = False) -> Domain:
    """A domain of a sweep file, checked; `stored`: one read back from a results folder, where a grid's
    repeated value or a span of one value (refused since 2026-12-05) still tells which key was searched."""
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
        # (a choice may weight a value by listing it twice)
        twice = _repeated(raw) if kind == "grid" and not stored else None
        if twice is not None:
            raise ConfigError(f"{at}: {format_value(twice)} is listed twice, which would run the same trials twice; "
                              "list each value once (seeds: repeats every configuration with other seeds)")
        return Domain(kind, tuple(raw))
    if not isinstance(raw, list) or len(raw) != 2 or not all(_is_number(v) for v in raw):
        raise ConfigError(f"{at}: must be [lo, hi], two numbers")
    lo, hi = raw
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(f"{at}: bounds must be finite numbers (NaN and inf are not allowed)")
    if lo == hi and not stored:
        raise ConfigError(f"{at}: lo and hi are both {format_value(lo)}, which searches nothing; give the one value "
                          f"({key.split('.', 1)[-1]}: {format_value(lo)})")
    if lo > hi:
        raise ConfigError(f"{at}: lo ({format_value(lo)}) must be below hi ({format_value(hi)})")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{at}: loguniform needs lo > 0")
    if kind == "randint" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise ConfigError(f"{at}: randint bounds must be integers")
    return Domain(kind, (int(lo), int(hi)) if kind == "randint" else (float(lo), float(hi)))


def check_domain_kinds(tree: dict[str, Any], prefix: str, where: str) -> None:
    """A mapping given to a key that takes one value is a search domain misspelt (`lr: {gird: [...]}`),
    or two in one: name the kinds, rather than let the schema say the mapping is not a number."""
    for key, value in tree.items():
        path = f"{prefix}.{key}"
        if not isinstance(value, dict) or is_domain(value):
            continue
        parts = path.split(".")
        parent = schema_at(TrialConfig, parts[:-1])
        if parent is None or key not in parent.model_fields:
            continue  # an unknown key: the schema names it and the keys allowed
        if schema_at(TrialConfig, parts) is not None:  # a section of its own (data.augment)
            check_domain_kinds(value, path, where)
            continue
        kinds = [str(k) for k in value]
        problem = (f"{kinds[0]!r} is not a kind of search domain{did_you_mean(kinds[0], DOMAIN_KINDS)}"
                   if len(kinds) == 1 else "an empty mapping is neither a value nor a search domain" if not kinds
                   else f"a search domain has one kind, here {len(kinds)} ({', '.join(kinds)})")
        raise ConfigError(f"{where}: {path}: {problem}; search it with one of {', '.join(DOMAIN_KINDS)} "
                          f"({key}: {{grid: [a, b]}}), or give one value")


def build_space(sweep: SweepConfig, where: str) -> Space:
    """Parse and check the search space: every candidate value must make a valid TrialConfig."""
    values: dict[str, Any] = {}
    for section in SECTIONS:
        check_domain_kinds(getattr(sweep, section), section, where)
        for key, value in flatten(getattr(sweep, section), section).items():
            values[key] = parse_domain(key, value, where) if is_domain(value) else value
            if isinstance(values[key], Domain) and key in UNSEARCHABLE:
                raise ConfigError(f"{where}: {key}: cannot be searched (one data set and device per sweep); give "
                                  "one value")
    seeds = tuple(sweep.seeds) if sweep.seeds else None
    if seeds and "train.seed" in values:
        raise ConfigError(f"{where}: seeds: and train.seed: both set; keep one")
    listed: tuple[dict[str, Any], ...] = ()
    if sweep.configurations is not None:
        values, listed = with_configurations(values, sweep.configurations, where)
        if seeds and "train.seed" in listed[0]:
            raise ConfigError(f"{where}: seeds: and train.seed in configurations: both set; keep one")
    space = Space(values, seeds, listed)
    _check_candidates(space, where)
    _check_acting(space, where)
    _check_search(space, sweep, where)
    return space


def _check_acting(space: Space, where: str) -> None:
    """A searched key that acts in no trial of the sweep (momentum with Adam alone) searches nothing, and a
    switch on where it can never act (nesterov: true with Adam alone) is a slip."""
    from cifar_ray.applies import idle_switch, idle_switch_text, never_acting

    for key in space.searched_keys():
        cond = never_acting(key, space.values_of)
        if cond is not None:
            raise ConfigError(f"{where}: {key}: searched, but it acts only when {cond.text()}, and no trial "
                              f"of this sweep has that; give it one value, or search {cond.parent} too")
    idle = idle_switch(space.values_of)  # where some trial can use it, the others hold it inert (a grid does)
    if idle is not None:
        raise ConfigError(f"{where}: {idle_switch_text(*idle)}")
    problem = idle_model_setting(space.values_of)  # likewise: refused only where no model can use it
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")


def configuration_keys(entry: Any, at: str) -> dict[str, Any]:
    """One entry of `configurations:` as flat keys. Keys are dotted as in --set (`train.lr: 0.1`), or
    under their section (`train: {lr: 0.1}`); a mapping below that (data.augment) is one value that
    replaces the sections' whole mapping, as --set does."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{at}: must be a mapping of keys to values, e.g. {{train.lr: 0.1, train.momentum: 0.9}}")
    flat: dict[str, Any] = {}
    for key, value in entry.items():
        pairs = ([(f"{key}.{k}", v) for k, v in value.items()] if key in SECTIONS and isinstance(value, dict)
                 else [(str(key), value)])
        for k, v in pairs:
            section = k.split(".", 1)[0]
            if section not in SECTIONS or "." not in k:
                raise ConfigError(f"{at}: {k}: not a key of model, data or train; name it as in --set, e.g. train.lr")
            if is_domain(v):
                raise ConfigError(f"{at}.{k}: a configuration gives values, not domains; search {k} in the "
                                  f"{section} section instead")
            if isinstance(v, list) or (isinstance(v, dict) and not k.endswith("augment")):
                raise ConfigError(f"{at}.{k}: values are scalars (a mapping only for data.augment), got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{at}.{k}: {v} is not a finite number")
            if k in UNSEARCHABLE:
                raise ConfigError(f"{at}.{k}: cannot differ between configurations (one data set and device per "
                                  "sweep); give it in the sections")
            if k in flat:
                raise ConfigError(f"{at}.{k}: given twice")
            flat[k] = v
    return flat


def with_configurations(values: dict[str, Any], entries: list[Any], where: str
                        ) -> tuple[dict[str, Any], tuple[dict[str, Any], ...]]:
    """The sections' flat values and `configurations:` -> (the values, each listed key holding the first
    configuration's value; every configuration's value of every listed key). A listed key that is a
    mapping (data.augment) takes the sections' keys below it into one value, so a configuration
    replaces the whole policy. ConfigError for a key both searched and listed, a repeated configuration,
    and a key given whole in one place and by its parts in another."""
    from cifar_ray.config import default

    flats = [configuration_keys(e, f"{where}: configurations[{i}]") for i, e in enumerate(entries)]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    values = dict(values)
    for i, flat in enumerate(flats):
        at = f"{where}: configurations[{i}]"
        for key in flat:
            for other, value in values.items():
                nested = other.startswith(key + ".") or key.startswith(other + ".")
                if isinstance(value, Domain) and (other == key or nested):
                    raise ConfigError(f"{at}.{key}: {other} is searched ({value.describe()}) in the "
                                      f"{other.split('.', 1)[0]} section; list it in every configuration or search "
                                      "it, not both")
                if key.startswith(other + "."):
                    raise ConfigError(f"{at}.{key}: the sections give {other} as {format_value(value)}; give "
                                      f"{other} whole in the configuration")
            whole = [k for k in keys if key.startswith(k + ".")]
            if whole:
                raise ConfigError(f"{at}.{key}: another configuration gives {whole[0]} whole; give it whole here too")
    base: dict[str, Any] = {}
    for key in keys:
        parts = {k[len(key) + 1:]: v for k, v in values.items() if k.startswith(key + ".")}
        if parts:  # the sections' policy keys, one value now
            base[key] = unflatten(parts)
            values = {k: v for k, v in values.items() if not k.startswith(key + ".")}
        elif key in values:
            base[key] = values[key]
        else:
            try:
                dflt = default(key)
            except AttributeError:  # not a key of the schema: the check of the first configuration naming it says so
                i = next(i for i, f in enumerate(flats) if key in f)
                firsts = {k: (v.candidates()[0] if isinstance(v, Domain) else v) for k, v in values.items()}
                trial_from(firsts | flats[i], f"{where}: configurations[{i}]")
                raise ConfigError(f"{where}: configurations[{i}].{key}: not a key of model, data or train") from None
            base[key] = dflt.model_dump() if hasattr(dflt, "model_dump") else dflt
    listed = tuple({k: flat.get(k, base[k]) for k in keys} for flat in flats)
    for i, config in enumerate(listed):
        for j in range(i):
            if same(listed[j], config):
                raise ConfigError(f"{where}: configurations[{i}] is configurations[{j}] again; repeat a "
                                  "configuration with seeds:")
    return values | listed[0], listed


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
    configs = [(f"{where}: configurations[{i}]", c) for i, c in enumerate(space.listed)] or [(where, {})]
    for at, config in configs:
        trial_from(first | config, at)
    combos = math.prod(len(d.candidates()) for d in domains.values()) * len(configs)
    if combos <= FULL_CHECK_LIMIT:  # every combination, so model x option clashes are found
        keys = list(domains)
        for at, config in configs:
            for picks in itertools.product(*(domains[k].candidates() for k in keys)):
                picked = dict(zip(keys, picks, strict=True))
                _check_one(first | config | picked, picked, domains, at)
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
    if sweep.search.kind == "optuna" and ("grid" in kinds or space.seeds or space.listed):
        raise ConfigError(f"{where}: search.kind: optuna samples its own points and cannot run a grid, seeds: or "
                          "configurations:; use choice instead of grid, or search.kind: grid (or random)")
    if sweep.search.kind == "optuna" and sweep.search.order == "shuffled":
        raise ConfigError(f"{where}: search.order: optuna chooses its own order; remove search.order")
    if sweep.search.kind != "grid" and not space.domains() and not space.seeds and not space.listed:
        raise ConfigError(f"{where}: search.kind: {sweep.search.kind} has nothing to search; add a domain such as "
                          "train.lr: {loguniform: [0.0001, 0.1]}")
    samples = sweep.search.samples
    if sweep.search.kind != "optuna" and samples > 1 and not space.has_random():
        raise ConfigError(f"{where}: search.samples: {samples} would run every trial {samples} times with the same "
                          f"values and seed, the same trials; repeat them with seeds: {list(range(samples))} "
                          "instead, or draw a key at random ({uniform: [lo, hi]}, {choice: [...]})")
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


def one_round(space: Space) -> list[dict[str, Any]]:
    """The listed and grid keys (and train.seed) of each trial of one round, in the file's order: the
    configurations outermost, then the grid (first key outermost, seeds innermost). A point equal to an
    earlier one in every key that acts in it is left out (cifar_ray.applies: momentum under adam, or
    under onecycle): that trial would train the same again. Empty when nothing is a grid or listed."""
    grid = {k: d.values for k, d in space.domains().items() if d.kind == "grid"}
    if space.seeds:
        grid["train.seed"] = space.seeds
    if not grid and not space.listed:
        return []
    points = [config | dict(zip(grid, picks, strict=True)) for config in space.listed or ({},)
              for picks in itertools.product(*grid.values())]
    return _acting_once(space, points)


def _acting_once(space: Space, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import json

    from cifar_ray.applies import CONDITIONS, acts

    constants = {k: v for k, v in space.values.items() if not isinstance(v, Domain)}
    drawn = {k for k, d in space.domains().items() if d.kind in RANDOM_KINDS}  # not known until a trial is made
    conditional = [k for k in points[0] if k in CONDITIONS and not any(c.parent in drawn for c in CONDITIONS[k])]
    if not conditional:
        return points
    kept, seen = [], set()
    for point in points:
        known = constants | point
        acting = {k: v for k, v in point.items() if k not in conditional or acts(k, known)}
        label = json.dumps(acting, sort_keys=True, default=str)
        if label not in seen:
            seen.add(label)
            kept.append(point)
    return kept


def grid_points(space: Space, sweep: SweepConfig) -> list[dict[str, Any]]:
    """one_round's points `search.samples` times, in the order trials start: shuffled when shuffles()."""
    points = one_round(space) * sweep.search.samples
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
                    out[key] = parse_domain(key, value, "sweep.yaml", stored=True)
                except ConfigError:
                    continue
    entries = doc.get("configurations") if isinstance(doc, dict) else None
    if isinstance(entries, list) and entries:
        out = listed_domains(stored_listed(doc)) | out
    seeds = doc.get("seeds") if isinstance(doc, dict) else None
    if isinstance(seeds, list) and seeds and "train.seed" not in out:
        out["train.seed"] = Domain("grid", tuple(seeds))
    return out


def stored_listed(doc: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """The configurations of a stored sweep copy as Space.listed holds them; () where it lists none or
    they do not parse."""
    entries = doc.get("configurations")
    if not isinstance(entries, list) or not entries:
        return ()
    values = {}
    for section in SECTIONS:
        tree = doc.get(section)
        values.update(flatten(tree, section) if isinstance(tree, dict) else {})
    try:
        return with_configurations(values, entries, "sweep.yaml")[1]
    except ConfigError:
        return ()


def listed_domains(listed: tuple[dict[str, Any], ...]) -> dict[str, Domain]:
    """The listed keys as analysis reads searched keys: a choice of the values the configurations give."""
    return {k: Domain("choice", tuple(distinct([c[k] for c in listed]))) for k in (listed[0] if listed else {})}


def searched_domains(space: Space) -> dict[str, Domain]:
    """Every searched key's domain, the listed keys as a choice of their values, the seeds as a grid of
    their own."""
    out = listed_domains(space.listed) | space.domains()
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
