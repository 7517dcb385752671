"""Device policy: which device a run trains on (and in which precision), inside Ray or not, and the
thread count a trial's CPU grant means. The engine, the evaluation, the estimate and analysis all reach it."""
from __future__ import annotations

import math
import resource
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch


class DeviceError(RuntimeError):
    """A device that was asked for and is not there, phrased for the user."""


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
        raise DeviceError(f"train.device: {requested} requested but no CUDA GPU is visible")
    if device.type == "mps" and not _mps_available():
        raise DeviceError(f"train.device: {requested} requested but MPS is not available")
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
