"""Evaluation of a trained model: accuracy, loss, per-class accuracy and confusion on the validation
split or the official test set, with optional test-time views (TTA). No Ray here."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cifar_ray.batches import DeviceImages
from cifar_ray.config import TrialConfig
from cifar_ray.data import Dataset, Split, split_dataset
from cifar_ray.device import amp_dtype


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
