"""Fused trials (cifar_ray.fuse): a pack of K runs trained as one wide network equals, member by member,
the K runs trained alone, up to float rounding; members that cannot share a pack are refused with the
reason. Synthetic data, the CPU, fp32."""
import math

import pytest
import torch

from cifar_ray import metrics as M
from cifar_ray.config import TrialConfig
from cifar_ray.data import load_dataset
from cifar_ray.engine import fit
from cifar_ray.fuse import UNFUSABLE_MODELS, FuseError, Pack, fit_pack, pack_problems
from cifar_ray.models import list_models, model_spec

BASE = {
    "model": {"name": "netconv"},  # BatchNorm, LeakyReLU, max-pool and dropout 0.25: every wide layer
    "data": {"source": "synthetic", "synthetic_size": 480, "val_size": 120},
    "train": {"epochs": 2, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "device": "cpu",
              "amp": "off", "eval_batch_size": 120},
}
# The per-member keys a pack carries: lr, momentum, nesterov, weight decay, label smoothing, the seed
# (init, batch order, augmentation draws, dropout masks), the schedule and its parameters.
MEMBERS = [
    {"lr": 0.02, "momentum": 0.9, "seed": 0},
    {"lr": 0.01, "momentum": 0.5, "seed": 1, "nesterov": True, "weight_decay": 5e-4},
    {"lr": 0.03, "momentum": 0.0, "seed": 2, "label_smoothing": 0.1, "schedule": "cosine"},
    {"lr": 0.002, "seed": 3, "optimizer": "adamw", "weight_decay": 0.01},
]
# Tolerance. In float64 a pack equals its runs alone to rounding: the wide network computes the same
# sums in another order (grouped convolutions, batched matmuls), about 1e-16 relative per operation, and
# each member's optimizer is its own torch optimizer; measured on these members, the weights after an
# epoch agree to 6e-15 relative under SGD and 3.5e-13 under AdamW (whose first steps divide by the
# gradient's own size), so 1e-9 on every reported loss and accuracy is far above rounding and far below
# any real difference (a wrong dropout mask or momentum moves a loss by 1e-3 or more). In float32 the
# same rounding (1e-7) grows with training, and how fast depends on the kernels torch picks (its thread
# count among them): after 2 epochs these members' netconv losses differed by up to 1.5e-3 with 1 thread
# and 9.3e-4 with 2 (train accuracy by 7.1e-3 and 3.6e-3), base's by 2.5e-7 (measured 2026-12-04). So
# float32 gets 5e-3 on losses and 2 images in 120 on accuracies: it still catches a member given another's
# seed (3.1e-2 on the epoch-2 validation loss) or a 1% momentum error (1.2e-2), not a 1% learning-rate
# one (4.5e-3); exactness is the float64 test's. A chaotic run (resnet18 at lr 0.02 on random images)
# drifts by 1e-2 in 12 steps, so float32 is tested on the small models only.
EXACT_TOL = 1e-9
FP32_TOL = 5e-3
FP32_ACC_TOL = 2 / 120 + 1e-9


def config(model: str = "netconv", augment: bool = True, **train) -> TrialConfig:
    data = {**BASE["data"], **({"augment": {"hflip": 0.5, "crop_padding": 2}} if augment else {})}
    return TrialConfig.model_validate({**BASE, "model": {"name": model}, "data": data,
                                       "train": {**BASE["train"], **train}})


@pytest.fixture
def float64(monkeypatch):
    """The engine in float64: models built in double and batches converted, for fused and alone alike."""
    from cifar_ray import batches, engine

    build, batch = engine.build_model, batches.DeviceImages.batch
    monkeypatch.setattr(engine, "build_model", lambda *a, **k: build(*a, **k).double())
    monkeypatch.setattr(batches.DeviceImages, "batch",
                        lambda self, *a, **k: (lambda xy: (xy[0].double(), xy[1]))(batch(self, *a, **k)))


def assert_same_curves(cfgs, fused, dataset, loss_tol: float, acc_tol: float) -> None:
    for cfg, member in zip(cfgs, fused, strict=False):
        alone = fit(cfg, dataset).history
        assert len(member) == len(alone) == cfg.train.epochs
        for a, f in zip(alone, member, strict=False):
            for key, tol in ((M.TRAIN_LOSS, loss_tol), (M.VAL_LOSS, loss_tol), (M.TRAIN_ACC, acc_tol),
                             (M.VAL_ACC, acc_tol)):
                assert math.isclose(a[key], f[key], abs_tol=tol), (cfg.train.seed, a[M.EPOCH], key, a[key], f[key])
            assert a[M.LR] == f[M.LR] and a[M.STATUS] == f[M.STATUS]


@pytest.mark.parametrize("model", ["netconv", "base", "resnet18", "net3"])
def test_a_pack_of_four_equals_four_runs_alone_in_float64(float64, model):
    # half the float32 tests' data set: float64 is slow here, and its rounding (1e-16 a step) stays far
    # below the tolerance either way; resnet18: every layer at a quarter of its width, one epoch
    small = {"synthetic_size": 240, "val_size": 60}
    cfgs = [config(model, **m) for m in MEMBERS]
    cfgs = [c.model_copy(update={"data": c.data.model_copy(update=small)}) for c in cfgs]
    if model == "resnet18":
        cfgs = [c.model_copy(update={"model": c.model.model_copy(update={"width": 0.25}),
                                     "train": c.train.model_copy(update={"epochs": 1})}) for c in cfgs]
    dataset = load_dataset(cfgs[0].data)
    fused = fit_pack(cfgs, dataset, torch.device("cpu"))
    assert_same_curves(cfgs, fused, dataset, EXACT_TOL, EXACT_TOL)


@pytest.mark.parametrize("model", ["netconv", "base"])
def test_a_pack_in_float32_follows_its_runs_alone(model):
    cfgs = [config(model, **m) for m in MEMBERS]
    dataset = load_dataset(cfgs[0].data)
    fused = fit_pack(cfgs, dataset, torch.device("cpu"))
    assert_same_curves(cfgs, fused, dataset, FP32_TOL, FP32_ACC_TOL)


def test_each_member_checkpoints_as_its_run_alone():
    cfgs = [config(**m) for m in MEMBERS[:2]]
    dataset = load_dataset(cfgs[0].data)
    pack = Pack.build(cfgs, dataset, torch.device("cpu"))
    pack.train_epoch()
    state = pack.state(1, 1, {"val_loss": 1.0, "val_acc": 0.1, "bad_epochs": 0}, {})
    alone = fit(cfgs[1].model_copy(update={"train": cfgs[1].train.model_copy(update={"epochs": 1})}), dataset)
    for name, value in alone.model.state_dict().items():
        stored = state["model"][name]
        assert stored.shape == value.shape and stored.untyped_storage().nbytes() == value.untyped_storage().nbytes()
        if value.is_floating_point():
            # float32, one epoch: 2.8e-4 at most with 1 thread, 1.5e-7 with 2 (another member's: 0.1 to 1.2)
            assert torch.allclose(stored, value, atol=1e-3), name


def test_a_diverging_member_leaves_and_the_others_go_on():
    cfgs = [config(**MEMBERS[0]), config(lr=10.0, momentum=0.99, seed=1), config(**MEMBERS[1])]
    dataset = load_dataset(cfgs[0].data)
    fused = fit_pack(cfgs, dataset, torch.device("cpu"))
    assert fused[1][-1][M.STATUS] == M.DIVERGED and len(fused[1]) < 2
    for i in (0, 2):
        alone = fit(cfgs[i], dataset).history
        assert [r[M.STATUS] for r in fused[i]] == [r[M.STATUS] for r in alone]
        assert math.isclose(fused[i][-1][M.VAL_LOSS], alone[-1][M.VAL_LOSS], abs_tol=FP32_TOL)


def test_members_that_leave_are_dropped_from_the_wide_network_and_the_others_stay_exact(float64, monkeypatch):
    """Member 1 diverges in epoch 1: from epoch 2 the wide network holds the other three only (narrowed),
    and they equal their runs alone to rounding in float64, as before it narrowed."""
    cfgs = [config(**MEMBERS[0], epochs=3), config(lr=10.0, momentum=0.99, seed=1, epochs=3),
            config(**MEMBERS[1], epochs=3), config(**MEMBERS[3], epochs=3)]
    dataset = load_dataset(cfgs[0].data)
    widths = []
    real_narrow = Pack.narrow

    def narrow(self):
        real_narrow(self)
        widths.append(list(self.slots))
    monkeypatch.setattr(Pack, "narrow", narrow)
    fused = fit_pack(cfgs, dataset, torch.device("cpu"))
    assert widths == [[0, 1, 2, 3], [0, 2, 3], [0, 2, 3]]
    assert fused[1][-1][M.STATUS] == M.DIVERGED and len(fused[1]) == 1
    keep = [0, 2, 3]
    assert_same_curves([cfgs[i] for i in keep], [fused[i] for i in keep], dataset, EXACT_TOL, EXACT_TOL)


def test_members_that_cannot_share_a_pack_are_refused_with_the_reason():
    assert pack_problems([config(**m) for m in MEMBERS]) == []
    problems = pack_problems([config(), config(batch_size=64)])
    assert problems == ["members differ in keys a pack cannot carry per member: train.batch_size"]
    assert "inception" in pack_problems([config("inception"), config("inception")])[0]
    assert "fp16" in pack_problems([config(amp="fp16")])[0]
    dataset = load_dataset(config().data)
    with pytest.raises(FuseError, match="train.batch_size"):
        Pack.build([config(), config(batch_size=64)], dataset, torch.device("cpu"))


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("at", [1, 2])
def test_a_pack_resumed_from_its_checkpoint_equals_its_straight_run(at):
    """Stopped after epoch `at` (member 1 diverged in epoch 1 and left the pack), then resumed from every
    member's checkpoint state: the same reports, bit for bit, as the straight run; the member that left
    stays out."""
    cfgs = [config(**MEMBERS[0], epochs=4), config(lr=10.0, momentum=0.99, seed=1, epochs=4),
            config(**MEMBERS[2], epochs=4, early_stopping_patience=1), config(**MEMBERS[3], epochs=4)]
    dataset = load_dataset(cfgs[0].data)
    straight = fit_pack(cfgs, dataset, torch.device("cpu"))
    saved: list = []

    def stop(epoch, reports, make_states):
        if epoch == at:
            saved.extend(make_states())
            raise Interrupt

    with pytest.raises(Interrupt):
        fit_pack(cfgs, dataset, torch.device("cpu"), on_epoch=stop)
    seen: dict[int, list] = {}
    resumed = fit_pack(cfgs, dataset, torch.device("cpu"), resume=saved,
                       on_epoch=lambda epoch, reports, _: seen.update({epoch: sorted(reports)}))
    assert straight[1][-1][M.STATUS] == M.DIVERGED and len(straight[1]) == 1
    for i, (want, got) in enumerate(zip(straight, resumed, strict=True)):
        after = [r for r in want if r[M.EPOCH] > at]
        assert len(got) == len(after), i
        for w, g in zip(after, got, strict=True):
            for key in (M.EPOCH, M.TRAIN_LOSS, M.TRAIN_ACC, M.VAL_LOSS, M.VAL_ACC, M.LR, M.STATUS):
                assert w[key] == g[key] or (math.isnan(w[key]) and math.isnan(g[key])), (i, w[M.EPOCH], key)
    assert all(1 not in members for members in seen.values())  # the diverged member never trains again


@pytest.mark.parametrize("model", list_models())
def test_every_registry_model_fuses_or_is_refused_with_the_reason(model):
    """Every model the wide network can hold trains fused as it trains alone (one short epoch, float32);
    the one it cannot (inception) is refused before anything is built, with the reason. The models that
    take a width run at a quarter of it: the same layers (batch norm, residual and pooling paths) at a
    sixteenth of the work (resnet34: 18 s at full width on the 2-core machine)."""
    base = {"model.name": model, "data.source": "synthetic", "data.synthetic_size": 96, "data.val_size": 32,
            "train.epochs": 1, "train.batch_size": 32, "train.device": "cpu", "train.amp": "off",
            "train.eval_batch_size": 32} | ({"model.width": 0.25} if "width" in model_spec(model).options() else {})
    cfgs = [TrialConfig.from_flat({**base, "train.lr": lr, "train.seed": s}) for lr, s in ((0.01, 0), (0.02, 1))]
    if model in UNFUSABLE_MODELS:
        assert pack_problems(cfgs) and "cannot be fused" in pack_problems(cfgs)[0]
        return
    dataset = load_dataset(cfgs[0].data)
    fused = fit_pack(cfgs, dataset, torch.device("cpu"))
    for cfg, member in zip(cfgs, fused, strict=True):
        alone = fit(cfg, dataset).history
        for key in (M.TRAIN_LOSS, M.VAL_LOSS):
            assert math.isclose(member[0][key], alone[0][key], abs_tol=FP32_TOL), (model, key)
