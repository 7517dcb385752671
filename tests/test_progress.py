"""The sweep's console: progress counts, the ETA, event lines (cifar_ray.progress) and the reporter that
reads them off Tune's trials (cifar_ray.console), piped and on a terminal."""
import io
import re
from types import SimpleNamespace

import pytest

from cifar_ray import metrics as M
from cifar_ray.progress import TrialView, best_so_far, counts, duration, eta_seconds, event_lines, progress_line


def view(i, state, done=0, planned=4, per_epoch=None, best=None, outcome=None):
    return TrialView(f"netconv_a_{i:05d}", state, done, planned, per_epoch, best, outcome)


def test_counts_take_trials_not_created_yet_as_pending():
    views = [view(0, "TERMINATED"), view(1, "ERROR"), view(2, "RUNNING"), view(3, "PENDING"), view(4, "PAUSED")]
    assert counts(views, 8) == (2, 1, 5)


def test_eta_is_remaining_epochs_at_each_trials_speed_over_the_slots():
    views = [view(0, "TERMINATED", 4, per_epoch=10.0), view(1, "RUNNING", 1, per_epoch=20.0),
             view(2, "RUNNING", 0), view(3, "PENDING")]
    # trial 1: 3 epochs x 20 s; trial 2 and 3: 4 epochs at the measured mean (15 s); 2 slots
    assert eta_seconds(views, 4) == pytest.approx((3 * 20 + 4 * 15 + 4 * 15) / 2)
    # a trial not created yet: the mean plan (4 epochs) at the mean speed
    assert eta_seconds(views, 5) == pytest.approx((3 * 20 + 3 * 4 * 15) / 2)
    # the most trials seen at once, not the running count of this moment
    assert eta_seconds(views, 4, slots=3) == pytest.approx((3 * 20 + 4 * 15 + 4 * 15) / 3)


def test_no_eta_before_anything_says_how_fast_unless_the_estimate_does():
    views = [view(0, "RUNNING"), view(1, "PENDING")]
    assert eta_seconds(views, 2) is None
    assert eta_seconds(views, 2, prior_epoch_s=5.0) == pytest.approx(8 * 5.0)
    assert eta_seconds([view(0, "TERMINATED", 4, per_epoch=1.0)], 1) == 0
    # before the search has created a trial: the sweep's epochs per trial at the estimate's speed
    assert eta_seconds([], 3, prior_epoch_s=2.0, epochs=6) == pytest.approx(3 * 6 * 2.0)


def test_best_so_far_follows_the_mode_and_breaks_ties_by_trial_id():
    views = [view(2, "RUNNING", best=0.5), view(1, "RUNNING", best=0.5), view(3, "RUNNING", best=0.2),
             view(4, "RUNNING", best=float("nan"))]
    assert best_so_far(views, "max").trial_id == "netconv_a_00001"
    assert best_so_far(views, "min").trial_id == "netconv_a_00003"
    assert best_so_far([view(0, "PENDING")], "max") is None


def test_progress_line_says_done_running_pending_best_elapsed_and_eta():
    views = [view(0, "TERMINATED", 4, per_epoch=10.0, best=0.61), view(1, "RUNNING", 1, per_epoch=10.0, best=0.4)]
    line = progress_line(views, 3, "val_acc", "max", 75.0, 95.0)
    assert line == ("1/3 done, 1 running, 1 pending | best val_acc 0.6100 (netconv_a_00000) | 1 min 15 s elapsed, "
                    "ETA 1 min 35 s")
    assert progress_line(views, 3, "val_acc", "max", 5, None).endswith("ETA after the first epoch")
    assert "ETA at most 10 s" in progress_line(views, 3, "val_acc", "max", 5, 10, upper_bound=True)
    assert progress_line(views[:1], 1, "val_acc", "max", 3725, None, done=True).endswith("1 h 2 min elapsed, finished")
    # the loop ended with a trial still running: stopped (Ctrl-C), not finished
    assert progress_line(views, 2, "val_acc", "max", 3725, None, done=True).endswith("1 h 2 min elapsed, stopped")
    assert duration(59.6) == "1 min 0 s" and duration(7) == "7 s"
    # a fused sweep's Tune trials are packs: the count says so (the summary counts the member trials)
    assert progress_line(views, 3, "val_acc", "max", 5, None, unit="packs").startswith("1/3 packs done, 1 running")


def test_event_lines_name_starts_resumes_ends_and_errors_once():
    before = {"netconv_a_00000": "PENDING", "netconv_a_00001": "RUNNING", "netconv_a_00002": "RUNNING",
              "netconv_a_00003": "PAUSED"}
    views = [view(0, "RUNNING"), view(1, "TERMINATED", 2, best=0.7, outcome=M.STOPPED), view(2, "ERROR", 1),
             view(3, "RUNNING", 3)]
    lines = event_lines(before, views, "val_acc")
    assert lines == ["started  netconv_a_00000",
                     "ended    netconv_a_00001: stopped after 2 epochs, best val_acc 0.7000",
                     "errored  netconv_a_00002 after 1 epochs (its error: the summary, error.txt)",
                     "resumed  netconv_a_00003 at epoch 3"]
    assert event_lines({v.trial_id: v.state for v in views}, views, "val_acc") == []


def test_event_lines_do_not_depend_on_when_the_console_looks():
    """Between two looks a trial can start and report (or start and end): a new sweep still gets one
    start line per trial; a resumed sweep says where a trial resumed and is silent on trials that ended
    in an earlier run."""
    views = [view(0, "RUNNING", 1), view(1, "TERMINATED", 1, best=0.2, outcome=M.STOPPED), view(2, "PENDING")]
    assert event_lines({"netconv_a_00001": "PENDING"}, views, "val_acc") == [
        "started  netconv_a_00000", "started  netconv_a_00001",
        "ended    netconv_a_00001: stopped after 1 epochs, best val_acc 0.2000"]
    assert event_lines({}, views, "val_acc", fresh=False) == ["resumed  netconv_a_00000 at epoch 1"]
    assert event_lines({"netconv_a_00001": "PENDING"}, views[1:], "val_acc", fresh=False) == [
        "ended    netconv_a_00001: stopped after 1 epochs, best val_acc 0.2000"]


# ---------------------------------------------------------------- the reporter on Tune-like trials

def tune_trial(i, status, epoch=None, seconds=None, acc=None, outcome=M.RUNNING, epochs=4):
    last = {M.EPOCH: epoch, M.STATUS: outcome} if epoch else {}
    analysis = {M.EPOCH_SECONDS: {"avg": seconds}, "val_acc": {"max": acc, "min": acc}} if epoch else {}
    return SimpleNamespace(trial_id=f"abc_{i:05d}", status=status, config={"model.name": "mlp", "train.epochs": epochs},
                           last_result=last, metric_analysis=analysis)


class Console(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.fixture
def clock(monkeypatch):
    """console.time.monotonic under the test's hand: the reporter's periods without waiting for them."""
    from cifar_ray import console

    now = [1000.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    return now


def run_reporter(monkeypatch, clock, tty, columns=120):
    from cifar_ray.console import SweepProgress

    monkeypatch.setenv("COLUMNS", str(columns))  # the terminal's width, whatever runs the tests
    out = Console(tty)
    monkeypatch.setattr("sys.stdout", out)
    reporter = SweepProgress(3, "val_acc", "max")
    steps = [
        [tune_trial(0, "RUNNING"), tune_trial(1, "RUNNING"), tune_trial(2, "PENDING")],
        [tune_trial(0, "RUNNING", 1, 10.0, 0.3), tune_trial(1, "RUNNING", 1, 10.0, 0.2), tune_trial(2, "PENDING")],
        [tune_trial(0, "TERMINATED", 4, 10.0, 0.5, M.COMPLETED), tune_trial(1, "RUNNING", 3, 10.0, 0.4),
         tune_trial(2, "RUNNING")],
        [tune_trial(0, "TERMINATED", 4, 10.0, 0.5, M.COMPLETED), tune_trial(1, "ERROR", 3, 10.0, 0.4),
         tune_trial(2, "TERMINATED", 4, 10.0, 0.6, M.COMPLETED)],
    ]
    for i, trials in enumerate(steps):
        clock[0] += 12.0
        done = i == len(steps) - 1
        if reporter.should_report(trials, done):
            reporter.report(trials, done)
    return out.getvalue()


def test_piped_console_is_event_lines_and_progress_lines(monkeypatch, clock):
    text = run_reporter(monkeypatch, clock, tty=False)
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[:3] == ["started  mlp_abc_00000", "started  mlp_abc_00001",
                         "0/3 done, 2 running, 1 pending | best val_acc: none yet | 12 s elapsed, "
                         "ETA after the first epoch"]
    # a trial's end brings a progress line with an ETA: trial 1's 1 epoch left and trial 2's 4, 2 at once
    at_end = lines.index("ended    mlp_abc_00000: completed after 4 epochs, best val_acc 0.5000")
    assert lines[at_end + 1] == "started  mlp_abc_00002"
    assert re.fullmatch(r"1/3 done, 2 running, 0 pending \| best val_acc 0\.5000 \(mlp_abc_00000\) \| 36 s "
                        r"elapsed, ETA 25 s", lines[at_end + 2]), lines[at_end + 2]
    assert lines[-1].startswith("3/3 done, 0 running, 0 pending | best val_acc 0.6000 (mlp_abc_00002)")
    assert lines[-1].endswith("finished") and any(ln.startswith("errored  mlp_abc_00001") for ln in lines)


def test_terminal_console_is_one_live_line_with_events_above(monkeypatch, clock):
    text = run_reporter(monkeypatch, clock, tty=True)
    assert text.endswith("finished\n") and text.count("\n") == 7  # 6 events, and the live line ends the run
    frames = text.split("\r\x1b[K")
    assert frames[1] == "started  mlp_abc_00000\n" and frames[-1].startswith("3/3 done")


def test_the_live_line_is_cut_to_the_terminals_width(monkeypatch, clock):
    """A live line longer than the terminal would wrap, and `\r` would then rewrite only its last row."""
    frames = run_reporter(monkeypatch, clock, tty=True, columns=40).split("\r\x1b[K")
    lines = [f.removesuffix("\n") for f in frames if " done, " in f]
    assert lines and all(len(line) == 39 for line in lines), lines
    assert frames[-1].startswith("3/3 done") and frames[1] == "started  mlp_abc_00000\n"  # events are whole


def test_the_reporter_pickles_its_settings_not_its_state():
    import pickle

    from cifar_ray.console import SweepProgress

    reporter = SweepProgress(20, "val_loss", "min", max_t=8, prior_epoch_s=3.5, upper_bound=True, epochs=8, fresh=False)
    reporter._states = {"x": "RUNNING"}
    copy = pickle.loads(pickle.dumps(reporter))
    assert (copy.total, copy.metric, copy.mode, copy.max_t, copy.prior_epoch_s, copy.upper_bound, copy.epochs,
            copy.fresh) == \
        (20, "val_loss", "min", 8, 3.5, True, 8, False)
    assert copy._states == {}


def test_a_fused_sweeps_console_counts_packs_and_keeps_that_when_tune_pickles_it(tmp_path):
    import pickle

    from cifar_ray.sweep import console_reporter, parse_args, plan_from_args
    from conftest import write_sweep

    path = write_sweep(tmp_path, "fused", train__lr={"grid": [0.01, 0.02, 0.05]}, resources={"cpu": 1, "fuse": 2})
    plan = plan_from_args(parse_args([str(path), "--storage-path", str(tmp_path / "r")]))
    reporter = pickle.loads(pickle.dumps(console_reporter(plan, verbose=False)))
    assert (reporter.total, reporter.unit) == (2, "packs")  # 3 trials in packs of at most 2
    plain = plan_from_args(parse_args([str(path), "--storage-path", str(tmp_path / "r"), "--set", "resources.fuse=1"]))
    assert (console_reporter(plain, verbose=False).total, console_reporter(plain, verbose=False).unit) == (3, "")
