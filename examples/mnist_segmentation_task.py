"""Dense prediction: segment the digit strokes of real MNIST images, objective mean IoU.

Each pixel's label is whether the clean image is above ``threshold`` (a stroke); the model sees
the image with fixed Gaussian noise added (``noise``, drawn once from the seed), so it must
denoise, not just threshold. The model is a small encoder-decoder of convolutions that returns
one stroke logit per pixel, ``(batch, 1, 28, 28)``. ``evaluate`` returns each image's mean IoU
over the two classes (background, stroke), computed by torchmetrics
(``quantsearch.pipeline.mean_iou_per_example``, the extra ``quantsearch[metrics]``); their mean
is torchmetrics' ``MeanIoU`` and gets a bootstrap interval.

The data are the MNIST IDX files in ``data_dir`` (``train-images-idx3-ubyte`` and
``t10k-images-idx3-ubyte``, plain or gzipped, with a dash or a dot before ``idx``). Options:
``train`` / ``val`` / ``test`` (image counts: val from the end of the training file, test from
the test file), ``threshold``, ``noise``, ``width``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from quantsearch.pipeline import MEAN_IOU, mean_iou_per_example
from quantsearch.tasks import Task, TaskError, TrainConfig, read_idx

OPTIONS = {
    "train": 6000, "val": 1000, "test": 1000, "threshold": 0.5, "noise": 0.3, "width": 16,
}


class StrokeSegmenter(nn.Module):
    """A noisy image ``(batch, 1, 28, 28)`` in, one stroke logit per pixel out."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(1, width, 3, padding=1)
        self.act1 = nn.ReLU6()
        self.enc2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.act2 = nn.ReLU6()
        self.mid = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.act3 = nn.ReLU6()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Conv2d(3 * width, width, 3, padding=1)
        self.act4 = nn.ReLU6()
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, image: Tensor) -> Tensor:
        skip = self.act1(self.enc1(image))
        deep = self.act3(self.mid(self.act2(self.enc2(skip))))
        merged = torch.cat([skip, self.up(deep)], dim=1)
        return self.head(self.act4(self.dec(merged)))


def loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Per-pixel binary cross-entropy against the stroke mask."""
    image, mask = batch
    return F.binary_cross_entropy_with_logits(model(image), mask)


def evaluate(model: nn.Module, batches: Any) -> dict[str, Tensor]:
    """Each image's mean IoU of the predicted strokes (logit > 0) over the two classes."""
    scores = []
    for image, mask in batches:
        predicted = (model(image) > 0).squeeze(1)
        scores.append(mean_iou_per_example(predicted, mask.squeeze(1) > 0.5, num_classes=2))
    return {"miou": torch.cat(scores)}


def _find(data_dir: Path, stem: str) -> Path:
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, f"{stem}.gz", dotted, f"{dotted}.gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise TaskError(f"mnist-segmentation: no {stem} (or .gz, or {dotted}) in {data_dir}")


def _split(images: np.ndarray, threshold: float, noise: float, seed: int) -> TensorDataset:
    clean = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    generator = torch.Generator().manual_seed(seed)
    noisy = clean + noise * torch.randn(clean.shape, generator=generator)
    return TensorDataset(noisy, (clean > threshold).float())


def make_task(*, data_dir: Path | None, options: dict[str, Any], seed: int) -> Task:
    """Stroke masks of the first ``train`` training images, the last ``val`` of the training
    file and the first ``test`` of the test file."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TaskError(
            f"mnist-segmentation: unknown option(s) {unknown}; allowed: {sorted(OPTIONS)}"
        )
    settings = {**OPTIONS, **options}
    if data_dir is None:
        raise TaskError("mnist-segmentation: needs task.data_dir, the folder of MNIST IDX files")
    train_images = read_idx(_find(Path(data_dir), "train-images-idx3-ubyte"))
    test_images = read_idx(_find(Path(data_dir), "t10k-images-idx3-ubyte"))
    n_train, n_val, n_test = (int(settings[k]) for k in ("train", "val", "test"))
    if n_train + n_val > len(train_images) or n_test > len(test_images):
        raise TaskError(
            f"mnist-segmentation: asked for {n_train}+{n_val} training and {n_test} test images; "
            f"the files hold {len(train_images)} and {len(test_images)}"
        )
    threshold, noise = float(settings["threshold"]), float(settings["noise"])
    train = _split(train_images[:n_train], threshold, noise, seed)
    return Task(
        name="mnist-segmentation",
        build_model=functools.partial(StrokeSegmenter, int(settings["width"])),
        train_set=train,
        val_set=_split(train_images[len(train_images) - n_val :], threshold, noise, seed + 1),
        test_set=_split(test_images[:n_test], threshold, noise, seed + 2),
        dummy_input=train.tensors[0][:1],
        loss=loss,
        evaluate=evaluate,
        metrics=(MEAN_IOU,),
        default_train_config=TrainConfig(epochs=3, batch_size=64, lr=3e-3),
        description=f"MNIST stroke segmentation ({n_train} noisy training images), mean IoU",
    )
