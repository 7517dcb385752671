"""CIFAR-10 sources, the decoded-pixel cache and the seeded train/val split.

`python -m cifar_ray.data prepare SOURCE` decodes and caches a source; `info SOURCE` reads the cache.
Sources: `cifar10` (local copy, else download), `synthetic`, or a path to an image-folder tree, a
.tar/.tar.gz/.zip of one, a `cifar-10-batches-py` or `cifar-10-batches-bin` folder, or
`cifar-10-python.tar.gz` / `cifar-10-binary.tar.gz`.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import io
import os
import pickle
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional

import numpy as np

from cifar_ray.config import DataConfig
from cifar_ray.files import atomic_write, printable
from cifar_ray.pipes import run_main

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# What torchvision's ImageFolder reads (torchvision.datasets.folder.IMG_EXTENSIONS), any case
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_FORMAT = 1  # bump when the cache layout changes
ENV_DATA = "CIFAR_RAY_DATA"
ENV_CACHE = "CIFAR_RAY_CACHE"
# A 32x32 RGB image is 3 KiB raw; a member this large in an archive is not one (or is a bomb).
MAX_MEMBER_BYTES = 1 << 20
MAX_IMAGES = 2_000_000


class DataError(ValueError):
    """A data problem phrased for the user; nothing has been written to the cache."""


@dataclass(frozen=True)
class Dataset:
    """Decoded pixels: images (N, 3, 32, 32) uint8, labels (N,) int64, for train and test."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]


@dataclass(frozen=True)
class Split:
    """Indices into Dataset.train_x for training and validation, and the training set's stats."""

    train_idx: np.ndarray
    val_idx: np.ndarray
    mean: tuple[float, float, float]  # per channel, on the [0, 1] scale
    std: tuple[float, float, float]


# ---------------------------------------------------------------- where things live

def cache_root(cache_dir: Optional[str] = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cifar_ray"


def download_dir(cfg: DataConfig) -> Path:
    return Path(cfg.data_dir).expanduser() if cfg.data_dir else cache_root(cfg.cache_dir) / "downloads"


def resolve_source(cfg: DataConfig) -> str | Path:
    """`synthetic`, or the path to read. For `cifar10`: $CIFAR_RAY_DATA, then the data directory;
    None-like result means "download". An explicit path or `synthetic` is never overridden."""
    if cfg.source == "synthetic":
        return "synthetic"
    if cfg.source == "cifar10":
        env = os.environ.get(ENV_DATA)
        if env:
            path = Path(env).expanduser()
            if not path.exists():
                raise DataError(f"{ENV_DATA}={env}: no such file or folder; unset it or point it at a CIFAR-10 copy")
            return path
        local = download_dir(cfg)
        for candidate in (local / "cifar-10-batches-py", local / "cifar-10-python.tar.gz",
                          local / "cifar-10-batches-bin", local / "cifar-10-binary.tar.gz"):
            if candidate.exists():
                return candidate
        return "download"
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise DataError(f"data.source: {cfg.source}: no such file or folder "
                        "(use cifar10, synthetic, or a path to an image folder or archive)")
    return path.resolve()


# ---------------------------------------------------------------- synthetic

def make_synthetic(size: int, seed: int = 0) -> Dataset:
    """Learnable CIFAR-shaped data, deterministic in (size, seed). Each class is a blocky random colour
    pattern (70% shared by all classes, 30% its own); an image is its class pattern shifted by up to
    4 px, with random contrast and brightness and Gaussian noise. 5/6 train, 1/6 test."""
    import torch  # torch's generator makes the noise several times faster than numpy's

    g = torch.Generator().manual_seed(seed)
    n_classes, max_shift = len(CIFAR10_CLASSES), 4
    common = torch.rand(1, 3, 4, 4, generator=g)
    coarse = 0.7 * common + 0.3 * torch.rand(n_classes, 3, 4, 4, generator=g)
    protos = coarse.repeat_interleave(8, 2).repeat_interleave(8, 3)  # (10, 3, 32, 32)
    shifts = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
    table = torch.stack([protos.roll(s, dims=(2, 3)) for s in shifts], 1)  # (10, 81, 3, 32, 32)
    labels = (torch.arange(size) % n_classes)[torch.randperm(size, generator=g)]
    images = table[labels, torch.randint(0, len(shifts), (size,), generator=g)]  # (N, 3, 32, 32)
    contrast = torch.rand(size, 1, 1, 1, generator=g) * 0.5 + 0.5
    brightness = torch.rand(size, 1, 1, 1, generator=g) * 0.3 - 0.15
    images.sub_(0.5).mul_(contrast).add_(0.5 + brightness)
    images.add_(torch.randn(images.shape, generator=g), alpha=0.35)
    pixels = images.mul_(255).clamp_(0, 255).to(torch.uint8).numpy()
    targets = labels.numpy().astype(np.int64)
    n_test = max(size // 6, n_classes)
    return Dataset(pixels[n_test:], targets[n_test:], pixels[:n_test], targets[:n_test], CIFAR10_CLASSES)


# ---------------------------------------------------------------- decoding

def _decode_image(raw: bytes, name: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            if img.size != (32, 32):
                raise DataError(f"{name}: image is {img.size[0]}x{img.size[1]}; every image must be 32x32")
            # grey, palette, RGBA or CMYK files become RGB, as torchvision's ImageFolder loader makes them
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types for a bad file
        raise DataError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from None


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    p = PurePosixPath(member.name)
    if p.is_absolute() or ".." in p.parts:
        raise DataError(f"{archive}: refusing member with an unsafe path: {member.name!r}")
    if member.issym() or member.islnk() or member.isdev() or member.isfifo():
        raise DataError(f"{archive}: refusing link or special file member: {member.name!r}")
    if member.size > MAX_MEMBER_BYTES:
        raise DataError(f"{archive}: member {member.name!r} is {member.size} bytes, far more than a 32x32 image; "
                        "refusing it")


def _iter_archive(path: Path) -> Iterator[tuple[str, Optional[bytes]]]:
    """Yield (member name, bytes) of regular files and (name, None) of folders, in place, without
    extracting anything to disk."""
    # a tar first: is_zipfile finds a zip's end record in the last 64 KiB, so a tar ending in a .zip
    # member would pass for that zip
    if not tarfile.is_tarfile(path) and zipfile.is_zipfile(path):
        yield from _iter_zip(path)
        return
    try:
        with tarfile.open(path, "r:*") as tar:
            count = 0
            for member in tar:
                _check_member(member, path)
                if member.isdir():
                    yield member.name, None
                    continue
                if not member.isfile():
                    continue
                count += 1
                if count > MAX_IMAGES:
                    raise DataError(f"{path}: more than {MAX_IMAGES} files; refusing it as a likely archive bomb")
                f = tar.extractfile(member)
                yield member.name, f.read() if f else b""
    except (tarfile.TarError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable tar archive ({exc})") from None


def _iter_zip(path: Path) -> Iterator[tuple[str, Optional[bytes]]]:
    """A .zip archive's members as _iter_archive yields a tar's, with the same refusals."""
    import stat

    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if sum(not m.is_dir() for m in members) > MAX_IMAGES:
                raise DataError(f"{path}: more than {MAX_IMAGES} files; refusing it as a likely archive bomb")
            for member in members:
                p = PurePosixPath(member.filename)
                if p.is_absolute() or ".." in p.parts or "\\" in member.filename:
                    raise DataError(f"{path}: refusing member with an unsafe path: {member.filename!r}")
                if stat.S_ISLNK(member.external_attr >> 16):
                    raise DataError(f"{path}: refusing link member: {member.filename!r}")
                if member.is_dir():
                    yield member.filename.rstrip("/"), None
                    continue
                if member.file_size > MAX_MEMBER_BYTES:
                    raise DataError(f"{path}: member {member.filename!r} is {member.file_size} bytes, far more than "
                                    "a 32x32 image; refusing it")
                yield member.filename, archive.read(member)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
        raise DataError(f"{path}: not a readable zip archive ({type(exc).__name__}: {exc})") from None


def _iter_tree(root: Path) -> Iterator[tuple[str, Optional[bytes]]]:
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            continue  # a tree's links could point anywhere; only regular files inside it count
        if path.is_dir():
            yield path.relative_to(root).as_posix(), None
        elif path.is_file():
            yield path.relative_to(root).as_posix(), path.read_bytes()


def _image_folder(entries: Iterator[tuple[str, Optional[bytes]]], where: Path, total: Optional[int]) -> Dataset:
    """Decode `[prefix/]train|test/<class>/<image>` entries (raw None for a folder) into a Dataset,
    checking the layout."""
    from tqdm import tqdm

    # split -> class -> (file name, pixels); sorted by name at the end, so that an archive decodes to the
    # same images in the same order as its unpacked tree, whatever order its packer wrote
    found: dict[str, dict[str, list[tuple[str, np.ndarray]]]] = {"train": {}, "test": {}}
    top_level: set[str] = set()
    class_dirs: list[tuple[str, ...]] = []
    prefix: Optional[tuple[str, ...]] = None
    for name, raw in tqdm(entries, total=total, desc=f"decoding {where.name}", unit="file", file=sys.stderr,
                          disable=None, mininterval=1.0):
        parts = PurePosixPath(name).parts
        if not parts:  # the archive's own root, "." or "./" (tar -C DIR -cf X.tar .)
            continue
        top_level.add(parts[0])
        if raw is None:
            if len(parts) >= 2 and parts[-2] in found:
                class_dirs.append(parts)
            continue
        if len(parts) < 3 or parts[-3] not in found or not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        if prefix is None:
            prefix = parts[:-3]
        elif parts[:-3] != prefix:
            continue  # a second tree elsewhere in the archive is not part of this data set
        found[parts[-3]].setdefault(parts[-2], []).append((parts[-1], _decode_image(raw, f"{where}:{name}")))
    empty = sorted("/".join(p[-2:]) for p in class_dirs if p[:-2] == (prefix or ()) and p[-1] not in found[p[-2]])
    if empty:
        raise DataError(f"{where}: class folder without images: {', '.join(empty)}; add images "
                        f"({', '.join(IMAGE_SUFFIXES)}) or remove it")
    missing = [s for s in ("train", "test") if not found[s]]
    if missing:
        seen = ", ".join(sorted(top_level)[:10]) or "nothing"
        raise DataError(f"{where}: no images under {' and '.join(m + '/' for m in missing)}; expected "
                        f"train/<class>/*.png|jpg and test/<class>/*, CIFAR-10 python or binary batches; "
                        f"found: {seen}")
    if sorted(found["train"]) != sorted(found["test"]):
        only_train = sorted(set(found["train"]) - set(found["test"]))
        only_test = sorted(set(found["test"]) - set(found["train"]))
        raise DataError(f"{where}: class folders differ between train and test "
                        f"(only in train: {only_train or 'none'}; only in test: {only_test or 'none'})")
    classes = tuple(sorted(found["train"]))
    arrays = []
    for split in ("train", "test"):
        xs: list[np.ndarray] = []
        ys: list[int] = []
        for label, cls in enumerate(classes):
            xs.extend(pixels for _, pixels in sorted(found[split][cls], key=lambda named: named[0]))
            ys.extend([label] * len(found[split][cls]))
        arrays += [np.stack(xs), np.asarray(ys, dtype=np.int64)]
    train_x, train_y, test_x, test_y = arrays
    return Dataset(train_x, train_y, test_x, test_y, classes)


class _BatchUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles: allow only the numpy/builtin names they use, so a crafted
    file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def _read_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
        x = np.frombuffer(bytes(d[b"data"]), dtype=np.uint8) if not isinstance(d[b"data"], np.ndarray) else d[b"data"]
        x = np.ascontiguousarray(x, dtype=np.uint8).reshape(-1, 3, 32, 32)  # rows are R(1024) G B planes
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as exc:
        raise DataError(f"{name}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    if len(x) != len(y):
        raise DataError(f"{name}: {len(x)} images but {len(y)} labels")
    return x, y


def _pickled(entries: dict[str, bytes], where: Path) -> Dataset:
    train = [_read_batch(entries[f"data_batch_{i}"], f"{where}:data_batch_{i}") for i in range(1, 6)]
    test = _read_batch(entries["test_batch"], f"{where}:test_batch")
    return Dataset(np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]),
                   test[0], test[1], CIFAR10_CLASSES)


BATCH_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
# The official binary version (cifar-10-binary.tar.gz): the same batches as fixed-size records
BIN_NAMES = [n + ".bin" for n in BATCH_NAMES]
BIN_RECORD = 1 + 3 * 32 * 32  # a label byte, then the R, G and B planes, 1,024 bytes each


def _read_bin_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    if not raw or len(raw) % BIN_RECORD:
        raise DataError(f"{name}: {len(raw)} bytes is not a whole number of {BIN_RECORD}-byte CIFAR-10 binary "
                        "records (a label byte and 3,072 pixel bytes each)")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, BIN_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(CIFAR10_CLASSES):
        raise DataError(f"{name}: label {labels.max()} in a CIFAR-10 binary batch (labels are 0-9)")
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def _binary(entries: dict[str, bytes], where: Path) -> Dataset:
    train = [_read_bin_batch(entries[n], f"{where}:{n}") for n in BIN_NAMES[:-1]]
    test = _read_bin_batch(entries[BIN_NAMES[-1]], f"{where}:{BIN_NAMES[-1]}")
    return Dataset(np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]),
                   test[0], test[1], CIFAR10_CLASSES)


def _batches_folder(path: Path) -> Optional[Dataset]:
    """A folder of CIFAR-10 python or binary batches; None when it holds neither."""
    for names, read in ((BATCH_NAMES, _pickled), (BIN_NAMES, _binary)):
        if (path / names[0]).exists():
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise DataError(f"{path}: CIFAR-10 batches folder lacks {', '.join(missing)}")
            return read({n: (path / n).read_bytes() for n in names}, path)
    return None


def _data_root(path: Path) -> Path:
    """The folder that holds the data: `path`, or the one folder it holds when it holds nothing else
    (an unpacked archive's top folder, `cifar-10-batches-py` in a download folder), as far down as that
    goes. Hidden files (.DS_Store) do not count."""
    for known in ("cifar-10-batches-py", "cifar-10-batches-bin"):
        if (path / known).is_dir():
            return path / known

    def holds_data(folder: Path) -> bool:
        return any((folder / n).exists() for n in ("train", "test", BATCH_NAMES[0], BIN_NAMES[0]))

    inner = path
    while not holds_data(inner):
        children = [c for c in inner.iterdir() if not c.name.startswith(".")]
        if len(children) != 1 or not children[0].is_dir() or children[0].is_symlink():
            return path  # no data down there either: the errors name the folder the user gave
        inner = children[0]
    return inner


def _decode_path(path: Path) -> Dataset:
    if path.is_dir():
        path = _data_root(path)
        batches_data = _batches_folder(path)
        if batches_data is not None:
            return batches_data
        if not (path / "train").is_dir() or not (path / "test").is_dir():
            seen = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
            raise DataError(f"{path}: expected train/ and test/ folders of class folders "
                            f"(or CIFAR-10 python or binary batches); found: {seen}")
        total = sum(1 for p in path.rglob("*") if p.is_file())
        return _image_folder(_iter_tree(path), path, total)
    if not tarfile.is_tarfile(path) and not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a folder or a .tar/.tar.gz/.zip archive")
    batches: dict[str, bytes] = {}

    def entries() -> Iterator[tuple[str, Optional[bytes]]]:
        for name, raw in _iter_archive(path):
            base = PurePosixPath(name).name
            if base in BATCH_NAMES + BIN_NAMES and raw is not None:
                batches[base] = raw
            else:
                yield name, raw

    try:
        return _image_folder(entries(), path, None)
    except DataError:
        if all(n in batches for n in BATCH_NAMES):
            return _pickled(batches, path)
        if all(n in batches for n in BIN_NAMES):
            return _binary(batches, path)
        raise


def _download(cfg: DataConfig) -> Path:
    """Download the official archive with torchvision, once, even when many trials ask at once."""
    from filelock import FileLock
    from torchvision.datasets import CIFAR10

    target = download_dir(cfg)
    target.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target / ".download.lock")):
        if not (target / "cifar-10-batches-py" / "test_batch").exists():
            try:
                CIFAR10(root=str(target), train=True, download=True)
            except Exception as exc:
                raise DataError(f"cannot download CIFAR-10 ({type(exc).__name__}: {exc}); on a machine without "
                                f"internet set {ENV_DATA} to a local copy (cifar-10-python.tar.gz, a "
                                "cifar-10-batches-py folder, or an image-folder tree or archive)") from None
    return target / "cifar-10-batches-py"


# ---------------------------------------------------------------- the cache

def source_key(path: Path) -> str:
    """Identifies a source's content cheaply: path, size and mtime of every file (a tree) or the file."""
    h = hashlib.sha256(f"v{CACHE_FORMAT}:{path}".encode())
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def cache_path(path: Path, cfg: DataConfig) -> Path:
    return cache_root(cfg.cache_dir) / f"{path.name}-{source_key(path)}.npz"


def _save_cache(ds: Dataset, target: Path) -> None:
    """Write atomically: a reader sees the old file, no file, or the whole new one."""
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(f) -> None:  # npz members carry CRC-32s, checked on load: a truncated or altered cache is detected
        np.savez(f, train_x=ds.train_x, train_y=ds.train_y, test_x=ds.test_x, test_y=ds.test_y,
                 classes=np.asarray(ds.classes))

    atomic_write(target, write, fsync=True, mode=0o644)  # 0644: the cache may be shared by users of one machine


def _load_cache(target: Path) -> Optional[Dataset]:
    """The cached Dataset, or None when the file is missing or damaged (then it is rebuilt)."""
    if not target.exists():
        return None
    try:
        with np.load(target, allow_pickle=False) as z:
            ds = Dataset(z["train_x"], z["train_y"], z["test_x"], z["test_y"], tuple(str(c) for c in z["classes"]))
    except Exception as exc:  # BadZipFile, CRC errors, truncation, missing members
        print(f"warning: data cache {target} is damaged ({type(exc).__name__}); rebuilding it", file=sys.stderr)
        return None
    if ds.train_x.ndim != 4 or ds.train_x.shape[1:] != (3, 32, 32) or len(ds.train_x) != len(ds.train_y):
        print(f"warning: data cache {target} has unexpected shapes; rebuilding it", file=sys.stderr)
        return None
    return ds


# A cache folder these refuse (full, over quota, read-only, not ours): the images are decoded all the same
CACHE_REFUSALS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def uncached_warning(target: Path, err: OSError) -> str:
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    fix = ("free space there, or point data.cache_dir or ${env} at a folder with room (CIFAR-10 takes 185 MB)"
           if full else "point data.cache_dir or ${env} at a folder you can write").format(env=ENV_CACHE)
    return (f"warning: cannot cache the decoded images in {printable(target.parent)} ({err.strerror}); this run "
            f"uses the images decoded now and the next decodes them again: {fix}")


def load_dataset(cfg: DataConfig) -> Dataset:
    """Decoded pixels for cfg.source: from the cache when it is valid, else decoded and cached once. A
    cache folder that refuses the file (a full or read-only disk) costs the cache only: a warning, and
    the images decoded now (`data prepare`, whose one job the cache is, then exits 1: main)."""
    from filelock import FileLock

    src = resolve_source(cfg)
    if src == "synthetic":
        return make_synthetic(cfg.synthetic_size, seed=0)
    path = _download(cfg) if src == "download" else Path(src)
    target = cache_path(path, cfg)
    ds = _load_cache(target)
    if ds is not None:
        return ds
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(target) + ".lock")
        lock.acquire()
    except OSError as err:
        if err.errno not in CACHE_REFUSALS:
            raise
        print(uncached_warning(target, err), file=sys.stderr)
        return _decode_path(path)
    try:
        ds = _load_cache(target)  # another process may have built it while we waited
        if ds is None:
            ds = _decode_path(path)
            try:
                _save_cache(ds, target)
            except OSError as err:  # atomic_write has removed its temporary file: no partial cache is left
                if err.errno not in CACHE_REFUSALS:
                    raise
                print(uncached_warning(target, err), file=sys.stderr)
        return ds
    finally:
        lock.release()


# ---------------------------------------------------------------- the split

def _stratified_take(labels: np.ndarray, idx: np.ndarray, n: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split idx into (taken, rest) with `n` taken in proportion to each class (largest remainder)."""
    classes, counts = np.unique(labels[idx], return_counts=True)
    exact = counts * n / counts.sum()
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota), kind="stable")[: n - quota.sum()]] += 1
    taken, rest = [], []
    for cls, q in zip(classes, quota, strict=True):
        members = rng.permutation(idx[labels[idx] == cls])
        taken.append(members[:q])
        rest.append(members[q:])
    return np.sort(np.concatenate(taken)), np.sort(np.concatenate(rest))


def check_val_size(ds: Dataset, val_size: int, source: str) -> None:
    """DataError unless `val_size` leaves training images: the split's one demand on the data set."""
    n = len(ds.train_y)
    if val_size >= n:
        raise DataError(f"data.val_size: {val_size} is not smaller than the {n} training images of "
                        f"source {source}; lower data.val_size")


def split_dataset(ds: Dataset, cfg: DataConfig) -> Split:
    """Seeded, stratified train/val split of the training images; the same for every trial."""
    n = len(ds.train_y)
    check_val_size(ds, cfg.val_size, cfg.source)
    rng = np.random.default_rng(cfg.split_seed)
    val_idx, train_idx = _stratified_take(ds.train_y, np.arange(n), cfg.val_size, rng)
    if cfg.train_size is not None and cfg.train_size < len(train_idx):
        train_idx, _ = _stratified_take(ds.train_y, train_idx, cfg.train_size, rng)
    mean, std = channel_stats(ds.train_x, train_idx)
    return Split(train_idx, val_idx, mean, std)


def channel_stats(x: np.ndarray, idx: np.ndarray, chunk: int = 1024) -> tuple[tuple, tuple]:
    """Per-channel mean and std on the [0, 1] scale, in chunks of 1,024 images (12 MiB of float32)
    so a trial never holds a float copy of the set; sums accumulate in float64."""
    s = np.zeros(3)
    s2 = np.zeros(3)
    for i in range(0, len(idx), chunk):
        part = x[np.sort(idx[i:i + chunk])].astype(np.float32)  # (b, 3, 32, 32), 0..255
        s += part.sum(axis=(0, 2, 3), dtype=np.float64)
        s2 += np.square(part).sum(axis=(0, 2, 3), dtype=np.float64)
    count = len(idx) * x.shape[2] * x.shape[3]
    mean = s / count / 255.0
    std = np.sqrt(np.maximum(s2 / count / 255.0**2 - mean ** 2, 1e-12))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# ---------------------------------------------------------------- CLI

def _describe(ds: Dataset, cfg: DataConfig, src) -> str:
    split = split_dataset(ds, cfg) if cfg.val_size < len(ds.train_y) else None
    lines = [f"source: {src}"]
    if src not in ("synthetic",):
        lines.append(f"cache: {cache_path(Path(src), cfg)}")
    lines.append(f"classes: {len(ds.classes)}")
    lines.append(f"{'class':<12}{'train':>8}{'test':>8}")
    for i, cls in enumerate(ds.classes):
        lines.append(f"{cls:<12}{int((ds.train_y == i).sum()):>8}{int((ds.test_y == i).sum()):>8}")
    lines.append(f"{'total':<12}{len(ds.train_y):>8}{len(ds.test_y):>8}")
    if split is not None:
        lines.append(f"split (seed {cfg.split_seed}): train {len(split.train_idx)}, val {len(split.val_idx)}")
        lines.append("train mean (R, G, B): " + ", ".join(f"{m:.4f}" for m in split.mean))
        lines.append("train std  (R, G, B): " + ", ".join(f"{s:.4f}" for s in split.std))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar_ray.data", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["prepare", "info"])
    parser.add_argument("source", help="cifar10, synthetic, or a path")
    parser.add_argument("--cache-dir")
    parser.add_argument("--val-size", type=int)
    args = parser.parse_args(argv)
    from pydantic import ValidationError

    from cifar_ray.config import ConfigError, describe_errors
    from cifar_ray.config import DataConfig as DC

    fields = {"source": args.source, "cache_dir": args.cache_dir, "val_size": args.val_size}
    try:
        cfg = DC(**{k: v for k, v in fields.items() if v is not None})
        src = resolve_source(cfg)
        if args.command == "info" and src != "synthetic":
            if src == "download":
                raise DataError("cifar10 is not downloaded yet; run `prepare cifar10` first")
            ds = _load_cache(cache_path(Path(src), cfg))
            if ds is None:
                raise DataError(f"{src}: not cached yet; run `python -m cifar_ray.data prepare {args.source}`")
        else:
            ds = load_dataset(cfg)
            src = resolve_source(cfg)
            if src == "download":
                src = download_dir(cfg) / "cifar-10-batches-py"
            if src != "synthetic" and not cache_path(Path(src), cfg).is_file():  # prepare's one job
                print(_describe(ds, cfg, src))
                print(f"error: the cache was not written (the warning above says why); {args.source} is "
                      "decoded again by each run", file=sys.stderr)
                return 1
        print(_describe(ds, cfg, src))
    except ValidationError as err:
        print("\n".join(f"error: {line}" for line in describe_errors(err, "options").splitlines()), file=sys.stderr)
        return 2
    except (DataError, ConfigError) as err:
        print(f"error: {printable(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
