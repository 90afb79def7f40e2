"""Mini-batches of a task's datasets on a device: (x, y) pairs, or any structure."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from quantsearch.tasks._train_config import TrainConfig, resolve_device

if TYPE_CHECKING:
    from quantsearch.tasks._contract import Task

__all__ = ["Batches", "batches_of", "to_device"]

# TensorDatasets up to this size are copied to the accelerator whole, once per fit/evaluate.
_DEVICE_COPY_LIMIT = 2 * 1024**3


class Batches:
    """Mini-batches of a dataset on a device, in a seeded order when shuffled.

    A two-tensor TensorDataset is indexed directly, without per-example collation (copied to
    an accelerator whole when it is at most 2 GiB). Any other dataset goes through a
    DataLoader. Both take their order from the same ``torch.randperm`` draw of ``generator``,
    so they visit the examples identically.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        device: torch.device,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        skip_single_tail: bool = False,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        raw: bool = False,
    ) -> None:
        self.length = len(dataset)  # type: ignore[arg-type]
        if self.length == 0:
            raise ValueError("the dataset is empty")
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.generator = generator
        # BatchNorm cannot train on one example, so a trailing batch of one is dropped.
        self.drop_tail = skip_single_tail and self.length > 1 and self.length % batch_size == 1
        self.dataset = dataset
        self.tensors: tuple[Tensor, Tensor] | None = None
        self.move_batches = False
        # raw: batches of any structure (a task's own collate_fn), moved to the device as
        # they are; else (x, y) pairs with integer labels.
        self.raw = raw or collate_fn is not None
        self.collate_fn = collate_fn
        if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2 and not self.raw:
            inputs, targets = dataset.tensors
            nbytes = inputs.nelement() * inputs.element_size()
            # Small datasets move to the accelerator once; larger ones batch by batch.
            self.move_batches = device != inputs.device and nbytes > _DEVICE_COPY_LIMIT
            target_device = inputs.device if self.move_batches else device
            self.tensors = (inputs.to(target_device), targets.to(target_device, torch.long))

    def __len__(self) -> int:
        return math.ceil(self.length / self.batch_size) - int(self.drop_tail)

    def __iter__(self) -> Iterator[Any]:
        starts = range(0, len(self) * self.batch_size, self.batch_size)
        order = None
        if self.shuffle:
            order = torch.randperm(self.length, generator=self.generator)
        if self.tensors is not None:
            inputs, targets = self.tensors
            if order is not None:
                order = order.to(inputs.device)
            for start in starts:
                if order is None:
                    batch = inputs[start : start + self.batch_size]
                    labels = targets[start : start + self.batch_size]
                else:
                    index = order[start : start + self.batch_size]
                    batch, labels = inputs[index], targets[index]
                if self.move_batches:
                    batch = batch.to(self.device, non_blocking=True)
                    labels = labels.to(self.device, non_blocking=True)
                yield batch, labels
            return
        indices = order.tolist() if order is not None else list(range(self.length))
        loader = DataLoader(
            self.dataset,
            batch_sampler=[indices[start : start + self.batch_size] for start in starts],
            pin_memory=self.device.type == "cuda",
            # A private generator: the loader's own seed draw must not consume torch's global one.
            generator=torch.Generator(),
            **({"collate_fn": self.collate_fn} if self.collate_fn is not None else {}),
        )
        non_blocking = self.device.type == "cuda"
        if self.raw:
            for batch in loader:
                yield to_device(batch, self.device, non_blocking=non_blocking)
            return
        for inputs, targets in loader:
            yield (
                inputs.to(self.device, non_blocking=non_blocking),
                targets.to(self.device, torch.long, non_blocking=non_blocking),
            )


def to_device(batch: Any, device: torch.device, *, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor in it (in tuples, lists and dicts) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return type(batch)(  # type: ignore[call-arg]
            {k: to_device(v, device, non_blocking=non_blocking) for k, v in batch.items()}
        )
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(to_device(v, device, non_blocking=non_blocking) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device, non_blocking=non_blocking) for v in batch)
    return batch


def batches_of(
    dataset: Dataset,
    config: TrainConfig,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    task: Task | None = None,
    batch_size: int | None = None,
) -> Batches:
    """Mini-batches of ``config.batch_size`` on ``config.device`` (``.device`` tells which).

    With ``task``, batches as that task makes them: its ``collate_fn``, and any structure
    for a task that is not a plain classifier."""
    device = resolve_device(config.device)
    return Batches(
        dataset,
        batch_size or config.batch_size,
        device,
        shuffle=shuffle,
        generator=generator,
        collate_fn=task.collate_fn if task is not None else None,
        raw=task is not None and not task.is_classifier,
    )
