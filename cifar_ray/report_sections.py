"""The report's decision sections: what mattered, is the winner real, all trials at once, when the
ranking settled. Each returns its Markdown lines (a figure and a sentence or two a student can act on)."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from cifar_ray import metrics as M
from cifar_ray.analysis import Sweep
from cifar_ray.applies import acts, row_config
from cifar_ray.figures import md, pyplot, save_figure
from cifar_ray.insight import MIN_TRIALS, SETTLED, config_keys, settled_epoch
from cifar_ray.space import Domain, is_log

SECTION_FIGURES = ("importance.png", "seeds.png", "parallel.png", "early_vs_final.png")
TOP_CONFIGS = 12  # configurations drawn in the seeds figure
LABEL_WIDTH = 60  # characters a line of a configuration's label in the seeds figure
STANDS_OUT = 0.1  # a key "mattered most" when its importance leads the next by this much


def _pct(sweep: Sweep, value: float) -> str:
    """A metric value as the report says it: accuracies in %, losses as they are."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "n/a"
    return f"{100 * value:.1f}%" if sweep.metric.endswith("acc") else f"{value:.4g}"


def _config_text(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(f"{md(k)}={md(row[k])}" for k in keys) or "the only configuration"


def importance_section(sweep: Sweep, out: Path) -> list[str]:
    lines = ["## What mattered", ""]
    try:
        imp = sweep.importance()
    except ValueError as err:
        return lines + [f"Not enough to say: {md(err)}.", ""]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(imp) + 1.8))
    shown = imp.iloc[::-1]
    ax.barh(shown["key"], 100 * shown["importance"], color="C0")
    for y, v in enumerate(shown["importance"]):
        ax.text(100 * v + 1, y, f"{100 * v:.0f}%", va="center", fontsize=9)
    ax.set(xlim=(0, 110), xlabel=f"share of the variation in best {sweep.metric} (%)",
           title=f"Importance of each searched key (PED-ANOVA, {len(sweep.trials())} trials)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = save_figure(fig, out / "importance.png")
    top, rest = imp.iloc[0], imp.iloc[1:]
    others = ", ".join(f"{md(r.key)} {100 * r.importance:.0f}%" for r in rest.itertuples())
    refine = f"`python -m cifar_ray.refine {md(sweep.path)}`"
    if top["importance"] - rest.iloc[0]["importance"] < STANDS_OUT:
        text = (f"No single key stands out ({md(top['key'])} {100 * top['importance']:.0f}%, {others}; PED-ANOVA, "
                "`sweep.importance()`): the best trials do not share one key's value, so the keys act together "
                f"or the differences are noise. Keep searching all of them; {refine} narrows each around the best "
                "trials.")
    else:
        text = (f"**{md(top['key'])}** mattered most: {100 * top['importance']:.0f}% of the variation in best "
                f"{md(sweep.metric)} (PED-ANOVA, `sweep.importance()`); {others}. Narrow the next sweep around the "
                f"best values of {md(top['key'])} ({refine}) and fix the keys that barely matter.")
    unjudged = [k for k in sweep.domains() if k not in set(imp["key"]) and k != "train.seed"]
    if unjudged:
        text += (f" Not judged: {', '.join(md(k) for k in unjudged)} (fewer than {MIN_TRIALS} finished trials "
                 "where it acts, or one value there).")
    return lines + [text, "", f"![What mattered]({path.name})", ""]


def seeds_section(sweep: Sweep, trials: pd.DataFrame, out: Path) -> list[str]:
    lines = ["## Is the winner real", ""]
    cmp = sweep.compare()
    keys = [c for c in cmp.columns if c not in ("mean", "std", "n", "ci_low", "ci_high", "p_vs_best")]
    if cmp.empty or int(cmp["n"].max()) < 2:
        seeds = "seeds: [0, 1, 2]"
        return lines + ["Each configuration ran once, so the ranking has no noise estimate: a gap of a point or "
                        "two can be the seed alone. Repeat every configuration with three seeds by adding this "
                        "line to the sweep file (then `sweep.compare()` gives each configuration's mean, 95% "
                        "interval and Welch's t-test against the best):", "", "```yaml", seeds, "```", ""]
    scale = 100 if sweep.metric.endswith("acc") else 1
    top = cmp.head(TOP_CONFIGS).iloc[::-1]
    labels = [textwrap.fill(", ".join(f"{k.split('.', 1)[-1]}={_short(r[k])}" for k in keys) or "all", LABEL_WIDTH)
              + f" (n={n})" for (_, r), n in zip(top.iterrows(), top["n"], strict=True)]
    rows = sum(lab.count("\n") + 1 for lab in labels)  # a configuration of many keys takes several lines
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8 + (3 if rows > len(labels) else 0), 0.3 * rows + 0.2 * len(top) + 1.8))
    y = np.arange(len(top))
    ends = top["ci_low"], top["ci_high"]
    if scale == 100:  # an accuracy lies in [0, 1]: the bar of a 2-seed interval past it only says "wide"
        ends = ends[0].clip(lower=0.0), ends[1].clip(upper=1.0)
    low = (top["mean"] - ends[0]).fillna(0) * scale
    high = (ends[1] - top["mean"]).fillna(0) * scale
    colors = ["C3" if i == len(top) - 1 else "C0" for i in range(len(top))]
    ax.errorbar(top["mean"] * scale, y, xerr=[low, high], fmt="none", ecolor="gray", capsize=3)
    ax.scatter(top["mean"] * scale, y, c=colors, zorder=3)
    ax.set_yticks(y, labels, fontsize=8)
    unit = " (%)" if scale == 100 else ""
    ax.set(xlabel=f"mean best {sweep.metric}{unit}, bars: 95% interval over seeds",
           title="Configurations over their seeds (best in red)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = save_figure(fig, out / "seeds.png")
    best = cmp.iloc[0]
    ci = (best["ci_high"] - best["mean"]) if not math.isnan(best["ci_high"]) else math.nan
    half = f" ± {_pct(sweep, ci)}" if not math.isnan(ci) else ""
    text = (f"Best configuration ({_config_text(best, keys)}): {md(sweep.metric)} {_pct(sweep, best['mean'])}"
            f"{half} (95% interval, {int(best['n'])} seeds).")
    if len(cmp) < 2:
        text += " It is the only configuration."
    else:
        second = cmp.iloc[1]
        p = second["p_vs_best"]
        runner = f"the runner-up ({_config_text(second, keys)}, {_pct(sweep, second['mean'])})"
        if math.isnan(p):
            text += f" Against {runner} there is no test: one of them ran with fewer than 2 seeds."
        elif p < 0.05:
            text += f" It beats {runner} beyond seed noise: Welch's t-test p = {p:.2g}."
        else:
            text += (f" It is not distinguishable from {runner}: Welch's t-test p = {p:.2g}. Call it a tie, or run "
                     "more seeds of the two.")
    return lines + [text, "", f"![Is the winner real]({path.name})", ""]


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


INERT_AT = -0.06  # where the parallel plot puts a key's value in trials where it does not act


def _axis(values: pd.Series, domain: Optional[Domain], inert: Optional[pd.Series] = None
          ) -> tuple[np.ndarray, list[tuple[float, str]], bool]:
    """Values placed on a [0, 1] axis, with tick positions and labels, and whether the axis is log.
    Trials where the key does not act (`inert`; cifar_ray.applies) sit below the axis, at "not used"."""
    if inert is not None and inert.any() and not inert.all():
        pos, ticks, log = _axis(values[~inert], domain)
        out = np.full(len(values), INERT_AT)
        out[~inert.to_numpy(bool)] = pos
        return out, [*ticks, (INERT_AT, "not used")], log
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all() and not values.map(lambda v: isinstance(v, bool)).any():
        log = domain is not None and is_log(domain) and (numeric > 0).all()
        x = np.log10(numeric.to_numpy(float)) if log else numeric.to_numpy(float)
        lo, hi = float(np.min(x)), float(np.max(x))
        pos = (x - lo) / (hi - lo) if hi > lo else np.full(len(x), 0.5)
        uniq = sorted(set(numeric.tolist()))
        ticks = uniq if len(uniq) <= 6 else [uniq[0], uniq[len(uniq) // 2], uniq[-1]]
        place = (lambda v: (math.log10(v) - lo) / (hi - lo)) if log else (lambda v: (v - lo) / (hi - lo))
        return pos, [(place(t) if hi > lo else 0.5, _short(t)) for t in ticks], log
    labels = values.map(lambda v: str(v))
    cats = sorted(set(labels))
    where = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
    return labels.map(where).to_numpy(float), [(where[c], c[:18]) for c in cats], False


def plot_parallel(sweep: Sweep, trials: pd.DataFrame, out: Path) -> Optional[Path]:
    """One line per trial across the searched keys and the metric, coloured by the metric."""
    best = f"best_{sweep.metric}"
    domains = sweep.domains()
    keys = [k for k in config_keys(trials, domains) if k in trials]
    if "train.seed" in trials and trials["train.seed"].nunique() > 1:
        keys.append("train.seed")
    df = trials[np.isfinite(pd.to_numeric(trials[best], errors="coerce"))] if best in trials else trials.iloc[0:0]
    if not keys or len(df) < 2:
        return None
    df = df.sort_values(best, ascending=sweep.mode == "max")  # the best drawn last, on top
    axes = [(k, *_axis(df[k], domains.get(k), ~df.apply(lambda row, k=k: acts(k, row_config(row)), axis=1)))
            for k in keys]
    metric_pos, metric_ticks, _ = _axis(df[best].astype(float), None)
    scale = 100 if sweep.metric.endswith("acc") else 1
    metric_ticks = [(p, _short(float(t) * scale) if scale == 100 else t) for p, t in metric_ticks]
    axes.append((f"best {sweep.metric}" + (" (%)" if scale == 100 else ""), metric_pos, metric_ticks, False))
    plt = pyplot()
    cmap = plt.get_cmap("viridis")
    values = df[best].to_numpy(float)
    lo, hi = float(values.min()), float(values.max())
    shade = (values - lo) / (hi - lo) if hi > lo else np.full(len(values), 0.5)
    if sweep.mode == "min":
        shade = 1 - shade  # the best is always yellow
    fig, ax = plt.subplots(figsize=(2.2 * len(axes) + 2, 5))
    xs = np.arange(len(axes))
    ys = np.column_stack([pos for _, pos, _, _ in axes])
    for row, c in zip(ys, shade, strict=True):
        ax.plot(xs, row, color=cmap(c), alpha=0.8, linewidth=1.5)
    for x, (name, _, ticks, log) in zip(xs, axes, strict=True):
        ax.plot([x, x], [0, 1], color="k", linewidth=0.8)
        for pos, label in ticks:
            ax.text(x + 0.03, pos, label, fontsize=8, va="center",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
        ax.text(x, -0.12, name + (" (log)" if log else ""), ha="center", va="top", fontsize=9, fontweight="bold")
    ax.set(xlim=(-0.15, len(axes) - 0.7), ylim=(-0.2, 1.04), xticks=[], yticks=[])
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"All {len(df)} trials at once (colour: best {sweep.metric}, yellow is best)")
    sm = plt.cm.ScalarMappable(cmap=cmap if sweep.mode == "max" else cmap.reversed(),
                               norm=plt.Normalize(lo * scale, hi * scale))
    fig.colorbar(sm, ax=ax, label=f"best {sweep.metric}" + (" (%)" if scale == 100 else ""), fraction=0.03)
    fig.tight_layout()
    return save_figure(fig, out / "parallel.png")


def parallel_section(sweep: Sweep, trials: pd.DataFrame, out: Path) -> list[str]:
    path = plot_parallel(sweep, trials, out)
    if path is None:
        return []
    return ["## All trials at once", "",
            "One line per trial across the searched keys (log-scaled where the sweep searched on a log scale) and "
            "the metric; the yellow lines are the best trials. Where they bunch on an axis, that key's good "
            "range is there; where they spread over it, the key barely matters.", "",
            f"![All trials at once]({path.name})", ""]


def settled_section(sweep: Sweep, trials: pd.DataFrame, out: Path) -> list[str]:
    lines = ["## When the ranking settled", ""]
    table = sweep.early_vs_final()
    finite = table.dropna(subset=["spearman"]) if not table.empty else table
    if finite.empty:
        return lines + ["Too few trials reached the last epoch (3 needed, with different final values) to tell.", ""]
    last = int(table[M.EPOCH].max())
    n = int(table["n"].iloc[-1])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.plot(table[M.EPOCH], table["spearman"], marker="o", color="C0", label="Spearman with the final ranking")
    ax.axhline(SETTLED, color="C3", linestyle="--", label=f"threshold {SETTLED}")
    epoch = settled_epoch(finite)
    if epoch is not None:
        ax.axvline(epoch, color="C2", linestyle=":", label=f"settled at epoch {epoch}")
    ax.set(xlabel="epoch", ylabel="rank correlation", ylim=(-1.05, 1.05),
           title=f"Ranking at each epoch vs the final one ({n} trials reached epoch {last})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = save_figure(fig, out / "early_vs_final.png")
    if epoch is None:
        text = (f"The ranking never correlated above {SETTLED} with the final one before the end: judging these "
                "trials early would have picked the wrong ones; train as long as this sweep did.")
    elif epoch == last:
        text = f"The ranking settled only at the last epoch ({last}): judge trials of this kind at the end."
    else:
        text = (f"From epoch {epoch} of {last} on, the ranking correlates above {SETTLED} with the final one "
                f"(Spearman, {n} trials): a scheduler such as ASHA with `grace_period: {epoch}` would keep the same "
                "winners for fewer epochs.")
    lines += [text, ""]
    stopped = sweep.stopped_early()
    if not stopped.empty:
        cut = stopped[stopped["contender"]]
        lines += [f"The scheduler stopped {len(stopped)} trials; "
                  + (f"{len(cut)} of them ({', '.join(md(t) for t in cut['trial_id'])}) ranked as well as the "
                     "eventual best at the epoch they were stopped, and may have been cut too soon: raise "
                     "`grace_period`." if len(cut) else
                     "none ranked as well as the eventual best did at the same epoch."), ""]
    return lines + [f"![When the ranking settled]({path.name})", ""]
