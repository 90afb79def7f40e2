"""Label-free metrics: a quantized model's outputs against the float model's, on the same inputs.

``agreement`` (top-1 agreement, a proportion), ``kl`` (KL divergence of the float model's
softmax to the quantized model's, in nats), ``sqnr_db`` (signal-to-quantization-noise ratio of
the outputs, in dB) and ``cosine`` (cosine similarity of each example's outputs). The float
model's outputs are computed once per study (a file beside its weights) and once per process.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from quantsearch._paths import replacing
from quantsearch.pipeline._float import load_state, load_weights
from quantsearch.pipeline._metrics import Evaluated, Metric, register_metric
from quantsearch.tasks import Batches, Task, evaluation_mode

__all__ = [
    "FIDELITY_METRICS",
    "FidelityError",
    "fidelity",
    "float_outputs",
    "main_tensor",
    "model_outputs",
]


class FidelityError(ValueError):
    """The outputs cannot be compared (no class scores for agreement or KL, shapes differ)."""


def _measured(name: str) -> Any:
    def compute(evaluated: Evaluated) -> float:
        return float(evaluated.metrics[name])

    return compute


FIDELITY_METRICS: dict[str, Metric] = {
    metric.name: register_metric(metric)
    for metric in (
        Metric("agreement", "maximize", "top-1 agreement with the float model",
               _measured("agreement"), proportion=True),
        Metric("kl", "minimize", "KL divergence from the float model", _measured("kl"),
               unit="nats", bounds=(1.0, 0.0)),
        Metric("sqnr_db", "maximize", "SQNR of the outputs", _measured("sqnr_db"), unit="dB",
               bounds=(0.0, 60.0)),
        Metric("cosine", "maximize", "cosine similarity to the float outputs",
               _measured("cosine"), bounds=(0.0, 1.0)),
    )
}


def main_tensor(output: Any) -> Tensor:
    """The tensor the fidelity metrics compare: the output itself, a mapping's ``logits`` (else
    its first tensor), or a tuple's first tensor."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), Tensor):
            return output["logits"]
        output = list(output.values())
    if isinstance(output, Sequence):
        for item in output:
            if isinstance(item, Tensor):
                return item
    raise FidelityError(f"the model's output holds no tensor to compare ({type(output).__name__})")


def model_outputs(
    model: nn.Module, task: Task, dataset: Dataset, *, batch_size: int, device: torch.device
) -> list[Tensor]:
    """The model's compared output tensor on each batch of ``dataset`` (in order, on the CPU,
    eval mode, no_grad; the submodules' training flags restored)."""
    batches = Batches(
        dataset, batch_size, device, shuffle=False, collate_fn=task.collate_fn,
        raw=not task.is_classifier,
    )
    with evaluation_mode(model, device):
        return [main_tensor(task.output(model, b)).detach().float().cpu() for b in batches]


@functools.lru_cache(maxsize=4)
def _cached(path: str, modified: float) -> dict[str, list[Tensor]]:
    return torch.load(path, map_location="cpu", weights_only=True)


def float_outputs(
    float_weights: str | Path,
    task: Task,
    split: str,
    *,
    batch_size: int,
    device: torch.device,
) -> list[Tensor]:
    """The float model's outputs on ``split`` ("val" or "test"): read from the file beside the
    float weights (``<weights>.outputs.pt``), else computed once and written there."""
    weights = Path(float_weights)
    cache = weights.with_name(weights.name + f".{split}-outputs.pt")
    if cache.is_file():
        stored = _cached(str(cache), cache.stat().st_mtime)
        if stored.get("weights_mtime") == [weights.stat().st_mtime]:
            return stored["outputs"]
    model = task.build_model()
    load_weights(model, load_state(weights), str(weights))
    dataset = task.val_set if split == "val" else task.test_set
    outputs = model_outputs(model, task, dataset, batch_size=batch_size, device=device)
    with replacing(cache) as partial:
        torch.save({"outputs": outputs, "weights_mtime": [weights.stat().st_mtime]}, partial)
    return outputs


def _classes(tensor: Tensor, name: str) -> Tensor:
    if tensor.dim() < 2 or tensor.shape[-1] < 2:
        raise FidelityError(
            f"{name} compares class scores, (batch, ..., classes); the output is "
            f"{tuple(tensor.shape)} (use cosine or sqnr_db, or a forward that returns scores)"
        )
    return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])


def fidelity(
    names: Sequence[str], outputs: Sequence[Tensor], reference: Sequence[Tensor]
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The fidelity metrics ``names`` of ``outputs`` against the float model's ``reference``
    (batch by batch): their values, and per-example values where a metric has them."""
    if len(outputs) != len(reference):
        raise FidelityError("the outputs and the float model's come in different batches")
    per: dict[str, list[Tensor]] = {name: [] for name in names}
    signal = noise = 0.0
    for got, want in zip(outputs, reference, strict=True):
        if got.shape != want.shape:
            raise FidelityError(
                f"an output of shape {tuple(got.shape)} against the float model's "
                f"{tuple(want.shape)}"
            )
        if "agreement" in per:
            a, b = _classes(got, "agreement"), _classes(want, "agreement")
            per["agreement"].append((a.argmax(-1) == b.argmax(-1)).double().mean(dim=1))
        if "kl" in per:
            q = F.log_softmax(_classes(got, "kl").double(), dim=-1)
            p = F.log_softmax(_classes(want, "kl").double(), dim=-1)
            per["kl"].append((p.exp() * (p - q)).sum(-1).mean(dim=1))
        flat_got, flat_want = got.reshape(len(got), -1).double(), want.reshape(len(want), -1)
        flat_want = flat_want.double()
        if "cosine" in per:
            per["cosine"].append(F.cosine_similarity(flat_got, flat_want, dim=1, eps=1e-12))
        signal += float((flat_want**2).sum())
        noise += float(((flat_got - flat_want) ** 2).sum())
    values: dict[str, float] = {}
    per_example: dict[str, np.ndarray] = {}
    for name in names:
        if name == "sqnr_db":
            values[name] = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)
            continue
        array = torch.cat(per[name]).numpy() if per[name] else np.zeros(0)
        per_example[name] = array
        values[name] = float(array.mean()) if len(array) else math.nan
    return values, per_example


