"""A readable report of a sweep: report.md with PNG figures, plus the Parquet tables.

    python -m cifar_ray.report results/quickstart [--out DIR] [--evaluate-best] [--data SOURCE]
"""
from __future__ import annotations

import argparse
import errno
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from cifar_ray import metrics as M
from cifar_ray.analysis import AnalysisError, Sweep, load, ranked, write_parquet
from cifar_ray.applies import CONDITIONS, acts, row_config
from cifar_ray.figures import format_cell, markdown_table, md, pyplot, save_figure
from cifar_ray.files import atomic_write_text, printable
from cifar_ray.insight import distinct_values
from cifar_ray.pipes import run_main
from cifar_ray.record import CURVES_FILE, PACK, TRIALS_FILE

TOP_CURVES = 5  # trials drawn in the learning-curve figure
LEGEND_CHARS = 60  # a longer configuration would cover the plot: the legend names the trial instead
REPORT_FILE = "report.md"
TEST_REPORT_FILE = "test_report.txt"
FIGURES = ("curves.png", "heatmap.png", "architectures.png", "per_class.png", "confusion.png", "importance.png",
           "seeds.png", "parallel.png", "early_vs_final.png")
WRITTEN = (REPORT_FILE, TEST_REPORT_FILE, TRIALS_FILE, CURVES_FILE, *FIGURES)  # every name the report writes



def searched_keys(trials: pd.DataFrame) -> list[str]:
    """Config columns that vary between trials (train.seed aside)."""
    cols = [c for c in trials.columns if "." in c and c != "train.seed"]
    return [c for c in cols if distinct_values(trials[c]) > 1]


def inert_as_dash(table: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """The trial table as the report prints it: '-' where a key does nothing in the trial (an Adam trial's
    momentum; cifar_ray.applies), read against the trial's whole config."""
    configs = {row["trial_id"]: row_config(row) for _, row in trials.iterrows()}
    out = table.astype(object)
    for col in [c for c in table.columns if c in CONDITIONS]:
        out[col] = [v if acts(col, configs.get(t, {})) else "-" for t, v in zip(table["trial_id"], table[col],
                                                                                  strict=True)]
    return out


def trial_table(sweep: Sweep, trials: pd.DataFrame) -> pd.DataFrame:
    best = f"best_{sweep.metric}"
    cols = ["trial_id", "status", *searched_keys(trials), best, sweep.metric, "epochs", "seconds"]
    if "train.seed" in trials and trials["train.seed"].nunique() > 1:
        cols.insert(2, "train.seed")
    if "host" in trials and trials["host"].nunique() > 1:  # trials ran on several machines
        cols.append("host")
    if "node_type" in trials and trials["node_type"].notna().any():  # on a cluster with node types
        cols.append("node_type")
    table = trials[[c for c in cols if c in trials]].copy()
    return ranked(table, best, sweep.mode)


def curve_label(trial_id: str, settings: list[str]) -> str:
    """A curve's legend entry: its searched settings where they are short, else its trial id (the
    report's trial table gives the configuration; a sweep of ten keys would fill the plot)."""
    label = ", ".join(settings)
    return label if label and len(label) <= LEGEND_CHARS else trial_id


def plot_curves(sweep: Sweep, trials: pd.DataFrame, curves: pd.DataFrame, out: Path) -> Optional[Path]:
    if curves.empty:
        return None
    plt = pyplot()
    top = trial_table(sweep, trials)["trial_id"].head(TOP_CURVES)
    keys = searched_keys(trials)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, trial_id in enumerate(top):
        c = curves[curves["trial_id"] == trial_id].drop_duplicates(M.EPOCH, keep="last")
        row = trials.set_index("trial_id").loc[trial_id]
        label = curve_label(trial_id, [f"{k.split('.', 1)[1]}={format_cell(row[k])}" for k in keys
                                       if acts(k, row_config(row))])  # an Adam trial's curve has no momentum
        color = f"C{i}"
        ax_acc.plot(c[M.EPOCH], 100 * c[M.VAL_ACC], color=color, marker="o", label=f"{label} (val)")
        if M.TRAIN_ACC in c:  # a trainable reports what it measures; the engine's report both
            ax_acc.plot(c[M.EPOCH], 100 * c[M.TRAIN_ACC], color=color, linestyle="--", alpha=0.7)
        if M.VAL_LOSS in c:
            ax_loss.plot(c[M.EPOCH], c[M.VAL_LOSS], color=color, marker="o", label=label)
    ax_acc.set(title=f"Accuracy of the top {len(top)} trials (solid: validation, dashed: train)",
               xlabel="epoch", ylabel="accuracy (%)")
    ax_loss.set(title="Validation loss", xlabel="epoch", ylabel="cross-entropy loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in (ax_acc, ax_loss):
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out / "curves.png")


def heatmap_grid(metric: str, trials: pd.DataFrame) -> Optional[pd.DataFrame]:
    """The best metric over a grid of two numeric searched keys (rows: the first, columns: the second),
    seeds averaged; a configuration without a result yet (a running sweep) is a NaN cell, not a row or
    column left out. None when the sweep is no such grid or nothing has a result yet."""
    keys = [k for k in searched_keys(trials) if pd.api.types.is_numeric_dtype(trials[k])]
    if len(keys) != 2 or len(searched_keys(trials)) != 2:
        return None
    grid = trials.pivot_table(index=keys[0], columns=keys[1], values=f"best_{metric}", aggfunc="mean", dropna=False)
    return grid if np.isfinite(grid.to_numpy(dtype=float)).any() else None


def plot_heatmap(sweep: Sweep, trials: pd.DataFrame, out: Path) -> Optional[Path]:
    """The metric over a grid of two numeric keys (the seed's lr x momentum); seeds averaged."""
    grid = heatmap_grid(sweep.metric, trials)
    if grid is None:
        return None
    keys = [grid.index.name, grid.columns.name]
    plt = pyplot()
    scale = 100 if sweep.metric.endswith("acc") else 1
    fig, ax = plt.subplots(figsize=(1.2 * len(grid.columns) + 3, 0.8 * len(grid.index) + 2))
    im = ax.imshow(grid.values * scale, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(grid.columns)), [format_cell(v) for v in grid.columns])
    ax.set_yticks(range(len(grid.index)), [format_cell(v) for v in grid.index])
    lo, hi = im.get_clim()
    for i in range(len(grid.index)):
        for j in range(len(grid.columns)):
            v = grid.values[i, j] * scale
            if math.isnan(v):  # not reported yet, or every trial of it errored
                ax.text(j, i, "no result", ha="center", va="center", color="0.5", fontsize=8)
                continue
            bright = hi > lo and (v - lo) / (hi - lo) > 0.6  # viridis turns yellow: dark text there
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="k" if bright else "w", fontsize=9)
    unit = " (%)" if scale == 100 else ""
    ax.set(title=f"Best {sweep.metric}{unit} per configuration", xlabel=keys[1], ylabel=keys[0])
    fig.colorbar(im, ax=ax, label=f"{sweep.metric}{unit}")
    fig.tight_layout()
    return save_figure(fig, out / "heatmap.png")


def plot_architectures(sweep: Sweep, trials: pd.DataFrame, curves: pd.DataFrame, out: Path) -> Optional[Path]:
    if "model.name" not in trials or trials["model.name"].nunique() < 2:
        return None
    from cifar_ray.config import ConfigError, TrialConfig
    from cifar_ray.models import ModelError, build_model
    from cifar_ray.models.stats import count_parameters

    plt = pyplot()
    best = f"best_{sweep.metric}"
    per_epoch = (curves.groupby("trial_id")[M.EPOCH_SECONDS].mean() if M.EPOCH_SECONDS in curves
                 else pd.Series(dtype=float))
    df = trials.assign(sec_per_epoch=trials["trial_id"].map(per_epoch))
    by_model = df.groupby("model.name").agg(best=(best, "max"), sec=("sec_per_epoch", "mean"),
                                            mem=(M.PEAK_MEMORY_MB, "max"))
    opts = {k.split(".", 1)[1] for k in trials.columns if k.startswith("model.") and k != "model.name"}
    params = {}
    for name in by_model.index:
        row = trials[trials["model.name"] == name].iloc[0]
        options = {f"model.{k}": row[f"model.{k}"] for k in opts if pd.notna(row[f"model.{k}"])}
        try:  # the folder's values go through the schema (known model, bounded width) before anything is built
            model = TrialConfig.from_flat({"model.name": name, **options}).model
            params[name] = count_parameters(build_model(model.name, **model.options())) / 1e6
        except (ConfigError, ModelError):
            params[name] = math.nan
    by_model["params"] = pd.Series(params)
    by_model = by_model.sort_values("best", ascending=False)
    scale = 100 if sweep.metric.endswith("acc") else 1
    panels = [("best", f"best {sweep.metric}" + (" (%)" if scale == 100 else ""), scale),
              ("sec", "seconds per epoch (s)", 1), ("mem", "peak memory (MiB)", 1),
              ("params", "parameters (millions)", 1)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.5))
    for ax, (col, label, k) in zip(axes, panels, strict=True):
        ax.bar(by_model.index, by_model[col] * k, color="C0")
        ax.set(title=label, xlabel="model", ylabel=label)
        ax.tick_params(axis="x", rotation=45)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Architectures compared")
    fig.tight_layout()
    return save_figure(fig, out / "architectures.png")


def plot_evaluation(ev, out: Path) -> tuple[Path, Path]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = list(ev.class_accuracy)
    ax.bar(names, [100 * v for v in ev.class_accuracy.values()], color="C2")
    ax.axhline(100 * ev.accuracy, color="k", linestyle="--", label=f"overall {100 * ev.accuracy:.1f}%")
    ax.set(title=f"Per-class test accuracy of the best trial ({ev.count} images)", xlabel="class",
           ylabel="accuracy (%)",
           ylim=(0, 100))
    ax.tick_params(axis="x", rotation=45)
    ax.legend()
    fig.tight_layout()
    per_class = save_figure(fig, out / "per_class.png")

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    cm = ev.confusion
    rates = cm / cm.sum(axis=1, keepdims=True).clip(min=1)
    im = ax.imshow(100 * rates, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="w" if rates[i, j] > 0.5 else "k")
    ax.set(title="Confusion matrix on test (counts; colour: % of the true class)", xlabel="predicted class",
           ylabel="true class")
    fig.colorbar(im, ax=ax, label="% of true class")
    fig.tight_layout()
    return per_class, save_figure(fig, out / "confusion.png")


def decision_sections(sweep: Sweep, trials: pd.DataFrame, out: Path) -> list[str]:
    """What mattered, is the winner real, all trials at once, when the ranking settled."""
    from cifar_ray import report_sections as R

    return [*R.importance_section(sweep, out), *R.seeds_section(sweep, trials, out),
            *R.parallel_section(sweep, trials, out), *R.settled_section(sweep, trials, out)]


class ReportError(ValueError):
    """A report that cannot be written safely where it was asked for."""


def output_folder(sweep: Sweep, out: Optional[str]) -> Path:
    """The report's folder, refused when it or any file the report writes there is a symbolic link:
    the report replaces its own files and never writes through a link."""
    out_dir = Path(out) if out else sweep.path / "report"
    if out_dir.is_symlink():
        raise ReportError(f"{out_dir} is a symbolic link; refusing to write the report through it (remove it, "
                          "or choose --out)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"{out_dir} exists and is not a folder; choose --out")
    links = [name for name in WRITTEN if (out_dir / name).is_symlink()]
    if links:
        raise ReportError(f"{out_dir}: {', '.join(links)} is a symbolic link; refusing to overwrite it "
                          "(remove it, or choose --out)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the commands' one line for a full disk (cifar_ray.pipes)
        raise ReportError(f"{printable(out_dir)}: cannot make the report's folder there ({err.strerror}); "
                          "choose --out") from None
    return out_dir


def write_report(results: str, out: Optional[str] = None, evaluate_best: bool = False,
                 data: Optional[str] = None) -> Path:
    from cifar_ray.evaluation import format_report

    sweep = load(results)
    out_dir = output_folder(sweep, out)
    trials, curves = sweep.trials(), sweep.curves()
    write_parquet(trials, out_dir / TRIALS_FILE)
    write_parquet(curves, out_dir / CURVES_FILE)
    counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    md_lines = [f"# Sweep {md(sweep.path.name)}", "",
                f"{len(trials)} trials ({', '.join(f'{n} {md(s)}' for s, n in sorted(counts.items()))}); "
                f"metric {md(sweep.metric)} ({md(sweep.mode)}).", ""]
    state = state_line(sweep.driver(), int((trials["status"] == M.UNFINISHED).sum()) if len(trials) else 0)
    md_lines += [state, ""] if state else []
    try:
        best = sweep.best()
        # a searched key the trial does not have (Optuna asks for it only where it acts) shows as '-' too
        shown = ", ".join(f"{md(k)}={md(best.config[k]) if k in best.config and acts(k, best.config) else '-'}"
                          for k in searched_keys(trials))
        md_lines += [f"Best trial: {md(best.trial_id)}, {md(sweep.metric)} {best.score:.4f}"
                     + (f" ({shown})" if shown else ""), ""]
    except AnalysisError as err:
        best = None
        md_lines += [f"No best trial yet: {md(err)}", ""]
    md_lines += ["## Trials", "", markdown_table(inert_as_dash(trial_table(sweep, trials), trials)), ""]
    fused = PACK in trials and bool(trials[PACK].notna().any())
    figures = [("Learning curves", plot_curves(sweep, trials, curves, out_dir)),
               ("Grid", plot_heatmap(sweep, trials, out_dir)),
               ("Architectures", plot_architectures(sweep, trials, curves, out_dir))]
    notes = {"Architectures": "The trials trained fused (`resources.fuse`): a member's seconds per epoch and "
                              "peak memory are its pack's, all its members at once, so the bars compare "
                              "packs; `trials()` has the `pack` column."} if fused else {}
    if evaluate_best and best is not None:
        ev = sweep.evaluate(best.trial_id, "test", data=data)
        text = format_report(ev, "test")
        atomic_write_text(out_dir / TEST_REPORT_FILE, text + "\n")
        per_class, confusion = plot_evaluation(ev, out_dir)
        checkpoint = md(best.checkpoint.name) if best.checkpoint else "none"
        md_lines += [f"## Best trial on the test set ({md(best.trial_id)}, checkpoint {checkpoint})", "",
                     "```", text, "```", ""]
        figures += [("Per-class test accuracy", per_class), ("Confusion matrix", confusion)]
    for title, path in figures:
        if path is not None:
            md_lines += [f"## {title}", "", *([notes[title], ""] if title in notes else []),
                         f"![{title}]({path.name})", ""]
    md_lines += decision_sections(sweep, trials, out_dir)
    md_lines += provenance_lines(sweep.provenance())
    md_lines += [f"Tables: `{TRIALS_FILE}`, `{CURVES_FILE}` (read with `pandas.read_parquet`)."]
    text = "\n".join(md_lines) + "\n"
    # a figure or test report of an earlier report that this one does not show (a heatmap before any
    # result, the test set's without --evaluate-best this time) would sit beside it, out of date
    for name in (*FIGURES, TEST_REPORT_FILE):
        if f"]({name})" not in text and not (name == TEST_REPORT_FILE and evaluate_best and best is not None):
            (out_dir / name).unlink(missing_ok=True)
    return atomic_write_text(out_dir / REPORT_FILE, text)


def state_line(driver: Optional[str], unfinished: int) -> str:
    """Whether the sweep is running now (a driver holds its folder) or was interrupted (trials unfinished
    and no driver): its `unfinished` trials read alike in the table. '' for a sweep that ended."""
    if driver:
        return (f"Running: a sweep driver holds this folder ({md(driver)}); the tables and figures are as of "
                "this report.")
    if unfinished:  # a copy of a folder whose sweep runs elsewhere holds no driver either
        return (f"Interrupted: {unfinished} trial{'s' if unfinished != 1 else ''} unfinished and no sweep driver "
                "holds this folder; the sweep's `--resume` continues it (a copy of a folder whose sweep runs "
                "elsewhere reads so too).")
    return ""


def provenance_lines(record: dict) -> list[str]:
    """The report's account of what made the folder: commit, changes, versions, each resume's."""
    lines = ["## Provenance", ""]
    if not record:
        return lines + ["Not recorded: the folder was written before sweeps kept provenance.json.", ""]

    def entry(e: dict) -> str:
        commit = md(str(e.get("commit"))[:12]) if e.get("commit") else "not a git checkout"
        dirty = f", with {md(e.get('changed_count', 0))} uncommitted change(s)" if e.get("dirty") else ""
        versions = e.get("versions")
        versions = versions if isinstance(versions, dict) else {}
        shown = ", ".join(f"{md(k)} {md(v)}" for k, v in versions.items() if v is not None)
        return f"{md(e.get('at'))} on {md(e.get('driver_host'))}: commit {commit}{dirty}; {shown}"

    first = "started" if record.get("kind", "start") == "start" else "resumed (the first run kept no record)"
    lines.append(f"- {first} {entry(record)}")
    for resumed in record.get("resumed") or []:
        if isinstance(resumed, dict):
            lines.append(f"- resumed {entry(resumed)}")
    return lines + [""]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cifar_ray.report", description="Write a sweep's report.")
    p.add_argument("results", help="the sweep's results folder, e.g. results/quickstart")
    p.add_argument("--out", help="output folder (default RESULTS/report)")
    p.add_argument("--evaluate-best", action="store_true", help="evaluate the best checkpoint on the test set")
    p.add_argument("--data", help="data source for --evaluate-best when the sweep's is not at hand here")
    args = p.parse_args(argv)
    from cifar_ray.config import ConfigError
    from cifar_ray.data import DataError

    try:
        report = write_report(args.results, args.out, args.evaluate_best, args.data)
    except (AnalysisError, ConfigError, DataError, ReportError) as err:
        print(f"error: {printable(err)}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
