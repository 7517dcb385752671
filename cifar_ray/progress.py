"""The sweep's console progress, as pure functions: counts of done / running / pending trials, the best
so far, elapsed time and an ETA, and one line per trial event. cifar_ray.console feeds it Tune's trials.

The ETA: every unfinished trial's remaining epochs (its train.epochs, or the scheduler's max_t if lower)
times its seconds per epoch, over the trials running at once. A trial's seconds per epoch is its own
mean once it has reported, else the mean of the trials that have, else the `--estimate` figure when the
sweep was started with one; before any of these exists there is no ETA. Trials a scheduler stops early
(ASHA) make it an upper bound, which the line says.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

# Tune's trial states, as the console counts them
DONE_STATES = ("TERMINATED", "ERROR")
RUNNING_STATES = ("RUNNING",)


@dataclass(frozen=True)
class TrialView:
    """What the console knows of one trial."""

    trial_id: str
    state: str  # Tune's: PENDING, RUNNING, PAUSED, TERMINATED, ERROR
    epochs_done: int
    epochs_planned: int
    epoch_seconds: Optional[float]  # its mean seconds per epoch so far; None before its first report
    best: Optional[float]  # its best value of the sweep's metric so far
    outcome: Optional[str]  # the engine's status in its last report (completed, early_stopped, ...)


def duration(seconds: float) -> str:
    """`1 h 5 min`, `4 min 7 s`, `12 s`: the console's and the estimate's one way to say a time."""
    whole = max(0, int(round(seconds)))
    h, rest = divmod(whole, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h} h {m} min"
    return f"{m} min {s} s" if m else f"{s} s"


def counts(views: list[TrialView], total: int) -> tuple[int, int, int]:
    """(done, running, pending); trials the search has not created yet count as pending."""
    done = sum(v.state in DONE_STATES for v in views)
    running = sum(v.state in RUNNING_STATES for v in views)
    return done, running, max(0, total - done - running)


def best_so_far(views: list[TrialView], mode: str) -> Optional[TrialView]:
    """The trial with the best metric so far (ties: the lowest trial id, as analysis.ranked breaks them)."""
    scored = sorted((v for v in views if v.best is not None and math.isfinite(v.best)), key=lambda v: v.trial_id)
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda v: v.best if v.best is not None else math.nan)


def eta_seconds(views: list[TrialView], total: int, prior_epoch_s: Optional[float] = None,
                slots: Optional[int] = None, epochs: int = 1) -> Optional[float]:
    """Seconds until the sweep ends (see the module's text); None when nothing yet says how fast it goes.
    epochs: a trial's planned epochs while no trial exists yet to say (the sweep's longest)."""
    measured = [v.epoch_seconds for v in views if v.epoch_seconds is not None and v.epoch_seconds > 0]
    fallback = sum(measured) / len(measured) if measured else prior_epoch_s
    planned = [v.epochs_planned for v in views] or [epochs]
    remaining = 0.0
    for v in views:
        if v.state in DONE_STATES:
            continue
        per_epoch = v.epoch_seconds or fallback
        if per_epoch is None:
            return None
        remaining += max(0, v.epochs_planned - v.epochs_done) * per_epoch
    unseen = max(0, total - len(views))  # not created yet: the mean plan at the mean speed
    if unseen:
        if fallback is None:
            return None
        remaining += unseen * (sum(planned) / len(planned)) * fallback
    running = sum(v.state in RUNNING_STATES for v in views)
    # slots: the most trials seen running at once (the moment between one trial's end and the next's
    # start would halve the rate otherwise)
    return remaining / max(1, slots or 0, running)


def progress_line(views: list[TrialView], total: int, metric: str, mode: str, elapsed_s: float,
                  eta_s: Optional[float], upper_bound: bool = False, done: bool = False, unit: str = "") -> str:
    """`2/4 done, 2 running, 0 pending | best val_acc 0.4120 (netconv_3d1f0_00001) | 1 min 10 s elapsed, ETA 40 s`;
    unit: what is counted where it is not trials (`2/4 packs done`: a fused sweep's Tune trials)."""
    finished, running, pending = counts(views, total)
    best = best_so_far(views, mode)
    best_text = f"best {metric} {best.best:.4f} ({best.trial_id})" if best and best.best is not None \
        else f"best {metric}: none yet"
    if total and finished == total:
        eta_text = "finished"
    elif done:  # Tune's loop ended with trials left: a stop (Ctrl-C, SIGTERM, a full disk)
        eta_text = "stopped"
    elif eta_s is None:
        eta_text = "ETA after the first epoch"
    else:
        eta_text = f"ETA {'at most ' if upper_bound else ''}{duration(eta_s)}"
    counted = f"{finished}/{total} {unit} done" if unit else f"{finished}/{total} done"
    return f"{counted}, {running} running, {pending} pending | {best_text} | {duration(elapsed_s)} elapsed, {eta_text}"


def event_lines(before: dict[str, str], views: list[TrialView], metric: str, fresh: bool = True) -> list[str]:
    """A line for each trial that started, ended or errored since `before` (trial id -> state), whatever
    happened between two looks: a trial first seen running past an epoch, or already ended, gets its
    start line too. fresh: a new sweep (every trial starts in it); False for a resumed one, whose trials
    may have started, or ended, in an earlier run."""
    lines = []
    for v in views:
        was = before.get(v.trial_id)
        if v.state == was:
            continue
        first = was in (None, "PENDING")  # not seen running yet
        best = f", best {metric} {v.best:.4f}" if v.best is not None and math.isfinite(v.best) else ""
        if v.state == "RUNNING":
            if first and (fresh or not v.epochs_done):
                lines.append(f"started  {v.trial_id}")
            else:  # paused by a scheduler, or interrupted and now resumed
                lines.append(f"resumed  {v.trial_id} at epoch {v.epochs_done}")
            continue
        if v.state in ("TERMINATED", "ERROR") and first:
            if fresh:
                lines.append(f"started  {v.trial_id}")
            elif was is None:
                continue  # ended in an earlier run of the sweep
        if v.state == "TERMINATED":
            lines.append(f"ended    {v.trial_id}: {v.outcome or 'completed'} after {v.epochs_done} epochs{best}")
        elif v.state == "ERROR":
            lines.append(f"errored  {v.trial_id} after {v.epochs_done} epochs (its error: the summary, error.txt)")
    return lines
