"""Size and cost of a model: parameter count and forward FLOPs per image."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_gflops(model: torch.nn.Module) -> float:
    """FLOPs (multiply and add counted separately) of one eval-mode forward pass of one image, 10^9."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    return counter.get_total_flops() / 1e9
