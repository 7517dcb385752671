"""The sweep driver's Ray process plumbing: a private folder for a local Ray, secrets kept out of trial
environments, Ray started quietly, and Ctrl-C / SIGTERM turned into a clean stop with a resume line.
The sweep CLI (cifar_ray.sweep) calls these around Tuner.fit()."""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from cifar_ray.config import ConfigError
from cifar_ray.files import printable
from cifar_ray.record import STATE_GLOB

CLOUD_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def keep_secrets_out(remote: bool) -> None:
    """Ray Tune copies these variables into every trial actor's runtime environment, which Ray's
    runtime-env agent writes to its log in plain text. Local storage needs none of them: drop them
    from this process (and so from a local Ray it starts). Cloud storage: say how to do without."""
    present = [k for k in CLOUD_SECRET_ENV if k in os.environ]
    if not present:
        return
    if not remote:
        for key in present:
            del os.environ[key]
        return
    print(f"warning: {', '.join(present)} set: Ray Tune passes them to every trial, and Ray's runtime-env agent "
          "logs them in plain text; prefer an instance role or AWS_PROFILE (README: security notes)", file=sys.stderr)


RAY_TMPDIR = "RAY_TMPDIR"  # where Ray keeps its session folders (sockets, logs)
# Ray starts its worker processes (every trial) at `nice +15` over the raylet, so that its own daemons
# stay responsive on a saturated node; a worker then gets 36/1024 of the CPU time any ordinary process
# gets. On the machine a user runs a sweep from, any other busy process starves the trials: measured
# 2026-12-04 on 2 cores beside two busy loops, tests/test_sweep.py's 4-trial grid took 181 s against
# 9.9 s alone, and 25.8 s with the workers at the sweep's own priority. A local Ray started here runs
# its trials at the sweep command's priority (`nice python -m cifar_ray.sweep ...` still lowers it: the
# value is an increment); the variable set by the user wins.
WORKER_NICENESS = "RAY_worker_niceness"


def private_folder(path: Path) -> Path:
    """`path` as a folder only this user can enter: made 0700, or an existing one of ours closed to
    others. Someone else's folder, or a link, there is refused."""
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if path.is_symlink() or not path.is_dir() or info.st_uid != os.getuid():
        raise ConfigError(f"{path}: not a folder of this user's (a link or someone else's); remove it or set "
                          f"{RAY_TMPDIR} to another folder")
    path.chmod(0o700)
    return path


# A head's GCS accepts a TCP connection in milliseconds. ray.init itself retries an address where none
# answers for minutes (seen 2026-12-05, Ray 2.60: 20 tries of up to 40 s each on a closed local port,
# then a traceback), so the port is tried once first.
GCS_PROBE_S = 10.0
ADDRESS_KEYWORDS = ("auto", "local")


def gcs_endpoint(address: str, given_by: str) -> Optional[tuple[str, int]]:
    """(host, port) of a HOST:PORT address; None for the forms Ray resolves itself (auto, local,
    ray://...); ConfigError for anything else."""
    if address in ADDRESS_KEYWORDS or "://" in address:
        return None
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"{given_by} {printable(address)}: expected HOST:PORT (the head's GCS port, 6379 unless "
                          "ray start --head was given another), or auto")
    return host.strip("[]"), int(port)


def connect(address: str, given_by: str, **options: Any) -> None:
    """ray.init for a cluster the user named (--address, $RAY_ADDRESS): one line naming the address and
    the way on (ConfigError) when no Ray answers there, instead of minutes of retries and a traceback."""
    import ray

    way = (f"start the cluster (ray up cluster.yaml, or ray start --head there) or correct {given_by}; without "
           f"it the sweep starts a Ray on this machine")
    endpoint = gcs_endpoint(address, given_by)
    if endpoint is not None:
        try:
            socket.create_connection(endpoint, timeout=GCS_PROBE_S).close()
        except OSError as err:
            raise ConfigError(f"{given_by} {printable(address)}: no Ray cluster answers there "
                              f"({printable(err.strerror or err)}); {way}") from None
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as err:
        # Ray's message can run to a whole remote traceback ("Last connection error: Traceback ..."): its
        # first sentence says what failed
        reason = str(err).splitlines()[0].split(" Last connection error")[0].strip() if str(err) else type(err).__name__
        raise ConfigError(f"{given_by} {printable(address)}: cannot join the Ray cluster there ({printable(reason)}); "
                          f"{way}") from None


def start_ray(address: Optional[str], verbose: bool, given_by: str = "--address") -> bool:
    """Connect to the Ray at `address`, or start a local one: True when this call started it."""
    import ray

    if ray.is_initialized():  # the caller's own (cifar_ray.sweep.main called from Python)
        return False
    runtime_env = {"worker_process_setup_hook": "cifar_ray.trainable.warm_worker"}
    # Without --verbose the workers' console is not forwarded: Ray's per-checkpoint lines and the
    # "Exception ignored" noise of workers SIGTERMed at shutdown stay in Ray's log files. A trial's
    # own warnings reach the console through its reports (cifar_ray.callbacks).
    options: dict[str, Any] = dict(include_dashboard=False, runtime_env=runtime_env, log_to_driver=verbose)
    if not verbose:
        options["logging_level"] = logging.WARNING
    if address:
        connect(address, given_by, **options)
        return False
    # A Ray started here keeps its session folder, logs and auth token to this user. Ray makes its
    # folders 0777 for sharing (and makes them so again as it runs), so its temporary root goes inside
    # a folder of this user's alone; files are made under umask 077 (the processes it starts keep it).
    root = Path(os.environ.get(RAY_TMPDIR) or tempfile.gettempdir())
    if not root.is_dir():
        raise ConfigError(f"{RAY_TMPDIR}={printable(root)}: no such folder; create it, or unset {RAY_TMPDIR} to use "
                          f"{tempfile.gettempdir()}")
    os.environ[RAY_TMPDIR] = str(private_folder(root / f"cifar_ray-{os.getuid()}"))
    os.environ.setdefault(WORKER_NICENESS, "0")
    old = os.umask(0o077)
    # Ray's processes (GCS, raylet, agents, and the workers the raylet starts) inherit a blocked SIGTERM,
    # as Ray starts them with SIGINT blocked so that Ctrl-C reaches the driver alone: a SIGTERM sent to
    # the sweep's whole process group (`timeout`, `kill -TERM -PGID`) or to every process of its service
    # (systemd's stop, a batch scheduler's cancel) then stops the sweep as one sent to the driver does,
    # with Tune's clean stop. A Ray ended by the same signal left the driver no clean stop: it hung on the
    # dead GCS, or Ray's core worker ended it with exit code 1 and no resume line once the raylet was gone
    # (its object recovery wrote to the closed object store socket, seen 2026-12-05).
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        ray.init(**options)
    finally:
        os.umask(old)
        forward_sigterm()  # over ray.init's own handler, before a SIGTERM that came meanwhile is delivered
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    kill_at_once_on_shutdown()
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file() and not token.is_symlink() and token.stat().st_uid == os.getuid():
        token.chmod(0o600)
    return True


def started_processes() -> dict[str, list[Any]]:
    """Process kind -> the Popen of each process of the local Ray this process started; {} on a cluster."""
    import ray

    # Ray keeps the Popen of each process it started on its private node object (Ray 2.60); where a
    # later Ray moves it, this finds none: the sweep runs unwatched, and Ray's shutdown takes its time
    try:
        node = ray._private.worker._global_node
        if node is None or not node.head:
            return {}
        return {kind: [info.process for info in infos] for kind, infos in node.all_processes.items()}
    except AttributeError:
        return {}


def kill_at_once_on_shutdown() -> None:
    """Ray's shutdown sends each process it started SIGTERM and gives it a second before SIGKILL. With
    SIGTERM blocked (start_ray) that second is only waited out, once per process: each gets the SIGKILL
    at once instead, the raylet together with the processes it started. Its workers would end by
    themselves on seeing it gone, but its agents (ray::DashboardAgent, ray::RuntimeEnvAgent) report that
    to the GCS first, which is gone by then, and lived 60 s longer. Measured 2026-12-05 on 2 cores,
    ray.shutdown() of a local 1-CPU Ray that had run one task: 5.3 s with SIGTERM blocked, 0.3 s with
    this, 1.1 s with SIGTERM not blocked; no process of it left after any of the three."""
    for kind, processes in started_processes().items():
        for process in processes:
            # pidfds are Linux's: elsewhere (macOS) the raylet's agents are left to end by themselves
            whole = kind == "raylet" and hasattr(os, "pidfd_open")
            process.terminate = kill_with_children(process) if whole else process.kill


def kill_with_children(process: Any) -> Callable[[], None]:
    """`process.kill`, then SIGKILL to each process it had started, each held by a pidfd taken before
    (a pid alone could name another process by the time the signal goes)."""
    def kill() -> None:
        held = []
        for pid in child_pids(process.pid):
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # it ended meanwhile
                continue
            if parent_pid(pid) == process.pid:  # the fd holds the child, not a process given its pid since
                held.append(fd)
            else:
                os.close(fd)
        process.kill()
        for fd in held:
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:  # it ended meanwhile
                pass
            finally:
                os.close(fd)

    return kill


def parent_pid(pid: int) -> Optional[int]:
    """The parent of process `pid`, from /proc (Linux); None once it has ended."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rpartition(")")[2].split()[1])  # PID (NAME) STATE PPID ...: a name may hold ")"


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` ([] where there is no /proc)."""
    return [int(d.name) for d in Path("/proc").glob("[0-9]*") if parent_pid(int(d.name)) == pid]


def own_ray_processes() -> list[tuple[str, Any]]:
    """The GCS and raylet of the local Ray this process started, as (name, Popen); [] on a cluster."""
    started = started_processes()
    return [(kind, process) for kind in ("gcs_server", "raylet") for process in started.get(kind, [])]


def watch_own_ray(farewell: Callable[[str], str], resume: str, code: int) -> threading.Event:
    """End the sweep at once, with `farewell(why)` on stderr (else why and `resume`) and exit `code`, when
    the GCS or raylet of the Ray it started ends while Tune still runs (the kernel's OOM killer, a kill -9);
    set the Event returned once Tune is done with Ray (its shutdown ends them). Without them the driver's
    stop hangs on an RPC to the dead GCS for 60 s, then Ray ends it with its own error line and no resume
    line. Ray's core worker may still end the process first, with exit code 1 and no line, once the
    raylet is gone (start_ray keeps SIGTERM, the one signal a sweep's stop sends everywhere, from them).
    What the trials reported and Tune's last saved state stay in the results folder; --resume goes on."""
    leaving = threading.Event()
    watched = own_ray_processes()

    def watch() -> None:
        while not leaving.wait(0.2):  # s: a poll of two child processes; there is nothing to wait on instead
            ended = [(kind, p.returncode) for kind, p in watched if p.poll() is not None]
            if ended and not leaving.is_set():
                kind, rc = ended[0]
                how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
                why = f"this sweep's Ray stopped: its {kind} ended ({how})"
                try:
                    text = farewell(why)
                except Exception as exc:  # the line that matters is the resume line: never lose it to this
                    text = f"{why}\n(no summary: {type(exc).__name__}: {exc})\nresume with:\n  {resume}"
                try:
                    sys.stdout.flush()
                except Exception:
                    pass
                os.write(2, f"\n{text}\n".encode())
                # the rest of that Ray at once (kill_at_once_on_shutdown), the raylet's agents with it: left
                # to themselves they waited 60 s on the dead GCS
                for _, process in watched:
                    if process.poll() is None:
                        try:
                            process.terminate()
                        except OSError:
                            pass
                os._exit(code)

    if watched:
        threading.Thread(target=watch, name="cifar_ray-own-ray", daemon=True).start()
    return leaving


class QuietTune(logging.Filter):
    """Without --verbose: no worker tracebacks repeated by Tune (the summary names each error and
    error.txt keeps it whole), no lines that point at Tune's own resume API instead of --resume, and the
    sweep's own line for Tune's stop notice."""

    # Tune's pointers to its own resume API; Ray's advice on token authentication (which stays on), an
    # invitation to turn it off; Tune's note, after a stop, that trials which never reported have no
    # results (the summary counts them as unfinished)
    HIDDEN = ("Trials did not complete", "Experiment has been interrupted", "Token authentication is enabled",
              "Failed to fetch metrics for")
    # Tune's stop on Ctrl-C or SIGTERM, in Tune's terms (its state, a second press "to skip"): said as
    # the sweep's own line instead
    STOPPING = "Stop signal received"
    STOPPING_LINE = ("stopping: saving the sweep's state for --resume, then the summary "
                     "(Ctrl-C again exits at once, and --resume still continues the sweep)\n")
    # Tune's note that its loop took over a second (a busy machine, the driver's record on a slow disk):
    # advice to report less often, which a per-epoch report cannot take
    SLOW = "may be a performance bottleneck"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.HIDDEN) or self.SLOW in message:
            return False
        if message.startswith(self.STOPPING):
            if not getattr(record, "cifar_ray_said", False):  # once, whichever of Ray's handlers asks first
                record.cifar_ray_said = True
                try:
                    sys.stderr.write(self.STOPPING_LINE)
                    sys.stderr.flush()
                except (OSError, ValueError):  # the reader has gone: nothing to tell
                    pass
            return False
        if record.exc_info:
            error = record.exc_info[1]
            last = str(error).strip().splitlines()[-1:] if error is not None else []
            record.msg, record.args = f"{message}: {' '.join(last)[:300]}", ()
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        elif self.TRACEBACK in message or self.FRAME.search(message):
            record.msg, record.args = one_line(message), ()
        return True

    # Ray writes some tracebacks into the message text itself: its upload thread's failed sync
    # (ray.train's syncer, e.g. a full disk), an unhandled error of a trial task the driver stopped
    TRACEBACK = "Traceback (most recent call last):"
    FRAME = re.compile(r'^\s*File "[^"]*", line \d+', re.MULTILINE)


def one_line(message: str) -> str:
    """A message with a traceback written into it, as its first line and the traceback's last line
    (the error itself), 300 characters at most."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    head = lines[0].removesuffix(QuietTune.TRACEBACK).strip() if lines else ""
    if head.endswith(":"):
        head = head[:-1]
    tail = lines[-1] if len(lines) > 1 else ""
    text = f"{head}: {tail}" if head and tail and tail != head else head or tail
    return text[:300]


def quiet_logs(verbose: bool) -> None:
    """Tune's warning about frequent state snapshots (they are forced by checkpoint.keep and cost
    nothing on local storage) and the filter above, on every handler of Ray's loggers."""
    if verbose:
        return
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    quiet = QuietTune()
    for name in ("ray", "ray.tune", ""):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, QuietTune) for f in handler.filters):
                handler.addFilter(quiet)


def exit_at_once_on_ctrl_c(results: Path, resume: str, code: int) -> None:
    """Tune takes the first Ctrl-C of a running sweep (it saves its state, then returns) and puts this
    handler back; any Ctrl-C that reaches it (a second one, or one before or after Tune's loop: the
    summary, Ray's shutdown) ends the process at once with exit `code`, the resume command `resume`
    (once Tune has saved a state under `results`) and no traceback."""
    def handler(signum, frame):
        try:
            sys.stdout.flush()
        except Exception:  # interrupted in the middle of a write
            pass
        started = any(results.glob(STATE_GLOB))
        line = f"resume with:\n  {resume}" if started else "no trial had started"
        os.write(2, f"\ninterrupted; {line}\n".encode())
        os._exit(code)  # no atexit: Ray's and W&B's shutdown hooks are what it interrupts

    signal.signal(signal.SIGINT, handler)
    forward_sigterm()


def forward_sigterm() -> None:
    """SIGTERM (`kill`, systemd, a batch scheduler) does what Ctrl-C does at that moment: Tune's
    clean stop with the summary and the resume line while trials run, else the exit-at-once handler.
    Called again after ray.init, which installs a SIGTERM handler of its own."""
    def handler(signum, frame):
        current = signal.getsignal(signal.SIGINT)
        if callable(current):
            current(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
