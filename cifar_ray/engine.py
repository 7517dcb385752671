"""The training engine: one TrialConfig in, per-epoch metrics out through a callback, and the checkpoint
state an exact resume needs. No Ray here: the trainable (cifar_ray.trainable) and the `train` CLI call fit()."""
from __future__ import annotations

import errno
import functools
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from cifar_ray import metrics as M
from cifar_ray.batches import DeviceImages
from cifar_ray.config import TrialConfig
from cifar_ray.data import Dataset, load_dataset, split_dataset
from cifar_ray.device import amp_dtype, peak_memory_mb, select_device, sync
from cifar_ray.evaluation import Evaluation, evaluate, logits_of
from cifar_ray.files import atomic_write
from cifar_ray.models import build_model, check_device
from cifar_ray.models.googlenet import AUX_WEIGHT
from cifar_ray.models.whitened import WhiteningConv
from cifar_ray.optim import MuonSGD

DIVERGENCE_CHECK_STEPS = 20  # check the running loss every N steps (a host sync each time)
# A run has diverged when its running mean training loss is NaN/inf or above this many times the loss
# of a uniform guess (ln of the class count: 2.3 for CIFAR-10). bf16 rarely reaches inf: a blown-up run
# measured at a mean loss of 8.8e9 in its first epoch, then sat at ~55 with chance accuracy.
DIVERGENCE_LOSS_FACTOR = 100.0

FLIP_SEED_OFFSET = 7919  # alternate_flip's generator: seeded apart from the run's and data_init's (seed itself)

OnEpoch = Callable[[dict, Callable[[], dict]], None]  # (metrics, make_state) after every epoch


# ---------------------------------------------------------------- checkpoint state

def save_state(state: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary name in the same folder, fsync, then rename: a crash or a full disk
    leaves the previous file intact."""
    try:
        atomic_write(path, lambda f: torch.save(state, f), fsync=True)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full while writing checkpoint {path}; the previous checkpoint is "
                                        "intact: free space, then resume the sweep with --resume") from exc
        raise


def load_state(path: str | os.PathLike) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- the run

@dataclass
class FitResult:
    status: str
    history: list[dict] = field(default_factory=list)
    model: Optional[nn.Module] = None
    evaluation: Optional[Evaluation] = None  # on the validation split, after the last epoch


def param_groups(cfg: TrialConfig, model: nn.Module) -> list[dict]:
    """The trained parameters as optimizer groups: the weights first (their lr is the one reported),
    then, when train.bias_lr_factor or bias_decay_factor is set, the biases and normalisation
    parameters (every 1-D tensor) with their own lr and weight decay; with train.optimizer muon, the
    convolution filters (4-D) last, as Muon's group. Frozen parameters are left out."""
    trained = [p for p in model.parameters() if p.requires_grad]
    settings = group_settings(cfg.train)
    muon = cfg.train.optimizer == "muon"
    filters = [p for p in trained if muon and p.ndim == 4]
    trained = [p for p in trained if not (muon and p.ndim == 4)]
    if len(settings) - muon == 1:
        groups = [{"params": trained, **settings[0]}]
    else:
        weights, vectors = [p for p in trained if p.ndim > 1], [p for p in trained if p.ndim <= 1]
        groups = [{"params": weights, **settings[0]}, {"params": vectors, **settings[1]}]
    return groups + ([{"params": filters, **settings[-1]}] if muon else [])


def group_settings(t) -> list[dict]:
    """lr and weight_decay of each parameter group param_groups makes (t: a TrainConfig)."""
    lr = t.effective_lr()
    muon = [{"lr": t.muon_lr, "weight_decay": 0.0, "momentum": t.muon_momentum, "nesterov": True, "muon": True}] \
        if t.optimizer == "muon" else []
    if not t.bias_group():
        return [{"lr": lr, "weight_decay": t.weight_decay}, *muon]
    return [{"lr": lr, "weight_decay": t.weight_decay},
            {"lr": lr * t.bias_lr_factor, "weight_decay": t.weight_decay * t.bias_decay_factor}, *muon]


def build_optimizer(cfg: TrialConfig, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    groups = param_groups(cfg, model)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=t.momentum, nesterov=t.nesterov)
    if t.optimizer == "muon":
        return MuonSGD(groups, momentum=t.momentum, nesterov=t.nesterov)
    if t.optimizer == "adam":
        return torch.optim.Adam(groups)
    return torch.optim.AdamW(groups)


def triangle(step: int, total: int, warmup_fraction: float, start: float, end: float) -> float:
    """The lr factor at `step` of `total`: start -> 1 linearly until warmup_fraction of the steps,
    then 1 -> end linearly at the last step."""
    peak = warmup_fraction * total
    if step < peak:
        return start + (1 - start) * step / peak
    return 1 + (end - 1) * (step - peak) / max(total - peak, 1)


def build_schedule(cfg: TrialConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """Returns (scheduler or None, whether it steps per batch)."""
    t = cfg.train
    if t.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=t.step_size, gamma=t.gamma), False
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs), False
    if t.schedule == "onecycle":  # each group peaks at its own lr (the biases' may be scaled)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                   epochs=t.epochs, steps_per_epoch=steps_per_epoch), True
    if t.schedule == "triangle":
        total = t.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: triangle(step, total, t.warmup_fraction, t.start_factor, t.end_factor)), True
    return None, False


def has_diverged(mean_loss: float, limit: float) -> bool:
    return not math.isfinite(mean_loss) or mean_loss > limit


def _loss(out: Any, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    if isinstance(out, tuple):  # inception in training mode: (logits, aux1, aux2)
        main, *aux = out
        return F.cross_entropy(main, y, label_smoothing=smoothing) + AUX_WEIGHT * sum(
            F.cross_entropy(a, y, label_smoothing=smoothing) for a in aux)
    return F.cross_entropy(out, y, label_smoothing=smoothing)


@dataclass
class Run:
    """Everything one training run holds: the model and its optimizer, schedule, scaler and random
    generator, the images on the device and the split's indices."""

    cfg: TrialConfig
    device: torch.device
    classes: tuple[str, ...]
    images: DeviceImages
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    model: nn.Module
    forward: Callable
    opt: torch.optim.Optimizer
    sched: Any
    per_step: bool  # the schedule steps per batch (onecycle), not per epoch
    amp: Optional[torch.dtype]
    scaler: torch.amp.GradScaler
    gen: torch.Generator  # shuffling and augmentation
    loss_limit: float  # a running mean training loss above this has diverged
    steps_per_epoch: int
    lookahead: Optional["Lookahead"]
    flips: Optional[torch.Tensor] = None  # alternate_flip: each image's first-epoch mirror, (N,) bool
    first_step_at: Optional[float] = None  # time.perf_counter() of the first training step
    step: int = 0  # optimizer steps taken in the run, across resumes

    @classmethod
    def build(cls, cfg: TrialConfig, dataset: Dataset, device: torch.device,
              share_data_of: Optional["Run"] = None) -> "Run":
        """share_data_of: a run of the same data config whose images and split this one uses (a pack)."""
        t = cfg.train
        split = split_dataset(dataset, cfg.data)
        channels_last = t.channels_last and device.type in ("cuda", "cpu")  # oneDNN's CPU convolutions prefer it
        if share_data_of is None:
            shared = DeviceImages.create(dataset.train_x, dataset.train_y, split, device, channels_last)
            train_idx = torch.from_numpy(split.train_idx).to(device)
            val_idx = torch.from_numpy(split.val_idx).to(device)
        else:
            shared, train_idx, val_idx = share_data_of.images, share_data_of.train_idx, share_data_of.val_idx
        torch.manual_seed(t.seed)
        model = build_model(cfg.model.name, num_classes=len(dataset.classes), **cfg.model.options()).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if t.bn_momentum is not None:
            for m in model.modules():
                if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                    m.momentum = t.bn_momentum
        data_init(model, shared, train_idx, t.data_init_images, t.seed)
        opt = build_optimizer(cfg, model)
        steps_per_epoch = math.ceil(len(train_idx) / t.batch_size)
        sched, per_step = build_schedule(cfg, opt, steps_per_epoch)
        amp = amp_dtype(t.amp, device)
        lookahead = Lookahead.of(t, steps_per_epoch) if t.lookahead_decay > 0 else None
        return cls(cfg, device, dataset.classes, shared, train_idx, val_idx,
                   model, torch.compile(model) if (t.compile and device.type == "cuda") else model, opt, sched,
                   per_step, amp, torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
                   torch.Generator(device=device).manual_seed(t.seed),
                   DIVERGENCE_LOSS_FACTOR * math.log(len(dataset.classes)), steps_per_epoch, lookahead,
                   first_flips(len(shared.x), t.seed, device) if cfg.data.augment.alternate_flip else None)

    def restore(self, state: dict) -> tuple[int, dict, Optional[dict]]:
        """Load a saved state; returns its epoch, early-stopping bookkeeping and that epoch's metrics."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None and state.get("scheduler"):
            self.sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.gen.set_state(state["rng"]["generator"].to(self.gen.get_state().device))
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step = int(state["epoch"]) * self.steps_per_epoch
        if self.lookahead is not None:
            self.lookahead.resume(self.model, self.step)
        return int(state["epoch"]), dict(state["best"]), state.get("metrics")

    def state(self, epoch: int, best: dict, metrics: dict) -> dict:
        """Everything an exact resume needs: weights, optimizer, schedule, scaler, RNG, bookkeeping."""
        return {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched is not None else {},
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "epoch": epoch, "best": dict(best), "config": self.cfg.model_dump(mode="json"), "metrics": metrics,
            "rng": {"torch": torch.get_rng_state(), "generator": self.gen.get_state(),
                    **({"cuda": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {})},
        }

    def train_epoch(self) -> "Trained":
        """One pass over the training split; stops early once the running loss has diverged."""
        t, device = self.cfg.train, self.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen, diverged = 0, False
        augment_cfg = self.cfg.data.augment if self.cfg.data.augment.enabled() else None
        autocast = torch.autocast(device.type, dtype=self.amp) if self.amp else nullcontext()
        epoch = self.step // self.steps_per_epoch + 1
        flips = None if self.flips is None else self.flips ^ (epoch % 2 == 0)  # every other epoch the other view
        freeze_whitening_bias(self.model, t.whiten_bias_epochs, epoch)
        batches = self.images.batches(self.train_idx, t.batch_size, gen=self.gen, augment_cfg=augment_cfg,
                                      flips=flips)
        for step, (x, y) in enumerate(batches, 1):
            if self.first_step_at is None:
                self.first_step_at = time.perf_counter()
            with autocast:
                out = self.forward(x)
                loss = _loss(out, y, t.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            if self.per_step:
                self.sched.step()
            self.step += 1
            if self.lookahead is not None:
                self.lookahead.after_step(self.model, self.step)
            loss_sum += loss.detach().float() * len(y)
            correct += (logits_of(out).argmax(1) == y).sum()
            seen += len(y)
            if step % DIVERGENCE_CHECK_STEPS == 0 and has_diverged(loss_sum.item() / seen, self.loss_limit):
                diverged = True
                break
        if self.lookahead is not None:
            self.lookahead.end_epoch(self.model)
        mean_loss = loss_sum.item() / max(seen, 1)
        diverged = diverged or has_diverged(mean_loss, self.loss_limit)
        sync(device)
        seconds = time.perf_counter() - t0
        if self.sched is not None and not self.per_step:
            self.sched.step()
        return Trained(math.nan if diverged else float(mean_loss), float(correct.item() / max(seen, 1)), seen,
                        t0, seconds, diverged)

    def validate(self) -> Evaluation:
        t = self.cfg.train
        return evaluate(self.model, self.images, self.val_idx, self.classes, t.eval_batch_size, self.amp)


def first_flips(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """alternate_flip's first-epoch mirror of each of n images, (n,) bool: its own generator, so the
    run's shuffling and augmentation draws are those of the run without it."""
    gen = torch.Generator().manual_seed(seed + FLIP_SEED_OFFSET)
    return (torch.rand(n, generator=gen) < 0.5).to(device)


def freeze_whitening_bias(model: nn.Module, epochs: Optional[int], epoch: int) -> None:
    """train.whiten_bias_epochs: from the epoch after the last of them, the whitening layer's bias takes
    no gradient (so no optimizer step, momentum or decay moves it); set again at each epoch's start, so a
    resumed run freezes it at the same epoch."""
    if epochs is None or epoch <= epochs:
        return
    for m in model.modules():
        if isinstance(m, WhiteningConv) and m.bias is not None:
            m.bias.requires_grad_(False)


def data_init(model: nn.Module, images: DeviceImages, train_idx: torch.Tensor, count: int, seed: int) -> None:
    """Run every `data_init(x)` hook of the model's layers (a whitening layer sets its filters from
    training patches) on `count` training images drawn with `seed`, normalised as training sees them
    but not augmented. Its own generator: the run's shuffling and augmentation draws are unchanged."""
    hooks: list[Callable[[torch.Tensor], None]] = [
        m.data_init for m in model.modules() if callable(getattr(m, "data_init", None))]  # type: ignore[misc]
    if not hooks or count == 0:
        return
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train_idx), generator=gen)[:count].to(train_idx.device)
    x, _ = images.batch(train_idx[pick])
    for hook in hooks:
        hook(x)


@dataclass
class Lookahead:
    """A running average of the model's floating-point state (weights and BN statistics), moved
    towards the model and copied back into it every `every` steps once `start` steps have passed.
    The decay per update is decay^every x (step / total)^3."""

    decay: float
    every: int
    start: int  # step
    total: int  # steps in the run
    average: Optional[dict[str, torch.Tensor]] = None

    @classmethod
    def of(cls, t, steps_per_epoch: int) -> "Lookahead":
        total = t.epochs * steps_per_epoch
        return cls(t.lookahead_decay, t.lookahead_every, math.ceil(t.lookahead_start * total), total)

    @staticmethod
    def _floats(model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        if step < self.start or step % self.every:
            return
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in self._floats(model).items()}
            return
        rho = self.decay ** self.every * (step / self.total) ** 3
        for k, v in self._floats(model).items():
            self.average[k].lerp_(v, 1 - rho)
            v.copy_(self.average[k])

    @torch.no_grad()
    def end_epoch(self, model: nn.Module) -> None:
        """Back to the average at the epoch's end (the steps since the last update are dropped), so a
        checkpoint's weights are the average and resuming needs nothing more."""
        if self.average is not None:
            for k, v in self._floats(model).items():
                v.copy_(self.average[k])

    def resume(self, model: nn.Module, step: int) -> None:
        # the average was taken at the first update step at or after start (a multiple of every)
        first = math.ceil(self.start / self.every) * self.every
        self.average = ({k: v.detach().clone() for k, v in self._floats(model).items()} if step >= first else None)


@dataclass(frozen=True)
class Trained:
    loss: float  # mean training loss; NaN once diverged
    accuracy: float
    images: int
    started: float  # time.perf_counter() at the epoch's start
    seconds: float  # the training phase
    diverged: bool


def fresh_bookkeeping() -> dict:
    return {"val_loss": math.inf, "val_acc": -math.inf, "bad_epochs": 0}


def epoch_status(best: dict, ev: Evaluation, diverged: bool, epoch: int, t) -> str:
    """Update the early-stopping bookkeeping with this epoch's validation; the run's status after it."""
    if diverged:
        return M.DIVERGED
    if ev.loss < best["val_loss"]:
        best["val_loss"], best["bad_epochs"] = ev.loss, 0
    else:
        best["bad_epochs"] += 1
    best["val_acc"] = max(best["val_acc"], ev.accuracy)
    if t.early_stopping_patience and best["bad_epochs"] >= t.early_stopping_patience:
        return M.EARLY_STOPPED
    return M.COMPLETED if epoch == t.epochs else M.RUNNING


def ended(state: dict, epochs: int) -> bool:
    """A state saved at the run's end: at or past the last epoch, or with a final status."""
    metrics = state.get("metrics") or {}
    return int(state["epoch"]) >= epochs or metrics.get(M.STATUS, M.RUNNING) != M.RUNNING


def fit(cfg: TrialConfig, dataset: Optional[Dataset] = None, *, on_epoch: Optional[OnEpoch] = None,
        resume: Optional[dict] = None, device: Optional[torch.device] = None,
        started_at: Optional[float] = None) -> FitResult:
    """Train cfg.model on cfg.data for cfg.train.epochs (or until early stop / divergence).

    resume: a state from a previous run's make_state(); training continues after its epoch and
    gives the same metrics as an uninterrupted run on the CPU. device overrides cfg.train.device
    (the Ray trainable passes the device Ray granted). started_at (time.perf_counter()) is when the
    caller's work began; setup_seconds runs from there to the first training step.
    """
    started_at = time.perf_counter() if started_at is None else started_at
    t = cfg.train
    device = device or select_device(t.device)
    check_device(cfg.model.name, device.type)
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    run = Run.build(cfg, dataset, device)
    start_epoch, best, restored = run.restore(resume) if resume is not None else (0, fresh_bookkeeping(), None)
    result = FitResult(M.COMPLETED, model=run.model)

    if resume is not None and ended(resume, t.epochs):
        # A state saved at the run's end (a PBT clone of a finished trial, a retry after the last
        # report): report its final epoch again so the caller's record ends with the true outcome.
        final = restored or _metrics_of_restored(run, start_epoch)
        if final[M.STATUS] == M.RUNNING:
            final = {**final, M.STATUS: M.COMPLETED}
        result.status = final[M.STATUS]
        result.history.append(final)
        if on_epoch is not None:
            on_epoch(final, lambda: run.state(start_epoch, best, final))
        return result

    run.model.train()
    for epoch in range(start_epoch + 1, t.epochs + 1):
        lr = run.opt.param_groups[0]["lr"]
        trained = run.train_epoch()
        ev = run.validate()
        status = epoch_status(best, ev, trained.diverged, epoch, t)
        metrics = epoch_metrics(epoch, trained, ev, lr, status, run, started_at)
        result.history.append(metrics)
        result.evaluation = ev
        if on_epoch is not None:
            on_epoch(metrics, functools.partial(run.state, epoch, best, metrics))
        if status != M.RUNNING:
            result.status = status
            break
    return result


def epoch_metrics(epoch: int, trained: Trained, ev: Evaluation, lr: float, status: str, run: Run,
                  started_at: float) -> dict:
    """One epoch's report: training and validation figures, the epoch's lr, time, memory, status."""
    return {
        M.EPOCH: epoch, M.TRAIN_LOSS: trained.loss, M.TRAIN_ACC: trained.accuracy, M.VAL_LOSS: ev.loss,
        M.VAL_ACC: ev.accuracy, M.VAL_CLASS_ACC: ev.class_accuracy, M.LR: lr,
        M.EPOCH_SECONDS: time.perf_counter() - trained.started,
        M.IMAGES_PER_SECOND: trained.images / trained.seconds, M.PEAK_MEMORY_MB: peak_memory_mb(run.device),
        M.SETUP_SECONDS: run.first_step_at - started_at if run.first_step_at is not None else math.nan,
        M.STATUS: status,
    }


def _metrics_of_restored(run: Run, epoch: int) -> dict:
    """Metrics of a state saved without them (older checkpoints): validation measured again, the
    training-phase figures unknown."""
    ev = run.validate()
    return {M.EPOCH: epoch, M.TRAIN_LOSS: math.nan, M.TRAIN_ACC: math.nan, M.VAL_LOSS: ev.loss, M.VAL_ACC: ev.accuracy,
            M.VAL_CLASS_ACC: ev.class_accuracy, M.LR: math.nan, M.EPOCH_SECONDS: 0.0, M.IMAGES_PER_SECOND: math.nan,
            M.PEAK_MEMORY_MB: math.nan, M.SETUP_SECONDS: math.nan, M.STATUS: M.COMPLETED}
