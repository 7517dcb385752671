"""One driver per results folder: a sweep's driver holds an exclusive lock on `<results>/.driver.lock`
while it runs, so a second driver on the same folder (a `--resume` typed in another terminal while the
sweep still runs, or the same sweep started twice) stops before it trains or writes anything. Two
drivers on one folder each train its unfinished trials again and overwrite each other's record: seen as
a trial with two histories of 40 epochs, Tune failing on checkpoints the other driver had rotated away,
and a finished trial marked errored.

The lock is flock(2): the kernel drops it when the process ends however it ends (kill -9 too), so no
lock is ever left stale and a resume after any accident takes it at once. It holds across hosts on NFS
(Linux maps flock to NFS byte-range locks). The file holds who holds it, for the message.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

LOCK_FILE = ".driver.lock"
# A reader asking whether a driver runs (running_driver) holds the lock shared for an instant: a driver
# taking it in that instant tries again for up to TAKE_TRIES x TAKE_PAUSE_S (2 s: a reader descheduled
# on a busy machine can hold it for milliseconds) before it calls the folder in use. A driver holds it
# for its whole sweep, so a real second driver is still refused, 2 s later.
TAKE_TRIES = 100
TAKE_PAUSE_S = 0.02


class FolderInUse(Exception):
    """Another live process holds the folder's driver lock; the message says who, when known."""


def holder_text(raw: bytes) -> str:
    """`pid 123 on host vm since 2026-12-05 18:11:02 UTC`, or '' for a file that says nothing readable."""
    try:
        who = json.loads(raw.decode("utf-8", "replace") or "{}")
        return f"pid {int(who['pid'])} on host {who['host']} since {who['since']}"
    except (ValueError, KeyError, TypeError):
        return ""


def take(folder: Path) -> Optional[int]:
    """Take the folder's driver lock and write this process into it: the open descriptor, to keep open
    while the sweep runs (release() closes it). None where the folder cannot hold the file (a read-only
    or full disk: the sweep's own writes then say so). Raises FolderInUse while another process holds it."""
    try:  # O_NOFOLLOW: a link planted at the lock's name is never followed to a file elsewhere
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise FolderInUse(f"{folder / LOCK_FILE} is a symbolic link; a results folder holds plain files "
                              "only (remove it)") from None
        return None
    for attempt in range(1, TAKE_TRIES + 1):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN) and attempt < TAKE_TRIES:
                time.sleep(TAKE_PAUSE_S)  # a reader's probe, over in an instant, or a driver: asked again
                continue
            raw = os.pread(fd, 4096, 0)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None  # a file system without locks: nothing to guard with
            who = holder_text(raw)
            raise FolderInUse(f"another sweep driver is running on it{f' ({who})' if who else ''}") from None
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds all the same, only the message lacks its holder
    return fd


def running_driver(folder: Path) -> Optional[str]:
    """The driver running on the folder now, as `pid 123 on host vm since ...` ("a sweep driver" where its
    file says nothing readable); None when none is: the sweep ended, was interrupted, or never ran, or
    the folder's file system has no locks. A driver on another host shows where the lock spans hosts
    (NFS). The lock is only tried, shared, and let go at once: take() waits that instant out."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # no lock file (no driver since locks were kept), or a link: not a driver's
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        held = err.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        return (holder_text(os.pread(fd, 4096, 0)) or "a sweep driver") if held else None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def release(fd: Optional[int]) -> None:
    """Let the folder go (the file stays: removing it could race a driver taking it)."""
    if fd is not None:
        os.close(fd)


@contextmanager
def held(folder: Path) -> Iterator[list[Optional[int]]]:
    """The lock for a with-block: a one-slot list holding the descriptor, taken now when the folder
    exists or later by the caller (`slot[0] = take(folder)`, once it has made the folder); released on
    leaving the block."""
    slot: list[Optional[int]] = [take(folder) if folder.is_dir() else None]
    try:
        yield slot
    finally:
        release(slot[0])
