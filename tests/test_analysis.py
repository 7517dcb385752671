"""Analysis and report on small real sweeps (synthetic data, local Ray, W&B offline)."""
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cifar_ray import analysis
from cifar_ray.analysis import AnalysisError
from cifar_ray.report import main as report_main
from cifar_ray.sweep import main as sweep_main
from conftest import WAIT_S, write_sweep


@pytest.fixture(scope="module")
def grid_sweep(ray_session, tmp_path_factory):
    """lr x momentum grid, two seeds: 8 trials with checkpoints."""
    tmp = tmp_path_factory.mktemp("grid")
    path = write_sweep(tmp, "lrmom", train__lr={"grid": [0.01, 0.05]}, train__momentum={"grid": [0.5, 0.9]},
                       seeds=[0, 1], checkpoint={"keep": 2})
    assert sweep_main([str(path), "--storage-path", str(tmp / "results")]) == 0
    return tmp / "results" / "lrmom"


@pytest.fixture(scope="module")
def models_sweep(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    path = write_sweep(tmp, "models", model={"name": {"grid": ["base", "net3"]}}, train__epochs=1)
    assert sweep_main([str(path), "--storage-path", str(tmp / "results")]) == 0
    return tmp / "results" / "models"


def test_trials_one_row_per_trial_with_searched_keys(grid_sweep):
    df = analysis.load(grid_sweep).trials()
    assert len(df) == 8 and df["trial_id"].is_unique
    for col in ("train.lr", "train.momentum", "train.seed", "status", "val_acc", "best_val_acc", "epochs", "seconds",
                "node", "host"):
        assert col in df
    import socket

    assert set(df["host"]) == {socket.gethostname()}  # the local Ray: every trial on this machine
    assert df["node"].str.fullmatch(r"\d+\.\d+\.\d+\.\d+").all()  # the node's address
    assert set(zip(df["train.lr"], df["train.momentum"], df["train.seed"], strict=True)) == {
        (lr, m, s) for lr in (0.01, 0.05) for m in (0.5, 0.9) for s in (0, 1)}
    assert (df["status"] == "completed").all() and (df["epochs"] == 2).all()


def test_curves_one_row_per_trial_epoch(grid_sweep):
    sweep = analysis.load(grid_sweep)
    curves = sweep.curves()
    assert len(curves) == 8 * 2
    assert set(curves.groupby("trial_id")["epoch"].apply(tuple)) == {(1, 2)}
    assert "val_class_acc/airplane" in curves
    final = curves[curves["epoch"] == 2].set_index("trial_id")["val_acc"]
    trials = sweep.trials().set_index("trial_id")["val_acc"]
    assert np.allclose(final.sort_index(), trials.sort_index())


def curves_max(sweep, column: str) -> float:
    return float(sweep.curves()[column].max())


def test_best_agrees_with_a_plain_sort(grid_sweep):
    sweep = analysis.load(grid_sweep)
    df = sweep.trials()
    best = sweep.best()
    # a plain sort, ties to the lowest trial id (the documented rule, analysis.ranked)
    def first(column, ascending):
        top = df[column].min() if ascending else df[column].max()
        return sorted(df.loc[df[column] == top, "trial_id"])[0]

    assert best.trial_id == first("best_val_acc", ascending=False)
    assert sweep.best(scope="last").trial_id == first("val_acc", ascending=False)
    assert sweep.best(metric="val_loss", mode="min", scope="last").trial_id == first("val_loss", ascending=True)
    assert best.checkpoint is not None and (best.checkpoint / "state.pt").exists()
    # its config is the trial's own, in plain Python values: what a user saves as JSON or passes on
    row = df.set_index("trial_id").loc[best.trial_id]
    assert json.loads(json.dumps(best.config)) == best.config
    # a metric or mode that is not one is refused by name (mode "up" was taken for min, a typo for "none yet")
    with pytest.raises(AnalysisError, match="metric: 'val_ac' is not a reported metric; reported: train_loss"):
        sweep.best(metric="val_ac")
    with pytest.raises(AnalysisError, match="mode: 'up' is not one of max, min"):
        sweep.best(mode="up")
    assert sweep.best(metric="val_class_acc/cat").score == curves_max(sweep, "val_class_acc/cat")
    assert best.config == {k: row[k] for k in best.config} and {"train.lr", "train.momentum"} <= set(best.config)


def test_aggregate_over_seeds(grid_sweep):
    agg = analysis.load(grid_sweep).trials(aggregate=True)
    assert len(agg) == 4
    assert (agg["val_acc_count"] == 2).all()
    df = analysis.load(grid_sweep).trials()
    one = df[(df["train.lr"] == 0.05) & (df["train.momentum"] == 0.9)]["val_acc"]
    row = agg[(agg["train.lr"] == 0.05) & (agg["train.momentum"] == 0.9)].iloc[0]
    assert row["val_acc_mean"] == pytest.approx(one.mean()) and row["val_acc_std"] == pytest.approx(one.std())


def test_evaluate_reproduces_the_reported_accuracy(grid_sweep):
    sweep = analysis.load(grid_sweep)
    best = sweep.best()
    from cifar_ray.engine import load_state

    epoch = load_state(best.checkpoint / "state.pt")["epoch"]
    curves = sweep.curves()
    reported = curves[(curves["trial_id"] == best.trial_id) & (curves["epoch"] == epoch)]["val_acc"].iloc[0]
    ev = sweep.evaluate(best.trial_id, split="val")
    assert ev.accuracy == pytest.approx(reported, abs=1e-9)
    test = sweep.evaluate(best.trial_id, split="test")
    assert test.count == 200 and 0 <= test.accuracy <= 1
    # a split or device that is not one is named before any checkpoint or data is read
    with pytest.raises(AnalysisError, match="split: 'train' is not one of test, val"):
        sweep.evaluate(split="train")
    with pytest.raises(AnalysisError, match="device: unknown device 'gpu'; allowed: auto, cpu, cuda, cuda:N, mps"):
        sweep.evaluate(device="gpu")  # was torch's RuntimeError listing its 20 device types


def test_parquet_round_trip(grid_sweep, tmp_path):
    sweep = analysis.load(grid_sweep)
    trials_path, curves_path = sweep.to_parquet(tmp_path / "out")
    for path, frame in ((trials_path, sweep.trials()), (curves_path, sweep.curves())):
        table = pq.read_table(path)
        back = table.to_pandas()
        assert list(back.columns) == list(frame.columns)
        pd.testing.assert_frame_equal(back, frame, check_dtype=False)
        assert pq.read_schema(path) == table.schema


def test_a_copied_sweep_folder_still_loads(grid_sweep, tmp_path):
    copy = tmp_path / "elsewhere" / "lrmom"
    shutil.copytree(grid_sweep, copy)
    sweep = analysis.load(copy)
    assert len(sweep.trials()) == 8
    assert str(sweep.best().checkpoint).startswith(str(copy))
    assert sweep.evaluate(split="val").count == 200


def test_evaluate_picks_again_when_tune_removes_the_checkpoint_it_picked(grid_sweep, tmp_path, monkeypatch):
    """A running sweep's Tune removes a checkpoint that drops out of the best `checkpoint.keep` at any
    moment, so one can go between evaluate's pick and its read: it picks again from those left and
    evaluates that one (FileNotFoundError before); a trial left with none gets the plain error."""
    copy = tmp_path / "lrmom"
    shutil.copytree(grid_sweep, copy)
    sweep = analysis.load(copy)
    trial = sweep.best().trial_id
    assert len(sweep.checkpoints(trial)) == 2  # checkpoint.keep: 2
    pick = analysis.Sweep._best_checkpoint
    picked: list[Path] = []

    def pick_then_lose_it(self, *args, **kwargs):
        ckpt = pick(self, *args, **kwargs)
        picked.append(ckpt)
        if len(picked) == 1:  # Tune's rotation, right after the pick
            shutil.rmtree(ckpt)
        return ckpt

    monkeypatch.setattr(analysis.Sweep, "_best_checkpoint", pick_then_lose_it)
    ev = sweep.evaluate(trial, split="val")
    assert len(picked) == 2 and picked[1] != picked[0] and picked[1].is_dir()
    from cifar_ray.engine import load_state

    epoch = load_state(picked[1] / "state.pt")["epoch"]  # the one evaluated: its reported accuracy
    curves = sweep.curves()
    reported = curves[(curves["trial_id"] == trial) & (curves["epoch"] == epoch)]["val_acc"].iloc[0]
    assert ev.accuracy == pytest.approx(reported, abs=1e-9)

    picked.clear()  # its one checkpoint left goes right after the pick too: none is left to pick
    with pytest.raises(AnalysisError, match=f"trial {trial} has no checkpoint to evaluate"):
        sweep.evaluate(trial, split="val")
    assert len(picked) == 2


def test_clear_errors(grid_sweep, tmp_path):
    with pytest.raises(AnalysisError, match="no such folder"):
        analysis.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="not a sweep folder"):
        analysis.load(tmp_path / "empty")
    sweep = analysis.load(grid_sweep)
    with pytest.raises(AnalysisError, match="no trial 'abc'"):
        sweep.evaluate("abc")
    # a trial is named as the console and the results folder show it: its id, its folder or the id's end
    rec = sweep.records()[3]
    assert sweep.checkpoints(rec.folder.name) == sweep.checkpoints(rec.trial_id) == sweep.checkpoints(
        rec.trial_id[-5:]) != []
    copy = tmp_path / "nockpt" / "lrmom"
    shutil.copytree(grid_sweep, copy)
    for ckpt in copy.glob("*/checkpoint_*"):
        shutil.rmtree(ckpt)
    with pytest.raises(AnalysisError, match="has no checkpoint"):
        analysis.load(copy).evaluate()


def test_errored_and_diverged_trials_are_kept_and_nan_never_wins(ray_session, tmp_path):
    path = write_sweep(tmp_path, "mixed", train__lr={"grid": [0.05, 10.0]}, train__momentum=0.99,
                       train__batch_size=16, train__epochs=2)
    assert sweep_main([str(path), "--storage-path", str(tmp_path / "results")]) == 0
    sweep = analysis.load(tmp_path / "results" / "mixed", metric="train_loss", mode="min")
    df = sweep.trials()
    assert set(df["status"]) == {"completed", "diverged"}
    assert math.isnan(df.set_index("train.lr").loc[10.0, "train_loss"])
    assert sweep.best(scope="last").config["train.lr"] == 0.05


def _report_images(md: Path) -> list[str]:
    import re

    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text())


def test_report_writes_markdown_figures_and_tables(grid_sweep, tmp_path):
    out = tmp_path / "report"
    assert report_main([str(grid_sweep), "--out", str(out), "--evaluate-best"]) == 0
    md = out / "report.md"
    images = _report_images(md)
    assert set(images) == {"curves.png", "heatmap.png", "per_class.png", "confusion.png", "importance.png",
                           "seeds.png", "parallel.png", "early_vs_final.png"}
    for name in images:
        assert (out / name).stat().st_size > 5000
    text = md.read_text()
    for section in ("What mattered", "Is the winner real", "All trials at once", "When the ranking settled"):
        assert f"## {section}" in text
    assert "(95% interval, 2 seeds)" in text and "Welch's t-test p = " in text  # the grid ran two seeds
    assert "Accuracy of the network on the 200 test images:" in text
    assert "| trial_id | status |" in text
    assert (out / "trials.parquet").exists() and (out / "curves.parquet").exists()


def test_report_compares_architectures(models_sweep, tmp_path):
    out = tmp_path / "report"
    assert report_main([str(models_sweep), "--out", str(out)]) == 0
    assert "architectures.png" in _report_images(out / "report.md")
    assert "heatmap.png" not in _report_images(out / "report.md")


def test_report_bad_path_exits_2(tmp_path, capsys):
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


# ---------------------------------------------------------------- results folders from elsewhere

class Payload:
    """A pickle that runs a command when loaded: what a hostile folder plants in Tune's state."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickle_state(folder: Path, marker: Path, keep_others: bool = True) -> Path:
    """A newer experiment_state file whose trials' pickled fields run code when Ray unpickles them."""
    states = sorted(folder.glob("experiment_state-*.json"))
    doc = json.loads(states[-1].read_text())
    evil = pickle.dumps(Payload(marker)).hex()
    for entry in doc["trial_data"]:
        trial = json.loads(entry[0])
        trial["results"] = trial["extra_arg"] = evil
        entry[0] = json.dumps(trial)
    if not keep_others:
        for p in states:
            p.unlink()
    planted = folder / "experiment_state-2099-01-01_00-00-00.json"
    planted.write_text(json.dumps(doc))
    return planted


def _every_reader(folder: Path, out: Path) -> None:
    sweep = analysis.load(folder)
    sweep.trials(), sweep.curves()
    try:
        sweep.best()
    except AnalysisError:
        pass
    assert report_main([str(folder), "--out", str(out)]) == 0


@pytest.mark.parametrize("keep_others", [True, False], ids=["newer_state_file", "only_state_file"])
def test_a_planted_pickle_never_runs(grid_sweep, tmp_path, keep_others):
    folder = tmp_path / "copy" / "lrmom"
    shutil.copytree(grid_sweep, folder)
    marker = tmp_path / "pwned"
    _plant_pickle_state(folder, marker, keep_others)
    (folder / "tuner.pkl").write_bytes(pickle.dumps(Payload(marker)))
    if not keep_others:
        for trial_dir in folder.glob("base_*"):
            shutil.rmtree(trial_dir)
    honest = analysis.load(grid_sweep).trials()
    _every_reader(folder, tmp_path / "report")
    assert not marker.exists(), "code from the results folder ran"
    got = analysis.load(folder).trials()
    if keep_others:  # the honest data is still read
        pd.testing.assert_frame_equal(got.drop(columns="status"), honest.drop(columns="status"))
    else:  # the state file alone: its trials and their last results, read as plain JSON
        assert list(got["trial_id"]) == list(honest["trial_id"]) and list(got["epochs"]) == list(honest["epochs"])


def test_report_refuses_links_it_did_not_create(grid_sweep, tmp_path, capsys):
    folder = tmp_path / "copy" / "lrmom"
    shutil.copytree(grid_sweep, folder)
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / "report").symlink_to(outside)
    assert report_main([str(folder)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert list(outside.iterdir()) == []

    (folder / "report").unlink()
    (folder / "report").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (folder / "report" / "report.md").symlink_to(victim)
    assert report_main([str(folder)]) == 2
    assert "report.md is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in (folder / "report").iterdir()) == ["report.md"]  # nothing half-written


def test_a_linked_error_file_is_not_read(grid_sweep, tmp_path, capsys):
    folder = tmp_path / "copy" / "lrmom"
    shutil.copytree(grid_sweep, folder)
    credentials = tmp_path / "credentials"
    credentials.write_text("aws_secret_access_key = CANARY-123\n")
    next(folder.glob("base_*")).joinpath("error.txt").symlink_to(credentials)
    with pytest.raises(AnalysisError, match="error.txt is a symbolic link"):
        analysis.load(folder).trials()
    assert report_main([str(folder), "--out", str(tmp_path / "report")]) == 2
    assert "symbolic link" in capsys.readouterr().err
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p != credentials]
    assert not any(b"CANARY-123" in p.read_bytes() for p in written)


def _rewrite_trial(trial_dir: Path, **config) -> None:
    """Set config values in every record of a trial (params.json and each row's config)."""
    params = json.loads((trial_dir / "params.json").read_text()) | config
    (trial_dir / "params.json").write_text(json.dumps(params))
    for name in ("history.jsonl", "result.json"):
        path = trial_dir / name
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            path.write_text("".join(json.dumps(r | {"config": r.get("config", {}) | config}) + "\n" for r in rows))


def test_crafted_values_are_escaped_in_the_report(grid_sweep, tmp_path):
    folder = tmp_path / "copy" / "lrmom"
    shutil.copytree(grid_sweep, folder)
    evil = "sgd|x` <script>alert(1)</script>\n# [click](http://example.invalid) $\\alpha$"
    _rewrite_trial(next(folder.glob("base_*")), **{"train.optimizer": evil})
    out = tmp_path / "report"
    assert report_main([str(folder), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "<script" not in text and not re.search(r"(?<!\\)\]\(http", text) and "\n# [click]" not in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    columns = {line.count("|") - line.count("\\|") for line in table}
    assert len(columns) == 1, "a value broke the table"
    assert "train.optimizer" in table[0]


def test_evaluate_takes_no_data_path_from_the_folder(grid_sweep, tmp_path, monkeypatch):
    folder = tmp_path / "copy" / "lrmom"
    shutil.copytree(grid_sweep, folder)
    planted_cache = tmp_path / "planted-cache"
    for trial_dir in folder.glob("base_*"):
        _rewrite_trial(trial_dir, **{"data.cache_dir": str(planted_cache), "data.data_dir": str(planted_cache)})
    sweep = analysis.load(folder)
    assert sweep.evaluate(split="val").count == 200
    assert not planted_cache.exists()

    for trial_dir in folder.glob("base_*"):
        _rewrite_trial(trial_dir, **{"data.source": str(tmp_path / "someone-elses-data")})
    with pytest.raises(AnalysisError, match="--data"):
        sweep.evaluate(split="val")
    assert sweep.evaluate(split="val", data="synthetic").count == 200


def test_reading_a_folder_needs_no_ray(grid_sweep, tmp_path):
    """Analysis and the report read files only: in a fresh process they never import Ray (whose
    readers unpickle the experiment state)."""
    code = ("import sys\nfrom cifar_ray import analysis, report\n"
            "sweep = analysis.load(sys.argv[1]); sweep.trials(); sweep.curves(); sweep.best()\n"
            "assert report.main([sys.argv[1], '--out', sys.argv[2]]) == 0\n"
            "print('ray imported:', 'ray' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code, str(grid_sweep), str(tmp_path / "report")],
                       capture_output=True, text=True, timeout=WAIT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ray imported: False" in r.stdout


def _epoch_of(checkpoint: Path) -> int:
    from cifar_ray.engine import load_state

    return int(load_state(Path(checkpoint) / "state.pt")["epoch"])


def test_ray_tunes_own_readers_agree_with_analysis(grid_sweep):
    """tune.ExperimentAnalysis and Tuner.restore(...).get_results() open a cifar_ray results folder and
    pick the same best trial and checkpoint as analysis (ties compared by their score)."""
    from ray import tune

    from cifar_ray.trainable import run_trial

    sweep = analysis.load(grid_sweep)
    best = sweep.best()
    curves = sweep.curves().set_index(["trial_id", "epoch"])["val_acc"]

    def same_pick(trial_id: str, checkpoint_path: str) -> None:
        if trial_id != best.trial_id:  # another trial with the same best score
            assert curves.loc[trial_id].max() == best.score
        assert curves.loc[(trial_id, _epoch_of(checkpoint_path))] == curves.loc[(best.trial_id, _epoch_of(
            best.checkpoint))]

    ea = tune.ExperimentAnalysis(str(grid_sweep))
    trial = ea.get_best_trial("val_acc", "max", scope="all")
    same_pick(trial.trial_id, ea.get_best_checkpoint(trial, "val_acc", "max").path)
    if trial.trial_id == best.trial_id:
        assert Path(ea.get_best_checkpoint(trial, "val_acc", "max").path) == best.checkpoint

    results = tune.Tuner.restore(str(grid_sweep), run_trial).get_results()
    assert len(results) == 8 and not results.errors
    result = results.get_best_result("val_acc", "max", scope="all")
    same_pick(result.metrics["trial_id"], result.get_best_checkpoint("val_acc", "max").path)
