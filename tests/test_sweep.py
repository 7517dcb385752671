"""Sweeps on a real local Ray (2 CPUs), synthetic data, W&B offline."""
import json
import re
import subprocess

import pytest
import yaml

from cifar_ray.space import build_space, grid_points
from cifar_ray.sweep import main
from cifar_ray.sweep_config import read_sweep
from conftest import (
    SLOWER_DATA,
    SweepProcess,
    assert_records_agree,
    result_rows,
    results_of,
    tune_statuses,
    wait_for,
    write_sweep,
)


def test_grid_of_four_completes_with_results_checkpoints_and_wandb(ray_session, tmp_path, capsys):
    path = write_sweep(tmp_path, "grid4", train__lr={"grid": [0.01, 0.05]}, train__momentum={"grid": [0.5, 0.9]},
                       train__epochs=3, checkpoint={"keep": 1})
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "4 completed" in out and "best trial" in out and "analysis.load(" in out
    df = results_of(tmp_path, "grid4")
    assert len(df) == 4 and set(df["status"]) == {"completed"}
    # trials start in the file's order, first key outermost: the order the dry run lists
    in_order = df.sort_values("trial_id")
    assert list(zip(in_order["train.lr"], in_order["train.momentum"], strict=True)) == [(0.01, 0.5), (0.01, 0.9),
                                                                                        (0.05, 0.5), (0.05, 0.9)]
    assert (df["epochs"] == 3).all() and df["val_acc"].between(0, 1).all()
    assert (df["best_val_acc"] >= df["val_acc"]).all()
    exp = tmp_path / "results" / "grid4"
    assert yaml.safe_load((exp / "sweep.yaml").read_text())["name"] == "grid4"
    for trial_dir in [p for p in exp.iterdir() if p.is_dir() and p.name.startswith("base_")]:
        ckpts = sorted(trial_dir.glob("checkpoint_*"))
        assert 1 <= len(ckpts) <= 2, ckpts  # keep=1 best by val_acc, plus the latest when it is not the best
        assert (ckpts[-1] / "state.pt").exists()
    assert len(list(exp.glob("wandb/wandb/offline-run-*/run-*.wandb"))) == 4
    assert_records_agree(exp)
    assert "Traceback" not in out
    # what made the folder: this checkout's commit and the versions imported here
    from importlib import metadata

    from cifar_ray import analysis

    made = analysis.load(exp).provenance()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert made["commit"] == head and made["kind"] == "start" and made["resumed"] == []
    assert isinstance(made["dirty"], bool)
    for name in ("cifar_ray", "torch", "ray", "wandb", "optuna"):
        assert made["versions"][name] == metadata.version(name)
    assert made["versions"]["python"] == ".".join(map(str, __import__("sys").version_info[:3]))


def test_trials_no_node_can_run_exit_4_before_anything_is_written(ray_session, tmp_path, capsys):
    path = write_sweep(tmp_path, "big", resources={"cpu": 64})
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 4
    err = capsys.readouterr().err
    # one message over several lines, each line as a line (it was printed with its newlines escaped)
    assert "error: no node of the cluster can ever run these trials (they would wait forever):\n  base: needs cpu=64" \
        in err, err
    assert "\\n" not in err and err.splitlines()[-1].startswith("lower the request in resources:")
    assert not (tmp_path / "results" / "big").exists()


def test_a_validation_split_larger_than_the_data_exits_2_before_any_trial(ray_session, tmp_path, capsys):
    # the driver has the data loaded: it refuses the split there, not through every trial erroring at its start
    path = write_sweep(tmp_path, "split", data={"source": "synthetic", "synthetic_size": 1200,
                                                "val_size": {"grid": [200, 5000]}})
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert "error: data.val_size: 5000 is not smaller than the" in err and "lower data.val_size" in err, err
    assert not (tmp_path / "results" / "split").exists()


BAD_LRS = [1e-6, 1.1e-6, 1.2e-6, 1.3e-6]  # trials that stay at chance accuracy


def test_asha_stops_a_bad_trial_early(ray_session, tmp_path):
    # The four bad trials are alike (same seed, lr near 1e-6: chance accuracy, each value once as a grid
    # must list it), and ASHA lets a trial that ties the cutoff through: started before the good ones,
    # they could all pass. So the good trials start first (order: given); every bad trial then meets a
    # rung they have raised.
    path = write_sweep(tmp_path, "asha", train__epochs=4, train__lr={"grid": [0.05, 0.04, *BAD_LRS]},
                       data__synthetic_size=2400,  # enough steps that the good trials beat chance by epoch 2
                       scheduler={"kind": "asha", "grace_period": 2, "reduction_factor": 2},
                       search={"order": "given"})
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 0
    df = results_of(tmp_path, "asha")
    assert len(df) == 6
    sweep = read_sweep(str(path))  # trials start in the order grid_points gives (the file's, here)
    assert list(df.sort_values("trial_id")["train.lr"]) == [p["train.lr"] for p in grid_points(build_space(sweep,
                                                                                                           "a"), sweep)]
    stopped = df[df["status"] == "stopped"]
    assert len(stopped) >= 1 and (stopped["epochs"] < 4).all()
    assert stopped["train.lr"].isin(BAD_LRS).any()
    assert df["epochs"].sum() < 6 * 4
    # every trial's W&B run is whole, the stopped ones and those that ran after them in a reused actor
    assert_records_agree(tmp_path / "results" / "asha")


def test_a_sweep_console_is_quiet(ray_session, tmp_path):
    """As a user runs it, piped to a file: a 4-trial sweep's console fits on a screen, with a line per
    trial event (`stopped` for trials ASHA ended), progress lines with an ETA, no Tune status table and no
    traceback, per-checkpoint line or state-snapshot warning."""
    path = write_sweep(tmp_path, "quiet", train__epochs=3, train__lr={"grid": [0.05, *BAD_LRS[:3]]},
                       data__synthetic_size=2400, scheduler={"kind": "asha", "grace_period": 1, "reduction_factor": 2},
                       search={"order": "given"})  # the good trial first: see test_asha_stops_a_bad_trial_early
    code, out = SweepProcess(path, tmp_path, ray_session).finish()
    assert code == 0, out
    for noise in ("Traceback", "Checkpoint successfully created", "snapshotting", "Exception ignored", "== Status ==",
                  "Result logdir", "driver_artifacts", "\r", "\x1b["):
        assert noise not in out, noise
    lines = out.splitlines()
    assert len(lines) < 40, out
    df = results_of(tmp_path, "quiet")
    stopped = df[df["status"] == "stopped"]
    assert len(stopped) >= 1
    for trial_id in df["trial_id"]:
        assert sum(line.startswith("started  ") and trial_id in line for line in lines) == 1, trial_id
        ended = [line for line in lines if line.startswith("ended    ") and trial_id in line]
        outcome = df.set_index("trial_id").loc[trial_id, "status"]
        assert len(ended) == 1 and f": {outcome} after " in ended[0], (ended, outcome)
    # the first trial's end gives a progress line with a measured ETA (at most: ASHA may stop trials)
    assert any(re.fullmatch(r"\d/4 done, \d running, \d pending \| best val_acc [\d.]+ \(base_\w+\) \| .* "
                            r"elapsed, ETA at most (\d+ min )?\d+ s", line) for line in lines), out
    assert re.fullmatch(r"4/4 done, 0 running, 0 pending \| .* elapsed, finished", next(
        line for line in lines if line.startswith("4/4 done"))), out


def test_a_grid_of_augment_policies_runs_each_trial_with_its_own_and_records_it(ray_session, tmp_path):
    """Mappings and a policy's name in one grid: Tune took a mapping in a grid point for nested keys and
    stopped the sweep (KeyError: 'hflip'), and trials.parquet refused the mixed column. Each trial
    trains with its policy: its curve is that of a sweep of that policy alone."""
    import pandas as pd

    from cifar_ray import analysis

    policies = [{"hflip": 0.5, "crop_padding": 2}, "flip_crop", {"alternate_flip": True}]
    path = write_sweep(tmp_path, "policies", train__epochs=1, data__augment={"grid": policies})
    alone = write_sweep(tmp_path, "alone", train__epochs=1, data__augment=policies[2])
    for p in (path, alone):
        assert main([str(p), "--storage-path", str(tmp_path / "results")]) == 0
    exp = tmp_path / "results" / "policies"
    sweep = analysis.load(exp)
    trials = sweep.trials().sort_values("trial_id")
    assert list(trials["data.augment"]) == policies and set(trials["status"]) == {"completed"}
    stored = pd.read_parquet(exp / "trials.parquet").sort_values("trial_id")  # a mapping as its JSON text
    assert [json.loads(v) if v.startswith("{") else v for v in stored["data.augment"]] == policies
    curves = sweep.curves().set_index("trial_id")
    own = curves.loc[trials["trial_id"].iloc[2]]
    straight = analysis.load(tmp_path / "results" / "alone").curves().iloc[0]
    for col in ("train_loss", "val_loss", "val_acc"):
        assert own[col] == straight[col], col
    assert curves["train_loss"].nunique() == 3  # three policies, three runs
    assert_records_agree(exp)


def test_configurations_over_seeds_run_as_listed_and_compare_over_their_seeds(ray_session, tmp_path):
    """Three whole configurations, two seeds each: every trial runs its configuration's values (its curve
    is that of a sweep of those values alone), and compare() groups the trials by configuration."""
    from cifar_ray import analysis

    configurations = [{}, {"train.lr": 0.01, "train.momentum": 0.5}, {"train": {"optimizer": "adam", "lr": 0.002}}]
    path = write_sweep(tmp_path, "listed", train__epochs=1, configurations=configurations, seeds=[0, 1])
    alone = write_sweep(tmp_path, "alone", train__epochs=1, train__lr=0.01, train__momentum=0.5, train__seed=1)
    for p in (path, alone):
        assert main([str(p), "--storage-path", str(tmp_path / "results")]) == 0
    exp = tmp_path / "results" / "listed"
    sweep = analysis.load(exp)
    trials = sweep.trials().sort_values("trial_id")
    keys = ["train.optimizer", "train.lr", "train.momentum", "train.seed"]
    assert [tuple(r) for r in trials[keys].itertuples(index=False)] == [
        ("sgd", 0.05, 0.9, 0), ("sgd", 0.05, 0.9, 1), ("sgd", 0.01, 0.5, 0), ("sgd", 0.01, 0.5, 1),
        ("adam", 0.002, 0.9, 0), ("adam", 0.002, 0.9, 1)]
    assert set(trials["status"]) == {"completed"}
    compared = sweep.compare()
    assert len(compared) == 3 and set(compared["n"]) == {2}
    assert {(r["train.optimizer"], r["train.lr"]) for _, r in compared.iterrows()} == {
        ("sgd", 0.05), ("sgd", 0.01), ("adam", 0.002)}
    own = sweep.curves().set_index("trial_id").loc[trials["trial_id"].iloc[3]]
    straight = analysis.load(tmp_path / "results" / "alone").curves().iloc[0]
    for col in ("train_loss", "val_loss", "val_acc"):
        assert own[col] == straight[col], col
    assert_records_agree(exp)



def test_optuna_asks_for_a_key_only_in_the_trials_where_it_acts(ray_session, tmp_path):
    """optimizer and momentum searched: Adam has no momentum, so Optuna proposes one only to SGD trials (a
    define-by-run space); each trial's record and the journal hold it where it acted, and it trained so."""
    from cifar_ray import analysis
    from conftest import journal_trials

    path = write_sweep(tmp_path, "acting", train__epochs=1, train__optimizer={"choice": ["sgd", "adam"]},
                       train__momentum={"uniform": [0.5, 0.95]}, train__lr={"loguniform": [0.001, 0.05]},
                       search={"kind": "optuna", "samples": 6, "seed": 0})
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 0
    exp = tmp_path / "results" / "acting"
    trials = analysis.load(exp).trials().set_index("trial_id")
    assert len(trials) == 6 and set(trials["status"]) == {"completed"}
    assert {"sgd", "adam"} <= set(trials["train.optimizer"]), trials["train.optimizer"]  # Optuna drew both
    journal = journal_trials(exp)
    for trial_id, row in trials.iterrows():
        params = json.loads(next(exp.glob(f"*_{trial_id}/params.json")).read_text())
        sgd = row["train.optimizer"] == "sgd"
        assert ("train.momentum" in params) == sgd, params  # asked only where it acts
        assert ("train.momentum" in journal[trial_id].params) == sgd, journal[trial_id].params
        if sgd:
            assert 0.5 <= params["train.momentum"] <= 0.95
    # an Adam trial trained as the same values without momentum in a sweep of their own
    adam = trials[trials["train.optimizer"] == "adam"].iloc[0]
    alone = write_sweep(tmp_path, "alone", train__epochs=1, train__optimizer="adam", train__lr=float(adam["train.lr"]))
    assert main([str(alone), "--storage-path", str(tmp_path / "results")]) == 0
    straight = analysis.load(tmp_path / "results" / "alone").curves().iloc[0]
    own = analysis.load(exp).curves().set_index("trial_id").loc[adam.name]
    for col in ("train_loss", "val_loss", "val_acc"):
        assert own[col] == straight[col], col
    assert_records_agree(exp)

def test_diverging_trial_is_diverged_while_others_finish(ray_session, tmp_path):
    path = write_sweep(tmp_path, "diverge", train__epochs=3, train__lr={"grid": [0.05, 10.0]}, train__momentum=0.99,
                       train__batch_size=16)
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 0
    df = results_of(tmp_path, "diverge").set_index("train.lr")
    assert df.loc[10.0, "status"] == "diverged"
    assert df.loc[0.05, "status"] == "completed" and df.loc[0.05, "epochs"] == 3
    assert_records_agree(tmp_path / "results" / "diverge")


def test_early_stopped_trial_keeps_its_outcome_and_whole_wandb_run(ray_session, tmp_path):
    # the settings of tests/test_train.py::test_early_stopping_on_val_loss
    path = write_sweep(tmp_path, "early", model={"name": "netconv", "dropout": 0.0},
                       data={"source": "synthetic", "synthetic_size": 2400, "val_size": 400, "train_size": 60},
                       train__epochs=40, train__early_stopping_patience=2)
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 0
    df = results_of(tmp_path, "early")
    assert df.loc[0, "status"] == "early_stopped" and df.loc[0, "epochs"] < 40
    exp = tmp_path / "results" / "early"
    outcome = json.loads(next(exp.glob("netconv_*/outcome.json")).read_text())
    assert outcome["status"] == "early_stopped" and outcome["epochs"] == df.loc[0, "epochs"]
    assert_records_agree(exp)


def test_impossible_request_exits_4_before_anything_starts(ray_session, tmp_path, capsys):
    path = write_sweep(tmp_path, "impossible", resources={"cpu": 1, "tags": {"tpu_v9": 1}})
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 4
    assert not (tmp_path / "results" / "impossible").exists()
    err = capsys.readouterr().err
    assert "no node of the cluster can ever run" in err and "tpu_v9=1" in err and "nodes:" in err
    path = write_sweep(tmp_path, "too_many_cpus", resources={"cpu": 64})
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 4


def test_existing_results_are_not_overwritten(ray_session, tmp_path, capsys):
    path = write_sweep(tmp_path, "twice", train__epochs=1)
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 0
    before = (tmp_path / "results" / "twice" / "trials.parquet").read_bytes()
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 2
    assert "already holds a sweep" in capsys.readouterr().err
    assert (tmp_path / "results" / "twice" / "trials.parquet").read_bytes() == before
    other = write_sweep(tmp_path, "twice", train__epochs=1, train__lr={"grid": [0.1, 0.2]})
    assert main([str(other), "--storage-path", str(tmp_path / "results"), "--resume"]) == 2
    assert "search space differs" in capsys.readouterr().err
    # a storage path that cannot hold the results folder: one line, exit 2 (before, a traceback)
    assert main([str(path), "--storage-path", str(path)]) == 2  # a file
    assert f"--storage-path: {path} is a file, so {path}/twice cannot be made" in capsys.readouterr().err
    assert main([str(path), "--storage-path", "/proc/cifar_ray_results"]) == 2  # a folder no file can be made in
    err = capsys.readouterr().err
    assert "--storage-path: cannot make /proc/cifar_ray_results/twice (No such file or directory)" in err, err


def test_pbt_runs_and_mutates_hyperparameters(ray_session, tmp_path):
    path = write_sweep(tmp_path, "pbt", train__epochs=4, train__lr={"loguniform": [0.001, 0.1]},
                       search={"kind": "random", "samples": 4, "seed": 0},
                       scheduler={"kind": "pbt", "perturbation_interval": 1, "synch": True,
                                  "mutations": {"train.lr": {"loguniform": [0.001, 0.1]}}},
                       checkpoint={"keep": 3})
    # synchronous PBT compares all four trials at each perturbation point, whatever the machine's speed:
    # the worst quarter exploits the best at the first one, so an exploit happens in every run
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 0
    df = results_of(tmp_path, "pbt")
    assert len(df) == 4 and set(df["status"]) == {"completed"} and (df["epochs"] == 4).all()
    # PBT copied a better trial's state into a worse one with a perturbed lr (its own log says so)
    exp = tmp_path / "results" / "pbt"
    steps = [json.loads(line) for line in (exp / "pbt_global.txt").read_text().splitlines() if line.strip()]
    assert any(old["train.lr"] != new["train.lr"] for *_, old, new in steps)
    # every trial's curve reaches its last epoch, clones of a finished trial included
    from cifar_ray import analysis

    assert (analysis.load(exp).curves().groupby("trial_id")["epoch"].max() == 4).all()
    assert_records_agree(exp)


@pytest.mark.slow
def test_optuna_search_with_asha_resumes_without_trying_a_configuration_twice(ray_session, tmp_path):
    """kill -9 mid-sweep and --resume; the space is define-by-run (momentum asked only of SGD trials,
    tune_search.ActingSpace), which the resumed searcher holds again from its pickled state."""
    path = write_sweep(tmp_path, "tpe", data=SLOWER_DATA, train__epochs=6, train__lr={"loguniform": [0.001, 0.1]},
                       train__momentum={"uniform": [0.5, 0.95]}, train__optimizer={"choice": ["sgd", "adam"]},
                       search={"kind": "optuna", "samples": 6, "seed": 0},
                       scheduler={"kind": "asha", "grace_period": 1})
    sweep = SweepProcess(path, tmp_path, ray_session)
    exp = tmp_path / "results" / "tpe"

    def two_recorded_and_one_running():
        states = tune_statuses(exp)
        done = [d for d in exp.glob("base_*") if states.get(d.name) == "TERMINATED"]
        # a trial that has reported, whether or not Tune's timed snapshot has seen it since
        running = [d for d in exp.glob("base_*") if states.get(d.name) != "TERMINATED" and result_rows(d)]
        return (done, running) if len(done) >= 2 and running else None

    done, _ = wait_for(two_recorded_and_one_running, "two finished trials in Tune's state, one running")
    rows_before = {d.name: len(result_rows(d)) for d in done}
    sweep.kill()
    code, out = SweepProcess(path, tmp_path, ray_session, "--resume").finish()
    assert code == 0, out
    df = results_of(tmp_path, "tpe")
    assert len(df) == 6 and set(df["status"]) <= {"completed", "stopped"}  # the searcher drew 6, not more
    assert df["train.lr"].nunique() == 6  # no configuration tried twice
    sgd = df["train.optimizer"] == "sgd"
    assert sgd.any() and not sgd.all(), df["train.optimizer"]  # Optuna (seed 0) drew both
    assert df["train.lr"].between(0.001, 0.1).all() and df.loc[sgd, "train.momentum"].between(0.5, 0.95).all()
    assert df.loc[~sgd, "train.momentum"].isna().all()  # asked only where it acts, before the kill and after
    for name, n in rows_before.items():
        assert len(result_rows(exp / name)) == n, f"{name} was trained again"
    assert_records_agree(exp)
    from cifar_ray import analysis

    made = analysis.load(exp).provenance()  # the resume's entry beside the first run's
    assert made["kind"] == "start" and [r["kind"] for r in made["resumed"]] == ["resume"]
    assert made["resumed"][0]["commit"] == made["commit"] and made["resumed"][0]["versions"] == made["versions"]


def test_max_concurrent_trials_holds_for_grid_search(ray_session, tmp_path, capsys):
    from cifar_ray import analysis

    path = write_sweep(tmp_path, "one_at_a_time", train__epochs=3, train__lr={"grid": [0.01, 0.02, 0.05]},
                       data=SLOWER_DATA, max_concurrent_trials=1)
    assert main([str(path), "--dry-run", "--estimate"]) == 0
    assert "3 trials, 1 at a time" in capsys.readouterr().out  # the estimate plans with the same limit
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 0
    exp = tmp_path / "results" / "one_at_a_time"
    rows = sorted((row["recorded_at"], d.name) for d in exp.glob("base_*")
                  for row in analysis.read_rows(d / "history.jsonl"))
    order = [name for _, name in rows]
    runs = [name for i, name in enumerate(order) if i == 0 or order[i - 1] != name]
    assert len(runs) == 3, f"trials ran side by side: {order}"  # each trial's reports all together


def test_estimate_on_a_real_run_prints_it_and_gives_the_first_eta(ray_session, tmp_path, capsys):
    """`--estimate` without --dry-run: the estimate's lines, then the sweep, whose first progress line
    already has an ETA from the estimate's seconds per epoch."""
    path = write_sweep(tmp_path, "eta", train__epochs=2, train__lr={"grid": [0.01, 0.05]})
    assert main([str(path), "--estimate", "--storage-path", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out.splitlines()
    wall = next(i for i, line in enumerate(out) if line.startswith("estimated wall time: "))
    assert any("2 at a time (the local Ray: 2 CPUs" in line for line in out[:wall]), out
    first = next(line for line in out[wall:] if " done, " in line)
    assert re.search(r"elapsed, ETA (\d+ min )?\d+ s$", first), first
    assert len(results_of(tmp_path, "eta")) == 2
