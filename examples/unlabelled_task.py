"""A label-free task: a trained model and unlabelled inputs, nothing more.

The situation this shows: you have a trained float model and some inputs of the kind it will
see, but no labels (or no evaluation code). quantsearch gets only the inputs: the datasets
hold images alone, the task has no ``loss``, no ``evaluate`` and no ``num_classes``, and its
trained weights come as ``Task(pretrained=...)``. A ``ptq`` study then needs nothing else:
the objectives are fidelity metrics computed against the float model's outputs on the same
inputs (``agreement``: the share of images whose top class is the float model's; ``sqnr_db``:
the outputs' signal-to-quantization-noise ratio), beside ``size_bytes``.

The data are scikit-learn's bundled 8x8 digits (1,797 images, no download). The float model
is a small CNN trained with the digits' labels by ``train_float_model``: that stands for your
own training, done before and apart from quantsearch (here once per process, seeded, about a
second on one CPU thread); the labels never reach the task. Split (seeded): 60% calibration
(the training images, as inputs), 20% validation, 20% test. See
``search_spaces/unlabelled_digits.yaml``:

    quantsearch study --space search_spaces/unlabelled_digits.yaml

Options: ``width`` (channels of the first convolution, default 8), ``epochs`` (of the float
model's training, default 10). Run this file to train the float model and print its test
accuracy (which quantsearch never sees): ``python examples/unlabelled_task.py``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from quantsearch.tasks import Task, TaskError

OPTIONS = {"width": 8, "epochs": 10}


class DigitsNet(nn.Module):
    """Two convolutions and two linear layers on an 8x8 image; ReLU6 modules, so a quantizer
    can take their outputs too."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.relu1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.relu2 = nn.ReLU6()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * 16, 64)
        self.relu3 = nn.ReLU6()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, image: Tensor) -> Tensor:
        features = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(image)))))
        return self.fc2(self.relu3(self.fc1(features.flatten(1))))


def _split(seed: int) -> tuple[Tensor, Tensor, dict[str, np.ndarray]]:
    """The images (scaled to [0, 1]), the labels and a seeded 60/20/20 split of their rows."""
    digits = load_digits()
    images = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = np.random.default_rng(seed).permutation(len(labels))
    n_train, n_val = int(0.6 * len(order)), int(0.2 * len(order))
    rows = {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    return images, labels, rows


@functools.lru_cache(maxsize=4)
def train_float_model(seed: int, width: int, epochs: int) -> dict[str, Tensor]:
    """Your own training, outside quantsearch: the trained weights of ``DigitsNet``
    (cross-entropy, Adam, seeded), from the labelled training rows."""
    images, labels, rows = _split(seed)
    x, y = images[rows["train"]], labels[rows["train"]]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsNet(width)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_task(*, data_dir: Path | None, options: dict[str, Any], seed: int) -> Task:
    """Inputs only, and the trained weights; ``data_dir`` is not needed."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TaskError(f"unlabelled: unknown option(s) {unknown}; allowed: {sorted(OPTIONS)}")
    settings = {**OPTIONS, **options}
    for key in OPTIONS:
        if not isinstance(settings[key], int) or settings[key] < 1:
            raise TaskError(f"unlabelled: option {key!r} must be a positive integer")
    width, epochs = int(settings["width"]), int(settings["epochs"])
    images, _, rows = _split(seed)

    def inputs(split: str) -> TensorDataset:
        return TensorDataset(images[rows[split]])  # one-tensor items: no labels

    return Task(
        name="unlabelled-digits",
        build_model=functools.partial(DigitsNet, width),
        train_set=inputs("train"),
        val_set=inputs("val"),
        test_set=inputs("test"),
        dummy_input=images[:1],
        pretrained=train_float_model(seed, width, epochs),
        description="scikit-learn's 8x8 digits as unlabelled inputs; a trained CNN",
    )


if __name__ == "__main__":
    task = make_task(data_dir=None, options={}, seed=0)
    model = task.build_model()
    model.load_state_dict(task.pretrained)  # type: ignore[arg-type]
    images, labels, rows = _split(0)
    with torch.no_grad():
        predicted = model(images[rows["test"]]).argmax(dim=1)
    accuracy = float((predicted == labels[rows["test"]]).float().mean())
    print(f"float model: test accuracy {accuracy:.4f} on {len(rows['test'])} images")
