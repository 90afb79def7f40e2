"""Fixtures for the tasks tests: tiny IDX and CIFAR-10 files written into tmp_path."""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(">u1").tobytes()


def class_images(labels: np.ndarray, size: int, channels: int | None = None) -> np.ndarray:
    """uint8 images where class k lights up row band k: learnable, and exactly reproducible."""
    rng = np.random.default_rng(0)
    shape = (len(labels), size, size) if channels is None else (len(labels), channels, size, size)
    images = rng.integers(0, 40, size=shape, dtype=np.uint8)
    band = size // 10
    for index, label in enumerate(labels):
        images[index, ..., label * band : (label + 1) * band, :] = 250
    return images


def cifar_batch(labels: np.ndarray) -> dict[bytes, object]:
    images = class_images(labels, 32, channels=3).reshape(len(labels), -1)
    return {
        b"batch_label": b"tiny batch",
        b"labels": [int(label) for label in labels],
        b"data": images,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }



def write_mnist_files(directory: Path) -> None:
    """A tiny MNIST in ``directory``: 60 training and 20 test images, gzipped IDX files."""
    directory.mkdir(parents=True)
    for stem, count in (("train", 60), ("t10k", 20)):
        labels = np.arange(count, dtype=np.uint8) % 10
        (directory / f"{stem}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(idx_bytes(class_images(labels, 28)))
        )
        (directory / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))


@pytest.fixture(name="idx_bytes")
def idx_bytes_fixture() -> Callable[..., bytes]:
    """idx_bytes(array, type_code=0x08): the bytes of an IDX file holding ``array``."""
    return idx_bytes


@pytest.fixture
def write_mnist() -> Callable[..., Path]:
    """write_mnist(directory, n_train=60, n_test=20, gz=True): the four IDX files."""

    def write(directory: Path, *, n_train: int = 60, n_test: int = 20, gz: bool = True) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        train_y = np.arange(n_train, dtype=np.uint8) % 10
        test_y = np.arange(n_test, dtype=np.uint8) % 10
        arrays = (class_images(train_y, 28), train_y, class_images(test_y, 28), test_y)
        for stem, array in zip(IDX_STEMS, arrays, strict=True):
            data = idx_bytes(array)
            if gz:
                (directory / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (directory / stem).write_bytes(data)
        return directory

    return write


@pytest.fixture
def write_cifar() -> Callable[..., Path]:
    """write_cifar(directory, per_batch=12): data_batch_1..5 and test_batch, pickled."""

    def write(directory: Path, *, per_batch: int = 12) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        names = [f"data_batch_{number}" for number in range(1, 6)] + ["test_batch"]
        for offset, name in enumerate(names):
            labels = (np.arange(per_batch) + offset) % 10
            with (directory / name).open("wb") as handle:
                pickle.dump(cifar_batch(labels), handle, protocol=2)
        return directory

    return write
