"""Files written whole or not at all, and files read without following links.

A results folder may come from someone else: nothing in it is trusted to be a plain file.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Optional


class LinkError(OSError):
    """A path that is a symbolic link where cifar_ray only reads or writes plain files."""


def new_file_mode() -> int:
    """The mode open() would give a new file under this process's umask (mkstemp makes 0600)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object], fsync: bool = False,
                 mode: Optional[int] = None) -> Path:
    """Call write(f) on a new temporary file beside `path` (created exclusively, never through a link),
    then rename it over `path`: readers see the old file or the new one, never half of one. A link at
    `path` is replaced, not followed. fsync: the data is on disk before the rename (checkpoints, caches).
    mode: the file's mode; default, what the umask gives a new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def read_bytes_nofollow(path: str | os.PathLike[str]) -> bytes:
    """The file's bytes; LinkError when `path` itself is a symbolic link (O_NOFOLLOW)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LinkError(errno.ELOOP, f"{path} is a symbolic link; refusing to follow it") from None
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read()


def read_text_nofollow(path: str | os.PathLike[str]) -> str:
    return read_bytes_nofollow(path).decode("utf-8", errors="replace")


def printable(text: object) -> str:
    """`text` safe for a terminal or a one-line comment: control characters (newlines, ESC, ...) and
    other unprintable ones appear as escapes (`\\n`, `\\x1b`), never raw. For values read from a
    results folder, which may come from someone else."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


SCRATCH_PREFIX = "cifar_ray_ckpt_"
_SWEPT: set[Path] = set()  # the folders this process has cleared of ended processes' scratch folders


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64]


def _ended(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: alive
        pass
    return False


def remove_ended_scratch(root: Path) -> None:
    """Remove the scratch folders (scratch_folder) that processes of this host left behind when they
    ended inside one; those of live processes, of other hosts sharing `root` and of other users stay."""
    pattern = re.compile(rf"{re.escape(SCRATCH_PREFIX)}{re.escape(_host_tag())}_(\d+)_")
    for entry in root.glob(f"{SCRATCH_PREFIX}*"):
        found = pattern.match(entry.name)
        if found and _ended(int(found.group(1))) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def scratch_folder(root: Optional[Path] = None) -> Iterator[Path]:
    """A private temporary folder (in `root`, default the system's), removed on leaving; the first
    one a process makes in `root` removes those of ended processes. A trial hands its checkpoint to
    Tune from such a folder, and a trial process killed while it waits inside its report (a worker or
    driver killed, a host reset) never leaves the `with`: a plain TemporaryDirectory stayed behind each
    time (a resnet18 state is 45 MB). The folder's name carries host and pid for a later process to
    tell whether its owner has ended."""
    root = Path(root or tempfile.gettempdir())
    if root not in _SWEPT:  # once a process: a trial makes one a checkpoint
        _SWEPT.add(root)
        remove_ended_scratch(root)
    folder = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{_host_tag()}_{os.getpid()}_", dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
