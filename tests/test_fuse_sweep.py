"""Fused sweeps (resources.fuse) on a real local Ray: the dry run lists the packs, what cannot fuse is
refused with the alternative, every member is a trial in every record (history, outcome, W&B run,
journal trial, trials() row with its pack, checkpoints that evaluate and retrain unfused), its curve
is the unfused trial's, and a fused sweep killed and resumed equals its straight run."""
import itertools
import math

import pytest

from cifar_ray import analysis
from cifar_ray.sweep import main
from conftest import (
    SweepProcess,
    assert_records_agree,
    assert_same_as_straight_run,
    wait_for,
    wandb_rows,
    write_sweep,
)

KEYS = ("train.lr", "train.momentum")
# netconv: BatchNorm, dropout and pooling, every wide layer. lr 10 diverges in its first epoch: that
# member leaves the pack while the others go on.
FUSED = dict(model={"name": "netconv"}, train__lr={"grid": [0.02, 10.0]}, train__momentum={"grid": [0.5, 0.9]},
             train__batch_size=32, train__amp="off", train__epochs=3, checkpoint={"keep": 1})


def run_sweep(tmp_path, name, **changes):
    path = write_sweep(tmp_path, name, **{**FUSED, **changes})
    assert main([str(path), "--storage-path", str(tmp_path / "results")]) == 0
    return tmp_path / "results" / name


@pytest.fixture(scope="module")
def fused_straight(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fused")
    return run_sweep(tmp, "fused", resources={"cpu": 1, "fuse": 4}), tmp


def test_the_dry_run_lists_packs_and_refuses_what_cannot_fuse(tmp_path, capsys):
    path = write_sweep(tmp_path, "dry", **FUSED, resources={"cpu": 1, "fuse": 3}, seeds=[0, 1])
    assert main([str(path), "--dry-run", "--storage-path", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "8 trials in 3 packs (resources.fuse 3)" in out
    assert out.count("pack ") == 3 and "netconv, 3 members  [cpu=1 for the pack]" in out
    assert "netconv, 2 members" in out and out.count("    trial ") == 8
    assert main([str(path), "--dry-run", "--set", "seeds=[0]", "--storage-path", str(tmp_path / "results")]) == 0
    assert "netconv, 1 member  [cpu=1 for the pack]" in capsys.readouterr().out  # 4 trials: packs of 3 and 1
    refused = {
        "asha": (["--set", "scheduler.kind=asha"], "scheduler.kind: fifo"),
        "pbt": (["--set", "scheduler.kind=pbt", "--set", "scheduler.mutations={train.lr: [0.1]}",
                 "--set", "checkpoint.keep=3"], "resources.fuse: 1 to run PBT"),
        "optuna over a shared key": (["--set", "search.kind=optuna", "--set", "train.lr={choice: [0.01, 0.02]}",
                                      "--set", "train.momentum=0.9", "--set", "seeds=null",
                                      "--set", "train.batch_size={choice: [16, 32]}"], "train.batch_size would split"),
        "inception": (["--set", "model.name=inception"], "concatenates its branches"),
        "per model": (["--set", "resources_by_model={netconv: {fuse: 2}}"], "use resources.fuse"),
    }
    for what, (sets, message) in refused.items():
        assert main([str(path), "--dry-run", *sets]) == 2, what
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (what, err)
    optuna = ["--set", "search.kind=optuna", "--set", "train.lr={loguniform: [0.001, 0.1]}", "--set", "seeds=null",
              "--set", "train.momentum={uniform: [0.5, 0.9]}",
              "--set", "search.samples=7"]
    assert main([str(path), "--dry-run", *optuna]) == 0
    assert "7 trials in up to 3 packs (resources.fuse 3), optuna search" in capsys.readouterr().out


def test_random_search_packs_its_draws_and_splits_packs_on_batch_size(tmp_path, capsys):
    path = write_sweep(tmp_path, "rnd", **{**FUSED, "train__lr": {"loguniform": [0.001, 0.1]},
                                           "train__batch_size": {"grid": [16, 32]}},
                       search={"kind": "random", "samples": 3, "seed": 7}, resources={"cpu": 1, "fuse": 4})
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    packs = [line for line in out.splitlines() if line.startswith("  pack")]
    assert len(packs) == 4, out  # 2 batch sizes x 2 momenta x 3 samples = 12 trials, packs of 4 by batch size
    lines = out.splitlines()
    for i, head in enumerate(lines):
        if head.startswith("  pack"):
            members = list(itertools.takewhile(lambda ln: ln.startswith("    trial"), lines[i + 1:]))
            assert len({ln.split("train.batch_size=")[1].split()[0] for ln in members}) == 1, members
    assert main([str(path), "--dry-run"]) == 0 and capsys.readouterr().out == out  # search.seed: the same draws


def test_every_member_is_a_trial_in_every_record_and_holds_what_it_trained(fused_straight):
    exp, _ = fused_straight
    sweep = analysis.load(exp)
    trials = sweep.trials()
    assert len(trials) == 4 and trials["pack"].nunique() == 1
    pack = trials["pack"].iloc[0]
    assert set(trials["trial_id"]) == {f"{pack}_{i}" for i in range(4)}
    assert sorted(trials["status"]) == ["completed", "completed", "diverged", "diverged"]
    assert sorted(trials["epochs"]) == [1, 1, 3, 3]
    # W&B: one run per member; the journal: one trial per member (assert_records_agree checks both
    # against curves(), epoch by epoch)
    assert_records_agree(exp)
    for trial_id in trials["trial_id"]:
        assert wandb_rows(exp, trial_id)
    # each member's record in its own folder; the pack's folder holds Tune's record of the pack only
    assert len(list(exp.glob(f"netconv_{pack}_*/history.jsonl"))) == 4
    assert len(list(exp.glob(f"netconv_{pack}_*/outcome.json"))) == 4
    assert (exp / f"pack_netconv_{pack}").is_dir() and not list(exp.glob("pack_*/history.jsonl"))

    # what happened: the same members trained as one pack here, with the one thread the trial had. The
    # record holds exactly its figures (same kernels, same order). That a pack equals its members trained
    # unfused is tests/test_fuse.py's (exact in float64; float32 kernels of grouped convolutions round
    # otherwise, and training amplifies it: 1e-3 in a loss after an epoch of netconv at momentum 0.9)
    import torch

    from cifar_ray.config import TrialConfig
    from cifar_ray.fuse import fit_pack

    members = sorted(trials["trial_id"])
    cfgs = [TrialConfig.from_flat(sweep._record(m).config) for m in members]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        history = fit_pack(cfgs, None, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    curves = sweep.curves()
    for member, want in zip(members, history, strict=True):
        got = curves[curves["trial_id"] == member].to_dict("records")
        assert [r["epoch"] for r in got] == [r["epoch"] for r in want], member
        for g, w in zip(got, want, strict=True):
            for col in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
                same = g[col] == w[col] or (math.isnan(g[col]) and math.isnan(w[col]))
                assert same, f"{member} epoch {w['epoch']} {col}: recorded {g[col]} != trained {w[col]}"

    # each member's own best checkpoint, in its own folder, evaluates unfused to its best epoch's figure
    best = sweep.best()
    assert best.checkpoint is not None and best.checkpoint.parent.name == f"netconv_{best.trial_id}"
    assert sweep.evaluate(best.trial_id, split="val").accuracy == best.score
    for trial_id in trials.loc[trials["status"] == "completed", "trial_id"]:
        assert sweep.checkpoints(trial_id)


def test_a_member_retrains_unfused_from_the_results_folder(fused_straight, capsys):
    from cifar_ray.train import main as train_main

    exp, _ = fused_straight
    best = analysis.load(exp).best()
    assert train_main(["--from", str(exp), "--trial", best.trial_id, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "Traceback" not in out


@pytest.mark.slow
def test_a_fused_sweep_killed_and_resumed_equals_its_straight_run(fused_straight, ray_session, tmp_path):
    straight, _ = fused_straight
    path = write_sweep(tmp_path, "fused", **FUSED, resources={"cpu": 1, "fuse": 4})
    exp = tmp_path / "results" / "fused"
    first = SweepProcess(path, tmp_path, ray_session)
    # kill -9 once the pack's first checkpoint is in its members' folders: the pack resumes from it mid-run,
    # with the two members that diverged in epoch 1 out of it
    wait_for(lambda: len(list(exp.glob("netconv_*/checkpoint_000001"))) == 4 or first.proc.poll() is not None,
             "the pack's first checkpoint")
    first.kill()
    assert first.proc.returncode == -9, first.output()  # killed mid-run, not finished
    code, out = SweepProcess(path, tmp_path, ray_session, "--resume").finish()
    assert code == 0, out
    assert_same_as_straight_run(exp, straight, KEYS)


@pytest.mark.slow
def test_fused_optuna_packs_its_proposals_and_resumes_without_trying_one_twice(ray_session, tmp_path):
    from conftest import SLOWER_DATA

    path = write_sweep(tmp_path, "tpe", data=SLOWER_DATA, train__epochs=4, train__lr={"loguniform": [0.001, 0.1]},
                       train__momentum={"uniform": [0.5, 0.95]}, search={"kind": "optuna", "samples": 6, "seed": 0},
                       resources={"cpu": 1, "fuse": 2})
    exp = tmp_path / "results" / "tpe"
    sweep = SweepProcess(path, tmp_path, ray_session)

    def one_pack_ended_and_one_training():
        """A pack's members ended, and another pack has reported (whether or not Tune's timed state
        snapshot has seen it since: the snapshot taken when a pack is made holds it and the searcher
        that drew it, cifar_ray.tune_search.new_trials_snapshot)."""
        def pack(member: str) -> str:  # base_<pack id>_<index>
            return member.rsplit("_", 1)[0]

        members = [d.name for d in exp.glob("base_*") if d.is_dir()]
        # a pack's members' outcomes are written one after another: a pack has ended once all of them are
        done = {name for name in members if (exp / name / "outcome.json").exists()}
        ended = {name for name in done if all(m in done for m in members if pack(m) == pack(name))}
        training = [name for name in members if pack(name) not in {pack(d) for d in done}
                    and (exp / name / "history.jsonl").exists() and (exp / name / "history.jsonl").read_text()]
        return ended if ended and training else sweep.proc.poll() is not None

    ended = wait_for(one_pack_ended_and_one_training, "a pack's members ended, another pack's training")
    assert isinstance(ended, set), sweep.output()  # the sweep was still running
    def curve(name):  # epoch -> val_acc, the later report standing
        from cifar_ray.record import read_rows

        return {r["epoch"]: r["val_acc"] for r in read_rows(exp / name / "history.jsonl")}

    members_done = {name: curve(name) for name in ended}
    sweep.kill()
    assert sweep.proc.returncode == -9
    code, out = SweepProcess(path, tmp_path, ray_session, "--resume").finish()
    assert code == 0, out
    df = analysis.load(exp).trials()
    assert len(df) == 6 and set(df["status"]) == {"completed"}  # Optuna proposed 6 members, not more
    assert sorted(df.groupby("pack").size()) == [2, 2, 2]  # in 3 packs of 2
    configs = list(zip(df["train.lr"], df["train.momentum"], strict=True))
    assert len(set(configs)) == 6  # no configuration tried twice
    assert df["train.lr"].between(0.001, 0.1).all() and df["train.momentum"].between(0.5, 0.95).all()
    assert len(members_done) in (2, 4)  # one pack's members, or two packs' when they ended together
    for name, before in members_done.items():  # the finished pack's members were not trained again (a pack
        assert curve(name) == before, name    # the snapshot missed may report its final epoch again, the same)
    assert_records_agree(exp)  # one journal trial per member, told its own curve and end


def test_a_strangers_pack_state_reads_nothing_outside_its_folder(fused_straight, tmp_path):
    """A results folder's state names a pack's folder ("../..") and claims a pack of 10,000 members: the
    reader follows neither (no file outside the folder is read; no pack beyond resources.fuse's bound)."""
    import json
    import shutil

    exp, _ = fused_straight
    copy = tmp_path / "a" / "b" / "fused"
    shutil.copytree(exp, copy)
    (tmp_path / "a" / "error.txt").write_text("a file outside the folder\n")
    state_file = sorted(copy.glob("experiment_state-*.json"))[-1]
    doc = json.loads(state_file.read_text())
    trial = json.loads(doc["trial_data"][0][0])
    trial["relative_logdir"] = ".."
    trial["status"] = "ERROR"
    doc["trial_data"][0][0] = json.dumps(trial)
    huge = dict(trial, trial_id="zzz_00001", relative_logdir="pack_x")
    huge["config"] = {**trial["config"], "pack.members": json.dumps([{"model.name": "netconv"}] * 10_000)}
    doc["trial_data"].append([json.dumps(huge), doc["trial_data"][0][1]])
    state_file.write_text(json.dumps(doc))
    for folder in copy.glob("netconv_*"):
        (folder / "outcome.json").unlink()
    trials = analysis.load(copy).trials()
    assert len(trials) == 5  # the 4 members, and the oversized "pack" read as one trial of its own
    assert not trials["error"].astype(str).str.contains("outside").any()
