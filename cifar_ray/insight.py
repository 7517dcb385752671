"""From a sweep's tables to a decision: which key mattered, whether the winner beats seed noise, and
when the ranking settled. Pure functions of analysis' DataFrames; Sweep's methods call them.

    sweep = analysis.load("results/seeds")
    sweep.importance(); sweep.compare(); sweep.early_vs_final(); sweep.stopped_early()
"""
from __future__ import annotations

import json
import math
import warnings
from typing import Any, Optional

import numpy as np
import pandas as pd

from cifar_ray import metrics as M
from cifar_ray.applies import acts, row_config
from cifar_ray.space import Domain, is_log

SEED = "train.seed"
CONFIDENCE = 0.95  # compare(): the confidence intervals' level
MIN_TRIALS = 4  # importance(): fewer trials say nothing about a key
SETTLED = 0.9  # early_vs_final(): rank correlation from which the ranking is taken as settled


def _finite(series: pd.Series) -> pd.Series:
    values = pd.to_numeric(series, errors="coerce")
    return values[np.isfinite(values)]


def config_keys(trials: pd.DataFrame, domains: dict[str, Domain]) -> list[str]:
    """The searched keys of the sweep (its domains, else the config columns that vary), seed aside."""
    keys = [k for k in domains if k in trials and k != SEED]
    if not keys:
        keys = [c for c in trials.columns if "." in c and c != SEED and distinct_values(trials[c]) > 1]
    return keys


def _label(value: Any) -> Any:
    """A config value as a hashable, comparable label (an augment policy is a dict)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def distinct_values(column: pd.Series) -> int:
    """How many values a config column holds, unset (null, NaN) counted as one: a choice of
    [null, 3] (train.whiten_bias_epochs) is two values, where nunique() drops the unset."""
    return column.map(lambda v: repr(_label(v))).nunique()


# ---------------------------------------------------------------- importance


def _distribution(key: str, values: pd.Series, domain: Optional[Domain]):
    """An Optuna distribution covering the values trials actually ran with (PBT can move them out
    of the domain): numbers over their observed range (log where the domain is), others categorical."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all() and not values.map(lambda v: isinstance(v, bool)).any():
        lo, hi = float(numeric.min()), float(numeric.max())
        log = domain is not None and is_log(domain) and lo > 0
        return FloatDistribution(lo, hi, log=log), numeric.astype(float).tolist()
    labels = [str(_label(v)) for v in values]
    return CategoricalDistribution(sorted(set(labels))), labels


def importance(trials: pd.DataFrame, domains: dict[str, Domain], metric: str, mode: str,
               method: str = "ped_anova") -> pd.DataFrame:
    """How much each searched key explains the trials' best `metric`: columns key, importance (sums
    to 1, highest first) and method. PED-ANOVA (Optuna's; no scikit-learn needed) compares the
    distribution of each key among the top trials with all trials; its top quantile is the best
    10% of trials, but at least 3 and at most half, so small grids are judged on more than one trial.
    method="fanova" uses Optuna's fANOVA, which needs scikit-learn."""
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    best = f"best_{metric}"
    df = trials[np.isfinite(pd.to_numeric(trials.get(best, pd.Series(dtype=float)), errors="coerce"))] \
        if best in trials else trials.iloc[0:0]
    keys = [k for k in config_keys(trials, domains) if k in df and distinct_values(df[k]) >= 2]
    if len(keys) < 2 or len(df) < MIN_TRIALS:
        raise ValueError(f"importance needs at least {MIN_TRIALS} trials with a finite {metric} and two searched keys "
                         f"with two values or more each; this sweep has {len(df)} such trial{'s' * (len(df) != 1)} and "
                         f"{len(keys)} such key{'s' * (len(keys) != 1)} ({', '.join(keys) or 'none'})")
    # a key counts only in the trials where it acts (cifar_ray.applies: Adam's trials say nothing of momentum)
    acting = {k: df.apply(lambda row, k=k: acts(k, row_config(row)), axis=1) for k in keys}
    if method not in ("ped_anova", "fanova"):
        raise ValueError(f"method={method!r}: use 'ped_anova' or 'fanova'")
    if method == "fanova":
        partial = [k for k in keys if not acting[k].all()]
        if partial:
            raise ValueError(f"method='fanova' models all keys at once and {', '.join(partial)} do not act in every "
                             "trial; method='ped_anova' reads each key in the trials where it acts")
        try:
            import sklearn  # noqa: F401
        except ImportError:
            raise ValueError("method='fanova' needs scikit-learn (pip install scikit-learn); the default "
                             "method='ped_anova' needs nothing more") from None
        scores = _importances(df, keys, domains, best, mode, FanovaImportanceEvaluator(seed=0))
    else:
        # PED-ANOVA scores each key on its own (its top trials' values against all trials'), so each is
        # read over the trials where it acts, and the scores are normalised together after
        scores = {}
        for key in keys:
            sub = df[acting[key]]
            if len(sub) < MIN_TRIALS or distinct_values(sub[key]) < 2:
                continue  # too few trials where it acts to say anything of it
            quantile = min(0.5, max(0.1, 3 / len(sub)))
            scores |= _importances(sub, [key], domains, best, mode,
                                   PedAnovaImportanceEvaluator(target_quantile=quantile), normalize=False)
        if len(scores) < 2:
            raise ValueError(f"importance needs two searched keys each with at least {MIN_TRIALS} finished trials "
                             f"where it acts and two values or more there; of {', '.join(keys)}, "
                             f"{', '.join(scores) or 'none'} has that")
        total = sum(scores.values())
        scores = {k: (v / total if total > 0 else 0.0) for k, v in scores.items()}
    out = pd.DataFrame({"key": list(scores), "importance": [float(v) for v in scores.values()], "method": method})
    if out["importance"].sum() <= 0:  # every trial equally good: nothing to attribute
        out["importance"] = 1 / len(out)
    return out.sort_values("importance", ascending=False, ignore_index=True)


def _importances(df: pd.DataFrame, keys: list[str], domains: dict[str, Domain], best: str, mode: str,
                 evaluator: Any, normalize: bool = True) -> dict[str, float]:
    """Optuna's importance of `keys` over the trials of `df` (a study made of them)."""
    import optuna
    from optuna.importance import get_param_importances

    dists, columns = {}, {}
    for key in keys:
        dists[key], columns[key] = _distribution(key, df[key], domains.get(key))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created in memory" line
    try:
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
        study.add_trials([
            optuna.trial.create_trial(params={k: columns[k][i] for k in keys}, distributions=dists,
                                      value=float(df[best].iloc[i]))
            for i in range(len(df))])
        with warnings.catch_warnings():  # normalize= is "experimental" in Optuna 4; PED-ANOVA's scores are final
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            scores = get_param_importances(study, evaluator=evaluator, params=keys, normalize=normalize)
        return {k: float(v) for k, v in scores.items()}
    finally:
        optuna.logging.set_verbosity(verbosity)


# ---------------------------------------------------------------- seed noise


def _welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Welch's t-test p-value (two-sided). Two groups without spread: 1 when equal, 0 when not."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return math.nan
    if np.var(a) == 0 and np.var(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    with warnings.catch_warnings():  # scipy warns of precision loss when one group has no spread
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def compare(trials: pd.DataFrame, domains: dict[str, Domain], metric: str, mode: str) -> pd.DataFrame:
    """One row per configuration (the searched keys without the seed) over its trials' best `metric`:
    mean, std, n, ci_low/ci_high (95%, Student t) and p_vs_best (Welch's t-test against the best
    configuration by mean; NaN for the best itself and where n < 2). Best first."""
    from scipy import stats

    best = f"best_{metric}"
    keys = config_keys(trials, domains)
    df = trials.assign(_value=pd.to_numeric(trials[best], errors="coerce")) if best in trials else trials
    df = df[np.isfinite(df["_value"])] if "_value" in df else df.iloc[0:0]
    cols = [*keys, "mean", "std", "n", "ci_low", "ci_high", "p_vs_best"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    labels = df[keys].apply(lambda col: col.map(_label)) if keys else pd.DataFrame(index=df.index)
    indexes = [g.index for _, g in labels.groupby(keys, dropna=False, sort=False)] if keys else [df.index]
    groups = [(idx, df.loc[idx, "_value"].to_numpy(float)) for idx in indexes]
    rows = []
    for idx, values in groups:
        n = len(values)
        mean = float(np.mean(values))
        std = float(np.std(values, ddof=1)) if n > 1 else math.nan
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
        row = {k: df.loc[idx[0], k] for k in keys}
        rows.append({**row, "mean": mean, "std": std, "n": n, "ci_low": mean - half, "ci_high": mean + half,
                     "_values": values})
    out = pd.DataFrame(rows).sort_values("mean", ascending=mode == "min", ignore_index=True)
    top = out.loc[0, "_values"]
    out["p_vs_best"] = [math.nan if i == 0 else _welch_p(v, top) for i, v in enumerate(out["_values"])]
    return out.drop(columns="_values")[cols]


# ---------------------------------------------------------------- early vs final


def _metric_by_epoch(curves: pd.DataFrame, metric: str) -> pd.DataFrame:
    if curves.empty or metric not in curves:
        return pd.DataFrame()
    return curves.pivot_table(index="trial_id", columns=M.EPOCH, values=metric, aggfunc="last")


def early_vs_final(curves: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per epoch: epoch, spearman (rank correlation of the metric at that epoch with the
    final one, over the trials that reached the last epoch) and n (those trials)."""
    from scipy import stats

    table = _metric_by_epoch(curves, metric)
    if table.empty:
        return pd.DataFrame(columns=[M.EPOCH, "spearman", "n"])
    last = table.columns.max()
    done = table[table[last].notna()]
    rows = []
    final = done[last].replace([np.inf, -np.inf], np.nan)
    for epoch in table.columns:
        now = done[epoch].replace([np.inf, -np.inf], np.nan)
        keep = now.notna() & final.notna()
        x, y = now[keep].to_numpy(float), final[keep].to_numpy(float)
        rho = math.nan
        if len(x) >= 3 and len(set(x)) > 1 and len(set(y)) > 1:
            rho = float(stats.spearmanr(x, y).statistic)
        rows.append({M.EPOCH: int(epoch), "spearman": rho, "n": int(keep.sum())})
    return pd.DataFrame(rows)


def settled_epoch(table: pd.DataFrame) -> Optional[int]:
    """The first epoch from which the rank correlation stays above SETTLED to the end, None if never."""
    rho = table.set_index(M.EPOCH)["spearman"]
    above = (rho > SETTLED).to_numpy()
    for i in range(len(above)):
        if above[i:].all():
            return int(rho.index[i])
    return None


def stopped_early(trials: pd.DataFrame, curves: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """The trials the scheduler stopped (ASHA/PBT's `stopped`), each beside the eventual best trial
    at the same epoch: stopped_at (epoch), value, best_value (the eventual best's metric at that
    epoch), rank (1 = best of all trials that reached that epoch) and `contender`, true when the
    stopped trial was at least as good as the eventual best was then: a trial that may have been
    cut too soon."""
    cols = ["trial_id", "stopped_at", "value", "best_trial", "best_value", "rank", "of", "contender"]
    table = _metric_by_epoch(curves, metric)
    best_col = f"best_{metric}"
    if table.empty or "status" not in trials or best_col not in trials:
        return pd.DataFrame(columns=cols)
    finals = trials.set_index("trial_id")[best_col].pipe(_finite)
    if finals.empty:
        return pd.DataFrame(columns=cols)
    winner = finals.idxmax() if mode == "max" else finals.idxmin()
    rows = []
    for trial_id in trials.loc[trials["status"] == M.STOPPED, "trial_id"]:
        if trial_id not in table.index or trial_id == winner:
            continue
        curve = table.loc[trial_id].dropna()
        if curve.empty:
            continue
        epoch = int(curve.index.max())
        value = float(curve[epoch])
        at = table[epoch].dropna()
        better = (at > value).sum() if mode == "max" else (at < value).sum()
        ref = table.loc[winner].get(epoch, math.nan) if winner in table.index else math.nan
        contender = bool(np.isfinite(ref) and (value >= ref if mode == "max" else value <= ref))
        rows.append({"trial_id": trial_id, "stopped_at": epoch, "value": value, "best_trial": winner,
                     "best_value": float(ref), "rank": int(better) + 1, "of": len(at), "contender": contender})
    return pd.DataFrame(rows, columns=cols)
