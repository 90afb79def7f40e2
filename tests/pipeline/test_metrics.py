"""Metrics: the registry, bitops from traced MACs, accuracy intervals."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binomtest
from torch import nn

from quantsearch.pipeline import (
    METRICS,
    Evaluated,
    Metric,
    ModelProfile,
    accuracy_interval,
    get_metric,
    register_metric,
)


def _net() -> nn.Module:
    # conv: 2x2x2 outputs x 9 weights each = 72 MACs; fc: 3 outputs x 8 inputs = 24 MACs.
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU6(), nn.MaxPool2d(1), nn.Flatten(), nn.Linear(8, 3)
    )


def test_the_profile_traces_the_execution_order_and_the_macs_of_each_layer() -> None:
    profile = ModelProfile.trace(_net(), torch.zeros(1, 1, 4, 4))
    assert profile.order == ("0", "1", "2", "3", "4")
    assert dict(profile.macs) == {"0": 72, "4": 24}


def test_bitops_multiplies_macs_by_weight_bits_and_the_bits_of_the_activation() -> None:
    profile = ModelProfile.trace(_net(), torch.zeros(1, 1, 4, 4))
    assert profile.bitops({}) == 96 * 32 * 32
    # conv: 4-bit weights on a float input; the ReLU6's 8-bit output survives the pooling and
    # flattening into the linear layer, whose weights have 2 bits.
    bits = {"0": {"weight": 4}, "1": {"output": 8}, "4": {"weight": 2}}
    assert profile.bitops(bits) == 72 * 4 * 32 + 24 * 2 * 8
    # A layer's own input quantizer decides its activation bits.
    assert profile.bitops({**bits, "4": {"weight": 2, "input": 6}}) == 72 * 4 * 32 + 24 * 2 * 6
    # A conv/linear output that is not quantized is float again for the next layer.
    assert profile.bitops({"0": {"weight": 4}, "4": {"weight": 2}}) == 72 * 4 * 32 + 24 * 2 * 32


def test_the_registry_names_every_builtin_metric_with_its_direction() -> None:
    assert {name: m.direction for name, m in METRICS.items()} == {
        "accuracy": "maximize",
        "size_bytes": "minimize",
        "bitops": "minimize",
        "agreement": "maximize",
        "kl": "minimize",
        "sqnr_db": "maximize",
        "cosine": "maximize",
        "latency": "minimize",
    }
    with pytest.raises(KeyError, match="unknown metric 'throughput'; known: accuracy"):
        get_metric("throughput")


def test_a_registered_metric_is_computed_from_the_evaluated_model() -> None:
    model = _net()
    metric = register_metric(
        Metric(
            "parameters",
            "minimize",
            "parameters",
            lambda e: float(sum(p.numel() for p in e.model.parameters())),
            relative=True,
        )
    )
    try:
        evaluated = Evaluated(
            model=model,
            task=None,  # type: ignore[arg-type]
            layer_bits={},
            profile=ModelProfile.trace(model, torch.zeros(1, 1, 4, 4)),
            val_accuracy=0.5,
            size_bytes=10,
        )
        assert get_metric("parameters").compute(evaluated) == 2 * 9 + 2 + 3 * 8 + 3
        assert METRICS["bitops"].compute(evaluated) == 96 * 32 * 32
        assert METRICS["accuracy"].compute(evaluated) == 0.5
    finally:
        del METRICS[metric.name]
    with pytest.raises(ValueError, match="direction must be maximize or minimize"):
        register_metric(Metric("bad", "up", "bad", lambda e: 0.0))  # type: ignore[arg-type]


@pytest.mark.parametrize(("correct", "samples"), [(263, 270), (10, 20), (270, 270), (0, 9)])
def test_the_accuracy_interval_is_the_wilson_interval(correct: int, samples: int) -> None:
    accuracy = correct / samples
    low, high = accuracy_interval(accuracy, samples)
    expected = binomtest(correct, samples).proportion_ci(method="wilson")
    assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-9)
    assert low <= accuracy <= high


def test_an_accuracy_without_samples_has_no_interval() -> None:
    assert all(math.isnan(v) for v in accuracy_interval(0.9, 0))
