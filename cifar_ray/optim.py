"""Muon for convolution filters beside SGD for the rest, as one torch optimizer (`train.optimizer: muon`).

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"): SGD momentum whose update is
orthogonalised by a few Newton-Schulz steps before it is applied, so every direction of a weight matrix
moves at a similar rate. airbench94_muon uses it on the conv filters and SGD on the rest. torch's own
torch.optim.Muon takes 2-D parameters only; here a filter (out, in, kh, kw) is the matrix (out, in*kh*kw),
and on a 2-D parameter the step is torch.optim.Muon's to the bit (tests/test_train.py holds it to it).
The other groups take torch's SGD step (torch.optim.sgd.sgd), so "muon" changes the filters' rule only.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch.optim.sgd import sgd

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic's (a, b, c): the steepest slope at zero that still converges
NS_STEPS = 5
NS_EPS = 1e-7


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS, eps: float = NS_EPS) -> torch.Tensor:
    """A matrix (A, B) -> its nearest semi-orthogonal matrix, roughly: singular values pushed towards 1
    (into about [0.7, 1.2]) by `steps` quintic Newton-Schulz iterations in bf16."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class MuonSGD(torch.optim.Optimizer):
    """Groups with `muon: True` take Muon steps (lr, momentum, nesterov, decoupled weight_decay); the
    others torch's SGD (lr, momentum, nesterov, weight_decay as torch.optim.SGD has them)."""

    def __init__(self, params: Iterable[dict[str, Any]], momentum: float = 0.9, nesterov: bool = False):
        super().__init__(params, {"momentum": momentum, "nesterov": nesterov, "weight_decay": 0.0, "muon": False,
                                  "dampening": 0.0})

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                for p in params:
                    self._muon_step(p, group)
                continue
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            sgd(params, [p.grad for p in params], bufs, weight_decay=group["weight_decay"],
                momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                nesterov=group["nesterov"], maximize=False)  # foreach as torch.optim.SGD picks it
            if group["momentum"]:
                for p, buf in zip(params, bufs, strict=True):
                    self.state[p]["momentum_buffer"] = buf
        return loss

    def _muon_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        assert p.grad is not None
        rows = p.shape[0]
        grad = p.grad.reshape(rows, -1)  # (out, in*kh*kw) for a filter
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - group["momentum"])
        update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
        update = orthogonalize(update)
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        # reshaped back, not a view of p: a channels_last filter has no (out, rest) view
        p.add_(update.reshape(p.shape), alpha=-lr * math.sqrt(max(1, rows / grad.shape[1])))
