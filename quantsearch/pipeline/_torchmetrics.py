"""Task metrics computed by torchmetrics (the optional extra ``quantsearch[metrics]``).

A task's ``evaluate`` returns per-example values where it can (quantsearch then computes a
bootstrap interval from them) and the declared :class:`TaskMetric` reduces them the way
torchmetrics' own accumulated metric does:

- :func:`mean_iou_per_example`: each image's mean IoU over the classes
  (``torchmetrics.functional.segmentation.mean_iou``); their mean is what
  ``torchmetrics.segmentation.MeanIoU`` accumulates. Declared by :data:`MEAN_IOU`.
- :func:`absolute_errors`: each example's mean absolute error
  (``torchmetrics.functional.mean_absolute_error``); their mean is the MAE when every example
  has as many outputs. Declared by :data:`MAE`.
- :func:`nll_per_example`: each sequence's mean negative log-likelihood per token, checked
  against ``torchmetrics.functional.text.perplexity`` (``exp`` of their mean is the
  perplexity when the sequences have equal lengths). Declared by :data:`PERPLEXITY`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from quantsearch.tasks import TaskMetric

__all__ = [
    "MAE",
    "MEAN_IOU",
    "PERPLEXITY",
    "TorchmetricsMissingError",
    "absolute_errors",
    "mean_iou_per_example",
    "nll_per_example",
    "perplexity_of",
    "require_torchmetrics",
]


class TorchmetricsMissingError(ImportError):
    """torchmetrics is not installed: it comes with the extra ``quantsearch[metrics]``."""


def require_torchmetrics() -> ModuleType:
    """The torchmetrics package, or an error that names the extra that installs it."""
    try:
        return importlib.import_module("torchmetrics")
    except ImportError as error:
        raise TorchmetricsMissingError(
            f"this metric is computed by torchmetrics, which is not installed ({error}); "
            "install it with: pip install 'quantsearch[metrics]'"
        ) from None


def perplexity_of(nll: np.ndarray) -> float:
    """Perplexity from per-sequence mean NLLs (nats per token) of equal-length sequences."""
    return float(np.exp(np.mean(nll)))


MEAN_IOU = TaskMetric("miou", "maximize", "mean IoU", bounds=(0.0, 1.0))
MAE = TaskMetric("mae", "minimize", "mean absolute error")
PERPLEXITY = TaskMetric("perplexity", "minimize", "perplexity", reduce=perplexity_of)


def mean_iou_per_example(preds: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Each example's mean IoU over ``num_classes`` classes, from class-index maps of shape
    ``(batch, height, width)`` (torchmetrics: a class absent from both maps counts as no IoU)."""
    require_torchmetrics()
    from torchmetrics.functional.segmentation import mean_iou

    return mean_iou(
        preds.long(), target.long(), num_classes=num_classes, input_format="index"
    ).float()


def absolute_errors(preds: Tensor, target: Tensor) -> Tensor:
    """Each example's mean absolute error over its outputs (``preds`` and ``target`` alike
    shaped, the first dimension the batch)."""
    require_torchmetrics()
    from torchmetrics.functional import mean_absolute_error

    pairs = zip(preds.reshape(len(preds), -1), target.reshape(len(target), -1), strict=True)
    return torch.stack([mean_absolute_error(p, t) for p, t in pairs])


def nll_per_example(scores: Tensor, targets: Tensor, *, check: bool = True) -> Tensor:
    """Each sequence's mean NLL in nats per token, from scores ``(batch, time, classes)`` and
    token indices ``(batch, time)``. With ``check``, ``exp`` of their mean is compared with
    torchmetrics' perplexity of the batch (a ValueError when they differ)."""
    nll = F.cross_entropy(scores.transpose(1, 2), targets, reduction="none").mean(dim=1)
    if check:
        require_torchmetrics()
        from torchmetrics.functional.text import perplexity

        expected = float(perplexity(scores.double(), targets))
        got = float(torch.exp(nll.double().mean()))
        if not np.isclose(got, expected, rtol=1e-4):
            raise ValueError(f"perplexity {got} differs from torchmetrics' {expected}")
    return nll
