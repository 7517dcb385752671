"""The `train` CLI: one configuration trained without Ray, through the engine (cifar_ray.engine).

    python -m cifar_ray.train --model netconv --data synthetic --epochs 2
    python -m cifar_ray.train --from sweeps/fast.yaml            # a sweep file's one configuration
    python -m cifar_ray.train --from results/quickstart --trial 00003   # a finished sweep's trial, again

The engine's names stay importable from here (`cifar_ray.train.fit`, `evaluate_split`, ...) for code
written against the earlier layout; new code imports them from cifar_ray.engine / evaluation / device.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Optional

import torch

from cifar_ray import metrics as M
from cifar_ray.applies import idle_switch, idle_switch_text
from cifar_ray.config import ConfigError, idle_model_setting, trial_config
from cifar_ray.data import DataError, load_dataset
from cifar_ray.device import DeviceError, Grant, amp_dtype, cpu_has_native_bf16, select_device, trial_threads
from cifar_ray.engine import (
    FitResult,
    Lookahead,
    Run,
    build_optimizer,
    build_schedule,
    fit,
    group_settings,
    has_diverged,
    load_state,
    param_groups,
    save_state,
    triangle,
)
from cifar_ray.evaluation import Evaluation, evaluate, evaluate_split, format_report, shifted, tta_logits
from cifar_ray.files import printable
from cifar_ray.models import ModelError
from cifar_ray.pipes import run_main

if TYPE_CHECKING:  # retrain reads results folders (pandas): imported only for --from
    from cifar_ray.retrain import Chosen

TrainError = DeviceError  # its earlier name
_Run = Run  # its earlier name, for code written against train.py before the engine moved out

# the CLI, and the shim: the engine's names as code written against the earlier layout imports them
__all__ = ["main", "choose", "compare_line", "flag_overrides", "CLI_FLAGS", "TrainError", "DeviceError", "Grant",
           "amp_dtype", "select_device", "trial_threads", "FitResult", "build_optimizer", "build_schedule", "fit",
           "group_settings", "load_state", "param_groups", "save_state", "Evaluation", "evaluate", "evaluate_split",
           "format_report", "Lookahead", "Run", "_Run", "triangle", "has_diverged", "shifted", "tta_logits",
           "cpu_has_native_bf16"]

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
    from cifar_ray.space import SECTIONS, check_domain_kinds, flatten, is_domain
    from cifar_ray.sweep_config import apply_overrides

    if args.source is not None:
        return from_source(args.source, args.trial, flag_overrides(args, skip=("data",)) + args.sets, args.data)
    nested: dict[str, dict] = {"model": {}, "data": {}, "train": {}}
    for flag, (section, key) in CLI_FLAGS.items():
        if getattr(args, flag) is not None:  # as given: pydantic converts and checks
            nested[section][key] = getattr(args, flag)
    tree = apply_overrides(nested, args.sets)
    for section in SECTIONS:
        if not isinstance(tree.get(section), dict):
            continue  # `--set train=5`: the schema says a section is a mapping
        check_domain_kinds(tree[section], section, "options")
        searched = [k for k, v in flatten(tree[section], section).items() if is_domain(v)]
        if searched:
            raise ConfigError(f"options: {searched[0]}: a search domain trains many models, and this trains one; "
                              "give one value, or put the domain in a sweep file (python -m cifar_ray.sweep FILE)")
    cfg = trial_config(tree, where="options")
    flat = {f"{section}.{k}": v for section in ("model", "train")
            for k, v in getattr(cfg, section).model_dump().items()}
    idle = idle_switch(lambda k: [flat[k]])  # one configuration: a sweep of one trial
    if idle is not None:
        raise ConfigError(f"options: {idle_switch_text(*idle, scope='this configuration does not')}")
    problem = idle_model_setting(lambda k: [flat[k]])
    if problem is not None:
        raise ConfigError(f"options: {problem}")
    return Chosen(cfg, "options")


def run_differences(chosen: Chosen, device: str) -> Optional[list[str]]:
    """What differs between the recorded trial's run and this one: commit, library versions (the folder's
    provenance.json), the device; None when the folder recorded no provenance."""
    from cifar_ray.provenance import collect, differences

    if not chosen.provenance:
        return None
    out = [printable(d) for d in differences(chosen.provenance, collect())]
    if chosen.device is not None and chosen.device != device:
        out.append(f"device {printable(chosen.device)} -> {device}")
    return out


def compare_line(history: list[dict], recorded: list[dict], differ: Optional[list[str]] = None) -> str:
    """How this run's validation accuracy compares with the recorded trial's, epoch by epoch; `differ`:
    what run_differences found (None: nothing recorded to compare with)."""
    ours = {m[M.EPOCH]: m[M.VAL_ACC] for m in history}
    pairs = [(r[M.EPOCH], ours[r[M.EPOCH]], r[M.VAL_ACC]) for r in recorded
             if r[M.EPOCH] in ours and isinstance(r.get(M.VAL_ACC), (int, float))]
    if not pairs:
        return "recorded run: no epoch to compare"
    worst = max(abs(a - b) for _, a, b in pairs)
    if worst == 0:
        return f"recorded run: val_acc identical at all {len(pairs)} recorded epochs"
    head = f"recorded run: val_acc differs by up to {worst:.4f} over {len(pairs)} epochs"
    if differ is None:
        return (f"{head} (the folder records no provenance; expected where the device, the thread count or "
                "library versions differ from the sweep's)")
    if differ:
        return f"{head}; this run differs from the sweep's in: {', '.join(differ)}"
    return (f"{head}, with the sweep's commit, library versions and device (provenance.json): "
            "the difference comes from elsewhere (thread count, CPU, nondeterministic kernels)")


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
            assert result.model is not None  # fit() always returns the model it trained
            device = str(next(result.model.parameters()).device)
            print(compare_line(result.history, chosen.recorded, run_differences(chosen, device)))
        tta = f" (test-time augmentation: {cfg.train.tta})" if cfg.train.tta != "none" else ""
        assert result.model is not None  # fit() always returns the model it trained
        print(format_report(evaluate_split(result.model, cfg, dataset, "test"), "test") + tta)
        print(f"wall time: {time.perf_counter() - started:.1f} s")
    except (ConfigError, DataError, ModelError, DeviceError) as err:
        print(f"error: {printable(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
