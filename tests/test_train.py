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
from cifar_ray.device import amp_dtype, cpu_has_native_bf16
from cifar_ray.engine import fit, has_diverged, load_state, save_state
from cifar_ray.evaluation import evaluate_split, format_report
from conftest import REAL_DATA, WAIT_S


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


SMALL = {"synthetic_size": 720, "val_size": 120}  # 480 training images: for tests that compare several runs


@pytest.fixture(scope="module")
def small_synthetic():
    return make_synthetic(SMALL["synthetic_size"])


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

    from cifar_ray.evaluation import Evaluation

    cm = np.array([[9, 1], [2, 8]])
    ev = Evaluation(0.85, 0.4, {"plane": 0.9, "car": 0.8}, cm, ("plane", "car"))
    assert format_report(ev).splitlines() == [
        "Accuracy of the network on the 20 test images: 85 %",
        "Accuracy for class: plane      is 90.0 %",
        "Accuracy for class: car        is 80.0 %",
    ]


def _cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "cifar_ray.train", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=WAIT_S)


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


# ---------------------------------------------------------------- engine options of the fast recipe

def _one_step(c, synthetic):
    """The model after building (data init included) and after one optimizer step of run c."""
    from cifar_ray.engine import Run

    run = Run.build(c, synthetic, torch.device("cpu"))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.model.train()
    x, y = next(run.images.batches(run.train_idx, c.train.batch_size, gen=run.gen))
    loss = torch.nn.functional.cross_entropy(run.model(x), y)
    run.opt.zero_grad()
    loss.backward()
    run.opt.step()
    return run, before


def test_bias_lr_factor_scales_only_the_1d_parameters_step(synthetic):
    plain, start = _one_step(cfg("netconv", momentum=0.0), synthetic)
    fast, start2 = _one_step(cfg("netconv", momentum=0.0, bias_lr_factor=8.0), synthetic)
    assert [g["lr"] for g in fast.opt.param_groups] == [0.05, 0.4]
    for k, v in plain.model.state_dict().items():
        if not v.is_floating_point() or "running" in k:
            continue
        torch.testing.assert_close(start[k], start2[k])
        step, step2 = v - start[k], fast.model.state_dict()[k] - start2[k]
        if v.ndim > 1:  # weights: the same step
            torch.testing.assert_close(step2, step, msg=k)
        else:  # biases and BN parameters: 8x the step (plain SGD: the step is lr x gradient)
            torch.testing.assert_close(step2, 8 * step, rtol=1e-4, atol=1e-6, msg=k)  # fp32 rounding of p + step


def test_bias_decay_factor_changes_only_the_biases_decay(synthetic):
    from cifar_ray.engine import param_groups

    c = cfg("netconv", weight_decay=0.01, bias_decay_factor=0.0)
    model = build_model_for(c)
    groups = param_groups(c, model)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters() if p.ndim > 1}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.parameters() if p.ndim <= 1}
    # no factor set: one group, as before (checkpoints keep their layout)
    assert len(param_groups(cfg("netconv", weight_decay=0.01), model)) == 1


def build_model_for(c):
    from cifar_ray.models import build_model

    return build_model(c.model.name, **c.model.options())


def test_frozen_parameters_are_not_given_to_the_optimizer():
    from cifar_ray.engine import param_groups

    c = cfg("whitened_cnn", bias_lr_factor=64.0)
    model = build_model_for(c)
    given = {id(p) for g in param_groups(c, model) for p in g["params"]}
    assert id(model[0].weight) not in given and id(model[0].bias) in given
    assert given == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("schedule", ["triangle", "onecycle"])
def test_schedules_keep_the_groups_ratio_and_triangle_follows_its_formula(synthetic, schedule):
    from cifar_ray.engine import Run, triangle

    c = cfg("netconv", epochs=3, schedule=schedule, bias_lr_factor=4.0, warmup_fraction=0.25, start_factor=0.2,
            end_factor=0.1, batch_size=256)
    run = Run.build(c, synthetic, torch.device("cpu"))
    total = 3 * run.steps_per_epoch
    seen = []
    for _ in range(total):
        lrs = [g["lr"] for g in run.opt.param_groups]
        assert lrs[1] == pytest.approx(4 * lrs[0])
        seen.append(lrs[0])
        run.opt.step()
        run.sched.step()
    if schedule == "triangle":
        assert seen == pytest.approx([0.05 * triangle(s, total, 0.25, 0.2, 0.1) for s in range(total)])
        assert seen[0] == pytest.approx(0.01) and max(seen) == pytest.approx(0.05, rel=0.1)
        assert triangle(total, total, 0.25, 0.2, 0.1) == pytest.approx(0.1)
        peak = seen.index(max(seen))
        assert all(a < b for a, b in zip(seen[:peak], seen[1:peak + 1], strict=True))
        assert all(a > b for a, b in zip(seen[peak:-1], seen[peak + 1:], strict=True))


def test_data_init_whitens_patches_and_changes_nothing_else(synthetic):
    from cifar_ray.engine import Run

    c = cfg("whitened_cnn", data_init_images=2000)
    off = cfg("whitened_cnn", data_init_images=0)
    torch.manual_seed(0)
    run = Run.build(c, synthetic, torch.device("cpu"))
    run_off = Run.build(off, synthetic, torch.device("cpu"))
    on_state, off_state = run.model.state_dict(), run_off.model.state_dict()
    changed = [k for k in on_state if not torch.equal(on_state[k], off_state[k])]
    assert changed == ["0.weight"]  # the whitening filters, and nothing else
    assert torch.equal(run.gen.get_state(), run_off.gen.get_state())  # shuffling and augmentation draws unchanged
    # Its first 12 channels project 2x2 patches of training images onto unit-variance, uncorrelated axes.
    x, _ = run.images.batch(run.train_idx[:1000])
    with torch.no_grad():
        out = torch.nn.functional.conv2d(x.float(), run.model[0].weight)[:, :12]  # (B, 12, 31, 31), no bias
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = flat.T @ flat / len(flat)
    assert torch.allclose(cov.diagonal(), torch.ones(12), atol=0.15)  # eps caps the smallest eigenvalues' scale
    off_diagonal = cov - torch.diag(cov.diagonal())
    assert off_diagonal.abs().max() < 0.1
    # and the filters come in +/- pairs
    w = run.model[0].weight
    assert torch.equal(w[12:], -w[:12])


def test_lookahead_pulls_the_weights_to_their_average_at_its_steps():
    from cifar_ray.engine import Lookahead

    model = torch.nn.Linear(2, 1, bias=False)
    la = Lookahead(decay=0.5, every=2, start=2, total=4)
    with torch.no_grad():
        model.weight.fill_(1.0)
    la.after_step(model, 1)  # before start: nothing
    assert la.average is None
    la.after_step(model, 2)  # the first update takes the average
    assert torch.equal(la.average["weight"], torch.ones(1, 2))
    with torch.no_grad():
        model.weight.fill_(3.0)
    la.after_step(model, 3)  # not a multiple of every
    assert torch.equal(model.weight, torch.full((1, 2), 3.0))
    la.after_step(model, 4)  # rho = 0.5^2 x (4/4)^3 = 0.25: average = 0.25 x 1 + 0.75 x 3, copied back
    torch.testing.assert_close(model.weight.detach(), torch.full((1, 2), 2.5))
    with torch.no_grad():
        model.weight.fill_(7.0)
    la.end_epoch(model)
    torch.testing.assert_close(model.weight.detach(), torch.full((1, 2), 2.5))


def test_lookahead_off_changes_nothing_and_on_changes_the_run(synthetic):
    base = fit(cfg("netconv", epochs=2, model_opts={"width": 0.25}), synthetic)
    zero = fit(cfg("netconv", epochs=2, model_opts={"width": 0.25}, lookahead_decay=0.0, lookahead_every=3), synthetic)
    on = fit(cfg("netconv", epochs=2, model_opts={"width": 0.25}, lookahead_decay=0.95, lookahead_start=0.5),
             synthetic)
    assert [h[M.VAL_LOSS] for h in zero.history] == [h[M.VAL_LOSS] for h in base.history]
    assert on.history[0][M.VAL_LOSS] == base.history[0][M.VAL_LOSS]  # starts after half the 2 x 32 steps...
    assert on.history[1][M.VAL_LOSS] != base.history[1][M.VAL_LOSS]  # ...so only the second epoch differs


def test_fast_recipe_resumes_exactly(tmp_path, synthetic):
    """Lookahead, the triangle schedule, the bias group and data init through a checkpoint."""
    c = cfg("whitened_cnn", epochs=3, batch_size=128, lr=0.2, momentum=0.85, nesterov=True, weight_decay=1e-3,
            bias_lr_factor=64.0, bias_decay_factor=1 / 64, schedule="triangle", lookahead_decay=0.95,
            lookahead_start=0.2, label_smoothing=0.2, model_opts={"width": 0.25},
            data={"augment": {"hflip": 0.5, "crop_padding": 2}, "synthetic_size": 1200, "val_size": 400})

    def keep(metrics, make_state):
        if metrics[M.EPOCH] == 2:
            save_state(make_state(), tmp_path / "epoch2.pt")

    full = fit(c, synthetic, on_epoch=keep)
    resumed = fit(c, synthetic, resume=load_state(tmp_path / "epoch2.pt"))
    assert [h[M.EPOCH] for h in resumed.history] == [3]
    for key in (M.TRAIN_LOSS, M.TRAIN_ACC, M.VAL_LOSS, M.VAL_ACC, M.LR):
        assert full.history[-1][key] == resumed.history[0][key], key
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


class _MirrorInvariant(torch.nn.Module):
    """Logits from each row's pixels summed across the width: the same for an image and its mirror."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 32, 10)

    def forward(self, x):  # (B, 3, 32, 32) -> (B, 10)
        return self.fc(x.sum(3).flatten(1))


def _images(n=64):
    from cifar_ray.batches import DeviceImages
    from cifar_ray.data import split_dataset

    ds = make_synthetic(600)
    split = split_dataset(ds, TrialConfig.model_validate({"data": {"source": "synthetic", "val_size": 100}}).data)
    images = DeviceImages.create(ds.test_x, ds.test_y, split, torch.device("cpu"), channels_last=False)
    return images, torch.arange(n), ds.classes


def test_flip_tta_on_a_mirror_invariant_model_gives_the_same_predictions():
    from cifar_ray.evaluation import evaluate

    torch.manual_seed(0)
    model = _MirrorInvariant()
    images, idx, classes = _images()
    plain = evaluate(model, images, idx, classes, 32)
    flipped = evaluate(model, images, idx, classes, 32, tta="flip")
    assert (plain.confusion == flipped.confusion).all()
    assert plain.loss == pytest.approx(flipped.loss, rel=1e-5)


def test_tta_views_are_the_mirror_and_one_pixel_shifts():
    from cifar_ray.evaluation import shifted, tta_logits

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    x = torch.randn(4, 3, 32, 32)
    f = model
    torch.testing.assert_close(tta_logits(model, x, "flip"), 0.5 * (f(x) + f(x.flip(-1))))
    pair = lambda v: 0.5 * (f(v) + f(v.flip(-1)))  # noqa: E731
    up_left, down_right = shifted(x, -1, -1), shifted(x, 1, 1)
    torch.testing.assert_close(tta_logits(model, x, "flip_translate"),
                               0.5 * pair(x) + 0.25 * (pair(up_left) + pair(down_right)))
    assert torch.equal(down_right[..., 1:, 1:], x[..., :-1, :-1])  # content moved down and right by 1 px
    assert torch.equal(up_left[..., :-1, :-1], x[..., 1:, 1:])
    assert torch.equal(down_right[..., 0, 1:], x[..., 1, :-1])  # the border is reflected
    assert torch.equal(tta_logits(model, x, "none"), f(x))


def test_tta_applies_to_the_final_evaluation_not_the_epochs(synthetic):
    c = cfg("netconv", epochs=1, tta="flip_translate")
    plain = cfg("netconv", epochs=1)
    a, b = fit(c, synthetic), fit(plain, synthetic)
    assert a.history[0][M.VAL_LOSS] == b.history[0][M.VAL_LOSS]
    assert evaluate_split(a.model, c, synthetic, "val").loss != evaluate_split(b.model, plain, synthetic, "val").loss


def test_trial_threads_are_the_whole_cpus_granted():
    from cifar_ray.device import trial_threads

    assert [trial_threads(c) for c in (0, 0.5, 1, 1.9, 2, 4.0)] == [1, 1, 1, 1, 2, 4]


def test_the_train_cli_runs_once_and_the_engine_needs_no_cli():
    """`python -m cifar_ray.train` runs train.py once (as __main__, never imported again through a module
    that imports it back), and the engine imports neither the CLI nor anything that reads results."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "cifar_ray.train", "--help"], capture_output=True,
                          text=True, timeout=WAIT_S, check=True)
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "cifar_ray.train" not in imported and "cifar_ray.engine" in imported
    engine = subprocess.run([sys.executable, "-c", "import sys, cifar_ray.engine; print(' '.join(sys.modules))"],
                            capture_output=True, text=True, timeout=WAIT_S, check=True).stdout.split()
    for name in ("cifar_ray.train", "cifar_ray.retrain", "cifar_ray.analysis", "pandas", "ray"):
        assert name not in engine, name


# ---------------------------------------------------------------- airbench's remaining options

def test_alternate_flip_shows_each_image_both_ways_every_two_epochs(synthetic):
    from cifar_ray.engine import Run

    c = cfg(epochs=3, data={"augment": {"alternate_flip": True}})
    run = Run.build(c, synthetic, torch.device("cpu"))
    first = run.flips.clone()
    assert 0.4 < first.float().mean() < 0.6  # a fair coin per image
    assert torch.equal(Run.build(c, synthetic, torch.device("cpu")).flips, first)  # seeded: the same draws
    assert not torch.equal(Run.build(cfg(epochs=3, seed=1, data={"augment": {"alternate_flip": True}}), synthetic,
                                     torch.device("cpu")).flips, first)
    seen = []
    original = run.images.batch

    def spy(idx, augment_cfg=None, gen=None, flips=None):
        seen.append(flips.clone())
        return original(idx, augment_cfg, gen, flips)

    run.images.batch = spy
    for _ in range(3):
        run.train_epoch()
    per_epoch = [seen[0], seen[run.steps_per_epoch], seen[2 * run.steps_per_epoch]]
    assert torch.equal(per_epoch[0], first) and torch.equal(per_epoch[1], ~first) and torch.equal(per_epoch[2], first)


def test_bn_momentum_sets_every_batch_norm_and_unset_keeps_the_models(small_synthetic):
    from cifar_ray.engine import Run

    def momenta(c):
        model = Run.build(c, small_synthetic, torch.device("cpu")).model
        return {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}

    assert momenta(cfg("whitened_cnn", model_opts={"width": 0.25}, data=SMALL)) == {0.4}  # the model's own
    assert momenta(cfg("whitened_cnn", bn_momentum=0.2, model_opts={"width": 0.25}, data=SMALL)) == {0.2}
    assert momenta(cfg("resnet18", bn_momentum=0.3, model_opts={"width": 0.125}, data=SMALL)) == {0.3}
    # set to the model's own value: the same run, epoch for epoch
    plain = fit(cfg("whitened_cnn", model_opts={"width": 0.25}, data=SMALL), small_synthetic)
    same = fit(cfg("whitened_cnn", bn_momentum=0.4, model_opts={"width": 0.25}, data=SMALL), small_synthetic)
    assert [h[M.VAL_LOSS] for h in plain.history] == [h[M.VAL_LOSS] for h in same.history]
    other = fit(cfg("whitened_cnn", bn_momentum=0.05, model_opts={"width": 0.25}, data=SMALL), small_synthetic)
    assert [h[M.VAL_LOSS] for h in plain.history] != [h[M.VAL_LOSS] for h in other.history]


def test_whitening_bias_trains_for_its_epochs_then_stays(small_synthetic):
    from cifar_ray.models.whitened import WhiteningConv

    biases = []

    def keep(metrics, make_state):
        biases.append(next(v for k, v in make_state()["model"].items() if k.endswith("0.bias")).clone())

    c = cfg("whitened_cnn", epochs=3, bias_lr_factor=64.0, whiten_bias_epochs=1, model_opts={"width": 0.25}, data=SMALL)
    result = fit(c, small_synthetic, on_epoch=keep)
    whiten = next(m for m in result.model.modules() if isinstance(m, WhiteningConv))
    assert torch.equal(biases[-1], whiten.bias.detach())
    assert biases[0].abs().sum() > 0  # it trained in epoch 1 (it starts at zero)
    assert torch.equal(biases[0], biases[1]) and torch.equal(biases[1], biases[2])  # then it stayed
    # a limit past the last epoch: the run without one
    plain = fit(cfg("whitened_cnn", epochs=2, model_opts={"width": 0.25}, data=SMALL), small_synthetic)
    late = fit(cfg("whitened_cnn", epochs=2, whiten_bias_epochs=2, model_opts={"width": 0.25}, data=SMALL),
               small_synthetic)
    assert [h[M.VAL_LOSS] for h in plain.history] == [h[M.VAL_LOSS] for h in late.history]
    with pytest.raises(ValueError, match="model 'base' has no whitening layer; models with one: whitened_cnn"):
        cfg("base", whiten_bias_epochs=1)


def test_airbench_options_resume_exactly(tmp_path, synthetic):
    """Alternating flips, reflection-padded crops, the whitening bias frozen after epoch 1 and a BN
    momentum, through a checkpoint at epoch 2: epoch 3 as in the straight run."""
    c = cfg("whitened_cnn", epochs=3, batch_size=128, lr=0.2, momentum=0.85, nesterov=True, weight_decay=1e-3,
            bias_lr_factor=64.0, bias_decay_factor=1 / 64, schedule="triangle", whiten_bias_epochs=1, bn_momentum=0.5,
            label_smoothing=0.2, model_opts={"width": 0.25},
            data={"augment": {"alternate_flip": True, "crop_padding": 2, "crop_reflect": True},
                  "synthetic_size": 1200, "val_size": 400})

    def keep(metrics, make_state):
        if metrics[M.EPOCH] == 2:
            save_state(make_state(), tmp_path / "epoch2.pt")

    full = fit(c, synthetic, on_epoch=keep)
    resumed = fit(c, synthetic, resume=load_state(tmp_path / "epoch2.pt"))
    for key in (M.TRAIN_LOSS, M.TRAIN_ACC, M.VAL_LOSS, M.VAL_ACC, M.LR):
        assert full.history[-1][key] == resumed.history[0][key], key
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------- optimizer muon

def _steps(opt, params, grads):
    for g in grads:
        for p, gp in zip(params, g, strict=True):
            p.grad = gp.clone()
        opt.step()


@pytest.mark.parametrize("nesterov,weight_decay", [(True, 0.0), (False, 0.1)])
def test_muon_steps_are_torchs_muon_on_a_matrix_and_on_a_filters_matrix(nesterov, weight_decay):
    """The trusted reference: torch.optim.Muon (2-D only). A filter (out, in, kh, kw) steps as the matrix
    (out, in*kh*kw) would under it, bit for bit."""
    from cifar_ray.optim import MuonSGD

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(16, 8, generator=gen), torch.randn(12, 3, 3, 3, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(3)]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    opt = MuonSGD([{"params": ours, "lr": 0.05, "momentum": 0.9, "nesterov": nesterov, "weight_decay": weight_decay,
                    "muon": True}])
    _steps(opt, ours, grads)
    ref = [torch.nn.Parameter(start[0].clone()), torch.nn.Parameter(start[1].reshape(12, -1).clone())]
    torch_muon = torch.optim.Muon(ref, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay)
    _steps(torch_muon, ref, [[g[0], g[1].reshape(12, -1)] for g in grads])
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1].reshape(12, -1), ref[1])
    assert not torch.equal(ours[0], start[0])


def test_muon_leaves_the_other_groups_to_torchs_sgd():
    from cifar_ray.optim import MuonSGD

    gen = torch.Generator().manual_seed(1)
    start = [torch.randn(10, 4, generator=gen), torch.randn(10, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(3)]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    groups = lambda ps: [{"params": [ps[0]], "lr": 0.1, "weight_decay": 5e-4},  # noqa: E731
                         {"params": [ps[1]], "lr": 6.4, "weight_decay": 0.0}]
    _steps(MuonSGD(groups(ours), momentum=0.85, nesterov=True), ours, grads)
    _steps(torch.optim.SGD(groups(ref), momentum=0.85, nesterov=True), ref, grads)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))


def test_orthogonalize_brings_singular_values_near_one():
    from cifar_ray.optim import orthogonalize

    g = torch.randn(64, 27, generator=torch.Generator().manual_seed(2)) * 40
    s = torch.linalg.svdvals(orthogonalize(g).float())
    assert s.min() > 0.5 and s.max() < 1.5 and orthogonalize(g).shape == g.shape


def test_muon_trains_the_filters_and_resumes_exactly(tmp_path, synthetic):
    from cifar_ray.engine import build_optimizer
    from cifar_ray.models import build_model

    c = cfg("whitened_cnn", epochs=3, batch_size=128, lr=0.2, momentum=0.85, nesterov=True, optimizer="muon",
            muon_lr=0.1, bias_lr_factor=64.0, bias_decay_factor=1 / 64, schedule="triangle",
            model_opts={"width": 0.25}, data={"synthetic_size": 1200, "val_size": 400})
    model = build_model("whitened_cnn", width=0.25)
    groups = build_optimizer(c, model).param_groups
    assert [g["muon"] for g in groups] == [False, False, True]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in groups[-1]["params"]} == {id(p) for p in trained if p.ndim == 4}
    assert groups[-1]["lr"] == 0.1 and groups[-1]["momentum"] == 0.95 and groups[0]["lr"] == 0.2

    def keep(metrics, make_state):
        if metrics[M.EPOCH] == 2:
            save_state(make_state(), tmp_path / "epoch2.pt")

    full = fit(c, synthetic, on_epoch=keep)
    assert full.history[-1][M.VAL_ACC] > 0.3  # it learns (chance: 0.1)
    resumed = fit(c, synthetic, resume=load_state(tmp_path / "epoch2.pt"))
    for key in (M.TRAIN_LOSS, M.VAL_LOSS, M.VAL_ACC, M.LR):
        assert full.history[-1][key] == resumed.history[0][key], key
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


# (key, two values, settings where it does not act, settings where it does): cifar_ray.applies' table
INERT = [
    ("momentum", (0.0, 0.9), {"optimizer": "adam"}, {"optimizer": "sgd"}),
    ("nesterov", (False, True), {"optimizer": "adam", "momentum": 0.9}, {"optimizer": "sgd", "momentum": 0.9}),
    ("momentum", (0.0, 0.5), {"schedule": "onecycle"}, {"schedule": "none"}),
    ("muon_lr", (0.01, 0.3), {"optimizer": "sgd"}, {"optimizer": "muon"}),
    ("muon_momentum", (0.6, 0.95), {"optimizer": "sgd"}, {"optimizer": "muon"}),
    ("muon_momentum", (0.6, 0.95), {"optimizer": "muon", "schedule": "onecycle"}, {"optimizer": "muon"}),
    ("step_size", (1, 5), {"schedule": "cosine"}, {"schedule": "step"}),
    ("gamma", (0.1, 0.5), {"schedule": "cosine"}, {"schedule": "step", "step_size": 1}),
    ("warmup_fraction", (0.1, 0.5), {"schedule": "step"}, {"schedule": "triangle"}),
    ("start_factor", (0.1, 0.5), {"schedule": "none"}, {"schedule": "triangle"}),
    ("end_factor", (0.0, 0.5), {"schedule": "cosine"}, {"schedule": "triangle"}),
    ("lookahead_every", (2, 7), {"lookahead_decay": 0.0}, {"lookahead_decay": 0.9, "lookahead_start": 0.0}),
    ("lookahead_start", (0.0, 0.8), {"lookahead_decay": 0.0}, {"lookahead_decay": 0.9}),
]


def test_the_table_of_keys_that_act_only_with_another_is_covered():
    from cifar_ray.applies import CONDITIONS

    assert {f"train.{k}" for k, *_ in INERT} == set(CONDITIONS)


@pytest.mark.parametrize("key, values, inert, acting", INERT,
                         ids=[f"{k}-{'-'.join(map(str, i.values()))}" for k, _, i, _ in INERT])
def test_a_key_where_it_does_not_act_changes_nothing_and_where_it_acts_changes_the_run(small_synthetic, key, values,
                                                                                     inert, acting):
    """What lets a grid run such a point once: two values of the key train the very same run where
    applies.acts says it does not act, and different runs where it says it does."""
    from cifar_ray.applies import acts

    def run(settings, value):
        c = cfg(**settings, **{key: value}, epochs=2, data=SMALL)
        flat = {f"train.{k}": v for k, v in c.train.model_dump().items()}
        return fit(c, small_synthetic), acts(f"train.{key}", flat)

    (a, a_acts), (b, b_acts) = run(inert, values[0]), run(inert, values[1])
    assert not a_acts and not b_acts
    assert [h[M.VAL_LOSS] for h in a.history] == [h[M.VAL_LOSS] for h in b.history]
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    (c, c_acts), (d, d_acts) = run(acting, values[0]), run(acting, values[1])
    assert c_acts and d_acts
    assert [h[M.VAL_LOSS] for h in c.history] != [h[M.VAL_LOSS] for h in d.history]


def test_ctrl_c_stops_the_train_cli_with_130_and_no_traceback(tmp_path):
    """Ctrl-C during training (after the first epoch's line: a condition, not a time): `interrupted`
    and exit 130, as a shell reports a tool SIGINT stopped; before, Python's KeyboardInterrupt traceback."""
    import signal

    env = {**os.environ, "CIFAR_RAY_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cifar_ray.train", "--model", "net1", "--data", "synthetic",
                             "--epochs", "1000", "--train-size", "200", "--val-size", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # blocks until the line comes (or the process ends)
            if line.startswith("epoch "):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()  # the process this test started
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().endswith("interrupted") and "Traceback" not in err, err
