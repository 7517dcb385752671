"""One driver per results folder (cifar_ray.driver_lock): the lock, its holder's line, and its end with
the process that held it, however that process ended. The sweep's use of it: tests/test_reliability.py."""
import fcntl
import os
import re
import subprocess

import pytest

from cifar_ray import driver_lock
from cifar_ray.driver_lock import LOCK_FILE, FolderInUse
from conftest import WAIT_S, hold_driver_lock


def test_a_held_folder_is_refused_naming_its_holder_and_free_once_the_holder_is_killed(tmp_path):
    proc = hold_driver_lock(tmp_path)
    try:
        with pytest.raises(FolderInUse, match=f"another sweep driver is running on it \\(pid {proc.pid} on host .+ "
                                              "since 20[0-9-]+ [0-9:]+ UTC\\)"):
            driver_lock.take(tmp_path)
    finally:
        proc.kill()  # kill -9 of the process this test started: the kernel drops its lock
        proc.wait(timeout=WAIT_S)
    fd = driver_lock.take(tmp_path)
    assert fd is not None
    driver_lock.release(fd)


def test_a_lock_released_in_this_process_can_be_taken_again_and_the_file_stays(tmp_path):
    with driver_lock.held(tmp_path) as slot:
        assert slot[0] is not None
        with pytest.raises(FolderInUse):  # a second open of the file is a second holder, even in one process
            driver_lock.take(tmp_path)
    assert (tmp_path / LOCK_FILE).is_file()
    with driver_lock.held(tmp_path) as slot:
        assert slot[0] is not None


def test_a_folder_not_made_yet_is_taken_by_the_caller_once_made(tmp_path):
    folder = tmp_path / "new"
    with driver_lock.held(folder) as slot:
        assert slot[0] is None and not folder.exists()  # nothing is made before the sweep makes its folder
        folder.mkdir()
        slot[0] = driver_lock.take(folder)
        with pytest.raises(FolderInUse):
            driver_lock.take(folder)
    driver_lock.release(driver_lock.take(folder))


def test_a_link_at_the_locks_name_is_refused_and_never_followed(tmp_path):
    target = tmp_path / "elsewhere"
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / LOCK_FILE).symlink_to(target)
    with pytest.raises(FolderInUse, match="is a symbolic link"):
        driver_lock.take(tmp_path / "results")
    assert not target.exists()


def test_a_holder_file_that_says_nothing_readable_still_refuses(tmp_path):
    proc = hold_driver_lock(tmp_path)
    try:
        (tmp_path / LOCK_FILE).write_bytes(b"\xff\x00 not json")  # the lock is the kernel's, not the text's
        with pytest.raises(FolderInUse, match="another sweep driver is running on it\\.?$"):
            driver_lock.take(tmp_path)
    finally:
        proc.stdin.close()
        proc.wait(timeout=WAIT_S)
    driver_lock.release(driver_lock.take(tmp_path))


def test_running_driver_names_the_holder_while_it_runs_and_nothing_once_it_has_ended(tmp_path):
    assert driver_lock.running_driver(tmp_path) is None  # no lock file: no driver since locks were kept
    proc = hold_driver_lock(tmp_path)
    try:
        for _ in range(2):  # asking takes nothing from the holder
            assert re.fullmatch(f"pid {proc.pid} on host .+ since 20[0-9-]+ [0-9:]+ UTC",
                                driver_lock.running_driver(tmp_path) or "")
        with pytest.raises(FolderInUse):
            driver_lock.take(tmp_path)
    finally:
        proc.kill()  # kill -9 of the process this test started: an interrupted sweep
        proc.wait(timeout=WAIT_S)
    assert driver_lock.running_driver(tmp_path) is None
    driver_lock.release(driver_lock.take(tmp_path))
    link = tmp_path / "linked"
    link.mkdir()
    (link / LOCK_FILE).symlink_to(tmp_path / LOCK_FILE)  # a link at the lock's name is no driver's
    assert driver_lock.running_driver(link) is None


def test_a_driver_that_starts_while_a_reader_asks_waits_the_question_out(tmp_path, monkeypatch):
    """running_driver holds the lock shared for an instant; a driver taking it then is not refused. The
    reader's instant here ends at the driver's first pause (its first try found the lock held); a reader
    that never lets go is a holder, and refuses it after TAKE_TRIES tries."""
    (tmp_path / LOCK_FILE).touch()
    reader = os.open(tmp_path / LOCK_FILE, os.O_RDONLY)
    fcntl.flock(reader, fcntl.LOCK_SH | fcntl.LOCK_NB)
    pauses: list[float] = []

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        fcntl.flock(reader, fcntl.LOCK_UN)  # the reader's question is over

    monkeypatch.setattr(driver_lock.time, "sleep", pause)
    try:
        fd = driver_lock.take(tmp_path)
        assert fd is not None and len(pauses) == 1
        driver_lock.release(fd)
        fcntl.flock(reader, fcntl.LOCK_SH | fcntl.LOCK_NB)
        pauses.clear()
        monkeypatch.setattr(driver_lock.time, "sleep", pauses.append)  # it holds on
        with pytest.raises(FolderInUse, match="another sweep driver is running on it"):
            driver_lock.take(tmp_path)
        assert len(pauses) == driver_lock.TAKE_TRIES - 1
    finally:
        os.close(reader)


def test_a_folder_that_cannot_hold_the_file_is_not_guarded(small_disk):
    """A read-only folder: no lock, no error here (the sweep's own writes then say what is wrong)."""
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert driver_lock.take(small_disk) is None
