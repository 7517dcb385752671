"""Fused trials: K runs of one architecture trained as one wide network (HFTA's layout, Wang et al.,
MLSys'21), each member exactly the run it would be alone.

Layout: every activation is the K members' side by side along the channel (or feature) dimension,
member-major: a (B, C, H, W) activation of one run becomes (B, K*C, H, W), member k in channels
[k*C, (k+1)*C). Convolutions become grouped convolutions (groups x K), BatchNorm one BatchNorm over
K*C channels (its statistics are per channel, so per member), Linear a batched matmul over a (K, out,
in) weight, Dropout draws each member's mask from that member's own random stream. Everything else a
registry model does (activations, pooling, flatten, residual adds) acts per channel or per element and
needs no change: a flatten of (B, K*C, H, W) is the members' flattens side by side. A model that
concatenates channels (inception) mixes the layout and is refused.

Exactness: each member is built by engine.Run.build from its own configuration (its seed's init, data
init, optimizer, schedule, lookahead, generator for batch order and augmentation), and keeps its own
model and optimizer: the member's parameters and buffers are views into the wide network's tensors, so
the member's own torch optimizer steps the wide network in place, and the member's model evaluates and
checkpoints as an ordinary unfused model. Only the forward and backward are fused; their grouped kernels
round differently from the unfused ones, so a member's curve equals its unfused run up to float
rounding (tests/test_fuse.py states the tolerance).

No Ray here: the trainable calls it."""
from __future__ import annotations

import functools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cifar_ray import metrics as M
from cifar_ray.config import TrialConfig
from cifar_ray.data import Dataset
from cifar_ray.device import sync
from cifar_ray.engine import (
    DIVERGENCE_CHECK_STEPS,
    Run,
    Trained,
    _loss,
    epoch_status,
    freeze_whitening_bias,
    has_diverged,
)
from cifar_ray.evaluation import logits_of
from cifar_ray.packs import (  # noqa: F401 - the rules of fusion, importable from here as before
    PER_MEMBER_KEYS,
    UNFUSABLE_MODELS,
    FuseError,
    flat,
    fusion_problem,
    pack_key,
    pack_problems,
)

# ---------------------------------------------------------------- the wide layers

class WideConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, k: int, weight: nn.Parameter, bias: Optional[nn.Parameter]):
        super().__init__()
        self.k, self.stride, self.padding, self.dilation = k, conv.stride, conv.padding, conv.dilation
        self.groups, self.padding_mode = conv.groups * k, conv.padding_mode
        self.weight, self.bias = weight, bias
        if conv.padding_mode != "zeros":
            raise FuseError(f"a convolution with padding_mode {conv.padding_mode!r} is not fused")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class WideLinear(nn.Module):
    """K Linear layers: input (B, K*in), weight (K, out, in), output (B, K*out)."""

    def __init__(self, k: int, weight: nn.Parameter, bias: Optional[nn.Parameter]):
        super().__init__()
        self.k, self.weight, self.bias = k, weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        y = torch.bmm(x.reshape(b, self.k, -1).transpose(0, 1), self.weight.transpose(1, 2))  # (K, B, out)
        y = y.transpose(0, 1).reshape(b, -1)
        return y if self.bias is None else y + self.bias


class WideDropout(nn.Module):
    """Dropout with each member's mask drawn from that member's random stream, as its unfused
    nn.Dropout draws it from the global one (CPU: a bernoulli mask of the input's shape and layout)."""

    def __init__(self, p: float, pack: "PackStreams | SlotStreams"):
        super().__init__()
        self.p, self.pack = p, pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        parts = x.chunk(self.pack.k, dim=1)
        keep = 1 - self.p
        masks = []
        for k, part in enumerate(parts):
            with self.pack.stream(k):
                like = torch.empty(part.shape, dtype=part.dtype, device=part.device,
                                   memory_format=_layout(x))
                masks.append(like.bernoulli_(keep).div_(keep) if keep > 0 else like.zero_())
        return x * torch.cat(masks, dim=1)


def _layout(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class PackStreams:
    """Each member's global random stream (what its dropout draws from when it runs alone)."""

    def __init__(self, states: list[torch.Tensor]):
        self.states = states

    @property
    def k(self) -> int:
        return len(self.states)

    def stream(self, k: int):
        pack = self

        class _Use:
            def __enter__(self):
                self.outer = torch.get_rng_state()
                torch.set_rng_state(pack.states[k])

            def __exit__(self, *exc):
                pack.states[k] = torch.get_rng_state()
                torch.set_rng_state(self.outer)
        return _Use()


class SlotStreams:
    """The streams of the members a wide network holds, by their place in it (slot j is member slots[j])."""

    def __init__(self, streams: PackStreams, slots: list[int]):
        self.streams, self.slots = streams, slots

    @property
    def k(self) -> int:
        return len(self.slots)

    def stream(self, k: int):
        return self.streams.stream(self.slots[k])


# ---------------------------------------------------------------- building the wide network

Links = list[tuple[nn.Parameter, list[torch.Tensor]]]  # each wide parameter, and the members' views of it


def _tensors(mods: list[nn.Module], name: str) -> list[torch.Tensor]:
    return [getattr(m, name) for m in mods]


def _point_at(wide: torch.Tensor, members: list[torch.Tensor], stacked: bool) -> None:
    """Re-point each member's tensor at its slice of `wide`: along dim 0 (concatenated) or index k
    (stacked); the slices are contiguous, so the member's optimizer updates the wide tensor in place."""
    size = 1 if stacked else wide.shape[0] // len(members)
    for i, m in enumerate(members):
        m.data = wide.data[i] if stacked else wide.data[i * size:(i + 1) * size]


def _wide_param(members: list[torch.Tensor], links: Links, stacked: bool = False) -> nn.Parameter:
    """The members' parameters side by side (concatenated along dim 0, or stacked), as one parameter
    the members then view."""
    joined = torch.stack if stacked else torch.cat
    wide = joined([t.detach() for t in members], dim=0).clone()
    if members[0].dim() == 4 and members[0].is_contiguous(memory_format=torch.channels_last):
        wide = wide.contiguous(memory_format=torch.channels_last)
    param = nn.Parameter(wide, requires_grad=members[0].requires_grad)
    _point_at(param, members, stacked)
    links.append((param, members))
    return param


def _wide_conv(conv: nn.Conv2d, mods: list[nn.Module], links: Links) -> nn.Module:
    weight = _wide_param(_tensors(mods, "weight"), links)
    bias = _wide_param(_tensors(mods, "bias"), links) if conv.bias is not None else None
    return WideConv2d(conv, len(mods), weight, bias)


def _wide_linear(linear: nn.Linear, mods: list[nn.Module], links: Links) -> nn.Module:
    weight = _wide_param(_tensors(mods, "weight"), links, stacked=True)
    bias = _wide_param(_tensors(mods, "bias"), links) if linear.bias is not None else None
    return WideLinear(len(mods), weight, bias)


def _wide_norm(bn: nn.BatchNorm1d | nn.BatchNorm2d, mods: list[nn.Module], links: Links) -> nn.Module:
    wide = type(bn)(bn.num_features * len(mods), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                    track_running_stats=bn.track_running_stats)
    if bn.affine:
        wide.weight = _wide_param(_tensors(mods, "weight"), links)
        wide.bias = _wide_param(_tensors(mods, "bias"), links)
    if bn.track_running_stats:
        for name in ("running_mean", "running_var"):
            buffers = _tensors(mods, name)
            joined = torch.cat(buffers).clone()
            setattr(wide, name, joined)
            _point_at(joined, buffers, stacked=False)
    return wide


UNSUPPORTED_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.MultiheadAttention, nn.Conv1d, nn.Conv3d,
                      nn.ConvTranspose2d, nn.BatchNorm3d)


def widen(models: list[nn.Module], streams: "PackStreams | SlotStreams") -> tuple[nn.Module, Links]:
    """The wide network of `models` (one architecture), and each wide parameter with the member
    parameters that now view it. The members' parameters and buffers are re-pointed at slices of the
    wide tensors; the wide network is a new module tree, the members' own trees are kept (evaluation,
    checkpoints)."""
    import copy

    links: Links = []

    def convert(path: str, mod: nn.Module, mods: list[nn.Module]) -> nn.Module:
        if isinstance(mod, nn.Conv2d):
            return _wide_conv(mod, mods, links)
        if isinstance(mod, nn.Linear):
            return _wide_linear(mod, mods, links)
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return _wide_norm(mod, mods, links)
        if isinstance(mod, nn.Dropout):
            return WideDropout(mod.p, streams)
        if isinstance(mod, UNSUPPORTED_LAYERS):
            raise FuseError(f"{path or 'the model'}: {type(mod).__name__} has no wide form here; set resources.fuse: 1")
        for name, child in list(mod.named_children()):
            new = convert(f"{path}.{name}" if path else name, child, [m.get_submodule(name) for m in mods])
            if new is not child:
                setattr(mod, name, new)
        own = [n for n, _ in mod.named_parameters(recurse=False)]
        if own:
            raise FuseError(f"{path or 'the model'} ({type(mod).__name__}) holds parameters of its own "
                            f"({', '.join(own)}) that have no wide form; set resources.fuse: 1")
        return mod

    return convert("", copy.deepcopy(models[0]), models), links


# ---------------------------------------------------------------- training a pack

@dataclass
class Pack:
    """K runs trained as one wide network; runs[k] is member k, an engine.Run of its own config."""

    runs: list[Run]
    wide: nn.Module
    links: Links
    streams: PackStreams
    active: list[bool]  # members still training (a diverged or stopped member leaves)
    slots: list[int] = field(default_factory=list)  # the members the wide network holds, in its order
    narrows: bool = True  # rebuild the wide network without members that left (off: bench/fuse.py --keep-left)

    def __post_init__(self) -> None:
        self.slots = self.slots or list(range(len(self.runs)))

    @classmethod
    def build(cls, cfgs: list[TrialConfig], dataset: Dataset, device: torch.device) -> "Pack":
        problems = pack_problems(cfgs)
        if problems:
            raise FuseError("; ".join(problems))
        runs: list[Run] = []
        states: list[torch.Tensor] = []
        outer = torch.get_rng_state()
        for cfg in cfgs:
            runs.append(Run.build(cfg, dataset, device, share_data_of=runs[0] if runs else None))
            states.append(torch.get_rng_state())  # where the member's own dropout stream goes on
        torch.set_rng_state(outer)
        streams = PackStreams(states)
        wide, links = widen([r.model for r in runs], streams)
        wide.train()
        return cls(runs, wide, links, streams, [True] * len(runs))

    @property
    def k(self) -> int:
        return len(self.runs)

    def state(self, member: int, epoch: int, best: dict, metrics: dict) -> dict:
        """Member's checkpoint, as its unfused run would save it (tensors copied out of the wide ones,
        so the file holds that member only; the global random state is the member's own)."""
        with self.streams.stream(member):
            state = self.runs[member].state(epoch, best, metrics)
        state["model"] = {n: v.clone() for n, v in state["model"].items()}
        return state

    def restore(self, member: int, state: dict) -> tuple[int, dict, Optional[dict]]:
        """Load member's checkpoint (Pack.state) into the wide network; returns what Run.restore does."""
        with self.streams.stream(member):
            out = self.runs[member].restore(state)
        # the wide BatchNorm layers count batches once for every member: the restored count is theirs
        for name, buf in self.runs[member].model.named_buffers():
            if name.endswith("num_batches_tracked"):
                self.wide.get_buffer(name).copy_(buf)
        self._sync_counters()
        return out

    def _sync_counters(self) -> None:
        """The wide BatchNorm layers count batches once for all members; the members' own counters
        (only read under momentum None, the cumulative average) follow it."""
        for i in self.slots:
            for name, buf in self.runs[i].model.named_buffers():
                if name.endswith("num_batches_tracked"):
                    buf.copy_(self.wide.get_buffer(name))

    def narrow(self) -> None:
        """Rebuild the wide network from the members still training: one that left costs no more compute.
        The members keep their own parameters, buffers and optimizers (re-pointed at the new wide tensors,
        their values unchanged); a member that left keeps its tensors as they were when it left."""
        live = [i for i, a in enumerate(self.active) if a]
        if not live or live == self.slots:
            return
        counters = {n: b.clone() for n, b in self.runs[live[0]].model.named_buffers()
                    if n.endswith("num_batches_tracked")}
        self.wide, self.links = widen([self.runs[i].model for i in live], SlotStreams(self.streams, live))
        self.wide.train()
        self.slots = live
        for name, count in counters.items():
            self.wide.get_buffer(name).copy_(count)

    def train_epoch(self) -> list[Optional[Trained]]:
        """One pass for every active member; each member's Trained (None for one that has left)."""
        runs, device = self.runs, self.runs[0].device
        if self.narrows:
            self.narrow()
        t0 = time.perf_counter()
        sync(device)
        live = [i for i, a in enumerate(self.active) if a]
        loss_sum = {i: torch.zeros((), device=device) for i in live}
        correct = {i: torch.zeros((), dtype=torch.int64, device=device) for i in live}
        seen = dict.fromkeys(live, 0)
        diverged = dict.fromkeys(live, False)
        first = runs[live[0]]
        amp = first.amp
        autocast = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
        epoch = first.step // first.steps_per_epoch + 1
        iterators = {}
        for i in live:
            r = runs[i]
            flips = None if r.flips is None else r.flips ^ (epoch % 2 == 0)
            freeze_whitening_bias(r.model, r.cfg.train.whiten_bias_epochs, epoch)
            augment_cfg = r.cfg.data.augment if r.cfg.data.augment.enabled() else None
            iterators[i] = r.images.batches(r.train_idx, r.cfg.train.batch_size, gen=r.gen,
                                            augment_cfg=augment_cfg, flips=flips)
        for w, members in self.links:  # the whitening bias freeze (and any freeze) is the members'
            w.requires_grad_(members[0].requires_grad)
        slots = self.slots
        k = len(slots)
        for step in range(1, first.steps_per_epoch + 1):
            if step == 1:
                for i in live:
                    if runs[i].first_step_at is None:
                        runs[i].first_step_at = time.perf_counter()
            batch = {i: next(iterators[i]) for i in slots if i in iterators}
            # a member that diverged this epoch (or, unnarrowed, left before) is fed zeros until the epoch ends
            xs = [batch[i][0] if i in batch else torch.zeros_like(batch[live[0]][0]) for i in slots]
            x = torch.cat(xs, dim=1)
            with autocast:
                out = self.wide(x)
                outs = dict(zip(slots, _split(out, k), strict=True))
                losses = {i: _loss(outs[i], batch[i][1], runs[i].cfg.train.label_smoothing) for i in batch}
            for w, _ in self.links:
                w.grad = None
            torch.stack(list(losses.values())).sum().backward()
            for w, members in self.links:
                if w.grad is None:
                    continue
                parts = w.grad.chunk(k, dim=0)
                for j, i in enumerate(slots):
                    if i in batch:
                        members[j].grad = parts[j].view_as(members[j]) if members[j].requires_grad else None
            for i in list(batch):
                r = runs[i]
                r.scaler.step(r.opt)
                r.scaler.update()
                for p in r.model.parameters():
                    p.grad = None
                if r.per_step:
                    r.sched.step()
                r.step += 1
                if r.lookahead is not None:
                    r.lookahead.after_step(r.model, r.step)
                y = batch[i][1]
                loss_sum[i] += losses[i].detach().float() * len(y)
                correct[i] += (logits_of(outs[i]).argmax(1) == y).sum()
                seen[i] += len(y)
                if step % DIVERGENCE_CHECK_STEPS == 0 and has_diverged(loss_sum[i].item() / seen[i], r.loss_limit):
                    diverged[i] = True
                    del iterators[i]  # its epoch ends here, as its unfused run's does
        results: list[Optional[Trained]] = [None] * self.k
        sync(device)
        seconds = time.perf_counter() - t0
        for i in live:
            r = runs[i]
            if r.lookahead is not None:
                r.lookahead.end_epoch(r.model)
            mean_loss = loss_sum[i].item() / max(seen[i], 1)
            d = diverged[i] or has_diverged(mean_loss, r.loss_limit)
            if r.sched is not None and not r.per_step:
                r.sched.step()
            results[i] = Trained(math.nan if d else float(mean_loss), float(correct[i].item() / max(seen[i], 1)),
                                 seen[i], t0, seconds, d)
        self._sync_counters()
        return results

    def leave(self, member: int) -> None:
        """A member that diverged, stopped early or was stopped: no more steps for it."""
        self.active[member] = False


def _split(out: Any, k: int) -> list[Any]:
    """The wide network's output, (B, K*classes) or a tuple of them, as each member's."""
    if isinstance(out, tuple):
        parts = [_split(o, k) for o in out]
        return [tuple(p[i] for p in parts) for i in range(k)]
    return list(out.chunk(k, dim=1))


# (epoch, reports, make_states) after every epoch: reports maps a member's index to its epoch report
# (only members that trained this epoch); make_states() gives every member's checkpoint state
OnPackEpoch = Callable[[int, dict[int, dict], Callable[[], list[dict]]], None]


def fit_pack(cfgs: list[TrialConfig], dataset: Optional[Dataset], device: torch.device, *,
             on_epoch: Optional[OnPackEpoch] = None, resume: Optional[list[dict]] = None,
             started_at: Optional[float] = None) -> list[list[dict]]:
    """Train a pack to its end; each member's per-epoch reports, as engine.fit's history gives them.
    A member that diverges or stops early leaves the pack (its checkpoint state stays the one it left
    with); the others go on. resume: every member's state from an earlier make_states(); the pack
    continues after it as the straight run would (exactly, on the CPU). A resumed pack whose members had
    all ended reports each member's final epoch again, as engine.fit does for an ended run."""
    from cifar_ray.data import load_dataset
    from cifar_ray.engine import epoch_metrics, fresh_bookkeeping

    started_at = time.perf_counter() if started_at is None else started_at
    pack = Pack.build(cfgs, dataset if dataset is not None else load_dataset(cfgs[0].data), device)
    k = pack.k
    best = [fresh_bookkeeping() for _ in cfgs]
    last: list[Optional[dict]] = [None] * k  # each member's latest report
    left: list[Optional[dict]] = [None] * k  # the state a member left the pack with
    history: list[list[dict]] = [[] for _ in cfgs]
    start = 0
    if resume is not None:
        if len(resume) != k:
            raise FuseError(f"the checkpoint holds {len(resume)} members and the pack {k}; resume the sweep it "
                            "came from with its own file")
        for i, state in enumerate(resume):
            epoch, best[i], last[i] = pack.restore(i, state)
            if (last[i] or {}).get(M.STATUS, M.RUNNING) != M.RUNNING or epoch >= cfgs[i].train.epochs:
                left[i] = state
                pack.leave(i)
            else:
                start = max(start, epoch)
        if not any(pack.active):
            finals = {i: {**r, M.STATUS: M.COMPLETED if r[M.STATUS] == M.RUNNING else r[M.STATUS]}
                      for i, r in enumerate(last) if r is not None}
            if on_epoch is not None:
                on_epoch(max(r[M.EPOCH] for r in finals.values()), finals, lambda: [s for s in left if s is not None])
            return [[finals[i]] if i in finals else [] for i in range(k)]

    def states(epoch: int) -> list[dict]:
        return [s if s is not None else pack.state(i, epoch, best[i], last[i] or {}) for i, s in enumerate(left)]

    for epoch in range(start + 1, cfgs[0].train.epochs + 1):
        lrs = [r.opt.param_groups[0]["lr"] for r in pack.runs]
        trained = pack.train_epoch()
        reports: dict[int, dict] = {}
        for i, tr in enumerate(trained):
            if tr is None:
                continue
            run = pack.runs[i]
            ev = run.validate()
            status = epoch_status(best[i], ev, tr.diverged, epoch, run.cfg.train)
            last[i] = reports[i] = epoch_metrics(epoch, tr, ev, lrs[i], status, run, started_at)
            history[i].append(reports[i])
            if status != M.RUNNING:
                left[i] = pack.state(i, epoch, best[i], reports[i])
                pack.leave(i)
        if on_epoch is not None:
            on_epoch(epoch, reports, functools.partial(states, epoch))
        if not any(pack.active):
            break
    return history
