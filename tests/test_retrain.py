"""`python -m cifar_ray.train --from FILE|RESULTS_DIR [--trial]` (cifar_ray.retrain and train's CLI)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_ray.config import ConfigError, TrialConfig
from cifar_ray.retrain import from_sweep_file
from cifar_ray.space import build_space, expand_grid
from cifar_ray.sweep import main as sweep_main
from cifar_ray.sweep_config import read_sweep
from cifar_ray.train import main as train_main
from conftest import WAIT_S, write_sweep


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cifar_ray.train", *args], capture_output=True, text=True,
                          env={**os.environ}, timeout=WAIT_S)


def test_a_file_with_one_configuration_trains_it(tmp_path):
    path = write_sweep(tmp_path, "one", train__epochs=1, train__lr=0.02, train__seed=3)
    r = _cli("--from", str(path))
    assert r.returncode == 0, r.stderr
    assert f"training {path}: base, 1 epochs, batch 64, seed 3" in r.stdout
    assert "epoch   1/1" in r.stdout and "lr 0.02 " in r.stdout
    assert "Accuracy of the network on the 200 test images:" in r.stdout
    assert "Accuracy for class: airplane" in r.stdout


def test_flags_and_set_override_the_file(tmp_path):
    path = write_sweep(tmp_path, "one", train__epochs=3)
    chosen = from_sweep_file(str(path), None, ["train.epochs=1", "train.amp=off"], "synthetic")
    assert chosen.config.train.epochs == 1 and chosen.config.train.amp == "off"
    r = _cli("--from", str(path), "--epochs", "1", "--set", "train.seed=7", "--set", "train.amp=off")
    assert r.returncode == 0, r.stderr
    assert "1 epochs, batch 64, seed 7" in r.stdout


def test_trial_n_is_the_dry_runs_nth_trial(tmp_path):
    path = write_sweep(tmp_path, "grid", train__lr={"grid": [0.01, 0.05]}, train__momentum={"grid": [0.5, 0.9]})
    sweep = read_sweep(str(path))
    listed = expand_grid(build_space(sweep, str(path)), sweep)
    for n, flat in enumerate(listed, 1):
        chosen = from_sweep_file(str(path), str(n), [], None)
        assert chosen.config == TrialConfig.from_flat(flat)
        assert f"trial {n}/4" in chosen.label
    assert from_sweep_file(str(path), "3", [], None).config.train.lr == 0.05
    assert from_sweep_file(str(path), "3", [], None).config.train.momentum == 0.5


@pytest.mark.parametrize("changes,args,needle", [
    ({"train__lr": {"grid": [0.01, 0.05]}}, [], "describes 2 trials; pick one with --trial N (1-2"),
    ({"train__lr": {"grid": [0.01, 0.05]}}, ["--trial", "3"], "--trial 3: "),
    ({"train__lr": {"grid": [0.01, 0.05]}}, ["--trial", "x"], "has trials 1-2"),
    ({"train__lr": {"loguniform": [0.001, 0.1]}, "search": {"kind": "random", "samples": 2}}, [],
     "drawn at random when the sweep runs"),
    ({"train__lr": "fast"}, [], "train.lr"),
])
def test_bad_choices_exit_2_with_the_reason(tmp_path, changes, args, needle):
    path = write_sweep(tmp_path, "bad", **changes)
    r = _cli("--from", str(path), *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_trial_needs_from_and_missing_sources_are_clear(tmp_path):
    r = _cli("--trial", "2")
    assert r.returncode == 2 and "--trial goes with --from" in r.stderr
    r = _cli("--from", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "no such file" in r.stderr
    (tmp_path / "empty").mkdir()
    r = _cli("--from", str(tmp_path / "empty"))
    assert r.returncode == 2 and "not a sweep folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ["fast", "fast94"])
def test_the_fast_recipes_are_single_configurations(name):
    cfg = from_sweep_file(f"sweeps/{name}.yaml", None, [], None).config
    assert cfg.model.name == "whitened_cnn" and cfg.data.val_size == 10_000 and cfg.data.train_size is None
    assert cfg.train.tta == "flip_translate" and cfg.train.schedule == "triangle" and cfg.train.lookahead_decay > 0


def test_the_fast_recipe_runs_end_to_end_on_small_data():
    r = _cli("--from", "sweeps/fast.yaml", "--data", "synthetic", "--epochs", "1", "--set", "data.val_size=500",
             "--set", "data.synthetic_size=1800", "--set", "train.batch_size=128")
    assert r.returncode == 0, r.stderr
    assert "whitened_cnn, 1 epochs, batch 128" in r.stdout
    assert "Accuracy of the network on the 300 test images:" in r.stdout
    assert "(test-time augmentation: flip_translate)" in r.stdout


@pytest.fixture(scope="module")
def finished(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrain")
    path = write_sweep(tmp, "again", train__lr={"grid": [0.01, 0.05]}, data={**{"source": "synthetic"},
                       "synthetic_size": 1200, "val_size": 200, "augment": {"hflip": 0.5, "crop_padding": 2}})
    assert sweep_main([str(path), "--storage-path", str(tmp / "results")]) == 0
    return tmp / "results" / "again"


def test_a_results_folders_trial_is_trained_again_exactly(finished, capsys):
    from cifar_ray import analysis

    trials = analysis.load(finished).trials()
    row = trials.sort_values("trial_id").iloc[1]
    threads = torch.get_num_threads()
    try:
        assert train_main(["--from", str(finished), "--trial", row["trial_id"][-5:]]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert f"trial {row['trial_id']}: base, 2 epochs" in out and "1 threads" in out
    assert "(recorded " in out
    assert "recorded run: val_acc identical at all 2 recorded epochs" in out
    assert "Accuracy of the network on the 200 test images:" in out


def test_a_results_folder_needs_a_trial_id_when_it_has_several(finished, capsys):
    assert train_main(["--from", str(finished)]) == 2
    err = capsys.readouterr().err
    assert "2 trials; pick one with --trial ID:" in err
    assert train_main(["--from", str(finished), "--trial", "zzz"]) == 2
    assert "--trial zzz: is not a trial of it" in capsys.readouterr().err


def test_pick_reports_ambiguous_ids():
    from types import SimpleNamespace

    from cifar_ray.retrain import _pick

    records = [SimpleNamespace(trial_id="a_00001", folder=Path("x/base_a_00001")),
               SimpleNamespace(trial_id="a_00011", folder=Path("x/net3_a_00011"))]
    assert _pick(records, "00011", "x").trial_id == "a_00011"
    # the folder's name, as the console's `started`/`ended` lines print it
    assert _pick(records, "net3_a_00011", "x").trial_id == "a_00011"
    assert _pick(records, "a_00001", "x").trial_id == "a_00001"  # an exact id wins over another's end
    with pytest.raises(ConfigError, match="matches several trials"):
        _pick(records, "1", "x")
    with pytest.raises(ConfigError, match="is not a trial of it"):
        _pick(records, "", "x")


def test_compare_line_names_the_largest_difference():
    from cifar_ray.train import compare_line

    ours = [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.6}]
    assert compare_line(ours, [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.6}]) == \
        "recorded run: val_acc identical at all 2 recorded epochs"
    assert "differs by up to 0.0300 over 2 epochs" in compare_line(ours, [{"epoch": 1, "val_acc": 0.52},
                                                                          {"epoch": 2, "val_acc": 0.63}])
    assert compare_line(ours, [{"epoch": 5, "val_acc": 0.5}]) == "recorded run: no epoch to compare"
    differ = ["torch 2.4.0 -> 2.14.1"]
    assert compare_line(ours, [{"epoch": 1, "val_acc": 0.52}], differ).endswith(
        "this run differs from the sweep's in: torch 2.4.0 -> 2.14.1")
    same = compare_line(ours, [{"epoch": 1, "val_acc": 0.52}], [])
    assert "with the sweep's commit, library versions and device" in same
    assert "the folder records no provenance" in compare_line(ours, [{"epoch": 1, "val_acc": 0.52}], None)


def test_train_from_compares_against_the_folders_provenance(finished, tmp_path, capsys):
    """What `train --from` says differs comes from what the folder recorded: another torch, another
    commit, another device, named; a folder that recorded nothing is said to have no record."""
    import json
    import shutil
    from importlib import metadata

    from cifar_ray import analysis
    from cifar_ray.retrain import from_results
    from cifar_ray.train import run_differences

    copy = tmp_path / "again"
    shutil.copytree(finished, copy)
    record = analysis.load(copy).provenance()
    assert record["commit"] and record["versions"]["torch"] == metadata.version("torch")
    trial = analysis.load(copy).trials()["trial_id"].iloc[0]
    record["dirty"] = False  # as on a clean checkout (this one may have changes)
    (copy / "provenance.json").write_text(json.dumps(record))
    assert run_differences(from_results(str(copy), trial, [], None), "cpu") == []  # the same code, here
    record["dirty"] = True
    (copy / "provenance.json").write_text(json.dumps(record))
    assert run_differences(from_results(str(copy), trial, [], None), "cpu") == [
        "the sweep ran with uncommitted changes"]
    record["dirty"] = False
    commit = record["commit"]
    record["commit"], record["versions"]["torch"] = "0" * 40, "2.4.0"
    (copy / "provenance.json").write_text(json.dumps(record))
    found = run_differences(from_results(str(copy), trial, [], None), "cuda")
    assert found == [f"commit 0000000000 -> {commit[:10]}", f"torch 2.4.0 -> {metadata.version('torch')}",
                     "device cpu -> cuda"]
    (copy / "provenance.json").unlink()
    assert run_differences(from_results(str(copy), trial, [], None), "cpu") is None
