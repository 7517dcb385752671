"""The sweep's console in place of Tune's status tables: on a terminal one live line (done / running /
pending, the best so far, elapsed, ETA) with a line above it per trial event; piped or redirected, the
event lines and a progress line every PIPED_EVERY_S. `--verbose` keeps Tune's tables instead.
The lines come from cifar_ray.progress; this module reads them off Tune's trials."""
from __future__ import annotations

import shutil
import sys
import time
from typing import Any, Optional

from ray.tune import ProgressReporter

from cifar_ray import metrics as M
from cifar_ray.config import default
from cifar_ray.progress import TrialView, eta_seconds, event_lines, progress_line
from cifar_ray.record import PACK_MEMBERS, PACK_PREFIX

# piped: a progress line after each trial's end, and every PIPED_EVERY_S, or a tenth of the time elapsed
# when that is longer (a 2-hour sweep prints ~40 periodic lines, not 240)
PIPED_EVERY_S = 30.0
LIVE_EVERY_S = 1.0  # the live line's refresh on a terminal
CHECK_EVERY_S = 0.5  # how often trial states are read for events (Tune asks many times a second)


def trial_view(trial: Any, metric: str, mode: str, max_t: Optional[int]) -> TrialView:
    """One Tune trial as the console sees it (its config keys are the sweep file's flat ones)."""
    config = trial.config or {}
    last = trial.last_result or {}
    analysis = getattr(trial, "metric_analysis", None) or {}
    planned = int(config.get("train.epochs", default("train.epochs")))
    if max_t:
        planned = min(planned, max_t)
    per_epoch = (analysis.get(M.EPOCH_SECONDS) or {}).get("avg")
    best = (analysis.get(metric) or {}).get(mode)
    epoch = last.get(M.EPOCH)
    name = f"{config.get('model.name', 'trial')}_{trial.trial_id}"
    if PACK_MEMBERS in config:  # a pack of trials (resources.fuse), as its folder is named
        name = PACK_PREFIX + name
    return TrialView(name, str(trial.status), int(epoch) if isinstance(epoch, int) else 0, planned,
                     float(per_epoch) if isinstance(per_epoch, (int, float)) else None,
                     float(best) if isinstance(best, (int, float)) else None,
                     last.get(M.STATUS) if isinstance(last.get(M.STATUS), str) else None)


class SweepProgress(ProgressReporter):
    """Tune's progress_reporter for the sweep CLI (see the module's text)."""

    def __init__(self, total: int, metric: str, mode: str, max_t: Optional[int] = None,
                 prior_epoch_s: Optional[float] = None, upper_bound: bool = False, epochs: int = 1,
                 fresh: bool = True, unit: str = ""):
        self.total = total
        self.unit = unit  # "packs" in a fused sweep: its Tune trials are packs of trials
        self.fresh = fresh  # a new sweep, not a --resume (see progress.event_lines)
        self.epochs = epochs  # a trial's epochs (the sweep's longest, capped by max_t) before any trial exists
        self.metric, self.mode = metric, mode
        self.max_t = max_t  # ASHA's cap on a trial's epochs
        self.prior_epoch_s = prior_epoch_s  # seconds per epoch from --estimate, before anything has run
        self.upper_bound = upper_bound  # a scheduler may stop trials early: the ETA is at most
        self.started = time.monotonic()
        self._states: dict[str, str] = {}
        self._checked = self._printed = -float("inf")
        self._slots = 0  # the most trials seen running at once
        self._live = False  # a live line is on screen, to be cleared before the next print

    def setup(self, start_time: Optional[float] = None, total_samples: Optional[int] = None,
              metric: Optional[str] = None, mode: Optional[str] = None, **kwargs: Any) -> None:
        self.started = time.monotonic()  # this run's start (a resumed sweep counts from its resume)

    def should_report(self, trials: list[Any], done: bool = False) -> bool:
        return done or time.monotonic() - self._checked >= CHECK_EVERY_S

    def report(self, trials: list[Any], done: bool, *sys_info: str) -> None:
        now = self._checked = time.monotonic()
        views = [trial_view(t, self.metric, self.mode, self.max_t) for t in trials]
        events = event_lines(self._states, views, self.metric, self.fresh)
        self._states = {v.trial_id: v.state for v in views}
        running = sum(v.state == "RUNNING" for v in views)
        self._slots = max(self._slots, running)
        total = max(self.total, len(views))
        live = sys.stdout.isatty()
        every = LIVE_EVERY_S if live else max(PIPED_EVERY_S, (now - self.started) / 10)
        ended = any(e.startswith(("ended", "errored")) for e in events)
        last_one = all(v.state in ("TERMINATED", "ERROR") for v in views) and len(views) >= total
        # the last trial's end: the closing report (done) prints the final line, once
        due = (now - self._printed >= every or ended) and not (last_one and not done)
        if not (events or due or done):
            return
        eta = eta_seconds(views, total, self.prior_epoch_s, self._slots, self.epochs)
        line = progress_line(views, total, self.metric, self.mode, now - self.started, eta, self.upper_bound, done,
                             self.unit)
        if live:
            width = shutil.get_terminal_size((120, 24)).columns
            text = "".join(f"\r\x1b[K{e}\n" for e in events) + f"\r\x1b[K{line[:width - 1]}"
            sys.stdout.write(text + ("\n" if done else ""))
            self._live = not done
        else:
            shown = [*events, line] if (due or done) else events
            sys.stdout.write("".join(f"{x}\n" for x in shown))
        sys.stdout.flush()
        if due or done:
            self._printed = now

    def __getstate__(self) -> dict[str, Any]:  # pickled with the run config: the settings, not the live state
        return {k: getattr(self, k) for k in ("total", "metric", "mode", "max_t", "prior_epoch_s", "upper_bound",
                                              "epochs", "fresh", "unit")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        SweepProgress.__init__(self, **state)
