"""MNIST and Fashion-MNIST from IDX files, gzipped or not, and every way those files go wrong."""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from quantsearch.tasks import (
    MnistCNN,
    TaskError,
    TrainConfig,
    evaluate,
    fit,
    get_task,
    make_optimizer,
    read_idx,
)


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_mnist_reads_idx_files_and_trains_one_epoch(
    tmp_path: Path, write_mnist: Callable[..., Path], gz: bool
) -> None:
    write_mnist(tmp_path, n_train=60, n_test=20, gz=gz)
    task = get_task("mnist", data_dir=tmp_path, options={"val_fraction": 0.2}, seed=0)
    assert [len(task.train_set), len(task.val_set), len(task.test_set)] == [48, 12, 20]
    inputs = task.train_set.tensors[0]
    assert tuple(inputs.shape[1:]) == (1, 28, 28)
    assert inputs.dtype == torch.float32
    # Pixels are normalised with MNIST's mean 0.1307 and std 0.3081.
    assert float(inputs.max()) == pytest.approx((250 / 255 - 0.1307) / 0.3081, rel=1e-6)
    assert tuple(task.dummy_input.shape) == (1, 1, 28, 28)
    model = task.build_model()
    assert isinstance(model, MnistCNN)
    config = TrainConfig(epochs=1, batch_size=16)
    result = fit(model, task, make_optimizer(model.parameters(), config), config, seed=0)
    assert result.epochs_run == 1
    assert 0.0 <= result.val_accuracy <= 1.0
    assert 0.0 <= evaluate(model, task.test_set) <= 1.0


def test_mnist_model_names_and_types() -> None:
    names = {n: type(m).__name__ for n, m in MnistCNN().named_modules() if n}
    assert names == {
        "conv1": "Conv2d",
        "relu1": "ReLU6",
        "pool1": "MaxPool2d",
        "conv2": "Conv2d",
        "relu2": "ReLU6",
        "pool2": "MaxPool2d",
        "flatten": "Flatten",
        "fc1": "Linear",
        "relu3": "ReLU6",
        "fc2": "Linear",
    }
    assert MnistCNN().fc1.in_features == 4 * 4 * 50


def test_idx_files_in_torchvision_raw_folders_are_found(
    tmp_path: Path, write_mnist: Callable[..., Path]
) -> None:
    write_mnist(tmp_path / "MNIST" / "raw")
    write_mnist(tmp_path / "FashionMNIST" / "raw", gz=False)
    mnist = get_task("mnist", data_dir=tmp_path, options={"limit": 10})
    fashion = get_task("fashion-mnist", data_dir=tmp_path)
    assert len(mnist.train_set) == 10
    assert len(fashion.test_set) == 20
    # Fashion-MNIST has its own normalisation (mean 0.2860, std 0.3530).
    expected = (250 / 255 - 0.2860) / 0.3530
    assert float(fashion.train_set.tensors[0].max()) == pytest.approx(expected, rel=1e-6)


def test_eval_limit_caps_validation_and_test(tmp_path: Path, write_mnist: Callable) -> None:
    write_mnist(tmp_path, n_train=100, n_test=40)
    task = get_task("mnist", data_dir=tmp_path, options={"eval_limit": 5, "val_fraction": 0.3})
    assert [len(task.train_set), len(task.val_set), len(task.test_set)] == [70, 5, 5]


def test_validation_split_is_disjoint_and_seeded(tmp_path: Path, write_mnist: Callable) -> None:
    write_mnist(tmp_path, n_train=100)
    first = get_task("mnist", data_dir=tmp_path, seed=5)
    again = get_task("mnist", data_dir=tmp_path, seed=5)
    other = get_task("mnist", data_dir=tmp_path, seed=6)
    assert torch.equal(first.val_set.tensors[1], again.val_set.tensors[1])
    assert torch.equal(first.train_set.tensors[0], again.train_set.tensors[0])
    assert not torch.equal(first.train_set.tensors[0], other.train_set.tensors[0])
    # The images carry random noise, so each is unique: count matches across splits.
    train = {row.numpy().tobytes() for row in first.train_set.tensors[0]}
    val = {row.numpy().tobytes() for row in first.val_set.tensors[0]}
    assert len(train) == 90
    assert len(val) == 10
    assert not train & val


def test_missing_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(TaskError) as info:
        get_task("mnist", data_dir=missing)
    assert str(info.value) == (
        f"mnist: data directory {missing} does not exist; it should hold "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (each may be gzipped, .gz)"
    )


def test_missing_files_name_the_files_and_the_folders_searched(
    tmp_path: Path, write_mnist: Callable[..., Path]
) -> None:
    write_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(TaskError) as info:
        get_task("mnist", data_dir=tmp_path)
    assert str(info.value).startswith(
        f"mnist: no 't10k-images-idx3-ubyte' and 't10k-labels-idx1-ubyte' (or .gz) in {tmp_path} "
        f"(also looked in {tmp_path / 'MNIST' / 'raw'}); expected the four IDX files "
    )
    with pytest.raises(TaskError, match=re.escape(str(tmp_path / "FashionMNIST" / "raw"))):
        get_task("fashion-mnist", data_dir=tmp_path)


def _corrupt(tmp_path: Path, write_mnist: Callable[..., Path], data: bytes, gz: bool) -> Path:
    write_mnist(tmp_path, gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_bad_magic_number_is_an_error(tmp_path: Path, write_mnist: Callable) -> None:
    path = _corrupt(tmp_path, write_mnist, b"\x50\x4b\x03\x04" + bytes(100), gz=False)
    with pytest.raises(TaskError) as info:
        get_task("mnist", data_dir=tmp_path)
    assert str(info.value).startswith(f"{path}: bad magic number 0x504b0304; an IDX file starts")


def test_size_mismatch_is_an_error(
    tmp_path: Path, write_mnist: Callable, idx_bytes: Callable
) -> None:
    truncated = idx_bytes(np.zeros((60, 28, 28), dtype=np.uint8))[:-10]
    path = _corrupt(tmp_path, write_mnist, truncated, gz=True)
    with pytest.raises(TaskError) as info:
        get_task("mnist", data_dir=tmp_path)
    assert str(info.value) == (
        f"{path}: size mismatch: the header says 60x28x28 (47040 bytes of data) but the file "
        "holds 47030 bytes after the header"
    )


def test_broken_gzip_is_an_error(tmp_path: Path, write_mnist: Callable) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(TaskError, match=rf"^{re.escape(str(path))}: cannot read \("):
        get_task("mnist", data_dir=tmp_path)


def test_wrong_image_size_and_count_mismatch_are_errors(
    tmp_path: Path, write_mnist: Callable, idx_bytes: Callable
) -> None:
    path = _corrupt(tmp_path, write_mnist, idx_bytes(np.zeros((60, 32, 32), np.uint8)), gz=True)
    with pytest.raises(TaskError) as info:
        get_task("mnist", data_dir=tmp_path)
    assert str(info.value) == f"{path}: expected images of shape N x 28 x 28, got 60 x 32 x 32"
    path = _corrupt(tmp_path, write_mnist, idx_bytes(np.zeros((59, 28, 28), np.uint8)), gz=True)
    with pytest.raises(TaskError) as info:
        get_task("mnist", data_dir=tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    assert str(info.value) == f"mnist: {path} holds 59 images but {labels} holds 60 labels"


def test_labels_outside_0_to_9_are_an_error(
    tmp_path: Path, write_mnist: Callable, idx_bytes: Callable
) -> None:
    write_mnist(tmp_path, gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.full(20, 12, dtype=np.uint8)))
    with pytest.raises(TaskError, match=rf"^{re.escape(str(path))}: labels must be 0\.\.9"):
        get_task("mnist", data_dir=tmp_path)


def test_read_idx_reads_other_element_types(tmp_path: Path) -> None:
    values = (np.arange(6).reshape(2, 3) - 3).astype(">i2")
    header = bytes([0, 0, 0x0B, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    path = tmp_path / "shorts-idx2"
    path.write_bytes(header + values.tobytes())
    array = read_idx(path)
    assert array.dtype == np.int16
    assert array.tolist() == [[-3, -2, -1], [0, 1, 2]]
