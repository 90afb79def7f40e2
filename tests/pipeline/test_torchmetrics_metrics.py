"""Task metrics computed by torchmetrics: known values, agreement with torchmetrics' accumulated
metrics, and the error that names the extra when torchmetrics is missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from quantsearch.pipeline import (
    MEAN_IOU,
    PERPLEXITY,
    TorchmetricsMissingError,
    absolute_errors,
    mean_iou_per_example,
    nll_per_example,
    require_torchmetrics,
)

torchmetrics = pytest.importorskip("torchmetrics")


def test_mean_iou_of_one_image_by_hand() -> None:
    predicted = torch.tensor([[[1, 1], [0, 0]]])
    target = torch.tensor([[[1, 0], [0, 0]]])
    # stroke: 1 of 2 pixels; background: 2 of 3 pixels -> (0.5 + 2/3) / 2
    (value,) = mean_iou_per_example(predicted, target, num_classes=2).tolist()
    assert value == pytest.approx((0.5 + 2 / 3) / 2)


def test_the_mean_of_per_image_values_is_torchmetrics_mean_iou() -> None:
    generator = torch.Generator().manual_seed(0)
    predicted = torch.randint(0, 2, (6, 8, 8), generator=generator)
    target = torch.randint(0, 2, (6, 8, 8), generator=generator)
    from torchmetrics.segmentation import MeanIoU

    accumulated = MeanIoU(num_classes=2, input_format="index")
    accumulated.update(predicted[:4], target[:4])
    accumulated.update(predicted[4:], target[4:])
    per_image = mean_iou_per_example(predicted, target, num_classes=2).numpy()
    assert MEAN_IOU.value_of(per_image) == pytest.approx(float(accumulated.compute()), rel=1e-6)
    assert (MEAN_IOU.direction, MEAN_IOU.bounds) == ("maximize", (0.0, 1.0))


def test_absolute_errors_per_example() -> None:
    errors = absolute_errors(torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.zeros(2, 2))
    assert errors.tolist() == [2.0, 0.0]


def test_perplexity_from_per_sequence_nll_equals_torchmetrics() -> None:
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 5, 7, generator=generator)
    targets = torch.randint(0, 7, (3, 5), generator=generator)
    nll = nll_per_example(scores, targets).numpy()  # checks against torchmetrics itself
    from torchmetrics.functional.text import perplexity

    expected = float(perplexity(scores, targets))
    assert PERPLEXITY.value_of(nll) == pytest.approx(expected, rel=1e-5)
    assert PERPLEXITY.value_of(np.zeros(4)) == 1.0


def test_without_torchmetrics_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    with pytest.raises(TorchmetricsMissingError, match=r"pip install 'quantsearch\[metrics\]'"):
        require_torchmetrics()
    with pytest.raises(ImportError):
        mean_iou_per_example(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), num_classes=2)
