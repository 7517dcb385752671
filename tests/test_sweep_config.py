"""Sweep files: schema, search space, dry runs and every way a file can be wrong (no Ray started)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_ray.config import ConfigError
from cifar_ray.space import Domain, build_space, expand_grid, grid_points, trial_count
from cifar_ray.sweep import main
from cifar_ray.sweep_config import apply_overrides, read_sweep
from conftest import WAIT_S, write_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
BAD = sorted((ROOT / "tests" / "data" / "bad_sweeps").glob("*.yaml"))


def expected(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# expect: "), path
    return first.removeprefix("# expect: ")


def test_corpus_is_large_enough():
    assert len(BAD) >= 30


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_validates_and_dry_runs(path, capsys):
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "total epochs at most:" in out


def test_resnet_grid_is_the_seeds_20_trials(capsys):
    sweep = read_sweep(str(ROOT / "sweeps/resnet_grid.yaml"))
    space = build_space(sweep, "resnet_grid.yaml")
    trials = expand_grid(space, sweep)
    assert trial_count(space, sweep) == 20 and len(trials) == 20
    assert {(t["train.lr"], t["train.momentum"]) for t in trials} == {
        (lr, m) for lr in (0.005, 0.001, 0.0005, 0.0001, 0.1) for m in (0, 0.5, 0.9, 0.99)}
    assert main([str(ROOT / "sweeps/resnet_grid.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("  trial ") == 20
    assert "train.lr=0.005  train.momentum=0.5  [cpu=1, gpu=0.25]" in out
    assert "total epochs at most: 100" in out


def test_dry_run_writes_nothing_and_starts_no_ray(tmp_path):
    code = ("import sys\nfrom cifar_ray.sweep import main\n"
            "rc = main([sys.argv[1], '--dry-run', '--storage-path', sys.argv[2]])\n"
            "print(rc, 'ray' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "sweeps/quickstart.yaml"), str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "0 False", r.stdout + r.stderr
    assert not (tmp_path / "r").exists()


def test_random_search_lists_domains(capsys):
    assert main([str(ROOT / "sweeps/resnet_pbt.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "train.lr: loguniform(0.001, 0.1)" in out and "samples: 8" in out


def test_seeds_repeat_every_configuration():
    sweep = read_sweep(str(ROOT / "sweeps/quickstart.yaml"), ["seeds=[0, 1, 2]"])
    space = build_space(sweep, "q")
    trials = expand_grid(space, sweep)
    assert len(trials) == 12
    assert sorted({t["train.seed"] for t in trials}) == [0, 1, 2]


def test_set_and_data_overrides():
    sweep = read_sweep(str(ROOT / "sweeps/quickstart.yaml"), ["train.lr=0.2", "train.momentum={grid: [0.1, 0.2, 0.3]}"],
                       data="synthetic")
    space = build_space(sweep, "q")
    assert space.values["train.lr"] == 0.2 and space.values["data.source"] == "synthetic"
    assert space.values["train.momentum"] == Domain("grid", (0.1, 0.2, 0.3))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.lr"])


def test_nested_augment_keys_are_searchable():
    sweep = read_sweep(str(ROOT / "sweeps/quickstart.yaml"),
                       ["data.augment={hflip: {grid: [0, 0.5]}, crop_padding: 4}"])
    space = build_space(sweep, "q")
    assert space.values["data.augment.hflip"] == Domain("grid", (0, 0.5))
    assert trial_count(space, sweep) == 8


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_sweep_files_exit_2_naming_the_problem(path, capsys):
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert expected(path) in err, err
    assert "Traceback" not in err


def test_a_boolean_is_refused_where_a_number_is_meant_and_taken_where_a_switch_is():
    """YAML reads yes/no/on/off/true/false as booleans, and pydantic would take them as 1 and 0: `hflip: true`
    would mirror every image and `epochs: yes` train one epoch. Each schema's numbers refuse them, in
    optional, list and mapping fields too; a switch still takes 1 and 0."""
    from cifar_ray.config import TrainConfig, TrialConfig, trial_config
    from cifar_ray.sweep_config import ResourcesConfig, SweepConfig

    for tree in ({"train": {"epochs": True}}, {"train": {"lr": False}}, {"data": {"augment": {"hflip": True}}},
                 {"model": {"width": True}}, {"train": {"whiten_bias_epochs": False}}, {"data": {"train_size": True}}):
        with pytest.raises(ConfigError, match="expects a number, not true/false"):
            trial_config(tree)
    for bad in ({"cpu": True}, {"fuse": True}, {"tags": {"cuda": True}}):
        with pytest.raises(ValueError, match="expects a number"):
            ResourcesConfig.model_validate(bad)
    with pytest.raises(ValueError, match="seeds"):
        SweepConfig.model_validate({"name": "x", "seeds": [0, True]})
    assert TrainConfig(nesterov=1, momentum=0.9).nesterov is True and TrainConfig(compile=0).compile is False
    assert TrainConfig.model_validate({"amp": False}).amp == "off"  # `amp: off`, read by YAML as false
    assert TrialConfig.model_validate({"train": {"epochs": "3", "lr": 1}}).train.epochs == 3  # numbers as before


def test_the_train_cli_names_a_search_domain_among_its_options(capsys):
    """One configuration trains one model: a domain in --set is named as one (misspelt or not), not
    reported as "Input should be a valid number"."""
    from cifar_ray.train import main as train_main

    base = ["--model", "net1", "--set", "data.source=synthetic"]
    assert train_main([*base, "--set", "train.lr={grid: [0.1, 0.2]}"]) == 2
    assert "options: train.lr: a search domain trains many models, and this trains one" in capsys.readouterr().err
    assert train_main([*base, "--set", "data.augment={hflip: {uniform: [0, 1]}}"]) == 2
    assert "options: data.augment.hflip: a search domain trains many models" in capsys.readouterr().err
    assert train_main([*base, "--set", "train.lr={gird: [0.1, 0.2]}"]) == 2
    assert "options: train.lr: 'gird' is not a kind of search domain (did you mean 'grid'?)" in capsys.readouterr().err
    assert train_main([*base, "--set", "train.epochs=yes"]) == 2
    assert "options: train.epochs: expects a number, not true/false" in capsys.readouterr().err
    assert train_main([*base, "--set", "train=5"]) == 2  # a section given one value: the schema says so
    assert "options: train: Input should be a valid dictionary" in capsys.readouterr().err


def test_bad_files_are_one_line_and_start_nothing(tmp_path):
    """As a user runs it: a subprocess, one line, no traceback, and nothing started: no Ray, no results."""
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"name: x\n" + b"# padding\n" * (5 * 2**20))  # 50 MB
    files = [huge, *BAD]
    code = ("import sys, io, contextlib\nfrom cifar_ray.sweep import main\n"
            "for f in sys.argv[1:]:\n"
            "    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err): rc = main([f])\n"
            "    ray = sys.modules.get('ray')\n"
            "    started = bool(ray and ray.is_initialized())\n"
            "    print(rc, started, len(err.getvalue().strip().splitlines()), f)\n")
    r = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=WAIT_S)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(files)
    for line in lines:
        rc, started, n_lines, name = line.split(" ", 3)
        assert rc == "2", line
        assert started == "False", line
        assert int(n_lines) <= 2, line  # one reason (a file with two problems may name both)
    assert not (tmp_path / "results").exists()
    assert not Path("/tmp/cifar_ray_pwned").exists()


def test_a_cluster_address_where_no_ray_answers_is_one_line_at_once(tmp_path):
    """--address (or $RAY_ADDRESS) naming a port nothing serves: exit 2 in one line naming it and the way
    on, nothing written; before, Ray retried for minutes (20 tries of up to 40 s each) and ended in a
    traceback. A subprocess: the test session's own Ray would be used as the caller's."""
    import socket

    closed = socket.socket()  # bound, never listening: a connection to it is refused for as long as it is held
    closed.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{closed.getsockname()[1]}"
    path = tmp_path / "q.yaml"
    path.write_text((ROOT / "sweeps/quickstart.yaml").read_text())
    code = ("import sys, os\nfrom cifar_ray.sweep import main\n"
            "base = [sys.argv[1], '--data', 'synthetic', '--storage-path', sys.argv[2]]\n"
            "codes = [main([*base, '--address', sys.argv[3]]), main([*base, '--address', 'nohost']),\n"
            "         main([*base, '--dry-run', '--estimate', '--address', sys.argv[3]])]\n"
            "os.environ['RAY_ADDRESS'] = sys.argv[3]\n"
            "print('codes', *codes, main(base), 'ray' in sys.modules and sys.modules['ray'].is_initialized())\n")
    try:
        r = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "results"), address],
                           capture_output=True, text=True, timeout=WAIT_S)
    finally:
        closed.close()
    assert r.stdout.splitlines()[-1] == "codes 2 2 2 2 False", r.stdout + r.stderr
    assert f"error: --address {address}: no Ray cluster answers there (Connection refused); start the cluster " \
           "(ray up cluster.yaml, or ray start --head there) or correct --address" in r.stderr
    assert "error: --address nohost: expected HOST:PORT" in r.stderr
    assert f"error: $RAY_ADDRESS {address}: no Ray cluster answers there" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "results").exists()


def test_missing_file_and_bad_option(tmp_path, capsys):
    assert main([str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    # a cluster file the user names is read, not passed over when it is not there (before: ignored)
    quick = str(ROOT / "sweeps/quickstart.yaml")
    assert main([quick, "--dry-run", "--cluster-config", str(tmp_path / "nope.yaml")]) == 2
    assert f"error: --cluster-config {tmp_path / 'nope.yaml'}: no such file" in capsys.readouterr().err
    assert main([quick, "--dry-run", "--cluster-config", quick]) == 2
    assert "not a valid Ray cluster file" in capsys.readouterr().err
    assert main([quick, "--dry-run", "--cluster-config", str(ROOT / "cluster.yaml")]) == 0
    assert main([str(tmp_path)]) == 2  # a results folder given where its sweep file belongs
    assert "a folder, not a sweep file" in capsys.readouterr().err
    # a data path that is not there fails the dry run as it fails the run, naming the key
    missing = str(tmp_path / "cifar10-jpeg.tar.gz")
    assert main([str(ROOT / "sweeps/quickstart.yaml"), "--dry-run", "--data", missing]) == 2
    assert f"data.source: {missing}: no such file or folder" in capsys.readouterr().err
    assert main([str(ROOT / "sweeps/quickstart.yaml"), "--dry-run", "--set", f"data.source={missing}"]) == 2
    assert "data.source" in capsys.readouterr().err
    assert main([str(ROOT / "sweeps/quickstart.yaml"), "--set", "train.lr=-1", "--dry-run"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_grid_order_is_shuffled_under_asha_and_given_otherwise():
    doc = ["train.lr={grid: [0.1, 0.05, 0.01, 0.001]}", "train.momentum={grid: [0, 0.5, 0.9, 0.99]}"]
    given = read_sweep(str(ROOT / "sweeps/quickstart.yaml"), doc)
    pts = grid_points(build_space(given, "q"), given)
    assert [(p["train.lr"], p["train.momentum"]) for p in pts[:5]] == [
        (0.1, 0), (0.1, 0.5), (0.1, 0.9), (0.1, 0.99), (0.05, 0)]  # first key outermost
    asha = read_sweep(str(ROOT / "sweeps/quickstart.yaml"), doc + ["scheduler={kind: asha}"])
    shuffled = grid_points(build_space(asha, "q"), asha)
    assert shuffled != pts and sorted(map(str, shuffled)) == sorted(map(str, pts))
    assert shuffled == grid_points(build_space(asha, "q"), asha)  # seeded: the same every time
    other_seed = read_sweep(str(ROOT / "sweeps/quickstart.yaml"), doc + ["scheduler={kind: asha}", "search.seed=1"])
    assert grid_points(build_space(other_seed, "q"), other_seed) != shuffled
    kept = read_sweep(str(ROOT / "sweeps/quickstart.yaml"), doc + ["scheduler={kind: asha}", "search.order=given"])
    assert grid_points(build_space(kept, "q"), kept) == pts
    forced = read_sweep(str(ROOT / "sweeps/quickstart.yaml"), doc + ["search.order=shuffled"])
    assert grid_points(build_space(forced, "q"), forced) == shuffled


def test_dry_run_lists_trials_in_start_order(capsys):
    assert main([str(ROOT / "sweeps/quickstart.yaml"), "--dry-run", "--set", "scheduler={kind: asha}"]) == 0
    out = capsys.readouterr().out
    sweep = read_sweep(str(ROOT / "sweeps/quickstart.yaml"), ["scheduler={kind: asha}"])
    listed = [line.split(":", 1)[1] for line in out.splitlines() if line.startswith("  trial ")]
    expected = expand_grid(build_space(sweep, "q"), sweep)
    assert len(listed) == len(expected) and all(f"train.lr={t['train.lr']:g}" in line for line, t in zip(listed,
            expected, strict=True))
    assert "shuffled order" in out


# ---------------------------------------------------------------- configurations:

CONFIGURATIONS = ("configurations=[{}, {train.optimizer: muon, train.muon_lr: 0.18, "
                  "data.augment: {alternate_flip: true, crop_padding: 2}}, {train: {lr: 1.0, label_smoothing: 0.1}}]")


def test_configurations_run_each_listed_set_of_keys_over_the_seeds():
    from cifar_ray.config import TrialConfig

    sweep = read_sweep(str(ROOT / "sweeps/fast.yaml"), [CONFIGURATIONS, "seeds=[0, 1]"])
    space = build_space(sweep, "f")
    trials = expand_grid(space, sweep)
    assert trial_count(space, sweep) == 6 and len(trials) == 6
    keys = ["train.optimizer", "train.muon_lr", "data.augment", "train.lr", "train.label_smoothing", "train.seed"]
    assert space.searched_keys() == keys
    fast, alternate = {"hflip": 0.5, "crop_padding": 2}, {"alternate_flip": True, "crop_padding": 2}
    # each configuration changes what it names; the sections (fast.yaml's) and the defaults give the rest
    assert [tuple(t[k] for k in keys) for t in trials] == [
        ("sgd", 0.02, fast, 1.5, 0.2, 0), ("sgd", 0.02, fast, 1.5, 0.2, 1),
        ("muon", 0.18, alternate, 1.5, 0.2, 0), ("muon", 0.18, alternate, 1.5, 0.2, 1),
        ("sgd", 0.02, fast, 1.0, 0.1, 0), ("sgd", 0.02, fast, 1.0, 0.1, 1)]
    # a policy is one value that a configuration replaces whole (as --set does), never merged key by key
    assert not any(k.startswith("data.augment.") for t in trials for k in t)
    assert all(t["train.momentum"] == 0.85 and t["model.name"] == "whitened_cnn" for t in trials)
    assert [TrialConfig.from_flat(t).train.optimizer for t in trials] == ["sgd", "sgd", "muon", "muon", "sgd", "sgd"]
    # a resume refuses another list; a file without one keeps the fingerprint it had
    other = read_sweep(str(ROOT / "sweeps/fast.yaml"), [CONFIGURATIONS.replace("0.18", "0.2"), "seeds=[0, 1]"])
    assert build_space(other, "f").fingerprint() != space.fingerprint()
    plain = read_sweep(str(ROOT / "sweeps/fast.yaml"))
    assert "configurations" not in build_space(plain, "f").fingerprint()



def test_a_grid_runs_a_key_once_where_it_does_not_act(capsys):
    # Adam has no momentum: the optimizer x lr x momentum grid runs each Adam lr once, not once per momentum
    sets = ["train.optimizer={grid: [sgd, adam]}", "train.lr={grid: [0.01, 0.1]}",
            "train.momentum={grid: [0, 0.5, 0.9]}"]
    assert main([str(ROOT / "sweeps/quickstart.yaml"), "--dry-run", *(a for s in sets for a in ("--set", s))]) == 0
    out = capsys.readouterr().out
    assert "8 trials" in out and "4 grid points left out" in out, out
    assert "train.momentum acts only when train.optimizer is sgd or muon" in out
    assert "train.optimizer=adam  train.lr=0.01  train.momentum=-" in out
    assert out.count("train.optimizer=adam") == 2 and out.count("train.optimizer=sgd") == 6
    # within configurations too, seeds kept apart; and nothing left out where every key acts
    sweep = read_sweep(str(ROOT / "sweeps/quickstart.yaml"),
                       ["configurations=[{train.optimizer: adam}, {train.optimizer: sgd}]", "train.lr=0.01",
                        "train.momentum={grid: [0.5, 0.9]}", "seeds=[0, 1]"])
    points = grid_points(build_space(sweep, "q"), sweep)
    assert [(p["train.optimizer"], p["train.momentum"], p["train.seed"]) for p in points] == [
        ("adam", 0.5, 0), ("adam", 0.5, 1), ("sgd", 0.5, 0), ("sgd", 0.5, 1), ("sgd", 0.9, 0), ("sgd", 0.9, 1)]
    # a parent drawn at random is not known before the trial: nothing is left out
    sweep = read_sweep(str(ROOT / "sweeps/quickstart.yaml"), ["train.optimizer={choice: [sgd, adam]}",
                                                              "train.lr=0.01", "train.momentum={grid: [0.5, 0.9]}"])
    assert len(grid_points(build_space(sweep, "q"), sweep)) == 2

def test_nesterov_on_is_held_inert_by_adam_trials_and_refused_where_no_trial_can_use_it(capsys):
    # a grid over the optimizer gives every trial the file's nesterov: true: the SGD trials use it, Adam's
    # hold it inert (it was refused for the Adam trials); listed configurations alike
    quick = str(ROOT / "sweeps/quickstart.yaml")
    sets = ["train.optimizer={grid: [sgd, adam]}", "train.momentum=0.9", "train.nesterov=true"]
    assert main([quick, "--dry-run", *(a for s in sets for a in ("--set", s))]) == 0
    assert "sweep quickstart: 4 trials" in capsys.readouterr().out
    sets[0] = "configurations=[{train.optimizer: sgd}, {train.optimizer: adam}]"
    assert main([quick, "--dry-run", *(a for s in sets for a in ("--set", s))]) == 0
    # with Adam alone it can do nothing: refused, naming the key and the way out
    sets[0] = "train.optimizer=adam"
    assert main([quick, "--dry-run", *(a for s in sets for a in ("--set", s))]) == 2
    err = capsys.readouterr().err
    assert "train.nesterov: true does nothing here: it acts only when train.optimizer is sgd or muon" in err
    assert "set train.nesterov: false, or change train.optimizer" in err
    # and so is one configuration given to the train CLI
    from cifar_ray.train import main as train_main

    assert train_main(["--model", "netconv", "--set", "data.source=synthetic", "--set", "train.optimizer=adam",
                       "--set", "train.nesterov=true"]) == 2
    assert "options: train.nesterov: true does nothing here" in capsys.readouterr().err


def test_settings_for_layers_no_model_of_the_sweep_has_are_refused_and_held_inert_beside_one_that_has(capsys):
    # Muon steps the convolution filters and SGD the rest: on an MLP alone it is SGD, recorded as Muon
    quick = str(ROOT / "sweeps/quickstart.yaml")

    def dry(*sets: str) -> int:
        return main([quick, "--dry-run", *(a for s in sets for a in ("--set", s))])

    assert dry("model.name=net3", "train.optimizer=muon") == 2
    err = capsys.readouterr().err
    assert "train.optimizer: muon steps convolution filters, and model 'net3' has none" in err
    assert "use sgd, or a model with convolutions" in err
    # beside a model that has filters, the MLP's trials hold it inert (as Adam's trials hold nesterov)
    assert dry("model.name={grid: [net1, netconv]}", "train.optimizer=muon") == 0
    assert dry("configurations=[{model.name: net1}, {model.name: base}]", "train.optimizer=muon") == 0
    # BN momentum where no model has a BatchNorm layer, or where batch_norm is off in every trial
    assert dry("model.name=net2", "train.bn_momentum=0.4") == 2
    assert "train.bn_momentum: model 'net2' has no BatchNorm layer, so it changes nothing; leave it unset" in \
        capsys.readouterr().err
    assert dry("model.batch_norm=false", "train.bn_momentum=0.4") == 2
    assert "model 'netconv' with batch_norm off has no BatchNorm layer" in capsys.readouterr().err
    assert dry("model.batch_norm={grid: [true, false]}", "train.bn_momentum=0.4") == 0
    assert dry("model.name={grid: [net1, vgg16]}", "train.bn_momentum={grid: [0.1, 0.4]}") == 0
    # one configuration given to the train CLI
    from cifar_ray.train import main as train_main

    assert train_main(["--model", "net2", "--set", "data.source=synthetic", "--optimizer", "muon"]) == 2
    assert "options: train.optimizer: muon steps convolution filters, and model 'net2' has none" in \
        capsys.readouterr().err
    assert train_main(["--model", "base", "--set", "data.source=synthetic", "--set", "train.bn_momentum=0.4"]) == 2
    assert "options: train.bn_momentum: model 'base' with batch_norm off" in capsys.readouterr().err
    # a results folder keeps what ran: its trials' configs are read back as they are (Sweep.evaluate,
    # train --from RESULTS_DIR), so a record written before these checks is not refused
    from cifar_ray.config import TrialConfig

    cfg = TrialConfig.from_flat({"model.name": "net1", "train.optimizer": "muon", "train.bn_momentum": 0.4})
    assert (cfg.train.optimizer, cfg.train.bn_momentum) == ("muon", 0.4)


def test_the_dry_run_names_trials_this_machine_can_never_start(capsys):
    # the run here would load the data, start Ray, then exit 4 (cluster.check_feasible): the dry run says so
    quick = str(ROOT / "sweeps/quickstart.yaml")
    assert main([quick, "--dry-run", "--set", "resources.cpu=1024"]) == 0
    note = capsys.readouterr().out.splitlines()[-1]
    assert note.startswith("note: this machine (") and "can never start a trial of netconv (cpu=1024)" in note
    assert "the sweep exits 4; lower resources:, or run it on a cluster that offers it (--address)" in note
    assert main([quick, "--dry-run"]) == 0 and "note:" not in capsys.readouterr().out  # 1 CPU a trial fits
    if not torch.cuda.is_available():  # a GPU asked of a machine without one: the CPU would do
        assert main([quick, "--dry-run", "--set", "resources.gpu=0.25"]) == 0
        assert "--set resources.gpu=0 trains it on the CPU" in capsys.readouterr().out
    # on a cluster (--address) the run checks the cluster's nodes instead
    assert main([quick, "--dry-run", "--set", "resources.cpu=1024", "--address", "198.18.0.1:6379"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_configurations_with_a_grid_and_random_draws(capsys):
    # a grid runs within every configuration; a random draw is made for each trial
    sweep = read_sweep(str(ROOT / "sweeps/quickstart.yaml"),
                       ["configurations=[{train.optimizer: adam, train.lr: 0.001}, {}]", "train.lr=0.05"])
    space = build_space(sweep, "q")
    points = grid_points(space, sweep)
    # Adam has no momentum: the momentum grid runs it once (cifar_ray.applies)
    assert [(p["train.optimizer"], p["train.lr"], p["train.momentum"]) for p in points] == [
        ("adam", 0.001, 0.5), ("sgd", 0.05, 0.5), ("sgd", 0.05, 0.9)]
    sets = ["train.momentum=0.9", "train.lr=0.05", "train.weight_decay={loguniform: [0.00001, 0.001]}",
            "search={kind: random, samples: 3}", "configurations=[{train.optimizer: adam, train.lr: 0.001}, {}]"]
    assert main([str(ROOT / "sweeps/quickstart.yaml"), "--dry-run", *(a for s in sets for a in ("--set", s))]) == 0
    out = capsys.readouterr().out
    assert "sweep quickstart: 6 trials, random search" in out
    assert "configurations (2, each with every draw below):" in out
    assert "[0] train.optimizer=adam  train.lr=0.001" in out and "[1] train.optimizer=sgd  train.lr=0.05" in out



def _quiet_stop(command: list[str], cwd: Path, read_first: bool, unbuffered: str) -> tuple[int, bytes, str]:
    """Run `python -m COMMAND | head -1` (read_first) or `| true` (the reader gone before any write)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    proc = subprocess.Popen([sys.executable, "-m", *command], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline() if read_first else b""
    proc.stdout.close()  # the pipe's reader is gone: the writer's next write fails with EPIPE
    err = proc.stderr.read().decode()
    return proc.wait(timeout=WAIT_S), first, err


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "unbuffered"])
def test_a_listing_read_by_head_ends_quietly_with_the_sigpipe_status(unbuffered, tmp_path):
    """`... | head -1`: the reader takes a line and goes; the command stops with 141 (128 + SIGPIPE), as
    a Unix tool does, and prints no traceback. The listing (4,000 trial lines, ~300 kB) is larger than a
    pipe holds, so the write is cut short whatever the timing."""
    seeds = "train.seed={grid: [" + ", ".join(map(str, range(200))) + "]}"
    rc, first, err = _quiet_stop(["cifar_ray.sweep", str(ROOT / "sweeps/resnet_grid.yaml"), "--dry-run",
                                  "--set", seeds], tmp_path, True, unbuffered)
    assert rc == 141, err
    assert first.startswith(b"sweep resnet_grid: 4000 trials"), first
    assert err == "", err


def test_every_commands_way_out_turns_a_refused_write_a_path_that_leads_nowhere_and_ctrl_c_into_one_line(capsys):
    import errno

    from cifar_ray.pipes import run_main

    def failing(err: BaseException):
        def main() -> int:
            raise err
        return main

    assert run_main(failing(OSError(errno.ENOSPC, "No space left on device"))) == 1
    assert capsys.readouterr().err.startswith("error: the disk is full; nothing written before was changed")
    assert run_main(failing(PermissionError(errno.EACCES, "Permission denied", "/srv/x"))) == 1
    assert capsys.readouterr().err.startswith("error: permission denied (/srv/x); ")
    assert run_main(failing(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/\x1b[31m"))) == 1
    assert capsys.readouterr().err == "error: no such file or folder (/x/\\x1b[31m)\n"  # the escape is shown, not run
    assert run_main(failing(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "\ninterrupted\n"
    with pytest.raises(ConnectionResetError):  # not a path or a disk: a fault to see whole
        run_main(failing(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")))


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "unbuffered"])
def test_a_command_whose_reader_left_before_it_wrote_ends_quietly(unbuffered, tmp_path):
    rc, _, err = _quiet_stop(["cifar_ray.models"], tmp_path, False, unbuffered)
    assert rc == 141, err
    assert err == "", err


def test_the_full_disk_line_names_the_disk_that_refused_and_resumes_only_a_begun_sweep(tmp_path):
    """A write refused for want of space outside the results folder (the data cache, Ray's temporary
    folder) names that folder's disk, not the results folder's; a sweep that had not begun is run
    again, not resumed (its results folder holds nothing to resume)."""
    import errno

    from cifar_ray.sweep import disk_full_line, parse_args, plan_from_args

    path = write_sweep(tmp_path, "full")
    plan = plan_from_args(parse_args([str(path), "--storage-path", str(tmp_path / "results")]))
    elsewhere = tmp_path / "cache"
    elsewhere.mkdir()
    line = disk_full_line(plan, OSError(errno.ENOSPC, "No space left on device", str(elsewhere / "x.npz")))
    assert line.startswith(f"error: the disk holding {elsewhere} is full (") and "run the sweep again" in line
    plan.results.mkdir(parents=True)
    (plan.results / "sweep.yaml").write_text("name: full\n")
    line = disk_full_line(plan, OSError(errno.ENOSPC, "No space left on device"))
    assert line.startswith(f"error: the disk holding {plan.results} is full (") and "resume with: python -m" in line
