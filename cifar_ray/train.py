"""The training engine: one TrialConfig in, per-epoch metrics out through a callback. No Ray here.

Run one trial without Ray:
    python -m cifar_ray.train --model netconv --data synthetic --epochs 2
    python -m cifar_ray.train --from sweeps/fast.yaml            # a sweep file's one configuration
    python -m cifar_ray.train --from results/quickstart --trial 00003   # a finished sweep's trial, again
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cifar_ray import metrics as M
from cifar_ray.batches import DeviceImages
from cifar_ray.config import ConfigError, TrialConfig, trial_config
from cifar_ray.data import DataError, Dataset, Split, load_dataset, split_dataset
from cifar_ray.files import atomic_write, printable
from cifar_ray.models import ModelError, build_model, check_device
from cifar_ray.models.googlenet import AUX_WEIGHT

DIVERGENCE_CHECK_STEPS = 20  # check the running loss every N steps (a host sync each time)
# A run has diverged when its running mean training loss is NaN/inf or above this many times the loss
# of a uniform guess (ln of the class count: 2.3 for CIFAR-10). bf16 rarely reaches inf: a blown-up run
# measured at a mean loss of 8.8e9 in its first epoch, then sat at ~55 with chance accuracy.
DIVERGENCE_LOSS_FACTOR = 100.0

OnEpoch = Callable[[dict, Callable[[], dict]], None]  # (metrics, make_state) after every epoch


class TrainError(RuntimeError):
    """A run that cannot start or continue, phrased for the user."""


# ---------------------------------------------------------------- device

def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


@dataclass(frozen=True)
class Grant:
    """What a scheduler gave the run: GPU ids, or a node tag asking for Apple's MPS."""

    gpu: bool = False
    mps: bool = False


def select_device(requested: str, grant: Optional[Grant] = None,
                  warn: Callable[[str], None] = lambda message: print(f"warning: {message}", file=sys.stderr)
                  ) -> torch.device:
    """The one device policy. requested is train.device; an explicit cpu is always honoured.
    Outside Ray (grant None): auto picks cuda, then mps, then cpu; cuda/mps must exist.
    Inside a Ray trial the grant decides: GPU ids -> cuda (cpu with a warning where CUDA is missing, as
    on Ray's fake GPU nodes), an mps tag -> mps where available, else cpu."""
    if requested == "cpu":
        return torch.device("cpu")
    if grant is not None:
        if grant.gpu:
            if torch.cuda.is_available():
                return torch.device("cuda")
            warn("Ray granted a GPU but CUDA is not available in this worker; training on cpu")
            return torch.device("cpu")
        return torch.device("mps") if grant.mps and _mps_available() else torch.device("cpu")
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"train.device: {requested} requested but no CUDA GPU is visible")
    if device.type == "mps" and not _mps_available():
        raise TrainError(f"train.device: {requested} requested but MPS is not available")
    return device


def trial_threads(cpu: float) -> int:
    """Torch threads for a trial granted `cpu` CPUs (resources.cpu): its whole CPUs, at least one. The
    trainable, the estimate and `train --from RESULTS_DIR` all use this rule, so a retrained trial does
    the same arithmetic as the recorded one."""
    return max(1, int(math.floor(cpu or 1)))


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN runs bf16 convolutions and matmuls natively. Without them bf16 is
    emulated and slower than fp32, so auto stays off there."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers; absent from some builds
        return False


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 where the GPU supports it; fp16 (with a grad scaler) on older CUDA GPUs (T4, 1080 Ti).
    On the CPU: bf16 when asked, or for auto when the CPU has native bf16 (on this project's AVX512-BF16
    CPU a netconv epoch 1.6x and a resnet18 epoch 2.0x faster: docs/performance.md); fp16 and MPS run in fp32."""
    if mode == "off" or device.type == "mps":
        return None
    if device.type == "cpu":
        return torch.bfloat16 if mode == "bf16" or (mode == "auto" and cpu_has_native_bf16()) else None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- evaluation

@dataclass
class Evaluation:
    accuracy: float
    loss: float
    class_accuracy: dict[str, float]
    confusion: np.ndarray  # (C, C): rows true class, columns predicted
    classes: tuple[str, ...]

    @property
    def count(self) -> int:
        return int(self.confusion.sum())


def logits_of(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x moved by (dy, dx) px, the border filled by reflection: (B, C, H, W) -> (B, C, H, W)."""
    h, w = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    return padded[..., p - dy:p - dy + h, p - dx:p - dx + w]


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The model's logits averaged over test-time views of x (B, C, H, W) -> (B, classes).
    flip: the image and its mirror, equal weights. flip_translate: that pair at half weight, plus the
    pair shifted one pixel up-left and the pair shifted down-right at a quarter each (airbench's views)."""
    def pair(v):
        return 0.5 * (logits_of(model(v)).float() + logits_of(model(v.flip(-1))).float())

    if tta == "none":
        return logits_of(model(x)).float()
    if tta == "flip":
        return pair(x)
    if tta == "flip_translate":
        return 0.5 * pair(x) + 0.25 * (pair(shifted(x, -1, -1)) + pair(shifted(x, 1, 1)))
    raise ValueError(f"tta: {tta!r} is not one of none, flip, flip_translate")


@torch.no_grad()
def evaluate(model: nn.Module, images: DeviceImages, idx: torch.Tensor, classes: tuple[str, ...],
             batch_size: int = 256, amp: Optional[torch.dtype] = None, tta: str = "none") -> Evaluation:
    """Accuracy, mean loss, per-class accuracy and confusion matrix of model on images[idx]
    (logits averaged over the test-time views `tta` names)."""
    was_training = model.training
    model.eval()
    n_cls = len(classes)
    confusion = torch.zeros(n_cls * n_cls, dtype=torch.int64, device=idx.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=idx.device)
    autocast = torch.autocast(idx.device.type, dtype=amp) if amp else nullcontext()
    for x, y in images.batches(idx, batch_size):
        with autocast:
            logits = tta_logits(model, x, tta)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        confusion += torch.bincount(y * n_cls + logits.argmax(1), minlength=n_cls * n_cls)
    model.train(was_training)
    cm = confusion.view(n_cls, n_cls).cpu().numpy()
    per_class = {c: float(cm[i, i] / max(cm[i].sum(), 1)) for i, c in enumerate(classes)}
    total = max(int(cm.sum()), 1)
    return Evaluation(float(np.trace(cm) / total), float(loss_sum.item() / total), per_class, cm, classes)


def format_report(ev: Evaluation, split: str = "test") -> str:
    """The seed's printout: overall accuracy as a whole percent, then one line per class."""
    lines = [f"Accuracy of the network on the {ev.count} {split} images: {round(100 * ev.accuracy)} %"]
    lines += [f"Accuracy for class: {c:<10s} is {100 * a:.1f} %" for c, a in ev.class_accuracy.items()]
    return "\n".join(lines)


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
    parameters (every 1-D tensor) with their own lr and weight decay. Frozen parameters are left out."""
    trained = [p for p in model.parameters() if p.requires_grad]
    settings = group_settings(cfg.train)
    if len(settings) == 1:
        return [{"params": trained, **settings[0]}]
    weights, vectors = [p for p in trained if p.ndim > 1], [p for p in trained if p.ndim <= 1]
    return [{"params": weights, **settings[0]}, {"params": vectors, **settings[1]}]


def group_settings(t) -> list[dict]:
    """lr and weight_decay of each parameter group param_groups makes (t: a TrainConfig)."""
    lr = t.effective_lr()
    if t.bias_lr_factor == 1 and t.bias_decay_factor == 1:
        return [{"lr": lr, "weight_decay": t.weight_decay}]
    return [{"lr": lr, "weight_decay": t.weight_decay},
            {"lr": lr * t.bias_lr_factor, "weight_decay": t.weight_decay * t.bias_decay_factor}]


def build_optimizer(cfg: TrialConfig, model: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    groups = param_groups(cfg, model)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=t.momentum, nesterov=t.nesterov)
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
class _Run:
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
    first_step_at: Optional[float] = None  # time.perf_counter() of the first training step
    step: int = 0  # optimizer steps taken in the run, across resumes

    @classmethod
    def build(cls, cfg: TrialConfig, dataset: Dataset, device: torch.device) -> "_Run":
        t = cfg.train
        split = split_dataset(dataset, cfg.data)
        channels_last = t.channels_last and device.type in ("cuda", "cpu")  # oneDNN's CPU convolutions prefer it
        images = DeviceImages.create(dataset.train_x, dataset.train_y, split, device, channels_last)
        train_idx = torch.from_numpy(split.train_idx).to(device)
        torch.manual_seed(t.seed)
        model = build_model(cfg.model.name, num_classes=len(dataset.classes), **cfg.model.options()).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        data_init(model, images, train_idx, t.data_init_images, t.seed)
        opt = build_optimizer(cfg, model)
        steps_per_epoch = math.ceil(len(train_idx) / t.batch_size)
        sched, per_step = build_schedule(cfg, opt, steps_per_epoch)
        amp = amp_dtype(t.amp, device)
        lookahead = Lookahead.of(t, steps_per_epoch) if t.lookahead_decay > 0 else None
        return cls(cfg, device, dataset.classes, images, train_idx, torch.from_numpy(split.val_idx).to(device),
                   model, torch.compile(model) if (t.compile and device.type == "cuda") else model, opt, sched,
                   per_step, amp, torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
                   torch.Generator(device=device).manual_seed(t.seed),
                   DIVERGENCE_LOSS_FACTOR * math.log(len(dataset.classes)), steps_per_epoch, lookahead)

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

    def train_epoch(self) -> "_Trained":
        """One pass over the training split; stops early once the running loss has diverged."""
        t, device = self.cfg.train, self.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen, diverged = 0, False
        augment_cfg = self.cfg.data.augment if self.cfg.data.augment.enabled() else None
        autocast = torch.autocast(device.type, dtype=self.amp) if self.amp else nullcontext()
        batches = self.images.batches(self.train_idx, t.batch_size, gen=self.gen, augment_cfg=augment_cfg)
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
        _sync(device)
        seconds = time.perf_counter() - t0
        if self.sched is not None and not self.per_step:
            self.sched.step()
        return _Trained(math.nan if diverged else float(mean_loss), float(correct.item() / max(seen, 1)), seen,
                        t0, seconds, diverged)

    def validate(self) -> Evaluation:
        t = self.cfg.train
        return evaluate(self.model, self.images, self.val_idx, self.classes, t.eval_batch_size, self.amp)


def data_init(model: nn.Module, images: DeviceImages, train_idx: torch.Tensor, count: int, seed: int) -> None:
    """Run every `data_init(x)` hook of the model's layers (a whitening layer sets its filters from
    training patches) on `count` training images drawn with `seed`, normalised as training sees them
    but not augmented. Its own generator: the run's shuffling and augmentation draws are unchanged."""
    hooks = [m.data_init for m in model.modules() if callable(getattr(m, "data_init", None))]
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
class _Trained:
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
    run = _Run.build(cfg, dataset, device)
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
        metrics = {
            M.EPOCH: epoch, M.TRAIN_LOSS: trained.loss, M.TRAIN_ACC: trained.accuracy, M.VAL_LOSS: ev.loss,
            M.VAL_ACC: ev.accuracy, M.VAL_CLASS_ACC: ev.class_accuracy, M.LR: lr,
            M.EPOCH_SECONDS: time.perf_counter() - trained.started,
            M.IMAGES_PER_SECOND: trained.images / trained.seconds, M.PEAK_MEMORY_MB: peak_memory_mb(device),
            M.SETUP_SECONDS: run.first_step_at - started_at if run.first_step_at is not None else math.nan,
            M.STATUS: status,
        }
        result.history.append(metrics)
        result.evaluation = ev
        if on_epoch is not None:
            on_epoch(metrics, lambda e=epoch, m=metrics: run.state(e, best, m))
        if status != M.RUNNING:
            result.status = status
            break
    return result


def _metrics_of_restored(run: _Run, epoch: int) -> dict:
    """Metrics of a state saved without them (older checkpoints): validation measured again, the
    training-phase figures unknown."""
    ev = run.validate()
    return {M.EPOCH: epoch, M.TRAIN_LOSS: math.nan, M.TRAIN_ACC: math.nan, M.VAL_LOSS: ev.loss, M.VAL_ACC: ev.accuracy,
            M.VAL_CLASS_ACC: ev.class_accuracy, M.LR: math.nan, M.EPOCH_SECONDS: 0.0, M.IMAGES_PER_SECOND: math.nan,
            M.PEAK_MEMORY_MB: math.nan, M.SETUP_SECONDS: math.nan, M.STATUS: M.COMPLETED}


def build_test_images(dataset: Dataset, split: Split, device: torch.device) -> tuple[DeviceImages, torch.Tensor]:
    images = DeviceImages.create(dataset.test_x, dataset.test_y, split, device, channels_last=False)
    return images, torch.arange(len(dataset.test_y), device=device)


def evaluate_split(model: nn.Module, cfg: TrialConfig, dataset: Dataset, split_name: str = "test",
                   device: Optional[torch.device] = None) -> Evaluation:
    """Evaluate on 'test' (the official 10,000) or 'val' (the seeded split of cfg.data)."""
    device = device or next(model.parameters()).device
    split = split_dataset(dataset, cfg.data)
    if split_name == "test":
        images, idx = build_test_images(dataset, split, device)
    elif split_name == "val":
        images = DeviceImages.create(dataset.train_x, dataset.train_y, split, device, channels_last=False)
        idx = torch.from_numpy(split.val_idx).to(device)
    else:
        raise ValueError(f"split: {split_name!r} is not one of test, val")
    # the same precision as training's validation, so a reported val_acc is reproduced exactly (when
    # train.tta is none: test-time views are for this final evaluation, not the per-epoch validation)
    return evaluate(model, images, idx, dataset.classes, cfg.train.eval_batch_size, amp_dtype(cfg.train.amp, device),
                    cfg.train.tta)


# ---------------------------------------------------------------- CLI

# flag -> (section, key); types come from the schema, defaults too (argparse keeps None).
CLI_FLAGS = {
    "model": ("model", "name"), "data": ("data", "source"), "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"), "optimizer": ("train", "optimizer"), "lr": ("train", "lr"),
    "momentum": ("train", "momentum"), "weight_decay": ("train", "weight_decay"),
    "schedule": ("train", "schedule"), "train_size": ("data", "train_size"), "val_size": ("data", "val_size"),
    "augment": ("data", "augment"), "device": ("train", "device"), "seed": ("train", "seed"),
}


def flag_overrides(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags given, as --set KEY=VALUE overrides."""
    return [f"{section}.{key}={getattr(args, flag)}" for flag, (section, key) in CLI_FLAGS.items()
            if getattr(args, flag) is not None and flag not in skip]


def choose(args: argparse.Namespace):
    """The configuration to train: from --from FILE|RESULTS_DIR [--trial], else from the flags; flags and
    --set override the keys they name either way."""
    from cifar_ray.retrain import Chosen, from_source
    from cifar_ray.sweep_config import apply_overrides

    if args.source is not None:
        return from_source(args.source, args.trial, flag_overrides(args, skip=("data",)) + args.sets, args.data)
    nested: dict[str, dict] = {"model": {}, "data": {}, "train": {}}
    for flag, (section, key) in CLI_FLAGS.items():
        if getattr(args, flag) is not None:  # as given: pydantic converts and checks
            nested[section][key] = getattr(args, flag)
    return Chosen(trial_config(apply_overrides(nested, args.sets), where="options"), "options")


def compare_line(history: list[dict], recorded: list[dict]) -> str:
    """How this run's validation accuracy compares with the recorded trial's, epoch by epoch."""
    ours = {m[M.EPOCH]: m[M.VAL_ACC] for m in history}
    pairs = [(r[M.EPOCH], ours[r[M.EPOCH]], r[M.VAL_ACC]) for r in recorded
             if r[M.EPOCH] in ours and isinstance(r.get(M.VAL_ACC), (int, float))]
    if not pairs:
        return "recorded run: no epoch to compare"
    worst = max(abs(a - b) for _, a, b in pairs)
    if worst == 0:
        return f"recorded run: val_acc identical at all {len(pairs)} recorded epochs"
    return (f"recorded run: val_acc differs by up to {worst:.4f} over {len(pairs)} epochs (expected where the "
            "device, the thread count or library versions differ from the sweep's)")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar_ray.train", description="Train one model without Ray.")
    parser.add_argument("--from", dest="source", metavar="FILE|RESULTS_DIR",
                        help="a sweep file with one configuration (or --trial N of its dry-run list), or a sweep's "
                             "results folder with --trial ID: train that configuration here")
    parser.add_argument("--trial", help="with --from: N (1-based) for a sweep file, a trial id (or its unique end, "
                                        "e.g. 00003) for a results folder")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, e.g. train.seed=1 (repeatable)")
    for flag in CLI_FLAGS:
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag)  # strings: pydantic converts and checks
    args = parser.parse_args(argv)
    if args.trial is not None and args.source is None:
        parser.error("--trial goes with --from FILE|RESULTS_DIR")
    started = time.perf_counter()
    try:
        chosen = choose(args)
        cfg = chosen.config
        for message in chosen.warnings:
            print(f"warning: {message}", file=sys.stderr)
        if chosen.threads is not None:
            torch.set_num_threads(chosen.threads)  # as the trial had: the same arithmetic, epoch for epoch
        recorded = {r[M.EPOCH]: r for r in chosen.recorded}
        print(f"training {chosen.label}: {cfg.model.name}, {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, "
              f"seed {cfg.train.seed}, {torch.get_num_threads()} threads", flush=True)
        dataset = load_dataset(cfg.data)

        def show(m: dict, _state) -> None:
            then = recorded.get(m[M.EPOCH], {}).get(M.VAL_ACC)
            was = f"  (recorded {then:.4f})" if isinstance(then, (int, float)) else ""
            print(f"epoch {m[M.EPOCH]:>3}/{cfg.train.epochs}  train_loss {m[M.TRAIN_LOSS]:.4f}  "
                  f"train_acc {m[M.TRAIN_ACC]:.4f}  val_loss {m[M.VAL_LOSS]:.4f}  val_acc {m[M.VAL_ACC]:.4f}{was}  "
                  f"lr {m[M.LR]:.3g}  {m[M.EPOCH_SECONDS]:.1f}s  {m[M.IMAGES_PER_SECOND]:.0f} img/s  "
                  f"{m[M.STATUS]}", flush=True)

        result = fit(cfg, dataset, on_epoch=show, started_at=started)
        print(f"status: {result.status}")
        if chosen.recorded:
            print(compare_line(result.history, chosen.recorded))
        tta = f" (test-time augmentation: {cfg.train.tta})" if cfg.train.tta != "none" else ""
        print(format_report(evaluate_split(result.model, cfg, dataset, "test"), "test") + tta)
        print(f"wall time: {time.perf_counter() - started:.1f} s")
    except (ConfigError, DataError, ModelError, TrainError) as err:
        print(f"error: {printable(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
