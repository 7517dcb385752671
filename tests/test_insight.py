"""importance, compare, early_vs_final, stopped_early on small results folders with known answers."""
from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from cifar_ray import analysis
from cifar_ray.insight import settled_epoch
from cifar_ray.refine import main as refine_main
from cifar_ray.report import curve_label, write_report
from conftest import WAIT_S, hold_driver_lock


def fake_sweep(tmp_path: Path, name: str, sections: dict, trials: list[tuple[dict, list[float], str]],
               mode: str = "max") -> Path:
    """A results folder as the sweep writes it (sweep.yaml, a folder per trial with params.json,
    history.jsonl, outcome.json), from (config, val_acc per epoch, outcome) per trial."""
    exp = tmp_path / name
    exp.mkdir(parents=True)
    doc = {"name": name, "metric": "val_acc", "mode": mode, "model": {"name": "base"}, **sections}
    (exp / "sweep.yaml").write_text(yaml.safe_dump(doc))
    for i, (config, curve, status) in enumerate(trials):
        trial_id = f"abcde_{i:05d}"
        folder = exp / f"base_{trial_id}"
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps({"model.name": "base", **config}))
        rows = [{"trial_id": trial_id, "training_iteration": e, "epoch": e, "val_acc": v, "status": "running",
                 "time_total_s": float(e)} for e, v in enumerate(curve, 1)]
        (folder / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "outcome.json").write_text(json.dumps({"trial_id": trial_id, "status": status,
                                                         "epochs": len(curve), "error": None}))
    return exp


LR_GRID = [0.001, 0.01, 0.1]
MOMENTUM_GRID = [0.0, 0.5, 0.9]


def lr_only(lr: float, noise: float = 0.0) -> float:
    """Accuracy that depends on lr only (best at 0.01)."""
    return 0.6 - 0.15 * abs(math.log10(lr) + 2) + noise


def test_a_key_that_does_nothing_gets_low_importance(tmp_path):
    rng = np.random.default_rng(0)
    trials = [({"train.lr": lr, "train.momentum": m, "train.optimizer": opt}, [lr_only(lr, 0.002 * rng.normal())],
               "completed")
              for lr, m, opt in itertools.product(LR_GRID, MOMENTUM_GRID, ["sgd", "adam"])]
    sections = {"train": {"lr": {"grid": LR_GRID}, "momentum": {"grid": MOMENTUM_GRID},
                          "optimizer": {"grid": ["sgd", "adam"]}}}
    imp = analysis.load(fake_sweep(tmp_path, "imp", sections, trials)).importance()
    assert list(imp.columns) == ["key", "importance", "method"]
    assert set(imp["key"]) == {"train.lr", "train.momentum", "train.optimizer"}
    assert imp["importance"].sum() == pytest.approx(1.0)
    assert imp["importance"].is_monotonic_decreasing and (imp["method"] == "ped_anova").all()
    assert imp.iloc[0]["key"] == "train.lr" and imp.iloc[0]["importance"] > 0.8
    assert imp.set_index("key").loc[["train.momentum", "train.optimizer"], "importance"].max() < 0.15



def test_a_key_is_read_only_in_the_trials_where_it_acts(tmp_path):
    # a random search over optimizer x momentum x lr: with SGD, momentum decides (higher is better); Adam has
    # no momentum (cifar_ray.applies) and beats every SGD trial whatever momentum value it was drawn with.
    # Read over all trials, momentum's top trials are Adam's and their values are noise.
    rng = np.random.default_rng(1)
    trials = []
    for i in range(24):
        opt, m, lr = ("sgd", "adam")[i % 2], float(rng.uniform(0.5, 0.95)), float(rng.uniform(0.001, 0.1))
        acc = 0.4 + 0.5 * (m - 0.5) if opt == "sgd" else 0.7 + 0.001 * rng.normal()
        trials.append(({"train.optimizer": opt, "train.momentum": m, "train.lr": lr}, [acc], "completed"))
    sections = {"train": {"optimizer": {"choice": ["sgd", "adam"]}, "momentum": {"uniform": [0.5, 0.95]},
                          "lr": {"uniform": [0.001, 0.1]}}}
    exp = fake_sweep(tmp_path, "inert", sections, trials)
    imp = analysis.load(exp).importance().set_index("key")["importance"]
    # read over all 24 trials: optimizer 0.63, momentum 0.34 (its top trials' values were Adam's noise)
    assert imp.index[0] == "train.momentum" and imp["train.momentum"] > 0.5, imp
    assert imp["train.lr"] < 0.05, imp
    assert imp.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="train.momentum do not act in every trial"):
        analysis.load(exp).importance(method="fanova")
    # refine narrows momentum around the SGD trials among the top 16 (12 Adam, then SGD's best: high momentum)
    sgd_top = sorted((t[0]["train.momentum"] for t in trials if t[0]["train.optimizer"] == "sgd"), reverse=True)[:4]
    refine_main([str(exp), "--top", "16", "--out", str(tmp_path / "wide.yaml")])
    lo, hi = yaml.safe_load((tmp_path / "wide.yaml").read_text())["train"]["momentum"]["uniform"]
    assert lo > 0.7 and lo <= min(sgd_top) and hi >= max(sgd_top), (lo, hi, sgd_top)
    # the top 5 are all Adam: momentum acted in none of them, and the next sweep (Adam alone) fixes it
    refine_main([str(exp), "--top", "5", "--out", str(tmp_path / "adam.yaml")])
    train = yaml.safe_load((tmp_path / "adam.yaml").read_text())["train"]
    assert train["optimizer"] == "adam" and isinstance(train["momentum"], float), train
    # --confirm over the top 14 (12 Adam, 2 SGD): an Adam configuration holds no momentum, the file validates
    assert refine_main([str(exp), "--confirm", "--top", "14", "--out", str(tmp_path / "confirm.yaml")]) == 0
    doc = yaml.safe_load((tmp_path / "confirm.yaml").read_text())
    assert doc["train"]["optimizer"] == "adam" and isinstance(doc["train"]["momentum"], float)  # does nothing there
    entries = doc["configurations"]
    assert len(entries) == 14 and entries[0] == {}
    for entry in entries[1:]:
        assert ("train.momentum" in entry) == (entry.get("train.optimizer") == "sgd"), entry
    assert sum(entry.get("train.optimizer") == "sgd" for entry in entries) == 2
    # with 3 SGD trials momentum acted too seldom to be judged: left out of importance, and the report says so
    # (Adam's trials hold no momentum here, as Optuna's define-by-run trials record them)
    adam = [({k: v for k, v in t[0].items() if k != "train.momentum"}, *t[1:])
            for t in trials if t[0]["train.optimizer"] == "adam"]
    few = fake_sweep(tmp_path, "few", sections, adam + [t for t in trials if t[0]["train.optimizer"] == "sgd"][:3])
    assert set(analysis.load(few).importance()["key"]) == {"train.optimizer", "train.lr"}
    report = write_report(str(few), str(tmp_path / "few_report")).read_text()
    assert "Not judged: train.momentum (fewer than 4 finished trials where it acts" in report
    rows = [line for line in report.splitlines() if line.startswith("| abcde_")]
    assert len(rows) == 15 and all(("| - |" in line) == ("| adam |" in line) for line in rows)  # Adam's momentum
    best = analysis.load(few).best()  # an Adam trial: its config is its own, without momentum
    assert best.config["train.optimizer"] == "adam" and "train.momentum" not in best.config
    assert f"Best trial: {best.trial_id}, val_acc {best.score:.4f} (" in report and "train.momentum=-" in report

def test_refine_turns_off_a_switch_that_acts_in_none_of_the_kept_trials(tmp_path):
    # SGD or Adam with nesterov: true, Adam far ahead: the next sweep (Adam alone) would hold a nesterov that
    # can never act, which the dry run refuses; refine and --confirm turn it off and say so
    trials = [({"train.optimizer": opt, "train.lr": lr}, [lr_only(lr) + (0.2 if opt == "adam" else 0.0)],
               "completed") for opt in ("sgd", "adam") for lr in LR_GRID]
    sections = {"train": {"optimizer": {"grid": ["sgd", "adam"]}, "lr": {"grid": LR_GRID}, "momentum": 0.9,
                          "nesterov": True}}
    exp = fake_sweep(tmp_path, "nest", sections, trials)
    for args, out in (([], "next.yaml"), (["--confirm"], "confirm.yaml")):
        assert refine_main([str(exp), "--top", "3", *args, "--out", str(tmp_path / out)]) == 0
        text = (tmp_path / out).read_text()
        doc = yaml.safe_load(text)
        assert doc["train"]["nesterov"] is False, text
        assert "#   train.nesterov: true -> false (it acts in none of the kept trials" in text
    assert yaml.safe_load((tmp_path / "next.yaml").read_text())["train"]["optimizer"] == "adam"
    # where a kept trial is SGD, nesterov stays on (the SGD trials use it)
    assert refine_main([str(exp), "--top", "4", "--out", str(tmp_path / "both.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "both.yaml").read_text())["train"]["nesterov"] is True


def test_refine_runs_one_round_of_a_grid_once_nothing_is_drawn_at_random(tmp_path):
    # a grid of lrs with the optimizer drawn at random, 2 rounds: the top trials all ran Adam, so refine fixes
    # the optimizer, and a second round would repeat the same trials (refused by the dry run)
    trials = [({"train.optimizer": opt, "train.lr": lr}, [lr_only(lr) + (0.2 if opt == "adam" else 0.0)], "completed")
              for opt in ("sgd", "adam") for lr in LR_GRID]
    sections = {"train": {"optimizer": {"choice": ["sgd", "adam"]}, "lr": {"grid": LR_GRID}},
                "search": {"kind": "grid", "samples": 2, "seed": 0}}
    exp = fake_sweep(tmp_path, "rounds", sections, trials)
    assert refine_main([str(exp), "--top", "3", "--out", str(tmp_path / "next.yaml")]) == 0
    text = (tmp_path / "next.yaml").read_text()
    doc = yaml.safe_load(text)
    assert doc["train"]["optimizer"] == "adam" and doc["search"]["samples"] == 1, text
    assert "#   search.samples: 2 -> 1 (no key is drawn at random any more" in text
    # with a key still drawn at random the rounds stay
    assert refine_main([str(exp), "--top", "6", "--out", str(tmp_path / "both.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "both.yaml").read_text())["search"]["samples"] == 2


def test_a_folder_whose_grid_repeats_a_value_still_reads_its_searched_keys(tmp_path):
    # sweep files may no longer repeat a grid value or span one value, but folders written before may: their
    # keys are still searched keys for importance, compare and the report
    sections = {"train": {"lr": {"grid": [0.01, 0.01, 0.1]}, "momentum": {"uniform": [0.9, 0.9]}}}
    trials = [({"train.lr": lr, "train.momentum": 0.9}, [lr_only(lr)], "completed") for lr in (0.01, 0.01, 0.1)]
    assert set(analysis.load(fake_sweep(tmp_path, "old", sections, trials)).domains()) == {"train.lr", "train.momentum"}


def test_a_choice_with_null_is_a_searched_key_in_importance_and_the_report(tmp_path):
    # bn_momentum: null (the model's own) or 0.2; null trials are the good ones. Missing values used to
    # count as no value at all, so the key vanished from the importance and the report's trial table.
    rng = np.random.default_rng(0)
    trials = [({"train.lr": lr, "train.bn_momentum": bn},
               [0.2, lr_only(0.01, 0.002 * rng.normal()) - (0.2 if bn else 0.0)], "completed")
              for lr, bn in itertools.product(LR_GRID * 2, [None, 0.2])]
    sections = {"model": {"name": "base", "batch_norm": True},  # BN momentum acts only where there is BN
                "train": {"lr": {"choice": LR_GRID}, "bn_momentum": {"choice": [None, 0.2]}}}
    folder = fake_sweep(tmp_path, "null", sections, trials)
    imp = analysis.load(folder).importance()  # without null as a value: "needs ... two searched keys"
    assert set(imp["key"]) == {"train.lr", "train.bn_momentum"}
    assert imp.set_index("key").loc["train.bn_momentum", "importance"] > 0.2
    cmp = analysis.load(folder).compare()
    assert len(cmp) == 6 and cmp["n"].tolist() == [2] * 6  # null is a configuration of its own
    refine_main([str(folder), "--top", "12", "--out", str(tmp_path / "next.yaml")])
    assert yaml.safe_load((tmp_path / "next.yaml").read_text())["train"]["bn_momentum"] == {"choice": [None, 0.2]}
    report = write_report(str(folder), str(tmp_path / "report")).read_text()
    header = next(line for line in report.splitlines() if line.startswith("| trial_id"))
    assert "train.bn_momentum" in header and "train.lr" in header


def test_a_curve_is_labelled_by_its_settings_or_by_its_trial_when_they_are_long():
    assert curve_label("abc_00001", ["lr=0.1", "momentum=0.9"]) == "lr=0.1, momentum=0.9"
    long = [f"key{i}=0.123456" for i in range(10)]
    assert curve_label("abc_00001", long) == "abc_00001"
    assert curve_label("abc_00001", []) == "abc_00001"


def test_importance_of_a_small_grid_and_its_limits(tmp_path):
    trials = [({"train.lr": lr, "train.momentum": m}, [lr_only(lr)], "completed")
              for lr, m in itertools.product([0.01, 0.1], [0.5, 0.9])]
    sections = {"train": {"lr": {"grid": [0.01, 0.1]}, "momentum": {"grid": [0.5, 0.9]}}}
    imp = analysis.load(fake_sweep(tmp_path, "four", sections, trials)).importance()
    assert imp.iloc[0]["key"] == "train.lr" and imp.iloc[0]["importance"] > 0.9  # 4 trials: the minimum
    with pytest.raises(ValueError, match="at least 4 trials"):
        analysis.load(fake_sweep(tmp_path, "three", sections, trials[:3])).importance()
    one_key = [({"train.lr": lr, "train.momentum": 0.9}, [lr_only(lr)], "completed") for lr in LR_GRID * 2]
    with pytest.raises(ValueError, match="two searched keys"):
        analysis.load(fake_sweep(tmp_path, "onekey", {"train": {"lr": {"grid": LR_GRID}}}, one_key)).importance()
    with pytest.raises(ValueError, match="ped_anova"):
        analysis.load(tmp_path / "four").importance(method="nope")


def test_compare_with_seeds_separates_noise_from_a_real_gap(tmp_path):
    trials = []
    for seed in (0, 1, 2):
        trials.append(({"train.lr": 0.01, "train.seed": seed}, [0.70], "completed"))  # A: identical curves
        trials.append(({"train.lr": 0.02, "train.seed": seed}, [0.70], "completed"))  # B: the same as A
        trials.append(({"train.lr": 0.05, "train.seed": seed}, [0.50 + 0.01 * seed], "completed"))  # C: worse
    trials.append(({"train.lr": 0.1, "train.seed": 0}, [0.40], "completed"))  # D: one trial only
    sections = {"train": {"lr": {"grid": [0.01, 0.02, 0.05, 0.1]}}, "seeds": [0, 1, 2]}
    cmp = analysis.load(fake_sweep(tmp_path, "seeds", sections, trials)).compare()
    assert list(cmp.columns) == ["train.lr", "mean", "std", "n", "ci_low", "ci_high", "p_vs_best"]
    assert list(cmp["n"]) == [3, 3, 3, 1] and list(cmp["train.lr"])[2:] == [0.05, 0.1]
    assert math.isnan(cmp.loc[0, "p_vs_best"])  # the best itself
    assert cmp.loc[1, "p_vs_best"] == 1.0  # identical to the best: not distinguishable
    assert cmp.loc[2, "p_vs_best"] < 0.01  # clearly worse, beyond seed noise
    assert math.isnan(cmp.loc[3, "p_vs_best"]) and math.isnan(cmp.loc[3, "ci_low"])  # n < 2
    c = cmp.loc[2]
    assert c["mean"] == pytest.approx(0.51) and c["ci_low"] < 0.51 < c["ci_high"]
    # 95% Student-t interval of (0.50, 0.51, 0.52): 0.51 +- 4.303 * 0.01 / sqrt(3)
    assert c["ci_high"] - c["mean"] == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-4)



def test_the_seeds_figure_keeps_an_accuracys_interval_within_0_to_100(tmp_path, monkeypatch):
    # two seeds 40 points apart: the Student t interval (12.7 x sd / sqrt 2) runs far past both ends
    trials = [({"train.lr": lr, "train.seed": s}, [v], "completed")
              for lr, vals in ((0.01, (0.5, 0.9)), (0.1, (0.60, 0.62))) for s, v in zip((0, 1), vals, strict=True)]
    exp = fake_sweep(tmp_path, "wide", {"train": {"lr": {"grid": [0.01, 0.1]}}, "seeds": [0, 1]}, trials)
    cmp = analysis.load(exp).compare()
    assert cmp["ci_low"].min() < 0 and cmp["ci_high"].max() > 1  # compare() itself keeps the plain interval
    import cifar_ray.report_sections as sections

    drawn = []
    real_save = sections.save_figure
    monkeypatch.setattr(sections, "save_figure", lambda fig, path: (path.name == "seeds.png" and drawn.append(
                        fig.axes[0].get_xlim())) or real_save(fig, path))
    write_report(str(exp), str(tmp_path / "report"))
    (low, high), = drawn
    assert -5.01 <= low and high <= 105.01  # the bars end at 0 and 100; matplotlib's 5% margin around them
    assert (tmp_path / "report" / "seeds.png").stat().st_size > 0

def test_compare_ranks_by_mean_for_a_min_metric(tmp_path):
    trials = [({"train.lr": lr, "train.seed": s}, [v + 0.01 * s], "completed")
              for lr, v in ((0.01, 0.9), (0.1, 0.3)) for s in (0, 1)]
    exp = fake_sweep(tmp_path, "minimize", {"train": {"lr": {"grid": [0.01, 0.1]}}, "seeds": [0, 1]}, trials,
                     mode="min")
    cmp = analysis.load(exp).compare()
    assert list(cmp["train.lr"]) == [0.1, 0.01]


def test_early_vs_final_finds_when_the_ranking_settled(tmp_path):
    # five trials; at epoch 1 their order is reversed, from epoch 3 it is the final one
    curves = [[0.5 - 0.05 * i, 0.3 + 0.01 * ((i * 3) % 5), 0.4 + 0.05 * i, 0.5 + 0.05 * i] for i in range(5)]
    trials = [({"train.lr": 0.01 * (i + 1)}, c, "completed") for i, c in enumerate(curves)]
    trials.append(({"train.lr": 0.5}, [0.2], "stopped"))  # did not reach the last epoch: left out
    exp = fake_sweep(tmp_path, "settle", {"train": {"lr": {"grid": [0.01 * (i + 1) for i in range(5)] + [0.5]}}},
                     trials)
    table = analysis.load(exp).early_vs_final()
    assert list(table.columns) == ["epoch", "spearman", "n"]
    assert list(table["epoch"]) == [1, 2, 3, 4] and list(table["n"]) == [5, 5, 5, 5]
    assert table.loc[0, "spearman"] == pytest.approx(-1.0) and table.loc[3, "spearman"] == pytest.approx(1.0)
    assert settled_epoch(table) == 3


def test_stopped_early_names_a_trial_cut_while_it_ranked_like_the_winner(tmp_path):
    trials = [({"train.lr": 0.01}, [0.30, 0.50, 0.80], "completed"),  # the eventual best, a slow starter
              ({"train.lr": 0.02}, [0.35], "stopped"),  # better than the winner at epoch 1: a contender
              ({"train.lr": 0.03}, [0.10], "stopped"),  # rightly stopped
              ({"train.lr": 0.04}, [0.20, 0.40, 0.60], "completed")]
    exp = fake_sweep(tmp_path, "asha", {"train": {"lr": {"grid": [0.01, 0.02, 0.03, 0.04]}},
                                        "scheduler": {"kind": "asha"}}, trials)
    stopped = analysis.load(exp).stopped_early().set_index("trial_id")
    assert list(stopped.index) == ["abcde_00001", "abcde_00002"]
    assert stopped.loc["abcde_00001", "contender"] and not stopped.loc["abcde_00002", "contender"]
    assert stopped.loc["abcde_00001", "best_trial"] == "abcde_00000"
    assert (stopped.loc["abcde_00001", "rank"], stopped.loc["abcde_00001", "of"]) == (1, 4)
    assert stopped.loc["abcde_00002", "best_value"] == 0.30


# ---------------------------------------------------------------- refine

def refinable(tmp_path: Path) -> Path:
    """A random search over a log lr, a bounded momentum and the optimizer, plus a grid of widths."""
    rng = np.random.default_rng(1)
    trials = []
    for i in range(10):
        lr = float(10 ** rng.uniform(-4, -1))
        momentum = float(rng.uniform(0.5, 0.99))
        opt = ["sgd", "adam"][i % 2]
        width = [1, 2, 4][i % 3]
        trials.append(({"train.lr": lr, "train.momentum": momentum, "train.optimizer": opt, "model.width": width,
                        "train.epochs": 2, "train.seed": 0}, [lr_only(lr)], "completed"))
    sections = {"model": {"name": "netconv", "width": {"grid": [1, 2, 4]}},
                "data": {"source": "synthetic", "synthetic_size": 1200, "val_size": 200},
                "train": {"epochs": 2, "lr": {"loguniform": [1e-4, 0.1]}, "momentum": {"uniform": [0.5, 0.99]},
                          "optimizer": {"choice": ["sgd", "adam"]}},
                "seeds": [0, 1], "search": {"kind": "random", "samples": 5, "seed": 3}}
    return fake_sweep(tmp_path, "wide", sections, trials)


def test_refine_writes_a_narrower_sweep_that_passes_the_dry_run(tmp_path, capsys):
    from cifar_ray.refine import main as refine_main
    from cifar_ray.sweep import main as sweep_main

    exp = refinable(tmp_path)
    out = tmp_path / "next.yaml"
    assert refine_main([str(exp), "--top", "3", "--out", str(out)]) == 0
    assert f"check it: python -m cifar_ray.sweep {out} --dry-run" in capsys.readouterr().out
    text = out.read_text()
    doc = yaml.safe_load(text)
    assert doc["name"] == "wide_refined" and "space" not in doc and "source_file" not in doc
    assert text.startswith(f"# wide_refined: refined from {exp.resolve()}")
    top = analysis.load(exp).trials().sort_values("best_val_acc", ascending=False).head(3)
    for trial_id in top["trial_id"]:
        assert f"#   {trial_id}: val_acc" in text
    lo, hi = doc["train"]["lr"]["loguniform"]  # log stays log, spans the top 3 with a margin
    assert lo < top["train.lr"].min() and hi > top["train.lr"].max() and hi / lo < 1e3 / 3
    m_lo, m_hi = doc["train"]["momentum"]["uniform"]
    assert m_lo <= top["train.momentum"].min() and top["train.momentum"].max() <= m_hi < 1  # inside the schema
    assert set(doc["train"]["optimizer"]["choice"] if isinstance(doc["train"]["optimizer"], dict)
               else [doc["train"]["optimizer"]]) == set(top["train.optimizer"])
    widths = doc["model"]["width"]
    assert set(widths["grid"] if isinstance(widths, dict) else [widths]) == set(top["model.width"])
    assert doc["seeds"] == [0, 1] and doc["search"]["kind"] == "random" and doc["train"]["epochs"] == 2
    assert sweep_main([str(out), "--dry-run"]) == 0


def test_refine_keeps_a_grid_a_grid_and_refuses_what_it_cannot_do(tmp_path, capsys):
    from cifar_ray.refine import main as refine_main

    trials = [({"train.lr": lr, "train.momentum": m}, [lr_only(lr)], "completed")
              for lr, m in itertools.product(LR_GRID, MOMENTUM_GRID)]
    sections = {"data": {"source": "synthetic"},
                "train": {"lr": {"grid": LR_GRID}, "momentum": {"grid": MOMENTUM_GRID}}}
    exp = fake_sweep(tmp_path, "grid", sections, trials)
    out = tmp_path / "g.yaml"
    assert refine_main([str(exp), "--top", "3", "--out", str(out)]) == 0
    lrs = yaml.safe_load(out.read_text())["train"]["lr"]["grid"]
    assert len(lrs) == 3 and lrs[0] < 0.01 < lrs[-1]  # the top 3 all have lr 0.01: a factor 2 either side
    assert lrs[1] / lrs[0] == pytest.approx(lrs[2] / lrs[1], rel=0.02)  # log-spaced
    before = out.read_text()
    assert refine_main([str(exp), "--out", str(out)]) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err and out.read_text() == before
    assert refine_main([str(exp), "--top", "0", "--out", str(tmp_path / "x.yaml")]) == 2
    nothing = fake_sweep(tmp_path, "nothing", sections, [({"train.lr": 0.01, "train.momentum": 0.5}, [], "errored")])
    assert refine_main([str(nothing), "--out", str(tmp_path / "y.yaml")]) == 2
    assert "no trial has reported" in capsys.readouterr().err
    assert refine_main([str(tmp_path / "missing")]) == 2


def test_refine_keeps_a_choice_to_the_values_the_top_trials_used_and_writes_their_null(tmp_path):
    # a choice is a menu: bn_momentum choice[0.2, 0.4, 0.6] with winners at 0.4 and 0.6 used to come back
    # re-spaced as [0.3, 0.5, 0.7], values nobody listed; a float grid is still re-spaced (test above)
    trials = [({"train.lr": lr, "train.bn_momentum": bn, "train.whiten_bias_epochs": wb},
               [lr_only(lr) + (0.01 if bn in (0.4, 0.6) else 0.0) + (0.002 if wb is None else 0.0)], "completed")
              for lr, bn, wb in itertools.product(LR_GRID, [0.2, 0.4, 0.6], [None, 3])]
    sections = {"model": {"name": "whitened_cnn"},
                "train": {"lr": {"grid": LR_GRID}, "bn_momentum": {"choice": [0.2, 0.4, 0.6]},
                          "whiten_bias_epochs": {"choice": [None, 3]}}}
    exp = fake_sweep(tmp_path, "menu", sections, trials)
    out = tmp_path / "next.yaml"
    assert refine_main([str(exp), "--top", "3", "--out", str(out)]) == 0
    text = out.read_text()
    doc = yaml.safe_load(text)
    # the top 3: lr 0.01 at bn 0.4/0.6 with wb null, then one of them with wb 3
    assert doc["train"]["bn_momentum"] == {"choice": [0.4, 0.6]}
    assert doc["train"]["whiten_bias_epochs"] == {"choice": [None, 3]}
    kept = [line for line in text.splitlines() if line.startswith("#   abcde_")]
    assert len(kept) == 3 and sum("train.whiten_bias_epochs=null" in line for line in kept) == 2
    assert "nan" not in text and "None" not in text
    assert "#   train.whiten_bias_epochs: choice[null, 3] -> choice[null, 3]" in text


def test_a_configurations_sweep_compares_by_configuration_and_refine_keeps_those_the_top_trials_ran(tmp_path):
    listed = [{"train.lr": 0.01}, {"train.lr": 0.1, "train.momentum": 0.5}, {"train": {"optimizer": "adam"}}]
    values = [{"train.lr": 0.01, "train.momentum": 0.9, "train.optimizer": "sgd"},
              {"train.lr": 0.1, "train.momentum": 0.5, "train.optimizer": "sgd"},
              {"train.lr": 0.05, "train.momentum": 0.9, "train.optimizer": "adam"}]
    level = [0.60, 0.50, 0.70]  # adam best, then the first, then the second
    trials = [({**values[c], "train.seed": seed}, [level[c] + 0.01 * seed], "completed")
              for c in range(3) for seed in range(3)]
    sections = {"train": {"lr": 0.05, "momentum": 0.9}, "configurations": listed, "seeds": [0, 1, 2]}
    exp = fake_sweep(tmp_path, "listed", sections, trials)
    compared = analysis.load(exp).compare()
    assert list(compared["train.optimizer"]) == ["adam", "sgd", "sgd"]
    assert list(compared["train.lr"]) == [0.05, 0.01, 0.1]
    assert set(compared["n"]) == {3} and compared["p_vs_best"].iloc[1] < 0.05
    for top, kept in ((3, [2]), (4, [2, 0])):
        out = tmp_path / f"next{top}.yaml"
        assert refine_main([str(exp), "--top", str(top), "--out", str(out)]) == 0
        doc = yaml.safe_load(out.read_text())
        assert doc["configurations"] == [listed[i] for i in sorted(kept)], top  # in the file's order
        assert doc["train"] == {"lr": 0.05, "momentum": 0.9} and doc["seeds"] == [0, 1, 2]
        assert f"#   configurations: 3 -> {len(kept)} (kept {', '.join(map(str, sorted(kept)))})" in out.read_text()


def test_refine_confirm_writes_the_top_configurations_with_seeds_as_the_trials_ran_them(tmp_path, capsys):
    """One run per configuration cannot say whether the best is better; --confirm writes a sweep of the
    top trials' configurations, each with three seeds, run to the end. The values are the trials' own
    (unrounded, a null as null, a listed 3 as 3, a policy whole); two trials of one configuration count once."""
    from cifar_ray.space import build_space, expand_grid
    from cifar_ray.sweep_config import read_sweep

    fast, alternate = {"hflip": 0.5, "crop_padding": 2}, {"alternate_flip": True, "crop_padding": 2}
    ran = [  # (lr, optimizer, whiten_bias_epochs, augment, seed, best val_acc)
        (0.123456789, "muon", None, alternate, 0, 0.90), (0.123456789, "muon", None, alternate, 1, 0.89),
        (0.0314159, "sgd", 3, fast, 0, 0.88), (0.5, "sgd", None, fast, 0, 0.70), (0.9, "muon", 3, fast, 0, 0.60)]
    trials = [({"train.lr": lr, "train.optimizer": opt, "train.whiten_bias_epochs": wb, "data.augment": aug,
                "train.seed": seed}, [acc - 0.1, acc], "completed") for lr, opt, wb, aug, seed, acc in ran]
    sections = {"model": {"name": "whitened_cnn"}, "data": {"augment": {"choice": [fast, alternate]}},
                "train": {"lr": {"loguniform": [0.01, 1.0]}, "optimizer": {"choice": ["sgd", "muon"]},
                          "whiten_bias_epochs": {"choice": [None, 3]}, "epochs": 2},
                "search": {"kind": "optuna", "samples": 5}, "scheduler": {"kind": "asha", "grace_period": 1}}
    exp = fake_sweep(tmp_path, "tpe", sections, trials)
    out = tmp_path / "confirm.yaml"
    assert refine_main([str(exp), "--confirm", "--top", "3", "--out", str(out)]) == 0
    text = out.read_text()
    doc = yaml.safe_load(text)
    assert doc["name"] == "tpe_confirm" and doc["seeds"] == [0, 1, 2]
    assert doc["search"] == {"kind": "grid"} and doc["scheduler"] == {"kind": "fifo"}
    assert doc["configurations"] == [{}, {"train.lr": 0.0314159, "train.optimizer": "sgd",
                                          "train.whiten_bias_epochs": 3, "data.augment": fast}]
    assert "#   configurations[0] (the sections): abcde_00000 (val_acc 0.9000), abcde_00001 (val_acc 0.8900)" in text
    assert "#   configurations[1]: abcde_00002 (val_acc 0.8800)" in text
    sweep = read_sweep(str(out))
    runs = expand_grid(build_space(sweep, "c"), sweep)
    keys = ("train.lr", "train.optimizer", "train.whiten_bias_epochs", "data.augment", "train.seed")
    assert [tuple(t[k] for k in keys) for t in runs] == [
        (0.123456789, "muon", None, alternate, 0), (0.123456789, "muon", None, alternate, 1),
        (0.123456789, "muon", None, alternate, 2), (0.0314159, "sgd", 3, fast, 0), (0.0314159, "sgd", 3, fast, 1),
        (0.0314159, "sgd", 3, fast, 2)]
    assert all(t["train.epochs"] == 2 for t in runs)
    assert refine_main([str(exp), "--confirm", "--seeds", "0,0"]) == 2
    assert "--seeds 0,0: give distinct seeds" in capsys.readouterr().err


# ---------------------------------------------------------------- --dry-run --estimate

def test_estimate_names_what_it_measured_and_ends_with_the_wall_time(tmp_path, capsys):
    from cifar_ray.sweep import main as sweep_main
    from conftest import write_sweep

    path = write_sweep(tmp_path, "est", train__lr={"grid": [0.01, 0.05]}, train__batch_size={"grid": [32, 64]},
                       train__epochs=3)
    assert sweep_main([str(path), "--dry-run", "--estimate"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    measured = [line for line in out if " img/s training" in line]
    assert len(measured) == 2  # one per batch size; the lr does not change the time
    assert re.match(r"\s+base stem=cifar bs 32 \w+ on cpu: [\d,]+ img/s training, [\d,]+ img/s evaluation", measured[0])
    assert any(re.match(r"\s+trial\s+4: 3 epochs x [\d.]+ s = ", line) for line in out)
    assert re.match(r"4 trials, \d at a time \(this machine: \d+ CPUs", next(ln for ln in out if "at a time" in ln))
    assert re.fullmatch(r"estimated wall time: (\d+ min )?\d+ s .*", out[-1])
    asha = write_sweep(tmp_path, "esta", train__lr={"grid": [0.01, 0.02, 0.03, 0.05]}, train__epochs=4,
                       scheduler={"kind": "asha", "grace_period": 1})
    assert sweep_main([str(asha), "--dry-run", "--estimate"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-2:]
    assert last[0].startswith("ASHA: worst case (every trial to 4 epochs)") and "(expected; worst case" in last[1]


def test_asha_expectation_and_the_schedule():
    from cifar_ray.estimate import asha_epochs, duration, schedule

    assert asha_epochs(8, 8, 1, 2) == [8, 4, 2, 2, 1, 1, 1, 1]  # half continue at each rung
    assert asha_epochs(4, 2, 2, 2) == [2, 2, 2, 2]  # the grace period is max_t: nobody is stopped
    assert schedule([10, 10, 10, 10], 2) == 20 and schedule([30, 10, 10, 10], 2) == 30
    assert (duration(72), duration(3), duration(3 * 3600 + 120)) == ("1 min 12 s", "3 s", "3 h 2 min")


# ---------------------------------------------------------------- a stranger's folder, round two

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


def test_an_alias_bomb_in_a_folder_is_refused_by_every_reader(tmp_path, capsys):
    from cifar_ray.refine import main as refine_main
    from cifar_ray.report import main as report_main
    from cifar_ray.train import main as train_main

    exp = refinable(tmp_path)
    (exp / "sweep.yaml").write_text(ALIAS_BOMB)  # 9^9 values once expanded, 1 KB on disk
    assert len(ALIAS_BOMB) < 2000
    with pytest.raises(analysis.AnalysisError, match="alias bomb"):
        analysis.load(exp)
    for command in (lambda: report_main([str(exp)]), lambda: refine_main([str(exp), "--out", str(tmp_path / "o.yaml")]),
                    lambda: train_main(["--from", str(exp), "--trial", "00000"])):
        assert command() == 2
        err = capsys.readouterr().err
        assert "alias bomb" in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.yaml").exists()


def _hostile_ids(exp: Path, trial_id: str) -> None:
    """Give the folder's best trial a crafted id (in its history, outcome and folder name)."""
    best = max(exp.glob("base_*"), key=lambda d: json.loads(d.joinpath("history.jsonl").read_text()
                                                                .splitlines()[-1])["val_acc"])
    lines = best.joinpath("history.jsonl").read_text().splitlines()
    rows = [json.loads(line) | {"trial_id": trial_id} for line in lines]
    best.joinpath("history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best.joinpath("outcome.json").write_text(json.dumps({"trial_id": trial_id, "status": "completed", "epochs": 1,
                                                         "error": None}))


@pytest.mark.parametrize("crafted", ["x\nwandb: {entity: attacker-team, mode: online}\n#", "x\x1b[2J\x1b]0;pwned\x07"],
                         ids=["newline_injection", "terminal_escape"])
def test_refine_never_carries_a_folders_values_or_paths_into_the_next_sweep(tmp_path, capsys, crafted):
    from cifar_ray.refine import main as refine_main
    from cifar_ray.sweep import main as sweep_main

    exp = refinable(tmp_path)
    stored = yaml.safe_load((exp / "sweep.yaml").read_text())
    stored["data"] |= {"cache_dir": "/home/victim/.cache", "data_dir": "/srv/data"}
    stored["wandb"] = {"entity": "attacker-team", "mode": "online", "project": "p"}
    (exp / "sweep.yaml").write_text(yaml.safe_dump(stored))
    _hostile_ids(exp, crafted)
    out = tmp_path / "next.yaml"
    assert refine_main([str(exp), "--out", str(out)]) == 0
    console = capsys.readouterr()
    assert "\x1b" not in console.out + console.err
    assert all(line.startswith("#") for line in console.out.splitlines() if "attacker" in line)  # shown, inert
    text = out.read_text()
    assert "\x1b" not in text
    assert all(line.startswith("#") for line in text.splitlines() if "attacker" in line or "pwned" in line)
    doc = yaml.safe_load(text)
    assert "entity" not in doc.get("wandb", {}) and "mode" not in doc.get("wandb", {})
    assert "cache_dir" not in doc["data"] and "data_dir" not in doc["data"]
    assert "Not carried over from the folder: data.cache_dir, data.data_dir, wandb.entity, wandb.mode" in text
    assert sweep_main([str(out), "--dry-run"]) == 0


def test_refine_out_into_a_missing_folder_exits_2_and_writes_nothing(tmp_path, capsys):
    from cifar_ray.refine import main as refine_main

    exp = refinable(tmp_path)
    assert refine_main([str(exp), "--out", str(tmp_path / "missing" / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no folder" in err and "Traceback" not in err
    assert not (tmp_path / "missing").exists()
    assert not list(tmp_path.glob(".*.yaml"))


def test_train_from_a_folder_prints_no_raw_terminal_escapes(tmp_path, capsys):
    from cifar_ray.train import main as train_main

    exp = refinable(tmp_path)
    _hostile_ids(exp, "evil\x1b[31m_00042")
    assert train_main(["--from", str(exp), "--trial", "nope"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "evil\\x1b[31m_00042" in err


def test_size_keys_are_bounded_with_clear_messages(tmp_path, capsys):
    from cifar_ray.sweep import main as sweep_main
    from cifar_ray.train import main as train_main
    from conftest import write_sweep

    for key, value in (("train__eval_batch_size", 10_000_000), ("train__batch_size", 10_000_000),
                       ("data", {"source": "synthetic", "synthetic_size": 10 ** 9})):
        path = write_sweep(tmp_path, "big", **{key: value})
        assert sweep_main([str(path), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert "less than or equal to" in err and "Traceback" not in err, err
    exp = refinable(tmp_path)  # a stored folder asking for 10^9 images
    for params in exp.glob("*/params.json"):
        params.write_text(json.dumps(json.loads(params.read_text()) | {"data.synthetic_size": 10 ** 9}))
    assert train_main(["--from", str(exp), "--trial", "00000", "--data", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert "synthetic_size" in err and "Traceback" not in err


def test_the_estimate_caps_what_it_times(tmp_path, capsys):
    from cifar_ray.sweep import main as sweep_main
    from conftest import write_sweep

    path = write_sweep(tmp_path, "many", train__eval_batch_size={"choice": list(range(100, 1100))},
                       train__batch_size={"choice": list(range(8, 1008))}, train__epochs=1,
                       search={"kind": "random", "samples": 4, "seed": 0})
    assert sweep_main([str(path), "--dry-run", "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "a seeded sample of 24 of the 1,000,000 combinations" in out
    assert len([line for line in out.splitlines() if " img/s training" in line]) <= 24
    huge = write_sweep(tmp_path, "huge", model={"name": "netconv"}, train__batch_size=65_536, train__epochs=1)
    assert sweep_main([str(huge), "--dry-run", "--estimate"]) == 0
    assert "bs 65536 (timed at 1024)" in capsys.readouterr().out


def test_the_parallel_plot_puts_a_key_below_its_axis_in_trials_where_it_does_not_act():
    import pandas as pd

    from cifar_ray.report_sections import INERT_AT, _axis
    from cifar_ray.space import Domain

    values = pd.Series([0.5, float("nan"), 0.9, 0.7])  # an Optuna sweep's Adam trial has no momentum
    inert = pd.Series([False, True, False, False])
    pos, ticks, log = _axis(values, Domain("uniform", (0.5, 0.95)), inert)
    assert list(pos) == pytest.approx([0.0, INERT_AT, 1.0, 0.5]) and not log  # numeric, over the trials where it acts
    assert (INERT_AT, "not used") in ticks and (0.0, "0.5") in ticks


def test_a_running_grids_heatmap_keeps_every_configuration_and_a_report_drops_what_it_no_longer_shows(tmp_path):
    # lr x momentum, one configuration with a result so far: the grid is 2 x 2 with three blank cells (its
    # rows and columns without a result were left out), and no heatmap at all before the first result
    from cifar_ray.report import heatmap_grid

    grid_of = {"train": {"lr": {"grid": [0.01, 0.1]}, "momentum": {"grid": [0.5, 0.9]}}}
    configs = [{"train.lr": lr, "train.momentum": m} for lr in (0.01, 0.1) for m in (0.5, 0.9)]
    running = fake_sweep(tmp_path, "running", grid_of, [(c, [0.4] if i == 1 else [], "unfinished")
                                                       for i, c in enumerate(configs)])
    grid = heatmap_grid("val_acc", analysis.load(running).trials())
    assert grid.shape == (2, 2) and int(np.isfinite(grid.to_numpy()).sum()) == 1
    assert grid.loc[0.01, 0.9] == 0.4
    fresh = fake_sweep(tmp_path, "fresh", grid_of, [(c, [], "unfinished") for c in configs])
    assert heatmap_grid("val_acc", analysis.load(fresh).trials()) is None
    # a report written again leaves no figure or test report of the earlier one that it does not show
    out = tmp_path / "report"
    out.mkdir()
    for name in ("heatmap.png", "confusion.png", "per_class.png", "test_report.txt"):
        (out / name).write_bytes(b"an earlier report's")
    text = write_report(str(fresh), str(out)).read_text()
    assert "heatmap.png" not in text
    assert sorted(p.name for p in out.iterdir()) == ["curves.parquet", "report.md", "trials.parquet"]
    write_report(str(running), str(out))
    assert (out / "heatmap.png").is_file() and "![Grid](heatmap.png)" in (out / "report.md").read_text()


def test_analysis_and_the_report_tell_a_running_sweep_from_an_interrupted_one(tmp_path):
    """`unfinished` trials read alike whether the sweep runs now or was interrupted: the driver's lock
    tells the two apart (sweep.driver(), the report's Running / Interrupted line)."""
    from cifar_ray import driver_lock

    grid_of = {"train": {"lr": {"grid": [0.01, 0.1, 1.0]}}}
    exp = fake_sweep(tmp_path, "half", grid_of, [({"train.lr": 0.01}, [0.4, 0.5], "completed"),
                                                 ({"train.lr": 0.1}, [0.3], "unfinished"),
                                                 ({"train.lr": 1.0}, [], "unfinished")])
    sweep = analysis.load(exp)

    def report() -> str:
        return write_report(str(exp), str(tmp_path / "report")).read_text()

    assert sweep.driver() is None
    text = report()
    assert "Interrupted: 2 trials unfinished and no sweep driver holds this folder; the sweep's `--resume` " \
           "continues it" in text and "Running:" not in text
    proc = hold_driver_lock(exp)  # as a sweep's driver holds it while it runs
    try:
        assert re.fullmatch(f"pid {proc.pid} on host .+ since 20[0-9-]+ [0-9:]+ UTC", sweep.driver() or "")
        text = report()
        assert f"Running: a sweep driver holds this folder (pid {proc.pid} on host " in text
        assert "Interrupted" not in text
        with pytest.raises(driver_lock.FolderInUse):  # reading it left the driver its lock
            driver_lock.take(exp)
    finally:
        proc.kill()  # the driver this test started, killed: the sweep is interrupted
        proc.wait(timeout=WAIT_S)
    assert sweep.driver() is None and "Interrupted: 2 trials unfinished" in report()
    ended = fake_sweep(tmp_path, "ended", grid_of, [({"train.lr": lr}, [0.4], "completed") for lr in (0.01, 0.1)])
    text = write_report(str(ended), str(tmp_path / "ended-report")).read_text()
    assert "Running:" not in text and "Interrupted" not in text


def test_a_fused_sweeps_architecture_bars_say_that_time_and_memory_are_the_packs(tmp_path):
    # a member's epoch seconds and peak memory are its pack's (all its members at once): the report says
    # so beside the bars, and only for a fused sweep
    def sweep_of(name: str, fused: bool) -> Path:
        pack = (lambda model: {"pack": f"p{model}"}) if fused else (lambda model: {})
        trials = [({"model.name": model, "train.lr": lr, **pack(model)}, [acc], "completed")
                  for model, acc in (("base", 0.3), ("net1", 0.2)) for lr in (0.01, 0.1)]
        return fake_sweep(tmp_path, name, {"model": {"name": {"grid": ["base", "net1"]}},
                                           "train": {"lr": {"grid": [0.01, 0.1]}}}, trials)

    fused = write_report(str(sweep_of("fused", True)), str(tmp_path / "fused_report")).read_text()
    assert "![Architectures](architectures.png)" in fused
    assert "peak memory are its pack's, all its members at once" in fused
    plain = write_report(str(sweep_of("plain", False)), str(tmp_path / "plain_report")).read_text()
    assert "![Architectures](architectures.png)" in plain and "its pack's" not in plain


def test_a_report_or_refine_on_a_full_disk_is_one_line_and_leaves_what_was_there(tmp_path, small_disk):
    """As a user runs them (subprocesses): a full disk, then a read-only one. The earlier report's files
    keep their bytes, refine leaves no file or temporary behind; before, each ended in a traceback."""
    import subprocess
    import sys

    from conftest import fill_disk

    exp = refinable(tmp_path)
    out = small_disk / "report"
    write_report(str(exp), str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "report.md").write_text("the earlier report\n")  # a report to keep, not one like the next
    before["report.md"] = b"the earlier report\n"
    fill_disk(small_disk)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=WAIT_S)

    for done in (run("cifar_ray.report", str(exp), "--out", str(out)),
                 run("cifar_ray.refine", str(exp), "--out", str(small_disk / "next.yaml"))):
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("error: the disk is full") and len(done.stderr.splitlines()) == 1, done.stderr
        assert "free space or choose another folder, then run the command again" in done.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["ballast", "report"]
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    done = run("cifar_ray.report", str(exp), "--out", str(out))
    assert done.returncode == 1 and done.stderr.startswith("error: the file system is read-only"), done.stderr
    assert "Traceback" not in done.stderr


def test_a_report_or_refine_out_where_nothing_can_be_made_is_one_line(tmp_path, capsys):
    exp = refinable(tmp_path)
    (tmp_path / "a_file").write_text("")
    from cifar_ray.report import main as report_main

    assert report_main([str(exp), "--out", str(tmp_path / "a_file" / "report")]) == 2
    assert "cannot make the report's folder there (Not a directory); choose --out" in capsys.readouterr().err
    assert refine_main([str(exp), "--out", "/proc/next.yaml"]) == 2  # a folder no file can be made in
    assert "--out /proc/next.yaml: cannot write in /proc (No such file or directory)" in capsys.readouterr().err
