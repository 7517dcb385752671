import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cifar_ray.config import DataConfig
from cifar_ray.data import (
    CIFAR10_CLASSES,
    DataError,
    cache_path,
    load_dataset,
    make_synthetic,
    resolve_source,
    split_dataset,
)
from conftest import REAL_DATA, class_pixels, fill_disk, png_bytes, write_batches, write_tar, write_tree


def test_synthetic_is_deterministic_and_balanced():
    a = make_synthetic(1200, seed=0)
    b = make_synthetic(1200, seed=0)
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.test_y, b.test_y)
    assert a.train_x.shape == (1000, 3, 32, 32) and a.train_x.dtype == np.uint8
    assert len(a.test_y) == 200
    assert np.bincount(a.train_y).min() > 80
    assert not np.array_equal(make_synthetic(1200, seed=1).train_x, a.train_x)


def test_image_tree_is_decoded_in_class_order(tmp_path):
    root = write_tree(tmp_path / "tree")
    ds = load_dataset(DataConfig(source=str(root), val_size=3))
    assert ds.classes == ("cat", "dog", "frog")
    assert ds.train_x.shape == (18, 3, 32, 32) and ds.test_x.shape == (6, 3, 32, 32)
    assert list(np.bincount(ds.train_y)) == [6, 6, 6]
    # pixel-exact: the first dog training image
    assert np.array_equal(ds.train_x[6], class_pixels(1, 0).transpose(2, 0, 1))


@pytest.mark.parametrize("prefix", ["", "cifar10/"])
def test_tar_archive_read_in_place(tmp_path, prefix):
    archive = write_tar(tmp_path / "data.tar.gz", write_tree(tmp_path / "tree"), prefix)
    ds = load_dataset(DataConfig(source=str(archive), val_size=3))
    assert ds.train_x.shape == (18, 3, 32, 32) and ds.classes == ("cat", "dog", "frog")
    assert not (tmp_path / "train").exists() and not (tmp_path / "cifar10").exists()


def test_pickled_batches_folder_and_archive(tmp_path):
    folder = write_batches(tmp_path / "b")
    ds = load_dataset(DataConfig(source=str(folder), val_size=10))
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.test_x.shape == (10, 3, 32, 32)
    assert ds.classes[0] == "airplane"
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    ds2 = load_dataset(DataConfig(source=str(tmp_path / "cifar-10-python.tar.gz"), val_size=10))
    assert np.array_equal(ds.train_x, ds2.train_x) and np.array_equal(ds.test_y, ds2.test_y)
    # the R plane comes first in each 3072-byte row
    import pickle

    raw = pickle.load(open(folder / "data_batch_1", "rb"), encoding="bytes")[b"data"]
    assert np.array_equal(ds.train_x[0, 0].ravel(), raw[0, :1024])


def test_malicious_pickle_is_refused(tmp_path):
    d = write_batches(tmp_path / "b")
    marker = tmp_path / "pwned"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (d / "data_batch_3").write_bytes(payload)
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR-10 python batch"):
        load_dataset(DataConfig(source=str(d), val_size=10))
    assert not marker.exists()


def test_cache_is_reused_and_keyed_by_source(tmp_path, isolated_cache):
    root = write_tree(tmp_path / "tree")
    cfg = DataConfig(source=str(root), val_size=3)
    load_dataset(cfg)
    files = list(isolated_cache.glob("*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    load_dataset(cfg)
    assert files[0].stat().st_mtime_ns == mtime  # read, not rewritten
    # a changed source gets a new key and is decoded again
    (root / "train" / "cat" / "0000.png").write_bytes(png_bytes(class_pixels(2, 5)))
    os.utime(root / "train" / "cat" / "0000.png", ns=(1, 1))
    ds = load_dataset(cfg)
    assert np.array_equal(ds.train_x[0], class_pixels(2, 5).transpose(2, 0, 1))
    assert len(list(isolated_cache.glob("*.npz"))) == 2


def test_damaged_cache_is_rebuilt(tmp_path, capsys):
    root = write_tree(tmp_path / "tree")
    cfg = DataConfig(source=str(root), val_size=3)
    good = load_dataset(cfg)
    target = cache_path(root, cfg)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # truncated
    again = load_dataset(cfg)
    assert np.array_equal(good.train_x, again.train_x)
    assert "damaged" in capsys.readouterr().err
    flipped = bytearray(target.read_bytes())
    flipped[len(flipped) // 3] ^= 0xFF  # altered inside the pixel data: the zip CRC catches it
    target.write_bytes(bytes(flipped))
    assert np.array_equal(load_dataset(cfg).train_x, good.train_x)


def test_read_only_source_and_cache_beside_nothing(tmp_path, isolated_cache):
    root = write_tree(tmp_path / "tree")
    before = sorted(p.as_posix() for p in root.rglob("*"))
    load_dataset(DataConfig(source=str(root), val_size=3))
    assert sorted(p.as_posix() for p in root.rglob("*")) == before
    assert cache_path(root, DataConfig(source=str(root))).parent == isolated_cache


@pytest.mark.parametrize("refusal", ["full", "read-only"])
def test_a_cache_folder_that_refuses_the_file_costs_the_cache_only(tmp_path, small_disk, refusal, capsys):
    """A full or read-only disk under the cache: the images are decoded and used all the same, a warning
    names the folder and the fix, no partial file is left; before, a sweep on a full cache disk stopped
    blaming its results folder's disk (with gigabytes free) and printed a resume command for a sweep that
    had never started. `data prepare`, whose one job is the cache, exits 1."""
    root = write_tree(tmp_path / "tree")
    cache = small_disk / "cache"
    cache.mkdir()
    if refusal == "full":
        fill_disk(small_disk)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    ds = load_dataset(DataConfig(source=str(root), val_size=3, cache_dir=str(cache)))
    plain = load_dataset(DataConfig(source=str(root), val_size=3))
    assert np.array_equal(ds.train_x, plain.train_x) and np.array_equal(ds.test_y, plain.test_y)
    err = capsys.readouterr().err
    assert f"warning: cannot cache the decoded images in {cache}" in err, err
    assert ("free space there" if refusal == "full" else "at a folder you can write") in err, err
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]  # no cache, whole or partial
    r = subprocess.run([sys.executable, "-m", "cifar_ray.data", "prepare", str(root), "--cache-dir", str(cache)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "error: the cache was not written" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_env_var_serves_cifar10_but_never_overrides(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "tree")
    monkeypatch.setenv("CIFAR_RAY_DATA", str(root))
    assert resolve_source(DataConfig(source="cifar10")) == root
    assert resolve_source(DataConfig(source="synthetic")) == "synthetic"
    other = write_tree(tmp_path / "other", classes=("a", "b"))
    assert resolve_source(DataConfig(source=str(other))) == other.resolve()


def test_offline_download_says_how_to_fix(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    with pytest.raises(DataError, match="CIFAR_RAY_DATA"):
        load_dataset(DataConfig(source="cifar10", data_dir=str(tmp_path / "dl")))


# ---- errors: clear message, nothing written to the cache

def _assert_error(source, match, isolated_cache, **kw):
    with pytest.raises(DataError, match=match):
        load_dataset(DataConfig(source=str(source), val_size=1, **kw))
    assert not list(isolated_cache.glob("*.npz"))


def test_missing_path(tmp_path, isolated_cache):
    _assert_error(tmp_path / "nope", "no such file or folder", isolated_cache)


def test_tree_without_train_test(tmp_path, isolated_cache):
    (tmp_path / "x" / "images").mkdir(parents=True)
    _assert_error(tmp_path / "x", "expected train/ and test/.*found: images", isolated_cache)


def test_archive_without_train_test(tmp_path, isolated_cache):
    tree = tmp_path / "t"
    (tree / "pics" / "cat").mkdir(parents=True)
    (tree / "pics" / "cat" / "1.png").write_bytes(png_bytes(class_pixels(0, 0)))
    _assert_error(write_tar(tmp_path / "a.tar.gz", tree), "no images under train/ and test/.*found: pics",
                  isolated_cache)


def test_class_folders_differ(tmp_path, isolated_cache):
    root = write_tree(tmp_path / "tree")
    for p in (root / "test" / "frog").iterdir():
        p.unlink()
    (root / "test" / "frog").rmdir()
    _assert_error(root, "only in train: \\['frog'\\]", isolated_cache)


def test_empty_class(tmp_path, isolated_cache):
    root = write_tree(tmp_path / "tree")
    (root / "train" / "empty").mkdir()
    (root / "test" / "empty").mkdir()
    _assert_error(root, "class folder without images: test/empty, train/empty", isolated_cache)


def test_wrong_size_image(tmp_path, isolated_cache):
    from PIL import Image

    root = write_tree(tmp_path / "tree")
    Image.new("RGB", (64, 64)).save(root / "train" / "dog" / "0001.png")
    _assert_error(root, "train/dog/0001.png: image is 64x64; every image must be 32x32", isolated_cache)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK"])
def test_grey_palette_and_alpha_images_become_rgb_as_torchvision_reads_them(tmp_path, mode):
    from PIL import Image
    from torchvision.datasets.folder import pil_loader

    root = write_tree(tmp_path / "tree")
    path = root / "test" / "cat" / ("0000.jpg" if mode == "CMYK" else "0000.png")
    (root / "test" / "cat" / "0000.png").unlink()
    Image.fromarray(class_pixels(2, 7)).convert(mode).save(path)
    ds = load_dataset(DataConfig(source=str(root), val_size=3))
    assert np.array_equal(ds.test_x[0], np.asarray(pil_loader(str(path))).transpose(2, 0, 1))


@pytest.mark.parametrize("suffix", [".webp", ".tiff", ".ppm", ".JPEG"])
def test_every_image_suffix_torchvision_reads_is_read(tmp_path, suffix):
    from PIL import Image

    root = write_tree(tmp_path / "tree")
    for png in sorted(root.rglob("*.png"))[::2]:  # half the images in the other format
        Image.open(png).save(png.with_suffix(suffix), format="JPEG" if suffix == ".JPEG" else None,
                             **({"lossless": True} if suffix == ".webp" else {}))
        png.unlink()
    ds = load_dataset(DataConfig(source=str(root), val_size=3))
    assert ds.train_x.shape == (18, 3, 32, 32) and ds.test_x.shape == (6, 3, 32, 32)


def test_a_tar_of_a_folders_contents_with_dot_slash_names(tmp_path):
    """`tar -C tree -czf data.tar.gz .` names its members ./train/cat/0000.png and has a `.` member."""
    tree = write_tree(tmp_path / "tree")
    archive = tmp_path / "data.tar.gz"
    subprocess.run(["tar", "-C", str(tree), "-czf", str(archive), "."], check=True)
    ds = load_dataset(DataConfig(source=str(archive), val_size=3))
    plain = load_dataset(DataConfig(source=str(tree), val_size=3))
    assert np.array_equal(ds.train_x, plain.train_x) and ds.classes == plain.classes


@pytest.mark.parametrize("prefix", ["", "cifar10/"])
def test_zip_archive_read_in_place(tmp_path, prefix):
    import zipfile

    tree = write_tree(tmp_path / "tree")
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(tree.rglob("*")):
            z.write(path, prefix + path.relative_to(tree).as_posix())
    ds = load_dataset(DataConfig(source=str(archive), val_size=3))
    plain = load_dataset(DataConfig(source=str(tree), val_size=3))
    assert np.array_equal(ds.train_x, plain.train_x) and np.array_equal(ds.test_y, plain.test_y)
    assert not (tmp_path / "train").exists() and not (tmp_path / "cifar10").exists()


@pytest.mark.parametrize("kind", ["traversal", "symlink", "bomb"])
def test_hostile_zips_are_refused(tmp_path, isolated_cache, kind):
    import stat
    import zipfile

    tree = write_tree(tmp_path / "tree")
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for path in sorted(tree.rglob("*.png")):
            z.write(path, path.relative_to(tree).as_posix())
        if kind == "traversal":
            z.writestr("../evil.png", png_bytes(class_pixels(0, 0)))
        elif kind == "symlink":
            info = zipfile.ZipInfo("train/cat/link.png")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
        else:  # 64 MiB of zeros, a few KiB compressed
            z.writestr("train/cat/huge.png", bytes(64 << 20))
    _assert_error(archive, {"traversal": "unsafe path", "symlink": "link",
                            "bomb": "far more than a 32x32 image"}[kind], isolated_cache)
    assert not (tmp_path / "evil.png").exists()


def write_binary_batches(root: Path, python_batches: Path) -> Path:
    """The official binary version of the same batches: a label byte, then 3,072 pixel bytes a record."""
    import pickle

    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(python_batches / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        labels = np.asarray(batch[b"labels"], dtype=np.uint8)[:, None]
        (d / f"{name}.bin").write_bytes(np.hstack([labels, batch[b"data"]]).tobytes())
    (d / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n")
    return d


def test_binary_batches_folder_and_archive_equal_the_python_batches(tmp_path, monkeypatch):
    python = load_dataset(DataConfig(source=str(write_batches(tmp_path / "py")), val_size=10))
    folder = write_binary_batches(tmp_path / "bin", tmp_path / "py" / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-bin")
    for source in (folder, folder.parent, archive):
        ds = load_dataset(DataConfig(source=str(source), val_size=10))
        for a, b in ((ds.train_x, python.train_x), (ds.train_y, python.train_y), (ds.test_x, python.test_x),
                     (ds.test_y, python.test_y)):
            assert np.array_equal(a, b)
        assert ds.classes == CIFAR10_CLASSES
    # `cifar10` finds the binary archive in the data folder as it finds the python one
    monkeypatch.delenv("CIFAR_RAY_DATA", raising=False)
    assert resolve_source(DataConfig(source="cifar10", data_dir=str(tmp_path))) == archive


def test_a_damaged_binary_batch_is_named(tmp_path, isolated_cache):
    folder = write_binary_batches(tmp_path / "bin", write_batches(tmp_path / "py"))
    with open(folder / "data_batch_3.bin", "ab") as f:
        f.write(b"\0" * 7)
    _assert_error(folder, "data_batch_3.bin: .* not a whole number of 3073-byte", isolated_cache)
    (folder / "test_batch.bin").unlink()
    _assert_error(folder, "lacks test_batch.bin", isolated_cache)


def test_a_folder_holding_one_folder_is_read_from_it(tmp_path):
    """An archive unpacked into a folder of its own (data/cifar10/train/...): the one folder is the data."""
    tree = write_tree(tmp_path / "data" / "cifar10")
    (tmp_path / "data" / ".DS_Store").write_bytes(b"\0")
    ds = load_dataset(DataConfig(source=str(tmp_path / "data"), val_size=3))
    assert np.array_equal(ds.train_x, load_dataset(DataConfig(source=str(tree), val_size=3)).train_x)


def test_undecodable_file_is_named(tmp_path, isolated_cache):
    root = write_tree(tmp_path / "tree")
    (root / "train" / "cat" / "0003.png").write_bytes(b"not an image at all")
    _assert_error(root, "train/cat/0003.png: cannot decode", isolated_cache)


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink", "bomb"])
def test_hostile_archives_are_refused(tmp_path, isolated_cache, kind):
    import io

    tree = write_tree(tmp_path / "tree")
    archive = write_tar(tmp_path / "a.tar", tree)
    with tarfile.open(archive, "a") as tar:
        if kind in ("traversal", "absolute"):
            info = tarfile.TarInfo("../evil.png" if kind == "traversal" else "/tmp/evil.png")
            data = png_bytes(class_pixels(0, 0))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        elif kind == "symlink":
            info = tarfile.TarInfo("train/cat/link.png")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info = tarfile.TarInfo("train/cat/huge.png")
            info.size = 64 << 20
            tar.addfile(info, io.BytesIO(bytes(info.size)))
    _assert_error(archive, {"traversal": "unsafe path", "absolute": "unsafe path", "symlink": "link",
                            "bomb": "far more than a 32x32 image"}[kind], isolated_cache)
    assert not (tmp_path / "evil.png").exists()


# ---- split

def test_split_is_seeded_stratified_and_disjoint():
    ds = make_synthetic(6000)
    cfg = DataConfig(source="synthetic", val_size=1000, train_size=2000, split_seed=3)
    a, b = split_dataset(ds, cfg), split_dataset(ds, cfg)
    assert np.array_equal(a.train_idx, b.train_idx) and np.array_equal(a.val_idx, b.val_idx)
    assert len(a.val_idx) == 1000 and len(a.train_idx) == 2000
    assert not set(a.train_idx) & set(a.val_idx)
    full_counts = np.bincount(ds.train_y, minlength=10) / len(ds.train_y)
    for idx, n in ((a.val_idx, 1000), (a.train_idx, 2000)):
        assert np.abs(np.bincount(ds.train_y[idx], minlength=10) - full_counts * n).max() <= 1
    c = split_dataset(ds, cfg.model_copy(update={"split_seed": 4}))
    assert not np.array_equal(a.val_idx, c.val_idx)


def test_train_size_subset_of_sorted_archive_covers_every_class(tmp_path):
    root = write_tree(tmp_path / "tree", classes=tuple("abcdefghij"), per_class=(10, 1))
    ds = load_dataset(DataConfig(source=str(root), val_size=10))
    split = split_dataset(ds, DataConfig(source=str(root), val_size=10, train_size=20))
    assert list(np.bincount(ds.train_y[split.train_idx], minlength=10)) == [2] * 10


def test_normalisation_stats_are_the_training_split_s():
    ds = make_synthetic(1200)
    split = split_dataset(ds, DataConfig(source="synthetic", val_size=200))
    pixels = ds.train_x[split.train_idx].astype(np.float64) / 255
    assert np.allclose(split.mean, pixels.mean(axis=(0, 2, 3)), atol=1e-9)
    assert np.allclose(split.std, pixels.std(axis=(0, 2, 3)), atol=1e-6)


def test_val_size_too_large_names_the_key():
    with pytest.raises(DataError, match="data.val_size: 5000 is not smaller"):
        split_dataset(make_synthetic(1200), DataConfig(source="synthetic", val_size=5000))


def test_data_cli_prepare_and_info(tmp_path):
    root = write_tree(tmp_path / "tree")
    env = {**os.environ, "CIFAR_RAY_CACHE": str(tmp_path / "c")}

    def run(*a):
        return subprocess.run([sys.executable, "-m", "cifar_ray.data", *a], capture_output=True, text=True, env=env)

    r = run("info", str(root), "--val-size", "3")
    assert r.returncode == 2 and "not cached yet" in r.stderr
    r = run("prepare", str(root), "--val-size", "3")
    assert r.returncode == 0, r.stderr
    assert "cat                6       2" in r.stdout and "total             18       6" in r.stdout
    assert "cache: " in r.stdout
    r = run("info", str(root), "--val-size", "3")
    assert r.returncode == 0 and "total             18       6" in r.stdout
    r = run("prepare", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = run("info", "synthetic", "--val-size", "0")
    assert r.returncode == 2 and r.stderr == "error: options: val_size: Input should be greater than or equal to 1\n"


@pytest.mark.skipif(not REAL_DATA, reason="CIFAR_RAY_DATA does not point at real CIFAR-10")
def test_real_data_counts(real_cache):
    ds = load_dataset(DataConfig(source=REAL_DATA, cache_dir=str(real_cache)))
    assert ds.train_x.shape == (50_000, 3, 32, 32) and ds.test_x.shape == (10_000, 3, 32, 32)
    assert list(np.bincount(ds.train_y)) == [5000] * 10 and list(np.bincount(ds.test_y)) == [1000] * 10
