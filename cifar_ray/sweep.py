"""Run a sweep file on Ray Tune.

    python -m cifar_ray.sweep sweeps/quickstart.yaml [--dry-run] [--resume] [--name NAME]
        [--storage-path DIR] [--address ADDR] [--data SOURCE] [--set KEY=VALUE ...] [--allow-pending]
        [--verbose] [--watch [--watch-port PORT] [--watch-host HOST]]

Exit codes: 0 every trial finished (completed, stopped early, diverged); 1 a disk is full (the sweep
stops as on Ctrl-C; free space, then --resume); 2 invalid sweep file or option, or another driver
running on the results folder;
3 trials errored after their retries; 4 a resource request no node can ever satisfy; 130 interrupted
(the message says how to resume).
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from cifar_ray import driver_lock
from cifar_ray import metrics as M
from cifar_ray.applies import acts, depends_within, row_config
from cifar_ray.config import ConfigError, TrialConfig, default
from cifar_ray.files import atomic_write_text, printable
from cifar_ray.pipes import run_main
from cifar_ray.ray_process import (
    connect,
    exit_at_once_on_ctrl_c,
    forward_sigterm,
    keep_secrets_out,
    quiet_logs,
    start_ray,
    watch_own_ray,
)
from cifar_ray.record import SWEEP_FILE
from cifar_ray.space import (
    Space,
    build_space,
    expand_grid,
    first_candidate,
    format_value,
    grid_points,
    max_epochs,
    shuffles,
    trial_count,
)
from cifar_ray.storage import disk_full
from cifar_ray.sweep_config import SweepConfig, read_sweep
from cifar_ray.tune_space import mutations, param_space

EXIT_OK, EXIT_DISK_FULL, EXIT_INVALID, EXIT_ERRORED, EXIT_INFEASIBLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
SPACE_KEY = "space"  # the search-space fingerprint stored in the results' sweep.yaml


@dataclass
class Plan:
    """A validated sweep, ready to run."""

    file: str
    sweep: SweepConfig
    space: Space
    results: Path  # <storage>/<name>; for cloud storage, a local folder for the sweep copy, W&B and tables
    storage: str
    packs: Optional[list[list[dict[str, Any]]]] = None  # resources.fuse > 1: each pack's member configs

    @property
    def fused(self) -> bool:
        return self.sweep.resources.fuse > 1

    @property
    def tune_trials(self) -> int:
        """Trials as Tune runs them: one per pack in a fused sweep."""
        if self.packs is not None:
            return len(self.packs)
        if self.fused:
            from cifar_ray.packs import optuna_packs

            return optuna_packs(self.sweep)
        return trial_count(self.space, self.sweep)

    @property
    def remote(self) -> bool:
        return "://" in self.storage

    @property
    def experiment(self) -> str:
        """Where Tune keeps the experiment: the results folder, or <URI>/<name> on cloud storage."""
        return f"{self.storage.rstrip('/')}/{self.sweep.name}" if self.remote else str(self.results)

    @property
    def max_epochs(self) -> int:
        return max_epochs(self.space)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cifar_ray.sweep", description="Run a CIFAR-10 sweep on Ray Tune.")
    p.add_argument("file", help="the sweep YAML file")
    p.add_argument("--dry-run", action="store_true", help="validate and list the trials; start nothing")
    p.add_argument("--estimate", action="store_true",
                   help="time a few training steps of each model here and estimate the wall time; with --dry-run "
                        "only that, else the sweep then runs with the estimate as its first ETA")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep in its results folder; Ray reads the folder's pickled state, "
                        "so resume only folders written by you or your own cluster (open anyone else's with "
                        "cifar_ray.analysis or cifar_ray.report)")
    p.add_argument("--name", help="results folder name (default: the file's name:)")
    p.add_argument("--storage-path", default="results", help="where results go (default: ./results)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--data", help="override data.source")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the file, e.g. train.lr=0.01 (repeatable)")
    p.add_argument("--allow-pending", action="store_true",
                   help="skip the resource feasibility check (autoscaling clusters)")
    p.add_argument("--cluster-config", help="the cluster file whose node types may still start "
                                            "(default: ~/ray_bootstrap_config.yaml on a `ray up` head)")
    p.add_argument("--verbose", action="store_true", help="show Ray's and W&B's own log output (for debugging)")
    p.add_argument("--watch", action="store_true",
                   help="serve the sweep live in optuna-dashboard beside it (see python -m cifar_ray.watch)")
    p.add_argument("--watch-port", type=int, default=8080, help="--watch: port (default 8080; 0 picks a free one)")
    p.add_argument("--watch-host", default="127.0.0.1",
                   help="--watch: address to bind (default 127.0.0.1: this machine only)")
    args = p.parse_args(argv)
    if not 0 <= args.watch_port <= 65535:
        p.error(f"--watch-port {args.watch_port}: must be 0-65535")
    return args


def plan_from_args(args: argparse.Namespace) -> Plan:
    sets = list(args.sets) + ([f"name={args.name}"] if args.name else [])
    sweep = read_sweep(args.file, sets, args.data)
    source = sweep.data.get("source")
    if isinstance(source, str) and source not in ("cifar10", "synthetic") and Path(source).expanduser().exists():
        # trials run in their own folders (and on other nodes): a relative path must not depend on them
        sweep = sweep.model_copy(update={"data": {**sweep.data, "source": str(Path(source).expanduser().resolve())}})
    space = build_space(sweep, args.file)
    from cifar_ray.data import resolve_source

    resolve_source(TrialConfig.from_flat(first_candidate(space)).data)  # a path not there fails the dry run too
    _check_scheduler(sweep, space, args.file)
    from cifar_ray.cluster import check_placement

    check_placement(sweep, space, args.file)
    storage = args.storage_path
    local = "results" if "://" in storage else storage
    results = Path(local).expanduser().resolve() / sweep.name
    packs = None
    if sweep.resources.fuse > 1:
        from cifar_ray.packs import plan_packs

        packs = plan_packs(space, sweep, args.file)
    return Plan(args.file, sweep, space, results, storage, packs)


def _check_scheduler(sweep: SweepConfig, space: Space, where: str) -> None:
    s = sweep.scheduler
    if s.kind == "asha":
        max_t = s.max_t or max_epochs(space)
        if s.grace_period > max_t:
            raise ConfigError(f"{where}: scheduler.grace_period: {s.grace_period} is more than max_t ({max_t}); "
                              "lower grace_period or raise max_t/train.epochs")
    if s.kind == "pbt":
        if sweep.checkpoint.keep < 3:
            given = "" if "keep" in sweep.checkpoint.model_fields_set else " (the default)"
            raise ConfigError(f"{where}: checkpoint.keep: {sweep.checkpoint.keep}{given}; PBT needs at least 3 "
                              "(it restores other trials' checkpoints, which must still exist): set checkpoint.keep: 3")
        if not s.mutations:
            raise ConfigError(f"{where}: scheduler.mutations: PBT needs at least one, e.g. train.lr: "
                              "{loguniform: [0.001, 0.1]}")
        epochs = max_epochs(space)
        if s.perturbation_interval >= epochs:  # PBT perturbs at multiples of the interval; a trial ends at epochs
            raise ConfigError(f"{where}: scheduler.perturbation_interval: {s.perturbation_interval} is not less than "
                              f"train.epochs ({epochs}), so PBT would never exploit or explore before the trials end; "
                              f"lower it (at most {epochs - 1}), or use kind: fifo" if epochs > 1 else
                              f"{where}: scheduler.kind: pbt needs train.epochs above 1 (it acts between epochs); "
                              "raise train.epochs, or use kind: fifo")
        if s.perturbation_interval % sweep.checkpoint.every:
            raise ConfigError(f"{where}: checkpoint.every: {sweep.checkpoint.every} must divide "
                              f"scheduler.perturbation_interval ({s.perturbation_interval})")
        mutations(sweep, space, where)


# ---------------------------------------------------------------- dry run

def _resources_text(req: dict[str, float]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in req.items() if v)


def searched_text(trial: dict[str, Any], keys: list[str]) -> str:
    """A trial's searched keys as the dry run lists them; '-' where a key does not act in it."""
    return "  ".join(f"{k}={format_value(trial[k]) if acts(k, trial) else '-'}" for k in keys) or "(no searched keys)"


def repeats_left_out(space: Space, trials: list[dict[str, Any]]) -> list[str]:
    """The dry run's note on grid points left out because they repeat a trial in every key that acts,
    with the reason of each key that did not act in some trial ("-" on the trial lines)."""
    from cifar_ray.applies import why_inert

    left = space.product_size() - space.grid_size()
    if left <= 0:
        return []
    reasons = {k: why_inert(k, t) for t in trials for k in space.searched_keys() if not acts(k, t)}
    return [f"  {left} grid points left out: each repeats a trial below in every key that acts in it "
            f"({'; '.join(f'{k} {r}' for k, r in reasons.items())}); '-' marks such a key"]


def _acting_note(key: str, space: Space, search: str) -> str:
    """The dry run's note on a searched key that acts only under values of another searched key."""
    from cifar_ray.applies import switches

    conds = switches(key, space.searched_keys(), space.values_of)
    if not conds:
        return ""
    where = " and ".join(c.text() for c in conds)
    if search == "optuna":
        return f"  (asked only where {where})"
    return f"  (drawn for every trial; acts only where {where})"


def describe(plan: Plan) -> str:
    from cifar_ray.cluster import model_names, requests_by_model

    sweep, space = plan.sweep, plan.space
    requests = requests_by_model(sweep, space)
    n = trial_count(space, sweep)
    lines = [f"sweep {sweep.name}: {n} trials, {sweep.search.kind} search, {sweep.scheduler.kind} scheduler, "
             f"metric {sweep.metric} ({sweep.mode})"]
    if shuffles(sweep) and space.grid_size() > 1:
        lines.append(f"  grid trials start in a shuffled order (search.order, seed {sweep.search.seed or 0})")
    trials = expand_grid(space, sweep)
    keys = space.searched_keys()
    if plan.fused:
        up_to = "" if plan.packs is not None else "up to "
        fused = f"{n} trials in {up_to}{packs_text(plan.tune_trials)} (resources.fuse {sweep.resources.fuse}),"
        lines[0] = lines[0].replace(f"{n} trials,", fused, 1)
    if plan.packs is not None:
        lines += describe_packs(plan.packs, keys, requests)
        total = sum(int(t.get("train.epochs", default("train.epochs"))) for p in plan.packs for t in p)
    elif trials is not None:
        lines += repeats_left_out(space, trials)
        for i, t in enumerate(trials, 1):
            name = t.get("model.name", default("model.name"))
            lines.append(f"  trial {i:>3}: {searched_text(t, keys)}  [{_resources_text(requests[name])}]")
        total = sum(int(t.get("train.epochs", default("train.epochs"))) for t in trials)
    else:
        if space.listed:
            lines.append(f"  configurations ({len(space.listed)}, each with every draw below):")
            lines += [f"    [{i}] " + "  ".join(f"{k}={format_value(v)}" for k, v in c.items())
                      for i, c in enumerate(space.listed)]
        lines.append("  domains:")
        lines += [f"    {k}: {d.describe()}{_acting_note(k, space, sweep.search.kind)}"
                  for k, d in space.domains().items()]
        if space.seeds:
            lines.append(f"    train.seed: grid[{', '.join(map(str, space.seeds))}]")
        lines.append(f"  samples: {sweep.search.samples} x grid {space.grid_size()}")
        lines += [f"  resources {m}: {_resources_text(requests[m])}" for m in model_names(space)]
        if plan.fused:
            lines.append(f"  packs: Optuna proposes each pack's {sweep.resources.fuse} members as the sweep runs; "
                         "the resources are per pack")
        total = n * plan.max_epochs
    lines.append(f"total epochs at most: {total}")
    lines.append(f"results: {plan.experiment}")
    return "\n".join(lines)


def packs_text(n: int) -> str:
    return f"{n} pack{'' if n == 1 else 's'}"


def unfit_here(plan: Plan, args: argparse.Namespace) -> list[str]:
    """The dry run for a local Ray (no --address): the trials this machine can never start, which the run
    would refuse with exit 4 after loading the data (cluster.check_feasible)."""
    if args.address or os.environ.get("RAY_ADDRESS") or args.allow_pending or args.cluster_config:
        return []
    from cifar_ray.cluster import infeasible, requests_by_model
    from cifar_ray.estimate import machine

    here = machine()
    by_request: dict[tuple[str, bool], list[str]] = {}  # the same request, one line for its models
    for model, req in infeasible(requests_by_model(plan.sweep, plan.space), [here]).items():
        # whether the sweep-wide resources: ask for the GPU alone that this machine lacks
        cpu_would_do = (model not in plan.sweep.resources_by_model and req.get("gpu", 0) > 0
                        and not infeasible({model: {**req, "gpu": 0}}, [here])
                        and not str(plan.space.values_of("train.device")[0]).startswith("cuda"))
        by_request.setdefault((_resources_text(req), cpu_would_do), []).append(model)
    return [f"note: this machine ({here['CPU']:.0f} CPUs, {here['GPU']:.0f} GPUs) can never start a trial of "
            f"{', '.join(models)} ({req}): run here, the sweep exits 4; "
            + ("--set resources.gpu=0 trains it on the CPU, " if cpu_would_do else "lower resources:, ")
            + "or run it on a cluster that offers it (--address)" for (req, cpu_would_do), models in by_request.items()]


def describe_packs(packs: list[list[dict[str, Any]]], keys: list[str], requests: dict) -> list[str]:
    """The dry run's packs: each with its model and resources (taken once per pack), then its members."""
    lines = []
    number = 0
    for p, members in enumerate(packs, 1):
        name = members[0].get("model.name", default("model.name"))
        count = f"{len(members)} member{'s' * (len(members) != 1)}"
        lines.append(f"  pack {p:>3}: {name}, {count}  [{_resources_text(requests[name])} for the pack]")
        for t in members:
            number += 1
            lines.append(f"    trial {number:>3}: {searched_text(t, keys)}")
    return lines


def cluster_address(args: argparse.Namespace) -> tuple[Optional[str], str]:
    """The cluster to run on (--address, else $RAY_ADDRESS, else None: a local Ray) and which named it."""
    if args.address:
        return args.address, "--address"
    return os.environ.get("RAY_ADDRESS") or None, "$RAY_ADDRESS"


def estimate_lines(plan: Plan, args: argparse.Namespace, running: bool = False) -> tuple[list[str], float]:
    """--estimate: its lines and mean seconds per epoch, for the resources of the cluster at --address
    (or, for a sweep about to run, of the Ray it started), else this machine's."""
    from cifar_ray.estimate import estimate_epochs, machine

    address, given_by = cluster_address(args)
    available, where = machine(), "this machine"
    if address or running:
        import ray

        if not ray.is_initialized():  # a dry run's estimate for a cluster (a running sweep has joined its Ray)
            connect(address or "auto", given_by, logging_level=logging.WARNING, log_to_driver=False)
        available, where = dict(ray.cluster_resources()), f"the cluster at {address}" if address else "the local Ray"
    space = plan.space
    lines, per_epoch = estimate_epochs(plan.sweep, space, expand_grid(space, plan.sweep),
                                       trial_count(space, plan.sweep), available, where)
    if plan.packs is not None:
        lines.append(f"fused: {trial_count(space, plan.sweep)} trials in {packs_text(len(plan.packs))}; the times "
                     "above are for unfused trials (a pack's speed against them: python bench/fuse.py)")
    return lines, per_epoch


# ---------------------------------------------------------------- running

def stored_sweep(results: Path) -> Optional[dict]:
    """The results folder's sweep.yaml, through the guarded reader (analysis.read_stored_sweep)."""
    from cifar_ray.record import AnalysisError, read_stored_sweep

    path = results / SWEEP_FILE
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        return read_stored_sweep(results)
    except AnalysisError as err:
        raise ConfigError(str(err)) from None


def fingerprint(plan: Plan) -> dict[str, Any]:
    """What must not change between a sweep and its --resume: the space, and how trials are packed."""
    fuse = plan.sweep.resources.fuse
    return plan.space.fingerprint() | ({"resources.fuse": fuse} if fuse > 1 else {})


def make_results_folder(plan: Plan) -> None:
    try:
        plan.results.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the sweep's own line for a full disk
        raise ConfigError(f"--storage-path: cannot make {printable(plan.results)} ({err.strerror}); choose another "
                          "--storage-path") from None


def write_sweep_copy(plan: Plan) -> None:
    doc = plan.sweep.model_dump(mode="json") | {SPACE_KEY: fingerprint(plan), "source_file": str(plan.file)}
    atomic_write_text(plan.results / SWEEP_FILE, yaml.safe_dump(doc, sort_keys=False))


def write_provenance(plan: Plan, resume: bool) -> None:
    """provenance.json: this run's commit, versions and machine; a resume adds its entry to the first's."""
    import json

    from cifar_ray.provenance import collect, recorded
    from cifar_ray.record import PROVENANCE_FILE, read_json

    path = plan.results / PROVENANCE_FILE
    entry = collect("resume" if resume else "start")
    atomic_write_text(path, json.dumps(recorded(read_json(path), entry), indent=1) + "\n")


def storage_filesystem(plan: Plan):
    """Local storage: Tune writes through cifar_ray.storage (whole files or none); cloud: pyarrow's own."""
    if plan.remote:
        return None
    from cifar_ray.storage import whole_file_filesystem

    return whole_file_filesystem()


def check_results_folder(plan: Plan, resume: bool) -> None:
    from ray.tune import Tuner

    if not plan.remote:  # before Ray starts or data is read: a path that cannot hold the folder
        above = next((p for p in (plan.results, *plan.results.parents) if p.exists()), None)
        if above is not None and not above.is_dir():
            raise ConfigError(f"--storage-path: {printable(above)} is a file, so {printable(plan.results)} cannot be "
                              "made; choose another --storage-path")
    stored = stored_sweep(plan.results)
    exists = plan.results.exists() and (stored is not None or any(plan.results.glob("experiment_state-*.json")))
    if plan.remote:
        exists = exists or Tuner.can_restore(plan.experiment)
    if not resume and exists:
        raise ConfigError(f"{plan.results} already holds a sweep named {plan.sweep.name!r}; continue it with "
                          f"--resume, or choose another --name")
    if resume:
        if not exists or not Tuner.can_restore(plan.experiment, storage_filesystem=storage_filesystem(plan)):
            raise ConfigError(f"--resume: {plan.results} holds no sweep to resume; run without --resume to start it")
        if stored is not None and stored.get(SPACE_KEY) != fingerprint(plan):
            old, new = stored.get(SPACE_KEY) or {}, fingerprint(plan)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigError(f"--resume: the search space differs from the stored one in {', '.join(diff)}; "
                              "resume with the original file, or start a new sweep with another --name")


def build_tuner(plan: Plan, dataset, resume: bool, mirror, verbose: bool = False,
                node_types: Optional[dict] = None, on_disk_full=None, prior_epoch_s: Optional[float] = None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler
    from ray.tune.search import SearchAlgorithm, Searcher

    from cifar_ray.callbacks import JournalCallback, TrialRecorder
    from cifar_ray.cluster import requests_by_model
    from cifar_ray.tracking import preflight, trial_settings
    from cifar_ray.trainable import run_trial
    from cifar_ray.tune_search import FolderPerTrialGenerator, trial_name

    sweep, space = plan.sweep, plan.space
    if plan.fused:
        from cifar_ray.trainable import run_pack

        trainable = tune.with_parameters(run_pack, dataset=dataset, checkpoint_every=sweep.checkpoint.every,
                                         quiet=not verbose, metric=sweep.metric, mode=sweep.mode)
    else:
        trainable = tune.with_parameters(run_trial, dataset=dataset, checkpoint_every=sweep.checkpoint.every,
                                         quiet=not verbose)
    requests = requests_by_model(sweep, space)
    default_model = next(iter(requests))
    # a callable giving a resource dict per config: Tune accepts it (its annotation names only factories)
    trainable = tune.with_resources(
        trainable, lambda config: requests.get(str(config.get("model.name")), requests[default_model]))  # type: ignore[arg-type,return-value]
    wandb_dir = str(plan.results / "wandb")  # local even with cloud storage: W&B writes files as it runs
    recorder = TrialRecorder(preflight(trial_settings(sweep.wandb, sweep.name, wandb_dir, verbose)), sweep.name,
                             node_types, record_root=str(plan.results), metric=sweep.metric, mode=sweep.mode,
                             keep=sweep.checkpoint.keep)
    recorder.on_disk_full = on_disk_full
    # the recorder goes first: it adds the node type to the result the journal mirror records too
    callbacks = [recorder, JournalCallback(mirror)]
    reporter = console_reporter(plan, verbose, prior_epoch_s, fresh=not resume)
    if resume:
        # Optuna's param_space is the one the sweep began with (None): a sweep begun before its searcher held a
        # define-by-run space (tune_search.ActingSpace) kept the domains there, and Tune refuses other keys
        own = None if sweep.search.kind == "optuna" and not plan.fused else tune_param_space(plan)
        tuner = tune.Tuner.restore(plan.experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   restart_errored=False, param_space=own, storage_filesystem=storage_filesystem(plan))
        _use_callbacks(tuner, callbacks, reporter)
        return tuner

    s = sweep.scheduler
    scheduler: TrialScheduler
    if s.kind == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=s.max_t or plan.max_epochs,
                                  grace_period=s.grace_period, reduction_factor=s.reduction_factor, brackets=s.brackets)
    elif s.kind == "pbt":
        scheduler = PopulationBasedTraining(time_attr="training_iteration",
                                            perturbation_interval=s.perturbation_interval, synch=s.synch,
                                            hyperparam_mutations=mutations(sweep, space, plan.file))
    else:
        scheduler = FIFOScheduler()
    num_samples = sweep.search.samples
    search_alg: SearchAlgorithm | Searcher
    if sweep.search.kind == "optuna" and plan.fused:
        search_alg = packed_optuna(plan)
        num_samples = plan.tune_trials
    elif sweep.search.kind == "optuna":
        search_alg = optuna_search(plan)
    else:
        # Grid trials start in grid_points' order (the dry run's), each point one sample; random
        # domains are still drawn per trial. A fused sweep's trials are its packs, drawn up front.
        points = pack_points(plan) if plan.fused else grid_points(space, sweep)
        # Tune ignores TuneConfig.max_concurrent_trials for this generator: it takes its own limit.
        search_alg = FolderPerTrialGenerator(points_to_evaluate=points or None, random_state=sweep.search.seed,
                                           max_concurrent=sweep.max_concurrent_trials or 0)
        num_samples = len(points) or num_samples

    # a pack's checkpoints are its latest: each member keeps its own best in its folder (TrialRecorder)
    score = None if plan.fused else sweep.metric
    return tune.Tuner(
        trainable, param_space=tune_param_space(plan),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, search_alg=search_alg, scheduler=scheduler,
                                    num_samples=num_samples,
                                    max_concurrent_trials=sweep.max_concurrent_trials if sweep.search.kind == "optuna"
                                    else None,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=plan.storage if plan.remote else str(plan.results.parent),
            storage_filesystem=storage_filesystem(plan),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=sweep.checkpoint.keep,
                                                    checkpoint_score_attribute=score,
                                                    checkpoint_score_order=sweep.mode),
            failure_config=tune.FailureConfig(max_failures=sweep.failures.max_retries),
            progress_reporter=reporter, verbose=1, callbacks=callbacks),
    )


def optuna_search(plan: Plan, own_space: bool = False):
    """Tune's OptunaSearch for the sweep. Where a searched key acts only under a value of another
    (tune_search.ActingSpace), or the searcher must hold its space itself (own_space: a fused sweep's
    param_space holds packs), it is made with the space; otherwise it reads Tune's param_space."""
    from ray.tune.search.optuna import OptunaSearch

    from cifar_ray.space import Domain
    from cifar_ray.tune_search import ActingSpace
    from cifar_ray.tune_space import to_tune

    sweep, domains = plan.sweep, plan.space.domains()
    if depends_within(domains, plan.space.values_of):
        constants = {k: v for k, v in plan.space.values.items() if not isinstance(v, Domain)}
        return OptunaSearch(space=ActingSpace(domains, constants), metric=sweep.metric, mode=sweep.mode,
                            seed=sweep.search.seed)
    if own_space:
        space = OptunaSearch.convert_search_space({k: to_tune(d) for k, d in domains.items()})
        return OptunaSearch(space=space, metric=sweep.metric, mode=sweep.mode, seed=sweep.search.seed)
    return OptunaSearch(seed=sweep.search.seed)


def packed_optuna(plan: Plan):
    """A fused Optuna sweep's searcher: Optuna over the searched keys, one proposal per member."""
    from cifar_ray.space import Domain
    from cifar_ray.tune_search import PackedSearch

    sweep, space = plan.sweep, plan.space
    shared = {k: v for k, v in space.values.items() if not isinstance(v, Domain)}
    return PackedSearch(optuna_search(plan, own_space=True), sweep.resources.fuse, trial_count(space, sweep), shared,
                        pack_head(first_candidate(space)), sweep.metric, sweep.mode)


def tune_param_space(plan: Plan) -> dict[str, Any]:
    """Tune's param_space: the sweep's domains; a fused sweep's packs are whole configs (pack_points)."""
    from cifar_ray.record import PACK_MEMBERS
    from cifar_ray.space import Domain

    if plan.fused:
        return {"model.name": "", "train.epochs": 0, PACK_MEMBERS: ""}
    if plan.sweep.search.kind == "optuna" and depends_within(plan.space.domains(), plan.space.values_of):
        # the searcher holds the space (Tune refuses domains in both places): the constants alone here
        return {k: v for k, v in plan.space.values.items() if not isinstance(v, Domain)}
    return param_space(plan.space)


def pack_points(plan: Plan) -> list[dict[str, Any]]:
    """A fused sweep's Tune trials: one config per pack, its model and its members' flat configs."""
    from cifar_ray.record import PACK_MEMBERS, pack_value

    return [{**pack_head(members[0]), PACK_MEMBERS: pack_value(members)} for members in plan.packs or []]


def pack_head(member: dict[str, Any]) -> dict[str, Any]:
    """What a pack's Tune config holds beside its members: model.name and train.epochs, which members
    share, for its resources and the console."""
    return {"model.name": member.get("model.name", default("model.name")),
            "train.epochs": int(member.get("train.epochs", default("train.epochs")))}


def console_reporter(plan: Plan, verbose: bool, prior_epoch_s: Optional[float] = None, fresh: bool = True):
    """Tune's tables under --verbose; otherwise the sweep's own progress lines (cifar_ray.console)."""
    from ray import tune

    sweep = plan.sweep
    if verbose:
        keys = plan.space.searched_keys()
        return tune.CLIReporter(metric_columns={M.EPOCH: "epoch", sweep.metric: sweep.metric, M.STATUS: "outcome"},
                                parameter_columns={k: k.split(".", 1)[1] for k in keys} or None,
                                max_report_frequency=15)
    from cifar_ray.console import SweepProgress

    asha = sweep.scheduler.kind == "asha"
    max_t = (sweep.scheduler.max_t or plan.max_epochs) if asha else None
    return SweepProgress(plan.tune_trials, sweep.metric, sweep.mode, max_t, prior_epoch_s,
                         upper_bound=asha, epochs=min(plan.max_epochs, max_t or plan.max_epochs), fresh=fresh,
                         unit="packs" if sweep.resources.fuse > 1 else "")


def _use_callbacks(tuner, callbacks: list, reporter=None) -> None:
    """A restored Tuner brings back the callbacks (and console reporter) pickled at the start; use this
    run's (with this run's W&B preflight, --verbose and results folder) instead. Tuner.restore takes no
    run config: this reaches into its one attribute for it."""
    run_config = getattr(getattr(tuner, "_local_tuner", None), "_run_config", None)
    if run_config is None:  # a Ray without that attribute: the pickled callbacks (same sweep) carry on
        return
    kinds = tuple(type(c) for c in callbacks)
    others = [c for c in (run_config.callbacks or []) if not isinstance(c, kinds)]
    run_config.callbacks = [*callbacks, *others]
    if reporter is not None:
        run_config.progress_reporter = reporter


def load_sweep_data(space: Space):
    """Decode (or read from the cache) the sweep's one data set, in the driver, once."""
    from cifar_ray.data import check_val_size, load_dataset

    cfg = TrialConfig.from_flat(first_candidate(space)).data
    dataset = load_dataset(cfg)
    for val_size in space.values_of("data.val_size"):  # refused here, not by every trial after its start
        check_val_size(dataset, int(val_size), cfg.source)
    return dataset


def summarize_remote(plan: Plan, grid) -> int:
    """Cloud storage: summarise from the driver's result grid; the tables need a local copy."""
    errored = [r for r in grid if r.error is not None]
    print(f"\nsweep {plan.sweep.name}: {len(grid)} trials, {len(errored)} errored")
    for r in errored:
        print(f"errored: {r.metrics.get('trial_id')}: {' '.join(str(r.error).split())[:300]}")
    try:
        best = grid.get_best_result(plan.sweep.metric, plan.sweep.mode, scope="all")
        print(f"best trial {best.metrics.get('trial_id')}: {plan.sweep.metric} {best.metrics.get(plan.sweep.metric)}")
    except RuntimeError:
        pass
    print(f"results: {plan.experiment}\ncopy them here for analysis: aws s3 sync {plan.experiment} {plan.results} "
          f"(gs://: gsutil -m rsync -r), then: python -m cifar_ray.report {plan.results}")
    return EXIT_ERRORED if errored else EXIT_OK


def resume_command(plan: Plan) -> str:
    import shlex

    storage = plan.storage if plan.remote else str(plan.results.parent)
    return " ".join(shlex.quote(a) for a in ["python", "-m", "cifar_ray.sweep", plan.file, "--resume", "--name",
                                             plan.sweep.name, "--storage-path", storage])


def summarize(plan: Plan, trials) -> tuple[str, int]:
    """The closing summary and the exit code."""

    sweep = plan.sweep
    counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines = ["", f"sweep {sweep.name}: {len(trials)} trials: {tally}"]
    best_col = f"best_{sweep.metric}"
    ok = trials[trials[best_col].notna()] if len(trials) else trials
    if len(ok):
        from cifar_ray.analysis import ranked

        best = ranked(ok, best_col, sweep.mode).iloc[0]
        config = row_config(best)
        shown = ", ".join(f"{k}={format_value(best[k]) if acts(k, config) else '-'}"  # '-': no part of this trial
                          for k in plan.space.searched_keys() if k in best)
        lines.append(f"best trial {best['trial_id']}: {sweep.metric} {best[best_col]:.4f}  ({shown})")
    errored = trials[trials["status"] == M.ERRORED] if len(trials) else trials
    for _, row in errored.iterrows():
        lines.append(f"errored: {row['trial_id']}: {row['error']}")
    lines.append(f"results: {plan.results}")
    lines.append(f"load them: from cifar_ray import analysis; sweep = analysis.load({str(plan.results)!r}); "
                 "sweep.trials()")
    code = EXIT_OK
    if len(errored):
        code = EXIT_ERRORED
    if len(trials) and (trials["status"] == M.UNFINISHED).any():
        lines.append(f"interrupted: {int((trials['status'] == M.UNFINISHED).sum())} trials unfinished; resume with:\n"
                     f"  {resume_command(plan)}")
        code = EXIT_INTERRUPTED
    return "\n".join(lines), code


def lost_ray_farewell(plan: Plan) -> Callable[[str], str]:
    """What the sweep says when the Ray it started is gone mid-sweep (ray_process.watch_own_ray): why,
    the summary of what the record holds, and the resume line."""
    def farewell(why: str) -> str:
        from cifar_ray.analysis import load

        text, _ = summarize(plan, load(plan.results).trials())
        if "resume with:" not in text:  # every trial it had made had ended: the search has more to make
            text += f"\ninterrupted; resume with:\n  {resume_command(plan)}"
        return f"{why}{text}"

    return farewell


def open_mirror(plan: Plan):
    """The sweep's Optuna journal (cifar_ray.journal), created or reopened before the first trial so
    a dashboard has the study to show at once. A journal that cannot be opened warns; the sweep runs."""
    import optuna

    from cifar_ray.journal import JournalMirror
    from cifar_ray.record import JOURNAL_FILE
    from cifar_ray.space import optuna_distribution, searched_domains

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its "new study created" line is not news here
    distributions = {k: optuna_distribution(d) for k, d in searched_domains(plan.space).items()}
    mirror = JournalMirror(plan.results / JOURNAL_FILE, plan.sweep.name, plan.sweep.metric, plan.sweep.mode,
                           distributions)
    try:
        mirror.open()
    except Exception as exc:  # the journal is a view of the record, never a reason to stop
        print(f"warning: could not open {mirror.path} ({type(exc).__name__}: {exc}); the sweep runs without "
              "its Optuna journal", file=sys.stderr)
    return mirror


def bind_watch(args: argparse.Namespace) -> tuple[Any, str]:
    """--watch: take the port before anything is written, so a port in use costs nothing."""
    from cifar_ray.watch import WatchError, bind

    try:
        return bind(args.watch_host, args.watch_port)
    except WatchError as err:
        raise ConfigError(f"--watch: {err} (--watch-port)") from None


def watch_beside(plan: Plan, server, url: str, host: str) -> None:
    """--watch: the dashboard in a thread of this driver, serving until the sweep ends."""
    from cifar_ray.watch import WatchError, exposure_warning, journal_of, serve_in_background, serve_journal

    try:
        serve_journal(server, journal_of(plan.results), host)
    except (WatchError, OSError) as err:
        print(f"warning: --watch: {err}; the sweep runs without the dashboard", file=sys.stderr)
        server.server_close()
        return
    warning = exposure_warning(host)
    if warning:
        print(warning, file=sys.stderr)
    serve_in_background(server)
    print(f"dashboard: {url}  (serves while the sweep runs; afterwards: python -m cifar_ray.watch {plan.results})",
          flush=True)


def run(plan: Plan, args: argparse.Namespace) -> int:
    """The sweep, holding its results folder's driver lock from before the folder is checked to the end
    (cifar_ray.driver_lock): a second driver on the folder exits 2 before it trains or writes anything.
    Cloud storage has no lock."""
    unlocked: list[Optional[int]] = [None]
    try:
        with nullcontext(unlocked) if plan.remote else driver_lock.held(plan.results) as lock:
            return run_sweep(plan, args, lock)
    except driver_lock.FolderInUse as err:
        raise ConfigError(f"{printable(plan.results)}: {err}. Two drivers on one folder would train the same "
                          "trials twice and overwrite each other's record: wait for that sweep to end, or stop it "
                          f"(Ctrl-C) and then resume with: {resume_command(plan)}") from None


def run_sweep(plan: Plan, args: argparse.Namespace, lock: list[Optional[int]]) -> int:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic live table, with our columns
    from cifar_ray.analysis import load, write_parquet
    from cifar_ray.cluster import autoscaler_node_types, check_feasible, check_storage, cluster_nodes, requests_by_model
    from cifar_ray.record import TRIALS_FILE

    exit_at_once_on_ctrl_c(plan.results, resume_command(plan), EXIT_INTERRUPTED)
    watch = bind_watch(args) if args.watch else None
    # This driver's W&B runs use a W&B service of its own: one inherited from a parent process outlives
    # a killed driver and holds its runs open, and the resumed sweep's run of the same id then hangs.
    os.environ.pop("WANDB_SERVICE", None)
    check_results_folder(plan, args.resume)
    dataset = load_sweep_data(plan.space)
    keep_secrets_out(plan.remote)
    import ray  # noqa: F401 - configures Ray's log handlers, which quiet_logs filters

    quiet_logs(args.verbose)
    address, given_by = cluster_address(args)
    started = start_ray(address, args.verbose, given_by)
    forward_sigterm()
    check_storage(plan.storage, cluster_nodes())
    node_types = autoscaler_node_types(args.cluster_config)
    if not args.allow_pending:
        check_feasible(requests_by_model(plan.sweep, plan.space), node_types)
    make_results_folder(plan)
    if lock[0] is None and not plan.remote:  # a new sweep's folder, made just now: held before a file is in it
        lock[0] = driver_lock.take(plan.results)
    write_sweep_copy(plan)
    write_provenance(plan, args.resume)
    mirror = open_mirror(plan)
    if watch is not None:
        watch_beside(plan, *watch, args.watch_host)
    full: list[bool] = []

    def stop_on_full_disk() -> None:  # from the recorder, in Tune's loop: stop as on Ctrl-C, once
        if not full:
            full.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    prior_epoch_s = None
    if args.estimate:  # timed before the first trial starts, so nothing else shares the CPU
        lines, prior_epoch_s = estimate_lines(plan, args, running=True)
        print("\n".join(lines), flush=True)
    from cifar_ray.tune_search import new_trials_snapshot, staging_of_its_own

    # while Tune runs, a Ray this sweep started is watched (a cluster's or a Python caller's is not)
    leaving = (watch_own_ray(lost_ray_farewell(plan), resume_command(plan), EXIT_INTERRUPTED) if started
               else threading.Event())
    try:
        with staging_of_its_own():
            tuner = build_tuner(plan, dataset, args.resume, mirror, args.verbose, node_types, stop_on_full_disk,
                                prior_epoch_s)
            with new_trials_snapshot():
                grid = tuner.fit()
    finally:
        leaving.set()  # Tune is done with Ray, however it ended: its processes may end from here on (shutdown)
    if plan.remote:
        return summarize_remote(plan, grid)
    if full or any(r.error is not None and disk_full(r.error) for r in grid):
        raise OSError(errno.ENOSPC, "No space left on device")
    trials = load(plan.results).trials()
    # The driver's own result grid is the authority on which trials errored (the state file may lag).
    errored = {r.metrics.get("trial_id") for r in grid if r.error is not None}
    failed = trials["trial_id"].isin(errored)
    if "pack" in trials:  # a failed pack's members that had not ended failed with it
        failed |= trials["pack"].isin(errored) & (trials["status"] == M.UNFINISHED)
    trials.loc[failed, "status"] = M.ERRORED
    write_parquet(trials, plan.results / TRIALS_FILE)
    text, code = summarize(plan, trials)
    print(text)
    return code


def main(argv: Optional[list[str]] = None) -> int:
    """The command, callable from Python: the Ctrl-C handler it installs is removed again on return."""
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        return command(argv)
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def command(argv: Optional[list[str]] = None) -> int:
    forward_sigterm()  # from the start: a SIGTERM before Tune's loop ends like a Ctrl-C then would
    args = parse_args(argv)
    from cifar_ray.cluster import InfeasibleError
    from cifar_ray.data import DataError

    plan = None
    try:
        plan = plan_from_args(args)
        if args.cluster_config:  # checked offline, before anything starts (the run reads it again)
            from cifar_ray.cluster import autoscaler_node_types

            try:
                autoscaler_node_types(args.cluster_config)
            except ConfigError as err:
                raise ConfigError(f"--cluster-config {err}") from None
        if args.dry_run:
            print(describe(plan), flush=True)
            for line in unfit_here(plan, args):
                print(line, flush=True)
            if args.estimate:
                print("\n".join(estimate_lines(plan, args)[0]))
            return EXIT_OK
        return run(plan, args)
    except KeyboardInterrupt:  # a Ctrl-C before the handler was installed
        if plan is not None:
            print(f"\ninterrupted; resume with:\n  {resume_command(plan)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, DataError) as err:
        print(f"error: {printable(err)}", file=sys.stderr)
        return EXIT_INVALID
    except InfeasibleError as err:  # several lines: the requests, then the nodes (each line escaped)
        print("error: " + "\n".join(printable(line) for line in str(err).splitlines()), file=sys.stderr)
        return EXIT_INFEASIBLE
    except OSError as err:
        if plan is None or args.dry_run or not disk_full(err):
            raise
        print(disk_full_line(plan, err), file=sys.stderr)
        return EXIT_DISK_FULL


def disk_full_line(plan: Plan, err: Optional[OSError] = None) -> str:
    """One line: which folder's disk is full (the file the refused write named, else the results folder),
    how much is free, and how to go on. Every file the sweep had written is whole (cifar_ray.storage);
    what was running is continued by --resume, or the sweep is run again when it had not begun."""
    from cifar_ray.storage import free_bytes, human_bytes

    named = Path(err.filename).absolute() if err is not None and isinstance(err.filename, str) else None
    if named is None or named.is_relative_to(plan.results):
        where = plan.results
    else:
        where = named if named.is_dir() else named.parent
    begun = (plan.results / SWEEP_FILE).is_file()
    then = f"resume with: {resume_command(plan)}" if begun else "run the sweep again (it had not begun)"
    return (f"error: the disk holding {printable(where)} is full ({human_bytes(free_bytes(where))} free); "
            f"the sweep stopped and every file written before is intact: free space, then {then}")


def exit_cli(code: int) -> None:
    """Shut Ray and W&B down while the exit-at-once Ctrl-C handler is still installed, then leave
    without the interpreter's finalization: that resets signal handlers to the default, and a Ctrl-C
    landing then would kill the process with a traceback-less -2 instead of exit 130."""
    try:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
        if "wandb" in sys.modules:
            sys.modules["wandb"].teardown()
    except Exception as exc:  # the sweep's result stands; say why shutdown was untidy
        print(f"warning: shutdown: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    # command(), not main(): the exit-at-once Ctrl-C handler stays in place through the shutdown
    exit_cli(run_main(command))
