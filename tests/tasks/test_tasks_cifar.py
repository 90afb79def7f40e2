"""CIFAR-10 from its python batches, NNI's BNN example VGG network and the small CNN."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from quantsearch.tasks import (
    CifarSmallCNN,
    TaskError,
    TrainConfig,
    VGG_Cifar10,
    fit,
    get_task,
    make_optimizer,
    read_cifar_batch,
)

# The op_names of the BNN example's config_list.
SEED_WEIGHT_OPS = [
    "features.0",
    "features.3",
    "features.7",
    "features.10",
    "features.14",
    "features.17",
    "classifier.0",
    "classifier.3",
]
SEED_OUTPUT_OPS = [
    "features.6",
    "features.9",
    "features.13",
    "features.16",
    "features.20",
    "classifier.2",
    "classifier.5",
]


def test_vgg_modules_at_the_seed_op_names_have_the_expected_types() -> None:
    modules = dict(VGG_Cifar10().named_modules())
    assert [type(modules[name]) for name in SEED_WEIGHT_OPS] == [nn.Conv2d] * 6 + [nn.Linear] * 2
    assert all(type(modules[name]) is nn.Hardtanh for name in SEED_OUTPUT_OPS)
    # The first Hardtanh is left out of that example's output list, and the last Linear stays float.
    assert type(modules["features.2"]) is nn.Hardtanh
    assert type(modules["classifier.6"]) is nn.Linear
    hardtanhs = [name for name, module in modules.items() if isinstance(module, nn.Hardtanh)]
    assert hardtanhs == ["features.2", *SEED_OUTPUT_OPS]
    weighted = [n for n, m in modules.items() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert weighted == [*SEED_WEIGHT_OPS, "classifier.6"]


def test_vgg_layer_shapes_follow_the_bnn_example() -> None:
    model = VGG_Cifar10()
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (3, 128),
        (128, 128),
        (128, 256),
        (256, 256),
        (256, 512),
        (512, 512),
    ]
    assert all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    assert [n.eps for n in norms] == [1e-4] * 6
    assert model.classifier[0].in_features == 512 * 4 * 4
    assert model.classifier[0].bias is None
    assert model.classifier[6].bias is not None
    last = model.classifier[7]
    assert isinstance(last, nn.BatchNorm1d)
    assert not last.affine
    assert len(model.features) == 21
    assert len(model.classifier) == 8


def test_vgg_forward_and_one_training_step() -> None:
    torch.manual_seed(0)
    model = VGG_Cifar10()
    inputs, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = nn.functional.cross_entropy(model(inputs), targets)
    loss.backward()
    optimizer.step()
    model.eval()
    assert tuple(model(inputs[:1]).shape) == (1, 10)


def test_cifar10_reads_batches_and_trains_the_small_model(
    tmp_path: Path, write_cifar: Callable[..., Path]
) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py", per_batch=12)
    task = get_task("cifar10", data_dir=tmp_path, options={"model": "small", "val_fraction": 0.2})
    assert [len(task.train_set), len(task.val_set), len(task.test_set)] == [48, 12, 12]
    inputs = task.train_set.tensors[0]
    assert tuple(inputs.shape[1:]) == (3, 32, 32)
    assert tuple(task.dummy_input.shape) == (1, 3, 32, 32)
    # Channel 0 is normalised with mean 0.4914 and std 0.2023.
    assert float(inputs[:, 0].max()) == pytest.approx((250 / 255 - 0.4914) / 0.2023, rel=1e-6)
    labels = torch.cat([task.train_set.tensors[1], task.val_set.tensors[1]])
    written = np.concatenate([(np.arange(12) + offset) % 10 for offset in range(5)])
    assert torch.bincount(labels, minlength=10).tolist() == np.bincount(written).tolist()
    model = task.build_model()
    assert isinstance(model, CifarSmallCNN)
    config = TrainConfig(epochs=1, batch_size=16)
    result = fit(model, task, make_optimizer(model.parameters(), config), config, seed=0)
    assert result.epochs_run == 1
    assert 0.0 <= result.val_accuracy <= 1.0


def test_cifar10_builds_the_vgg_by_default(tmp_path: Path, write_cifar: Callable) -> None:
    write_cifar(tmp_path, per_batch=4)
    for name in ("cifar10", "cifar10-bnn"):
        task = get_task(name, data_dir=tmp_path)
        assert isinstance(task.build_model(), VGG_Cifar10)
        assert task.default_train_config.lr == 1e-2
    with pytest.raises(TaskError, match=r"^cifar10-bnn: option 'model' must be one of vgg_bnn"):
        get_task("cifar10-bnn", data_dir=tmp_path, options={"model": "small"})


def test_read_cifar_batch_returns_images_and_labels(tmp_path: Path, write_cifar: Callable) -> None:
    write_cifar(tmp_path, per_batch=5)
    images, labels = read_cifar_batch(tmp_path / "data_batch_2")
    assert images.shape == (5, 3, 32, 32)
    assert images.dtype == np.uint8
    assert labels.tolist() == [1, 2, 3, 4, 5]


def test_missing_batches_are_named(tmp_path: Path, write_cifar: Callable) -> None:
    write_cifar(tmp_path, per_batch=2)
    (tmp_path / "data_batch_4").unlink()
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(TaskError) as info:
        get_task("cifar10", data_dir=tmp_path)
    assert str(info.value) == (
        f"cifar10: no 'data_batch_4' in {tmp_path} (also looked in "
        f"{tmp_path / 'cifar-10-batches-py'}); expected the python batches data_batch_1, "
        "data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch; "
        "cifar-10-python.tar.gz is there: extract it first (tar xzf)"
    )
    with pytest.raises(TaskError, match=r"^cifar10: data directory .* does not exist"):
        get_task("cifar10", data_dir=tmp_path / "absent")


def _write(path: Path, obj: object) -> None:
    with path.open("wb") as handle:
        pickle.dump(obj, handle, protocol=2)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a pickle at all", "not a CIFAR-10 python batch ("),
        ([1, 2, 3], "not a CIFAR-10 python batch (a list, not a dict)"),
        (
            {b"data": np.zeros((2, 3072), np.uint8)},
            "a CIFAR-10 batch needs keys b'data' and b'labels'; found b'data'",
        ),
        (
            {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
            "b'data' must be an N x 3072 array, got (2, 100)",
        ),
        (
            {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
            "b'data' must hold uint8 pixels, got float32",
        ),
        (
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},
            "2 images but 1 labels in b'labels'",
        ),
        (
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
            "labels must be 0..9, found 0..10",
        ),
    ],
)
def test_malformed_batches_are_errors(
    tmp_path: Path, write_cifar: Callable, content: object, message: str
) -> None:
    write_cifar(tmp_path, per_batch=2)
    path = tmp_path / "test_batch"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _write(path, content)
    with pytest.raises(TaskError) as info:
        get_task("cifar10", data_dir=tmp_path)
    assert str(info.value).startswith(f"{path}: {message}")


def test_a_batch_cannot_run_code_when_loaded(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, ("echo unsafe",))

    path = tmp_path / "data_batch_1"
    _write(path, {b"data": Exploit(), b"labels": []})
    message = "'posix.system' is not allowed in a CIFAR-10 batch"
    if os.name == "nt":
        message = "'nt.system' is not allowed in a CIFAR-10 batch"
    with pytest.raises(TaskError, match=re.escape(message)):
        read_cifar_batch(path)
