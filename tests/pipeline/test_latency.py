"""The latency metric: a model's ONNX export timed in onnxruntime, cached by config, with its
setup parsed from a space (tests assert behaviour, never timings)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from quantsearch.pipeline import METRICS, LatencySetup, TrialRecord, measure_latency
from quantsearch.quantization import QAT_Quantizer
from quantsearch.search._errors import SpaceError
from quantsearch.search._sections import parse_latency

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _model(quantized: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    if not quantized:
        return model.eval()
    config = [
        {"quant_types": ["input", "weight", "output"], "quant_bits": 8,
         "op_types": ["Conv2d", "Linear"]},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
    ]
    quantizer = QAT_Quantizer(model, config, dummy_input=torch.randn(1, 1, 8, 8))
    model = quantizer.compress()
    with quantizer.calibrate():
        model(torch.randn(8, 1, 8, 8))
    return model.eval()


def test_latency_is_a_registered_minimised_metric_in_ms() -> None:
    metric = METRICS["latency"]
    assert metric.direction == "minimize" and metric.unit == "ms"
    assert metric.info.shown_label.endswith("(ms)")


def test_a_measurement_records_its_setup_repeats_and_spread() -> None:
    setup = LatencySetup(batch_size=4, threads=1, repeats=5, warmup=1)
    measured = measure_latency(_model(True), torch.randn(1, 1, 8, 8), setup)
    assert measured.median_ms > 0 and measured.spread_ms >= 0
    assert measured.repeats == 5 and measured.integer and measured.float_ops == 0
    fields = measured.record_fields()
    assert fields["latency_setup"]["batch_size"] == 4
    record = TrialRecord(**fields)
    assert record.latency_ms == measured.median_ms and record.latency_integer
    # A float model is timed too; its compute stays float.
    float_measured = measure_latency(_model(False), torch.randn(1, 1, 8, 8), setup)
    assert not float_measured.integer


def test_a_config_measured_before_is_not_timed_again() -> None:
    setup = LatencySetup(repeats=3, warmup=0)
    config: Any = {"algorithm": "qat", "config_list": [{"quant_types": ["weight"], "x": 1}]}
    first = measure_latency(_model(True), torch.randn(1, 1, 8, 8), setup, config=config)
    again = measure_latency(_model(True), torch.randn(1, 1, 8, 8), setup, config=config)
    assert not first.cached and again.cached
    assert again.median_ms == first.median_ms and again.spread_ms == first.spread_ms
    other = measure_latency(
        _model(True), torch.randn(1, 1, 8, 8), LatencySetup(repeats=4, warmup=0), config=config
    )
    assert not other.cached  # another setup is another measurement


def test_the_space_section_is_checked() -> None:
    assert parse_latency(None) is None
    assert parse_latency(True) == LatencySetup()
    setup = parse_latency({"batch_size": 32, "threads": 2, "repeats": 10})
    assert (setup.batch_size, setup.threads, setup.repeats) == (32, 2, 10)
    with pytest.raises(SpaceError, match=r"latency\.batch_size"):
        parse_latency({"batch_size": 0})
    with pytest.raises(SpaceError, match=r"latency\.provider"):
        parse_latency({"provider": "cuda"})
    with pytest.raises(SpaceError):
        parse_latency({"batch": 1})


def test_the_float_reference_is_timed_in_the_same_loop() -> None:
    setup = LatencySetup(batch_size=2, repeats=4, warmup=1)
    measured = measure_latency(
        _model(True), torch.randn(1, 1, 8, 8), setup, reference=_model(False),
        reference_key="test-float",
    )
    assert measured.reference_ms is not None and measured.reference_ms > 0
    assert measured.speedup == measured.reference_ms / measured.median_ms
    fields = measured.record_fields()
    assert fields["latency_float_ms"] == measured.reference_ms
    assert fields["latency_speedup"] == measured.speedup


def test_integer_is_what_onnxruntime_runs_not_only_what_the_export_reads() -> None:
    # Symmetric uint8 activations put a ReLU's output on zero point 128: onnxruntime keeps the
    # ReLU and computes the Linear layers in float (FusedGemm), a rewrite the export's own
    # reading of the graph does not follow.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    config = [
        {"quant_types": ["input", "weight", "output"], "quant_bits": 8,
         "op_types": ["Linear"], "quant_scheme": "per_tensor_symmetric"},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"],
         "quant_scheme": "per_tensor_symmetric"},
    ]
    quantizer = QAT_Quantizer(model, config, dummy_input=torch.randn(1, 16))
    model = quantizer.compress()
    with quantizer.calibrate():
        model(torch.randn(8, 16))
    measured = measure_latency(model.eval(), torch.randn(1, 16), LatencySetup(repeats=3))
    assert not measured.integer and measured.float_ops >= 1
