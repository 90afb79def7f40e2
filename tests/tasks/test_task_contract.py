"""The generic task contract: dict batches, a task's own loss and metrics, per-example values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from quantsearch.pipeline import bootstrap_interval, fidelity, measure_split
from quantsearch.tasks import (
    TaskError,
    TrainConfig,
    fit,
    get_task,
    make_optimizer,
    measure,
    seed_everything,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "regression_task.py"


@pytest.fixture(scope="module")
def task():  # type: ignore[no-untyped-def]
    return get_task(f"{EXAMPLE}:make_task", options={"limit": 120, "hidden": 8}, seed=0)


def test_a_regression_task_trains_with_its_own_loss_and_reports_its_metric(task) -> None:  # type: ignore[no-untyped-def]
    assert not task.is_classifier and task.trains
    seed_everything(0)
    model = task.build_model()
    config = TrainConfig(epochs=10, batch_size=16, lr=0.01)
    result = fit(model, task, make_optimizer(model.parameters(), config), config, seed=0)
    after = measure(model, task, task.val_set)
    assert math.isnan(result.val_accuracy)
    assert result.steps_run == 10 * math.ceil(len(task.train_set) / 16)
    assert result.epoch_losses[-1] < result.epoch_losses[0]  # its own loss went down
    assert result.val_metrics["mae"] == pytest.approx(after.values["mae"])
    # Per-example absolute errors come back, and the metric is their mean.
    assert after.per_example["mae"].shape == (len(task.val_set),)
    assert after.values["mae"] == pytest.approx(float(after.per_example["mae"].mean()))


def test_a_task_metric_gets_a_bootstrap_interval_around_it(task) -> None:  # type: ignore[no-untyped-def]
    seed_everything(0)
    model = task.build_model()
    split = measure_split(model, task, "val", device=torch.device("cpu"))
    low, high = split.intervals["mae"]
    assert low < split.values["mae"] < high


def test_the_bootstrap_interval_is_seeded_and_follows_reduce() -> None:
    values = np.arange(100, dtype=float)
    assert bootstrap_interval(values) == bootstrap_interval(values)
    low, high = bootstrap_interval(values, lambda v: float(np.exp(v.mean() / 100)))
    assert low < math.exp(0.495) < high


def test_fidelity_of_identical_outputs_is_perfect_and_noise_lowers_it() -> None:
    generator = torch.Generator().manual_seed(0)
    outputs = [torch.randn(8, 5, generator=generator) for _ in range(3)]
    names = ("agreement", "kl", "sqnr_db", "cosine")
    same, per = fidelity(names, outputs, outputs)
    assert same["agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-12)
    assert same["cosine"] == pytest.approx(1.0) and same["sqnr_db"] == math.inf
    assert per["agreement"].shape == (24,)
    noisy = [o + 0.3 * torch.randn(o.shape, generator=generator) for o in outputs]
    values, _ = fidelity(names, noisy, outputs)
    assert values["kl"] > 0 and values["cosine"] < 1 and 0 < values["sqnr_db"] < 60
    # SQNR is 10 log10 of signal over noise energy.
    signal = sum(float((o**2).sum()) for o in outputs)
    noise = sum(float(((n - o) ** 2).sum()) for n, o in zip(noisy, outputs, strict=True))
    assert values["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise))


def test_agreement_needs_class_scores() -> None:
    outputs = [torch.randn(4)]
    with pytest.raises(ValueError, match="agreement compares class scores"):
        fidelity(("agreement",), outputs, outputs)


def test_a_task_with_metrics_but_no_evaluate_is_refused(tmp_path: Path) -> None:
    body = EXAMPLE.read_text() + (
        "\n\ndef broken(**kwargs):\n    import dataclasses\n"
        "    return dataclasses.replace(make_task(**kwargs), evaluate=None)\n"
    )
    path = tmp_path / "broken.py"
    path.write_text(body)
    with pytest.raises(TaskError, match=r"Task\.metrics are declared but Task\.evaluate"):
        get_task(f"{path}:broken", seed=0)
