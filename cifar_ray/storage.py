"""Tune's storage for a local results folder: every file written whole or not at all, and no checkpoint
deleted while the saved experiment state may still point at it.

Ray Tune copies its staging folder (experiment state, params.json, result.json) and each checkpoint
into the results folder with pyarrow, which truncates a file in place and then writes it. On a full
disk that left 0-byte files and a checkpoint half-written under its final name. Given to Tune as
`RunConfig(storage_filesystem=...)`, this filesystem writes each file beside its final name, fsyncs it
and renames it over the old one; a failed write removes the temporary file and the old one stands.

Tune deletes the checkpoints that `CheckpointConfig(num_to_keep)` rotates out at once, while the
experiment state on storage (saved every few seconds) can still name one of them as a trial's latest:
a driver killed in between left a sweep whose resume failed every retry with "Could not recover from
checkpoint as it does not exist on storage anymore". Here such a deletion waits until the experiment
state that this driver's Tune wrote to its staging folder after it (`snapshot_serialized`, called by the
controller that `cifar_ray.tune_search.new_trials_snapshot` puts in place) has been copied whole to the
results folder: that snapshot, the newest, no longer names the checkpoint. Copies of the states of
earlier drivers (a resumed driver uploads them again) release nothing.
A driver killed meanwhile leaves the checkpoint on disk: a valid, older checkpoint of its trial.

Tune rewrites its experiment state and its searcher's state in the staging folder in place (open with
"w", then json.dump); its upload thread, had it still been copying the previous ones, would read a file
cut short. The sweep's controller waits for the upload before it saves (cifar_ray.tune_search's
`finish_upload`); a copy of a state file is still checked before it takes the name, and one that is not
whole (JSON, or the searcher's pickle) is dropped (the state there stands; the next upload carries the
new one).
"""
from __future__ import annotations

import errno
import fnmatch
import itertools
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.fs as pafs

from cifar_ray.files import new_file_mode

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
STATE_PATTERN = "experiment_state-*.json"  # Tune's experiment snapshot, written into the results folder
# Tune's files that it rewrites in place in its staging folder: the experiment state, and the search
# algorithm's (basic-variant-state-*.json for grid and random search)
REWRITTEN_PATTERNS = (STATE_PATTERN, "*-state-*.json")
CHECKPOINT_PATTERN = "checkpoint_*"

# Deletions waiting for a later snapshot, process-wide: Tune hands each trial (and each checkpoint it
# gets back from a worker) its own copy of the filesystem object. (order, folder), ordered by _ORDER.
_DEFERRED: list[tuple[int, str]] = []
_ORDER = itertools.count()
_LOCK = threading.Lock()


def _defer_deletion(path: str) -> None:
    with _LOCK:
        _DEFERRED.append((next(_ORDER), path))


# The _ORDER mark of the newest experiment state Tune has written to its staging folder (-1: none yet),
# and that state's file name: this driver's own experiment_state-<its start>.json
_SERIALIZED: list = [-1, None]


def snapshot_serialized(name: str) -> None:
    """Called in Tune's loop just after its controller wrote the experiment state `name` (a file name) to
    its staging folder (cifar_ray.tune_search): that state no longer names a checkpoint whose deletion
    was asked for before."""
    with _LOCK:
        _SERIALIZED[:] = [next(_ORDER), name]


def _snapshot_started(name: str) -> Optional[Callable[[], None]]:
    """Called when an experiment state file is opened on storage. For the state this driver writes (the
    one a resume reads: the newest), the function it returns, once that file is whole, deletes the
    checkpoints whose deletion was asked for before the staged state it copies was written. Tune uploads
    its staging folder in a thread of its own, file after file, while its loop goes on: a state written
    before a deletion request could be opened on storage after it, and marking the opening let it delete
    a checkpoint the state still named (kill -9, then every retry of that trial failed with "does not
    exist on storage anymore"; seen 2026-12-04, four interrupted sweeps at once). The staging folder also
    holds the states of the drivers this one resumed (Tune copies the results folder into it and uploads
    them again): their copies release nothing. Releasing on one of them deleted checkpoints while this
    driver's own newest state was not yet on storage (kill -9 just then; seen the same day, under load)."""
    with _LOCK:
        mark, own = _SERIALIZED
    if name != own:
        return None

    def release() -> None:
        with _LOCK:
            due = [path for order, path in _DEFERRED if order < mark]
            _DEFERRED[:] = [(order, path) for order, path in _DEFERRED if order >= mark]
        for path in due:
            shutil.rmtree(path, ignore_errors=True)
    return release


class _WholeFile:
    """A file-like object for pa.PythonFile: writes go to a temporary file beside `path`; close()
    renames it into place only when every write succeeded."""

    def __init__(self, path: str, on_done: Optional[Callable[[], None]] = None,
                 whole: Optional[Callable[[str], bool]] = None):
        self.path = path
        self.on_done = on_done  # called once the file has its name
        self.whole = whole  # whether the written file is complete: one that is not never takes the name
        fd, self.tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.",
                                        suffix=".tmp")
        os.fchmod(fd, new_file_mode())
        self._f = os.fdopen(fd, "wb")
        self._failed = False
        self.closed = False

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except BaseException:
            self._abandon()
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        """A failed write: the temporary file goes at once (pyarrow may never call close after an
        error), and close() will not rename anything."""
        self._failed = True
        try:
            self._f.close()
        except OSError:
            pass
        Path(self.tmp).unlink(missing_ok=True)

    def tell(self) -> int:
        return self._f.tell()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._failed:
            return
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        except BaseException:
            self._abandon()
            raise
        if self.whole is not None and not self.whole(self.tmp):
            Path(self.tmp).unlink(missing_ok=True)
            return
        os.replace(self.tmp, self.path)
        if self.on_done is not None:
            self.on_done()


class WholeFileHandler(pafs.FileSystemHandler):
    """pyarrow's local filesystem, except that output streams write whole files (see _WholeFile)."""

    def __init__(self):
        self._fs = pafs.LocalFileSystem()

    def __reduce__(self):  # pickled into every trial worker with Tune's storage context
        return (WholeFileHandler, ())

    def __eq__(self, other) -> bool:
        return isinstance(other, WholeFileHandler)

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "cifar_ray-local"

    def normalize_path(self, path: str) -> str:
        return self._fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self._fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        if fnmatch.fnmatch(os.path.basename(path.rstrip("/")), CHECKPOINT_PATTERN):
            _defer_deletion(path)  # see the module's docstring
            return
        self._fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of the root folder")

    def delete_file(self, path: str) -> None:
        self._fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with open(src, "rb") as source:
            stream = _output(dest)
            try:
                shutil.copyfileobj(source, stream, 1 << 22)
            finally:
                stream.close()

    def open_input_stream(self, path: str):
        return self._fs.open_input_stream(path)

    def open_input_file(self, path: str):
        return self._fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Optional[dict] = None):
        return pa.PythonFile(_output(path), mode="w")

    def open_append_stream(self, path: str, metadata: Optional[dict] = None):
        return self._fs.open_append_stream(path)


def _output(path: str) -> _WholeFile:
    """A whole-file writer for `path`: an experiment state releases the deletions it makes safe once it
    has its name; a file Tune rewrites in place takes its name only whole (_whole_state)."""
    name = os.path.basename(path)
    is_state = fnmatch.fnmatch(name, STATE_PATTERN)
    rewritten = any(fnmatch.fnmatch(name, pattern) for pattern in REWRITTEN_PATTERNS)
    return _WholeFile(path, _snapshot_started(name) if is_state else None, _whole_state if rewritten else None)


def _whole_state(path: str) -> bool:
    """Whether the file is one whole state (a copy of a file Tune was rewriting is cut short): a JSON
    document, or, for the searcher state that Ray writes as a pickle under a .json name
    (basic-variant-state-*.json: ray.tune's _atomic_save), one whole pickle. Checking every state as JSON
    dropped each searcher state, so a resume that did not find the old driver's staging folder (its own
    Ray, another machine) restarted the generator empty and ended with the trials it had made."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:1] == b"\x80":  # a pickle's PROTO opcode; JSON never starts so
        return _whole_pickle(data)
    try:
        json.loads(data)
    except ValueError:  # JSONDecodeError, and bytes that are not UTF-8
        return False
    return True


def _whole_pickle(data: bytes) -> bool:
    """Whether `data` is one pickle that ends at its last byte: its opcodes are read, never run."""
    import io
    import pickletools

    stream = io.BytesIO(data)
    try:
        for _ in pickletools.genops(stream):
            pass
    except Exception:  # ValueError and others on a pickle cut short
        return False
    return stream.tell() == len(data)


def whole_file_filesystem() -> pafs.FileSystem:
    return pafs.PyFileSystem(WholeFileHandler())


DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "disk full while writing")


def disk_full_text(text: str) -> bool:
    """An error message (a trial's error line, a wrapped pyarrow error) that says the disk is full."""
    return any(t in text for t in DISK_FULL_TEXTS)


def disk_full(exc: Optional[BaseException]) -> bool:
    """An error for a full disk or quota, here or anywhere in its chain of causes."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS or disk_full_text(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(path: str | os.PathLike) -> Optional[int]:
    """Bytes free to this user on the filesystem holding `path` (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def human_bytes(count: Optional[int]) -> str:
    if count is None:
        return "unknown"
    n = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
