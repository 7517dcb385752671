"""W&B for a sweep: mode resolution, a stable run id per trial, and failure-proof logging.

The runs are written by the sweep's driver (cifar_ray.callbacks), one per trial. W&B trouble (no
network, bad key, a crash of its service) warns once and turns logging off for that trial; it never
fails a trial or a sweep.
"""
from __future__ import annotations

import hashlib
import json
import netrc
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from cifar_ray import metrics as M
from cifar_ray.sweep_config import WandbSettings

INIT_TIMEOUT_S = 20  # seconds wandb.init may take before we give up on W&B for the trial
PREFLIGHT_TIMEOUT_S = 10  # seconds the driver spends checking W&B is reachable and the key is good


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    """auto -> online with credentials, offline without; WANDB_MODE=disabled in the environment wins."""
    if os.environ.get("WANDB_MODE") in ("disabled", "offline") and mode in ("auto", "online"):
        return os.environ["WANDB_MODE"]
    if mode == "auto":
        return "online" if has_credentials() else "offline"
    return mode


def preflight(settings: dict) -> dict:
    """Check once, in the driver, that online W&B works (server reachable, key accepted). If not,
    warn and log offline instead, so no trial waits on a dead server; `wandb sync` uploads later."""
    if settings["mode"] != "online":
        return settings
    import concurrent.futures

    def login() -> None:
        import wandb

        # Api().viewer asks the server who the key belongs to; unlike wandb.login it writes no netrc.
        api = wandb.Api(api_key=os.environ.get("WANDB_API_KEY") or None, timeout=PREFLIGHT_TIMEOUT_S)
        if not api.viewer:
            raise RuntimeError("W&B did not accept the API key")

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(login).result(timeout=PREFLIGHT_TIMEOUT_S)
        return settings
    except Exception as exc:  # timeouts, network errors, a bad key
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        print(f"warning: W&B is not usable ({reason}); logging offline instead "
              f"(upload later with `wandb sync {settings['dir']}/wandb`)", file=sys.stderr)
        return {**settings, "mode": "offline"}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def run_id(sweep_name: str, trial_id: str) -> str:
    """Stable across retries and --resume, so a trial continues its own W&B run."""
    return hashlib.sha1(f"{sweep_name}/{trial_id}".encode()).hexdigest()[:16]


@dataclass
class TrialTracker:
    """One trial's W&B run, driven from the sweep's driver process (several runs live side by side
    there); every call is safe to make when W&B is off or broken."""

    settings: dict  # WandbSettings fields plus resolved mode, group, dir
    run: Any = None
    warned: bool = field(default=False)

    def start(self, name: str, run_key: str, config: dict) -> None:
        if self.settings["mode"] == "disabled":
            return
        try:
            import wandb

            os.makedirs(self.settings["dir"], exist_ok=True)
            self.run = wandb.init(
                project=self.settings["project"], entity=self.settings.get("entity"), group=self.settings["group"],
                tags=self.settings.get("tags") or None, name=name, id=run_key, resume="allow",
                dir=self.settings["dir"], mode=self.settings["mode"], config=public_config(config),
                # the driver's own CPU and memory say nothing about a trial: no system metrics
                settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S, silent=not self.settings.get("verbose"),
                                        console="off", x_disable_stats=True),
                reinit="create_new",
            )
            # Rows are logged in the order Tune records them, with W&B's own step; charts use the epoch
            # as their x axis (a restored trial can report an epoch again).
            self.run.define_metric("*", step_metric=M.EPOCH)
        except Exception as exc:  # W&B must never fail a trial
            self._warn(f"W&B init failed ({type(exc).__name__}: {exc}); continuing without W&B for this trial")
            self.run = None

    def _call(self, what: str, call: Callable[[], Any], drop: bool = False) -> None:
        """Make one W&B call; a failure warns once, and with drop turns W&B off for this trial."""
        if self.run is None:
            return
        try:
            call()
        except Exception as exc:  # W&B must never fail a trial
            self._warn(f"W&B {what} failed ({type(exc).__name__}: {exc})"
                       + ("; continuing without W&B for this trial" if drop else ""))
            if drop:
                self.run = None

    def held(self) -> dict[int, Optional[dict]]:
        """epoch -> the row this run already holds, read when the run is (re)opened: offline, from the
        run's earlier offline files in the W&B folder; online, the epochs up to the one in the resumed
        run's summary (values not known: None)."""
        if self.run is None:
            return {}
        held: dict[int, Optional[dict]] = {}
        try:
            if self.settings["mode"] == "offline":
                for path in sorted(Path(self.settings["dir"]).glob(f"wandb/offline-run-*-{self.run.id}/"
                                                                    f"run-{self.run.id}.wandb")):
                    for row in offline_history(path):
                        if isinstance(row.get(M.EPOCH), int):
                            held[row[M.EPOCH]] = row
            else:
                last = self.run.summary.get(M.EPOCH)
                if isinstance(last, int):
                    held = {e: None for e in range(1, last + 1)}
        except Exception as exc:  # an unreadable earlier file: log every epoch again
            self._warn(f"W&B: could not read what run {self.run.id} already holds ({type(exc).__name__}: {exc})")
        return held

    def log(self, metrics: dict) -> None:
        self._call("log", lambda: self.run.log(metrics), drop=True)

    def update_config(self, config: dict) -> None:
        """PBT changes a trial's hyperparameters as it goes: the run's config follows."""
        self._call("config update", lambda: self.run.config.update(public_config(config), allow_val_change=True))

    def note(self, summary: dict) -> None:
        """Summary fields that describe the run itself (its outcome, what was replayed)."""
        self._call("summary update", lambda: self.run.summary.update(summary))

    def finish(self, summary: dict, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(summary)
            self.run.finish(exit_code=exit_code)
        except Exception as exc:
            self._warn(f"W&B finish failed ({type(exc).__name__}: {exc})")
        self.run = None

    def _warn(self, message: str) -> None:
        if not self.warned:
            print(f"warning: {message}", file=sys.stderr)
            self.warned = True


def public_config(config: dict) -> dict:
    """A config with anything that looks like a secret removed (keys never reach W&B or results)."""
    secret_words = ("api_key", "secret", "token", "password")
    return {k: v for k, v in config.items() if not any(s in k.lower() for s in secret_words)}


def trial_settings(w: WandbSettings, sweep_name: str, wandb_dir: str, verbose: bool = False) -> dict:
    return {**w.model_dump(), "mode": resolve_mode(w.mode), "group": w.group or sweep_name, "dir": wandb_dir,
            "verbose": verbose}


# ---------------------------------------------------------------- offline run files

# An offline run file (`run-<id>.wandb`) is W&B's 7-byte header, then LevelDB-log blocks of 32 KiB
# whose records (4-byte CRC, 2-byte length, 1-byte type) carry protobuf `Record`s; wandb's Python
# package ships no reader for it.
_BLOCK = 32 * 1024
_HEADER = 7  # ":W&B" + 2-byte magic + 1-byte version
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def offline_records(path: str | os.PathLike) -> list[bytes]:
    """The raw records of an offline run file; a file cut short (a killed W&B service) ends early."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    out, pending, pos = [], b"", _HEADER
    while pos + 7 <= len(data):
        block_left = _BLOCK - (pos % _BLOCK)
        if block_left < 7:  # trailer padding at the end of a block
            pos += block_left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):
            break  # the last record was cut short
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            out.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            out.append(pending + chunk)
            pending = b""
        else:  # zero padding
            break
    return out


def offline_history(path: str | os.PathLike) -> list[dict]:
    """Each row logged to an offline run file, as {key: value}, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in offline_records(path):
        rec = pb.Record()  # type: ignore[attr-defined]  # generated protobuf module: no stubs
        try:
            rec.ParseFromString(raw)
        except Exception:  # a damaged record ends what can be read
            break
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows
