"""cifar_ray.storage: Tune's files written whole or not at all, and checkpoint deletions deferred until
a later experiment snapshot is on storage; cifar_ray.files' checkpoint scratch folders. Real files and
processes; the full disk is a real tmpfs (root)."""
import os
import pickle
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cifar_ray.storage import disk_full, free_bytes, human_bytes, snapshot_serialized, whole_file_filesystem


def test_a_copy_that_runs_out_of_space_leaves_the_old_file_and_no_temporary(tmp_path, small_disk):
    fs = whole_file_filesystem()
    src = tmp_path / "src"
    src.mkdir()
    (src / "state.pt").write_bytes(os.urandom(80 << 20))  # more than the 64 MB disk holds
    (small_disk / "state.pt").write_bytes(b"the previous checkpoint")
    with pytest.raises(OSError) as failed:
        pafs.copy_files(str(src), str(small_disk), destination_filesystem=fs)
    assert disk_full(failed.value)
    assert (small_disk / "state.pt").read_bytes() == b"the previous checkpoint"
    assert sorted(p.name for p in small_disk.iterdir()) == ["state.pt"]
    assert free_bytes(small_disk) > 60 << 20  # the temporary file's space was given back
    (src / "state.pt").write_bytes(b"new")
    pafs.copy_files(str(src), str(small_disk), destination_filesystem=fs)
    assert (small_disk / "state.pt").read_bytes() == b"new"


def test_files_get_the_umask_mode_and_the_filesystem_pickles(tmp_path):
    fs = whole_file_filesystem()
    with fs.open_output_stream(str(tmp_path / "a.json")) as f:
        f.write(b"{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~_umask()  # what open() would give
    again = pickle.loads(pickle.dumps(fs))  # Tune sends it to every trial worker
    assert again == fs and again.type_name == fs.type_name


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_a_rotated_checkpoint_is_deleted_only_after_a_later_snapshot(tmp_path):
    """A checkpoint Tune rotates out is deleted once a state written to the staging folder after the
    deletion request is whole on storage; not when a state written before it is copied, even if that copy
    is opened after the request (Tune uploads in a thread of its own while its loop goes on)."""
    from ray.train._internal.storage import _delete_fs_path

    fs = whole_file_filesystem()
    old = tmp_path / "trial" / "checkpoint_000001"
    old.mkdir(parents=True)
    (old / "state.pt").write_bytes(b"x")
    snapshot_serialized("experiment_state-a.json")  # the controller writes a state naming checkpoint_000001
    with fs.open_output_stream(str(tmp_path / "experiment_state-a.json")) as early:  # opened before the request
        _delete_fs_path(fs=fs, fs_path=str(old))  # what Tune's checkpoint manager calls
        early.write(b"{}")
    assert old.exists(), "deleted while a snapshot naming it could still be the newest on storage"
    with fs.open_output_stream(str(tmp_path / "experiment_state-a.json")) as copied_late:  # the same state
        copied_late.write(b"{}")
    assert old.exists(), "deleted when a state written before the request reached storage"
    other = tmp_path / "trial" / "notes"
    other.mkdir()
    fs.delete_dir(str(other))  # anything else goes at once
    assert not other.exists()
    snapshot_serialized("experiment_state-a.json")  # a state written after the request
    with fs.open_output_stream(str(tmp_path / "experiment_state-a.json")) as later:
        later.write(b"{}")
    assert not old.exists()


def staging_and_storage(tmp_path: Path):
    """Tune's staging folder and a results folder on the whole-file filesystem, with one of a trial's
    checkpoints on storage: (filesystem, staging, storage, the checkpoint's folder)."""
    staging, storage = tmp_path / "staging", tmp_path / "results"
    staging.mkdir()
    storage.mkdir()
    rotated = storage / "trial" / "checkpoint_000001"
    rotated.mkdir(parents=True)
    return whole_file_filesystem(), staging, storage, rotated


def test_a_resumed_drivers_older_states_copied_again_release_no_checkpoint(tmp_path):
    """A resumed driver's staging folder holds the states of the drivers before it (Tune copies the
    results folder into it) and uploads them again beside its own. Only its own state, the newest one
    that a resume reads, makes a rotated checkpoint safe to delete once it is whole on storage: an older
    driver's state copied whole after the request still names the checkpoint as that trial's latest."""
    from ray.train._internal.storage import _delete_fs_path

    fs, staging, storage, rotated = staging_and_storage(tmp_path)
    (staging / "experiment_state-earlier.json").write_bytes(b'{"trial_data": ["names checkpoint_000001"]}')
    _delete_fs_path(fs=fs, fs_path=str(rotated))  # this driver rotates checkpoint_000001 out
    snapshot_serialized("experiment_state-now.json")  # and writes its own state without it, not yet uploaded
    pafs.copy_files(str(staging), str(storage), destination_filesystem=fs)  # the older state goes up again
    assert (storage / "experiment_state-earlier.json").is_file()
    assert rotated.exists(), "deleted when an older driver's state reached storage, before this driver's own"
    (staging / "experiment_state-now.json").write_bytes(b'{"trial_data": ["names checkpoint_000002"]}')
    pafs.copy_files(str(staging), str(storage), destination_filesystem=fs)
    assert not rotated.exists()


def test_sizes_read_as_people_write_them():
    assert [human_bytes(n) for n in (0, 999, 1500, 2_500_000, None)] == ["0 B", "999 B", "1.5 KB", "2.5 MB", "unknown"]


def test_a_scratch_folder_of_an_ended_process_is_removed_by_the_next_one(tmp_path):
    """Tune ends a trial it stops while the trial waits inside its report, so a checkpoint's scratch
    folder is never left by its `with`: the next one on the host removes it, and only it."""
    import subprocess
    import sys

    from cifar_ray.files import SCRATCH_PREFIX, _host_tag, scratch_folder

    code = ("import sys, pathlib; from cifar_ray.files import scratch_folder\n"
            "with scratch_folder(pathlib.Path(sys.argv[1])) as d:\n"
            "    (d / 'state.pt').write_bytes(b'x' * 1000); print(d, flush=True); sys.stdin.read()\n")
    ended = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    left = Path(ended.stdout.readline().strip())
    ended.kill()  # ended inside its `with`, as a trial Tune stops inside tune.report
    ended.wait()
    assert left.is_dir()
    live = tmp_path / f"{SCRATCH_PREFIX}{_host_tag()}_{os.getpid()}_live"
    other_host = tmp_path / f"{SCRATCH_PREFIX}elsewhere_{ended.pid}_x"
    for kept in (live, other_host):
        kept.mkdir()
    with scratch_folder(tmp_path) as folder:
        assert folder.is_dir() and folder.name.startswith(f"{SCRATCH_PREFIX}{_host_tag()}_{os.getpid()}_")
        assert not left.exists()
    assert not folder.exists()
    assert live.is_dir() and other_host.is_dir()


def test_a_state_file_copied_while_tune_rewrites_it_never_replaces_the_whole_one(tmp_path):
    """Tune rewrites its experiment and searcher states in its staging folder in place while its upload
    thread may be copying them: a copy cut short keeps the state on storage (and the checkpoint
    deletions it would have made safe wait); the next whole copy replaces it. Copied as Ray's upload
    does (pyarrow.fs.copy_files from the local staging folder)."""
    from ray.train._internal.storage import _delete_fs_path

    fs, staging, storage, rotated = staging_and_storage(tmp_path)
    names = ("experiment_state-2026.json", "basic-variant-state-2026.json")
    whole = {name: b'{"trial_data": [1, 2, 3], "runner_data": {}}' for name in names}
    for name in names:
        (staging / name).write_bytes(whole[name])
    pafs.copy_files(str(staging), str(storage), destination_filesystem=fs)
    _delete_fs_path(fs=fs, fs_path=str(rotated))
    snapshot_serialized(names[0])  # the controller writes a state no longer naming checkpoint_000001 ...
    for name in names:  # ... and the upload reads it while it is being written
        (staging / name).write_bytes(whole[name][:17])
    pafs.copy_files(str(staging), str(storage), destination_filesystem=fs)
    assert {name: (storage / name).read_bytes() for name in names} == whole
    assert rotated.exists(), "deleted although the state that no longer names it did not reach storage"
    assert not list(storage.glob(".*.tmp"))
    newer = b'{"trial_data": [1, 2, 3, 4], "runner_data": {}}'
    for name in names:
        (staging / name).write_bytes(newer)
    pafs.copy_files(str(staging), str(storage), destination_filesystem=fs)
    assert all((storage / name).read_bytes() == newer for name in names)
    assert not rotated.exists()


def test_the_searchers_pickled_state_reaches_the_results_folder_whole_and_a_copy_cut_short_does_not(tmp_path):
    """Ray writes a grid or random search's state as a pickle under a .json name (basic-variant-state-
    *.json). Checked as JSON, every copy was dropped, so a resume that did not find the old driver's
    staging folder restarted the search with nothing left to make (the trials it had not yet made were
    lost; tests/test_resume_property.py runs that). Written by Ray's own save_to_dir, copied as its upload
    does, restored by its own restore_from_dir."""
    from ray.tune.search import BasicVariantGenerator

    fs, staging, storage, _ = staging_and_storage(tmp_path)
    BasicVariantGenerator(points_to_evaluate=[{"train.lr": 0.1}]).save_to_dir(str(staging), session_str="2026")
    name = "basic-variant-state-2026.json"
    whole = (staging / name).read_bytes()
    assert whole[:1] == b"\x80"  # a pickle, whatever the name says
    pafs.copy_files(str(staging), str(storage), destination_filesystem=fs)
    assert (storage / name).read_bytes() == whole
    for cut in (1, len(whole) // 2, len(whole) - 1):  # a copy read while Ray rewrote the file
        (staging / name).write_bytes(whole[:cut])
        pafs.copy_files(str(staging), str(storage), destination_filesystem=fs)
        assert (storage / name).read_bytes() == whole, cut
    assert not list(storage.glob(".*.tmp"))
    restored = BasicVariantGenerator()
    assert restored.has_checkpoint(str(storage))
    restored.restore_from_dir(str(storage))
    assert restored._points_to_evaluate == [{"train.lr": 0.1}]
