"""The next sweep: a sweep file narrowed around the best trials of a finished one.

    python -m cifar_ray.refine results/quickstart [--top 3] [--out FILE]

Numeric keys get a domain spanning the top K trials' values with a margin of half that span on each
side (log domains stay log: the margin is then a factor), kept inside what the configuration allows;
a grid of floats stays a grid with as many points, a random domain stays random. A choice (a menu) and
a grid of anything else keep the values the top K used, and `configurations:` keeps the configurations
they ran. Unsearched keys, seeds, search, scheduler and resources are unchanged. The file gets a new
name (`<name>_refined`) and a header saying where it came from and which trials it kept.

    python -m cifar_ray.refine results/fast_search --confirm [--top 2] [--seeds 0,1,2]

instead writes `<name>_confirm`: the top K trials' configurations again, each with the seeds, to tell
whether the best is better beyond seed noise (confirm()).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import errno
import math
import re
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import yaml

from cifar_ray.analysis import AnalysisError, load, ranked
from cifar_ray.applies import acts, row_config
from cifar_ray.config import ConfigError
from cifar_ray.files import new_file_mode, printable
from cifar_ray.pipes import run_main
from cifar_ray.space import (
    Domain,
    distinct,
    first_candidate,
    format_value,
    is_log,
    listed_domains,
    stored_domains,
    stored_listed,
)

DEFAULT_TOP = 3
DEFAULT_SEEDS = (0, 1, 2)  # --confirm: three runs a configuration, the fewest a t-test reads
MARGIN = 0.5  # of the top trials' span, on each side (in log space for log domains)
MIN_FACTOR = 2.0  # log domains whose top values coincide: [v / 2, v * 2]
MIN_LINEAR = 0.25  # linear domains whose top values coincide: v +- 25% of |v| (0.1 around 0)
STORED_ONLY = ("space", "source_file")  # keys the sweep adds to its stored copy
# Settings a folder must not carry into the next sweep: where the data and its cache were on the machine
# that ran it, and whose W&B account and mode it logged to (a folder may come from someone else).
DROPPED = {"data": ("cache_dir", "data_dir"), "wandb": ("entity", "mode")}


class RefineError(ValueError):
    """A results folder with nothing to refine from, or an output that would overwrite a file."""


def _round(v: float) -> float:
    return float(f"{v:.3g}")


def _valid(key: str, value: Any, base: dict) -> bool:
    """Whether the trial configuration accepts `value` for `key` (bounds of the schema and the model)."""
    from cifar_ray.space import trial_from

    try:
        trial_from(base | {key: value}, "refine")
        return True
    except ConfigError:
        return False


def _inside(key: str, bound: float, anchor: float, base: dict, integer: bool) -> float:
    """`bound`, or the nearest value toward `anchor` (a top trial's value) that the schema accepts."""
    for _ in range(30):
        value = int(round(bound)) if integer else bound
        if _valid(key, value, base):
            return value
        bound = (bound + anchor) / 2
    return anchor


def _numeric_bounds(dom: Domain, values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if is_log(dom) and lo > 0:
        factor = max(MIN_FACTOR, (hi / lo) ** MARGIN) if hi > lo else MIN_FACTOR
        return lo / factor, hi * factor
    margin = MARGIN * (hi - lo) if hi > lo else (MIN_LINEAR * abs(lo) or 0.1)
    lower = lo - margin
    if dom.kind != "randint" and min(dom.values) >= 0:
        lower = max(lower, 0.0)  # a domain of non-negative values stays non-negative
    return lower, hi + margin


def _points(lo: float, hi: float, n: int, log: bool) -> list[float]:
    raw = np.geomspace(lo, hi, n) if log else np.linspace(lo, hi, n)
    return list(dict.fromkeys(_round(float(v)) for v in raw))


def used_values(column: list[Any], dom: Domain) -> list[Any]:
    """The values the kept trials ran with. A table holds a null as NaN: where the domain lists null
    (train.whiten_bias_epochs: [null, 3]) it is that value, else a value the trial did not record."""
    nullable = dom.kind in ("grid", "choice") and any(v is None for v in dom.values)
    missing = [isinstance(v, float) and math.isnan(v) for v in column]
    return [None if gone else v for v, gone in zip(column, missing, strict=True) if nullable or not gone]


def used_configurations(kept: pd.DataFrame, listed: tuple[dict[str, Any], ...]) -> list[int]:
    """The indexes of the configurations some kept trial ran (its listed keys' values all match)."""
    from cifar_ray.space import same

    domains = listed_domains(listed)
    rows = [row for _, row in kept.iterrows()]
    return [i for i, config in enumerate(listed)
            if any(all(k in row and same(_ran(row, k, domains[k]), v) for k, v in config.items()) for row in rows)]


def refine_domain(key: str, dom: Domain, values: list[Any], base: dict) -> Any:
    """The new domain (as the sweep file writes it) or constant for one searched key."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    # A choice is a menu (Optuna samples it as categories), and so is a grid of anything but floats
    # (names, flags, policies, batch sizes): both keep the values the top K used. Re-spacing a menu
    # proposes values nobody listed (bn_momentum choice[0.2, 0.4, 0.6] became [0.3, 0.5, 0.7]).
    floats = all(number(v) for v in (*dom.values, *values)) and not all(isinstance(v, int) for v in dom.values)
    if dom.kind == "choice" or (dom.kind == "grid" and not floats):
        kept = distinct([v for v in dom.values if any(v == u for u in values)]) or list(dict.fromkeys(values))
        return kept[0] if len(kept) == 1 else {dom.kind: kept}
    if not all(number(v) for v in values):
        return {dom.kind: list(dom.values)}
    integer = dom.kind == "randint"
    lo, hi = _numeric_bounds(dom, [float(v) for v in values])
    lo = _inside(key, lo, min(values), base, integer)
    hi = _inside(key, hi, max(values), base, integer)
    if integer:
        lo, hi = int(lo), int(hi)
        return lo if lo == hi else {"randint": [lo, hi]}
    if _round(hi) <= _round(lo):  # a span rounding away to one value is that value
        return _round(lo)
    if dom.kind == "grid":
        points = _points(lo, hi, max(len(dom.values), 3), is_log(dom))
        return points[0] if len(points) == 1 else {dom.kind: points}
    return {dom.kind: [_round(lo), _round(hi)]}


def _set(doc: dict, key: str, value: Any) -> None:
    node = doc
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def refined_name(name: str) -> str:
    match = re.search(r"_refined(\d*)$", name)
    if not match:
        return f"{name}_refined"[:100]
    return f"{name[:match.start()]}_refined{int(match.group(1) or 1) + 1}"


def _shown(value: Any, dom: Domain) -> str:
    """A kept trial's value in the header: a null the table holds as NaN is written as null."""
    (used,) = used_values([value], dom) or [value]
    return format_value(used)


def _describe(value: Any) -> str:
    if isinstance(value, dict) and len(value) == 1:
        kind, spec = next(iter(value.items()))
        return f"{kind}[{', '.join(format_value(v) for v in spec)}]"
    return format_value(value)


def _top_trials(results: str | Path, top: int) -> tuple[Any, dict, pd.DataFrame, pd.DataFrame]:
    """(the sweep, its stored file, its finished trials, the best `top` of them, best first)."""
    if top < 1:
        raise RefineError(f"--top {top}: must be 1 or more")
    sweep = load(results)
    stored = sweep.stored()
    if not stored.get("name"):
        raise RefineError(f"{sweep.path}: no sweep.yaml with the sweep's file; refine needs a sweep run by "
                          "cifar_ray")
    trials = sweep.trials()
    best = f"best_{sweep.metric}"
    finished = trials[np.isfinite(pd.to_numeric(trials.get(best), errors="coerce"))] if best in trials else trials
    if finished.empty:
        raise RefineError(f"{sweep.path}: no trial has reported a finite {sweep.metric}; nothing to refine around")
    return sweep, stored, finished, ranked(finished, best, sweep.mode).head(top)


def refine(results: str | Path, top: int = DEFAULT_TOP) -> tuple[str, str]:
    """(file text, new name) of the refined sweep file."""
    from cifar_ray.space import Space

    sweep, stored, finished, kept = _top_trials(results, top)
    best = f"best_{sweep.metric}"
    listed = stored_listed(stored)
    domains = {k: d for k, d in stored_domains(stored).items() if k != "train.seed" and k not in listed_domains(listed)}
    doc = {k: v for k, v in stored.items() if k not in STORED_ONLY}
    base = first_candidate(Space(_flat_constants(doc) | domains, None))
    changes = []
    for key, dom in domains.items():
        # a key is read where it acts: an Adam trial's momentum is whatever it was given (cifar_ray.applies)
        acting = kept[[acts(key, row_config(row)) for _, row in kept.iterrows()]] if key in kept else kept.iloc[0:0]
        if key in kept and acting.empty:  # the top trials all ran where it does nothing: fix it to one value
            new = dom.candidates()[0]
            _set(doc, key, new)
            changes.append(f"#   {key}: {dom.describe()} -> {_describe(new)} (it acted in none of the top trials)")
            continue
        values = used_values(acting[key].tolist(), dom) if key in kept else []
        if not values:
            continue
        new = refine_domain(key, dom, values, base)
        _set(doc, key, new)
        changes.append(f"#   {key}: {dom.describe()} -> {_describe(new)}")
    changes += _switch_off_idle(doc, [row_config(row) for _, row in kept.iterrows()])
    changes += _one_round_without_draws(doc)
    if listed:  # the configurations are menu items: keep those the top K ran
        used = used_configurations(kept, listed)
        doc["configurations"] = [doc["configurations"][i] for i in used]
        changes.append(f"#   configurations: {len(listed)} -> {len(used)} (kept {', '.join(map(str, used))})")
    name = refined_name(str(stored["name"]))
    doc["name"] = name
    dropped = drop_machine_settings(doc)
    searched = listed_domains(listed) | domains
    shown_keys = list(searched)
    kept_lines = [f"#   {printable(row['trial_id'])}: {sweep.metric} {row[best]:.4f}"
                  + (f" ({', '.join(f'{k}={printable(_shown(row[k], searched[k]))}' for k in shown_keys if k in row)})"
                     if shown_keys else "") for _, row in kept.iterrows()]
    header = [f"# {name}: refined from {printable(sweep.path)} (sweep {printable(stored['name'])}, {sweep.metric} "
              f"{sweep.mode}) on {dt.date.today().isoformat()} by python -m cifar_ray.refine --top {top}.",
              f"# Kept the top {len(kept)} of {len(finished)} finished trials:", *kept_lines,
              "# Narrowed:" if changes else "# No searched key to narrow.", *map(printable, changes)]
    if dropped:
        header.append(f"# Not carried over from the folder: {', '.join(dropped)} (this machine's defaults apply; "
                      "give the data with --data)")
    return "\n".join(header) + "\n" + yaml.safe_dump(doc, sort_keys=False), name


def confirm(results: str | Path, top: int = DEFAULT_TOP, seeds: tuple[int, ...] = DEFAULT_SEEDS) -> tuple[str, str]:
    """(file text, new name) of a sweep that runs the configurations of the `top` trials again, each with
    `seeds`, to the end (grid search, FIFO): whether the best beats the others beyond seed noise, which
    one run per configuration cannot tell. The sections become the best trial's configuration
    (configurations[0], `{}`); each other entry lists the keys it changes. Values are the trials' own,
    unrounded; trials that ran one configuration with several seeds count once."""
    from cifar_ray.space import same

    if not seeds or len(set(seeds)) != len(seeds):
        raise RefineError(f"--seeds {','.join(map(str, seeds))}: give distinct seeds, e.g. 0,1,2")
    sweep, stored, finished, kept = _top_trials(results, top)
    best = f"best_{sweep.metric}"
    domains = {k: d for k, d in stored_domains(stored).items() if k != "train.seed"}
    configs: list[dict[str, Any]] = []
    sources: dict[int, list[str]] = {}  # configuration -> the kept trials that ran it
    for _, row in kept.iterrows():
        # a key where it does nothing is no part of the configuration (an Adam trial's momentum)
        config = {k: _ran(row, k, dom) for k, dom in domains.items() if k in row and acts(k, row_config(row))}
        found = [i for i, c in enumerate(configs) if same(c, config)]
        if not found:
            configs.append(config)
        sources.setdefault(found[0] if found else len(configs) - 1, []).append(
            f"{printable(row['trial_id'])} ({sweep.metric} {row[best]:.4f})")
    doc = {k: v for k, v in stored.items() if k not in (*STORED_ONLY, "configurations", "seeds")}
    for key, dom in domains.items():  # a key the best does not use holds a value that does nothing there
        _clear(doc, key)
        _set(doc, key, copy.deepcopy(configs[0][key] if key in configs[0] else dom.candidates()[0]))
    switched = _switch_off_idle(doc, configs)
    changed: list[dict[str, Any]] = [{k: v for k, v in c.items() if k not in configs[0] or not same(v, configs[0][k])}
                                     for c in configs[1:]]
    listed = [copy.deepcopy(c) for c in [{}, *changed]]  # no value shared between entries: YAML writes an alias
    doc["search"] = {"kind": "grid"}
    doc["scheduler"] = {"kind": "fifo"}  # every seed runs to the end: ASHA or PBT would cut the comparison
    at = list(doc).index("train") + 1 if "train" in doc else len(doc)  # after the sections, as people write it
    items = list(doc.items())
    doc = dict(items[:at] + [("configurations", listed), ("seeds", list(seeds))] + items[at:])
    name = f"{str(stored['name'])[:92]}_confirm"
    doc["name"] = name
    dropped = drop_machine_settings(doc)
    header = [f"# {name}: the top {len(kept)} of {len(finished)} finished trials of {printable(sweep.path)} (sweep "
              f"{printable(stored['name'])}, {sweep.metric} {sweep.mode}) run again with seeds "
              f"{', '.join(map(str, seeds))}, written on {dt.date.today().isoformat()} by python -m "
              f"cifar_ray.refine --confirm --top {top}.",
              "# Whether the best beats the others beyond seed noise: python -m cifar_ray.report on its results.",
              *(f"#   configurations[{i}]{' (the sections)' if i == 0 else ''}: {', '.join(sources[i])}"
                for i in range(len(configs))),
              "# search: grid and scheduler: fifo (every seed runs to the end); the searched keys are the trials' "
              "own values.", *switched]
    if dropped:
        header.append(f"# Not carried over from the folder: {', '.join(dropped)} (this machine's defaults apply; "
                      "give the data with --data)")
    return "\n".join(header) + "\n" + yaml.safe_dump(doc, sort_keys=False), name


def _one_round_without_draws(doc: dict) -> list[str]:
    """A grid's rounds (search.samples) differ only in their random draws: where narrowing fixed every key
    drawn at random, one round is all there is (the dry run refuses the repeats). Header lines."""
    from cifar_ray.space import RANDOM_KINDS

    search = doc.get("search")
    if not isinstance(search, dict) or search.get("kind", "grid") == "optuna" or search.get("samples", 1) <= 1:
        return []
    if any(d.kind in RANDOM_KINDS for d in stored_domains(doc).values()):
        return []
    before, search["samples"] = search["samples"], 1
    return [f"#   search.samples: {before} -> 1 (no key is drawn at random any more; seeds: repeats a configuration)"]


def _switch_off_idle(doc: dict, configs: list[dict[str, Any]]) -> list[str]:
    """Turn off a switch the file turns on (nesterov: true) that acts in none of `configs`, the flat keys
    of the trials the new file runs (over its constants): the dry run refuses a switch that can never act
    (applies.idle_switch), as a grid of SGD and Adam narrowed to Adam would have it. Header lines."""
    from cifar_ray.applies import SWITCHES

    constants = _flat_constants(doc)
    lines = []
    for key in SWITCHES:
        if constants.get(key) is True and not any(acts(key, constants | c) for c in configs):
            _set(doc, key, False)
            lines.append(f"#   {key}: true -> false (it acts in none of the kept trials, and true alone is refused)")
    return lines


def _ran(row: pd.Series, key: str, dom: Domain) -> Any:
    """The value a trial ran `key` with, as the sweep file writes it: a listed value as listed (3, not
    the table's 3.0), a table's NaN as the null the domain lists, numpy scalars as Python's."""
    (value,) = used_values([row[key]], dom) or [None]
    if dom.kind in ("grid", "choice"):
        listed = [v for v in dom.values if v == value]
        if listed:
            return listed[0]
    return value.item() if isinstance(value, np.generic) else value


def _clear(doc: dict, key: str) -> None:
    """Remove `key` from its section: a domain, or the keys below it (the parts of a policy)."""
    node: Any = doc
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


def drop_machine_settings(doc: dict) -> list[str]:
    """Remove DROPPED keys, and a data source that is a path, from `doc`; the keys removed."""
    gone = []
    for section, keys in DROPPED.items():
        tree = doc.get(section)
        if not isinstance(tree, dict):
            continue
        for key in keys:
            if key in tree:
                del tree[key]
                gone.append(f"{section}.{key}")
    data = doc.get("data")
    if isinstance(data, dict) and data.get("source") not in (None, "cifar10", "synthetic"):
        del data["source"]
        gone.append("data.source")
    return gone


def _flat_constants(doc: dict) -> dict:
    from cifar_ray.space import SECTIONS, flatten, is_domain

    out = {}
    for section in SECTIONS:
        tree = doc.get(section)
        for key, value in (flatten(tree, section).items() if isinstance(tree, dict) else ()):
            if not is_domain(value):
                out[key] = value
    return out


def check(path: Path) -> None:
    """The refined file passes what `python -m cifar_ray.sweep FILE --dry-run` checks."""
    from cifar_ray.space import build_space
    from cifar_ray.sweep_config import read_sweep

    build_space(read_sweep(str(path)), str(path))


def write_checked(out: Path, text: str) -> None:
    """Write `text` to a temporary file beside `out`, check it as the dry run would, then give it its
    name without replacing anything there; on any failure nothing is left. (Its comments are one line
    each: values from the folder go through printable().)"""
    import os
    import tempfile

    if out.exists() or out.is_symlink():
        raise RefineError(f"{printable(out)} exists; choose another --out (an existing file is never overwritten)")
    if not out.parent.is_dir():
        raise RefineError(f"--out {printable(out)}: no folder {printable(out.parent)}; create it or choose another")
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".yaml")
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the commands' one line for a full disk (cifar_ray.pipes)
        raise RefineError(f"--out {printable(out)}: cannot write in {printable(out.parent)} ({err.strerror}); "
                          "choose another") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            check(Path(tmp))
        except ConfigError as err:
            raise RefineError(f"the refined file does not validate ({err}); nothing written") from None
        os.chmod(tmp, new_file_mode())
        os.link(tmp, out)  # fails rather than replace a file made there meanwhile
    except FileExistsError:
        raise RefineError(f"{printable(out)} exists; choose another --out") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise RefineError(f"--seeds {printable(text)}: give whole numbers separated by commas, e.g. 0,1,2") from None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cifar_ray.refine",
                                description="Write a sweep file narrowed around the best trials of a sweep.")
    p.add_argument("results", help="the sweep's results folder, e.g. results/quickstart")
    p.add_argument("--top", type=int, default=DEFAULT_TOP, help=f"trials to refine around (default {DEFAULT_TOP})")
    p.add_argument("--out", help="the new sweep file (default ./<name>_refined.yaml, or <name>_confirm.yaml); "
                   "never overwritten")
    p.add_argument("--confirm", action="store_true",
                   help="instead of narrowing, run the top trials' configurations again with --seeds (grid, FIFO)")
    seeds = ",".join(map(str, DEFAULT_SEEDS))
    p.add_argument("--seeds", default=seeds, help=f"--confirm: each configuration's seeds (default {seeds})")
    args = p.parse_args(argv)
    try:
        if args.confirm:
            text, name = confirm(args.results, args.top, parse_seeds(args.seeds))
        else:
            text, name = refine(args.results, args.top)
        out = Path(args.out or f"{name}.yaml")
        write_checked(out, text)
    except (AnalysisError, RefineError, ConfigError) as err:
        print(f"error: {printable(err)}", file=sys.stderr)
        return 2
    print(f"wrote {printable(out)}")
    print("\n".join(line for line in text.splitlines() if line.startswith("#")))
    print(f"check it: python -m cifar_ray.sweep {out} --dry-run")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
