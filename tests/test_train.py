import math
import os
import subprocess
import sys
import typing

import pytest
import torch

from cifar_ray import metrics as M
from cifar_ray.config import Optimizer, TrialConfig
from cifar_ray.data import load_dataset, make_synthetic
from cifar_ray.train import (
    amp_dtype,
    cpu_has_native_bf16,
    evaluate_split,
    fit,
    format_report,
    has_diverged,
    load_state,
    save_state,
)
from conftest import REAL_DATA


def cfg(model="base", **train):
    data = train.pop("data", {})
    mopts = train.pop("model_opts", {})
    return TrialConfig.model_validate({
        "model": {"name": model, **mopts},
        "data": {"source": "synthetic", "synthetic_size": 2400, "val_size": 400, **data},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "device": "cpu", **train},
    })


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(2400)


def test_small_cnn_learns_synthetic_data():
    c = TrialConfig.model_validate({"model": {"name": "base"},
                                    "data": {"source": "synthetic", "val_size": 2000},
                                    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "device": "cpu"}})
    result = fit(c)
    assert result.status == M.COMPLETED
    assert [h[M.EPOCH] for h in result.history] == [1, 2]
    assert result.history[-1][M.VAL_ACC] > 0.5
    assert result.history[-1][M.TRAIN_LOSS] < result.history[0][M.TRAIN_LOSS]
    last = result.history[-1]
    for key in M.EPOCH_METRICS:
        assert isinstance(last[key], float) and math.isfinite(last[key]), key
    assert set(last[M.VAL_CLASS_ACC]) == {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                          "ship", "truck"}
    assert last[M.PEAK_MEMORY_MB] > 0 and last[M.IMAGES_PER_SECOND] > 0


def test_reported_val_acc_is_reproduced_by_evaluate(synthetic):
    c = cfg()
    result = fit(c, synthetic)
    ev = evaluate_split(result.model, c, synthetic, "val")
    assert ev.accuracy == pytest.approx(result.history[-1][M.VAL_ACC])
    assert ev.confusion.sum() == 400
    assert sum(ev.class_accuracy[c] * ev.confusion[i].sum() for i, c in enumerate(ev.classes)) == pytest.approx(
        ev.accuracy * 400)


@pytest.mark.parametrize("schedule", ["onecycle", "step"])
def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, synthetic, schedule):
    c = cfg("netconv", epochs=3, schedule=schedule, step_size=1, momentum=0.9, weight_decay=5e-4,
            model_opts={"width": 0.25}, data={"augment": "seed", "synthetic_size": 2400, "val_size": 400})

    def keep(metrics, make_state):
        if metrics[M.EPOCH] == 1:
            save_state(make_state(), tmp_path / "epoch1.pt")

    full = fit(c, synthetic, on_epoch=keep)
    state = load_state(tmp_path / "epoch1.pt")  # weights_only=True
    assert state["epoch"] == 1
    resumed = fit(c, synthetic, resume=state)
    assert [h[M.EPOCH] for h in resumed.history] == [2, 3]
    for a, b in zip(full.history[1:], resumed.history, strict=True):
        for key in (M.TRAIN_LOSS, M.TRAIN_ACC, M.VAL_LOSS, M.VAL_ACC, M.LR):
            assert a[key] == b[key], key
    for pa, pb in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("how", ["completed", "early_stopped"])
def test_a_state_saved_at_the_end_reports_its_final_metrics_again(tmp_path, synthetic, how):
    """A PBT clone of a finished trial, or a retry after the last report, starts from a state saved at
    the run's end: the engine reports that epoch again, with its outcome, instead of nothing."""
    if how == "early_stopped":  # the settings of test_early_stopping_on_val_loss
        c = cfg("netconv", epochs=40, lr=0.05, early_stopping_patience=2, model_opts={"dropout": 0.0},
                data={"train_size": 60, "synthetic_size": 2400, "val_size": 400})
    else:
        c = cfg()
    saved = []
    full = fit(c, synthetic, on_epoch=lambda m, make_state: saved.append(make_state()))
    assert full.status == how
    state = saved[-1]
    states = []
    again = fit(c, synthetic, resume=state, on_epoch=lambda m, make_state: states.append((m, make_state())))
    assert again.status == how
    assert len(states) == 1, "the restored end was reported exactly once"
    metrics, new_state = states[0]
    assert metrics == full.history[-1]
    assert new_state["epoch"] == state["epoch"] and new_state["metrics"] == full.history[-1]
    for key, value in state["model"].items():
        assert torch.equal(new_state["model"][key], value), key


def test_divergence_stops_with_status_not_exception(synthetic):
    result = fit(cfg(lr=10.0, momentum=0.99, epochs=5), synthetic)
    assert result.status == M.DIVERGED
    assert len(result.history) < 5 or result.history[-1][M.STATUS] == M.DIVERGED
    assert math.isnan(result.history[-1][M.TRAIN_LOSS])


def test_early_stopping_on_val_loss(synthetic):
    result = fit(cfg("netconv", epochs=40, lr=0.05, early_stopping_patience=2, model_opts={"dropout": 0.0},
                     data={"train_size": 60, "synthetic_size": 2400, "val_size": 400}), synthetic)
    assert result.status == M.EARLY_STOPPED
    losses = [h[M.VAL_LOSS] for h in result.history]
    assert len(losses) < 40
    assert min(losses[-2:]) >= min(losses)  # the last two epochs did not improve


def test_inception_trains_with_aux_losses(synthetic):
    result = fit(cfg("inception", epochs=1, model_opts={"width": 0.125},
                     data={"train_size": 64, "synthetic_size": 2400, "val_size": 400}), synthetic)
    assert math.isfinite(result.history[0][M.TRAIN_LOSS])


@pytest.mark.parametrize("optimizer", typing.get_args(Optimizer))
def test_optimizers_and_label_smoothing(synthetic, optimizer):
    result = fit(cfg(optimizer=optimizer, lr=0.003 if optimizer != "sgd" else 0.05, label_smoothing=0.1,
                     schedule="cosine"), synthetic)
    assert result.history[-1][M.TRAIN_LOSS] < result.history[0][M.TRAIN_LOSS]
    assert result.history[-1][M.VAL_ACC] > 0.15  # above chance (0.1) after two short epochs
    assert result.history[1][M.LR] < result.history[0][M.LR]


def test_lr_reference_batch_scales_linearly():
    c = cfg(lr=0.1, batch_size=256, lr_reference_batch=128)
    assert c.train.effective_lr() == pytest.approx(0.2)


def test_state_file_is_replaced_atomically(tmp_path):
    save_state({"epoch": 1, "w": torch.ones(3)}, tmp_path / "s.pt")
    save_state({"epoch": 2, "w": torch.zeros(3)}, tmp_path / "s.pt")
    assert load_state(tmp_path / "s.pt")["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]


def test_report_format():
    import numpy as np

    from cifar_ray.train import Evaluation

    cm = np.array([[9, 1], [2, 8]])
    ev = Evaluation(0.85, 0.4, {"plane": 0.9, "car": 0.8}, cm, ("plane", "car"))
    assert format_report(ev).splitlines() == [
        "Accuracy of the network on the 20 test images: 85 %",
        "Accuracy for class: plane      is 90.0 %",
        "Accuracy for class: car        is 80.0 %",
    ]


def _cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "cifar_ray.train", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["--model", "resnet19"], "model.name: unknown model 'resnet19' (did you mean 'resnet18'?)"),
    (["--epochs", "0"], "train.epochs"),
    (["--lr", "abc"], "train.lr"),
    (["--optimizer", "sgdd"], "train.optimizer: 'sgdd' is not one of"),
    (["--device", "tpu"], "train.device"),
    (["--data", "/nonexistent/x"], "no such file or folder"),
    (["--lr", "nan"], "finite"),
])
def test_cli_rejects_bad_values_with_exit_2(args, needle):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_cli_runs_a_trial_and_prints_the_report():
    r = _cli("--model", "base", "--data", "synthetic", "--epochs", "1", "--val-size", "2000", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "epoch   1/1" in r.stdout
    assert "Accuracy of the network on the 2000 test images:" in r.stdout
    assert "Accuracy for class: airplane" in r.stdout


@pytest.mark.skipif(not REAL_DATA, reason="CIFAR_RAY_DATA does not point at real CIFAR-10")
def test_netconv_on_real_cifar10(real_cache):
    c = TrialConfig.model_validate({"model": {"name": "netconv"},
                                    "data": {"source": REAL_DATA, "train_size": 10_000, "cache_dir": str(real_cache)},
                                    "train": {"epochs": 2, "batch_size": 128, "lr": 0.05, "momentum": 0.9,
                                              "device": "cpu"}})
    dataset = load_dataset(c.data)
    result = fit(c, dataset)
    test = evaluate_split(result.model, c, dataset, "test")
    assert test.count == 10_000
    assert test.accuracy > 0.25


def test_divergence_threshold_is_relative_to_a_uniform_guess():
    limit = 100 * math.log(10)
    assert has_diverged(float("nan"), limit) and has_diverged(float("inf"), limit)
    assert has_diverged(8.8e9, limit)  # a bf16 blow-up measured on the CPU: finite, never inf
    assert not has_diverged(2.31, limit) and not has_diverged(60.0, limit)


def test_cpu_precision_follows_the_cpu():
    cpu = torch.device("cpu")
    assert amp_dtype("off", cpu) is None and amp_dtype("fp16", cpu) is None
    assert amp_dtype("bf16", cpu) == torch.bfloat16
    assert amp_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert amp_dtype("auto", torch.device("mps")) is None
