"""Shared fixtures: an isolated cache per test, small generated data sets on disk."""
from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REAL_DATA = os.environ.get("CIFAR_RAY_DATA")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder and no CIFAR_RAY_DATA unless it asks for it."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CIFAR_RAY_CACHE", str(cache))
    monkeypatch.delenv("CIFAR_RAY_DATA", raising=False)
    return cache


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    """(32, 32, 3) uint8 -> encoded image bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def class_pixels(label: int, i: int) -> np.ndarray:
    """A deterministic, class-distinct 32x32 RGB image."""
    rng = np.random.default_rng(1000 * label + i)
    img = rng.integers(0, 40, size=(32, 32, 3), dtype=np.uint8)
    img[..., label % 3] += np.uint8(20 * label)
    return img


def write_tree(root: Path, classes=("cat", "dog", "frog"), per_class=(6, 2)) -> Path:
    """An image-folder tree train/<class>/*.png, test/<class>/*.png."""
    for split, n in zip(("train", "test"), per_class):
        for label, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (d / f"{i:04d}.png").write_bytes(png_bytes(class_pixels(label, i + (100 if split == "test" else 0))))
    return root


def write_tar(path: Path, tree: Path, prefix: str = "") -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tar:
        for p in sorted(tree.rglob("*")):
            tar.add(p, arcname=prefix + p.relative_to(tree).as_posix(), recursive=False)
    return path


def write_batches(root: Path, per_batch: int = 20, test: int = 10) -> Path:
    """A cifar-10-batches-py folder in the official pickled format."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, f)
    return d


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    """One decoded-pixel cache for every real-data test of the session (decoding takes ~12 s)."""
    return tmp_path_factory.mktemp("real-cache")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs), W&B offline, short socket paths."""
    import tempfile

    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    os.environ["WANDB_MODE"] = "offline"  # before ray.init: the workers inherit it
    os.environ["WANDB_SILENT"] = "true"
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ctx
    ray.shutdown()
