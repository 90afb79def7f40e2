"""`quantsearch export --format onnx`: a trained trial as an ONNX QDQ model, checked in
onnxruntime on the test split and timed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import optuna
import pytest

from quantsearch.cli import main
from quantsearch.export import (
    ExportError,
    Latency,
    OnnxReport,
    describe_export,
    describe_onnx,
    export_trial,
)
from quantsearch.export._onnx import MIN_AGREEMENT
from quantsearch.pipeline import metric_info
from quantsearch.quantization import OnnxExport, OnnxTensor
from quantsearch.tasks import Task, get_task

from .test_export import _study

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def task() -> Task:
    return get_task("digits", seed=0)


def test_cli_exports_onnx_that_agrees_with_the_study(
    tmp_path: Path, task: Task, capsys: pytest.CaptureFixture[str]
) -> None:
    _study(tmp_path, task, ["qat"])  # weights 4 bits, ReLU6 outputs 8 bits
    storage = f"sqlite:///{tmp_path / 'exp.db'}"
    out = tmp_path / "onnx"
    code = main(["export", "--storage", storage, "--study", "exp", "--trial", "0",
                 "--out", str(out), "--format", "onnx"])
    text, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "calibration.json", "export.json", "model.onnx", "model.pt", "model.qpk",
        "model_dequantized.pt", "model_float.onnx",
    ]
    trial = optuna.load_study(study_name="exp", storage=storage).trials[0]
    stored = trial.user_attrs["test_accuracy"]
    summary = json.loads((out / "export.json").read_text())["onnx"]
    samples = summary["test_samples"]
    assert samples == len(task.test_set)
    # At least 99.9% of the images, or (on this 270-image split) all but one.
    assert summary["agrees"] is True
    assert summary["agreement"] >= MIN_AGREEMENT or len(summary["differences"]) == 1
    assert len(summary["differences"]) == round((1 - summary["agreement"]) * samples)
    # Each differing image can move the accuracy by one image at most.
    assert abs(summary["onnx_accuracy"] - stored) * samples <= len(summary["differences"]) + 1e-6
    assert summary["checker"] == "passed"
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    # 4-bit uint weights (QAT's default dtype) as uint4, 8-bit activations as uint8.
    types = {name: t["type"] for name, t in summary["tensors"].items()}
    assert types == {"conv1.weight": "uint4", "conv2.weight": "uint4", "fc1.weight": "uint4",
                     "fc2.weight": "uint4", "relu1.output": "uint8", "relu2.output": "uint8",
                     "relu3.output": "uint8"}
    assert summary["size_bytes"] == trial.user_attrs["size_bytes"]
    assert summary["size_bytes"] < summary["file_bytes"] < summary["size_bytes"] + 8192
    assert summary["file_bytes"] < summary["float_file_bytes"] / 5
    latency = summary["latency_ms"]
    assert [entry["batch"] for entry in latency] == [1, 64]
    assert all(entry["qdq"] > 0 and entry["float"] > 0 for entry in latency)
    assert "1 thread" in summary["latency_setup"]
    # The terminal shows the same facts.
    assert "model.onnx        ONNX QDQ model (opset 25)" in text
    assert "weights uint4 x4; activations uint8 x3" in text
    accuracy = summary["onnx_accuracy"]
    assert f"onnxruntime: test accuracy {accuracy:.2%} (stored: {stored:.2%})" in text
    assert f"same class as PyTorch on {samples - len(summary['differences'])}/{samples}" in text
    assert "onnx.checker passed" in text
    assert "batch   1: QDQ " in text and "batch  64: QDQ " in text


def _report(tmp_path: Path, **fields: Any) -> OnnxReport:
    export = OnnxExport(path=tmp_path / "model.onnx", file_bytes=900, size_bytes=800, opset=25,
                        tensors=(), unquantized=())
    differences = tuple((i, 1, 1, 7) for i in range(25))
    return OnnxReport(
        export=export, float_path=tmp_path / "model_float.onnx", float_file_bytes=4000,
        metric=metric_info("accuracy", "maximize"), onnx_metric=0.9, stored_metric=0.95,
        agreement=1 - 25 / 1000,
        differences=differences, latency=(Latency(batch=1, qdq_ms=0.2, float_ms=0.1),),
        test_samples=1000, onnxruntime_version="1.32.0", **fields,
    )


def test_integer_is_also_read_from_onnxruntimes_optimised_graph(tmp_path: Path) -> None:
    codes = OnnxTensor(name="fc.weight", bits=8, onnx_type="int8", qmin=-128, qmax=127,
                       per_channel=False, clipped=False)
    fused = {"QGemm": 2, "QuantizeLinear": 1, "DequantizeLinear": 1}
    quantized = OnnxExport(path=tmp_path / "model.onnx", file_bytes=900, size_bytes=800,
                           opset=25, tensors=(codes,), unquantized=())
    report = dataclasses.replace(_report(tmp_path, runtime_ops=fused), export=quantized)
    assert report.integer and report.summary()["integer"] is True
    assert "  onnxruntime's integer kernels run every compute op" in describe_onnx(report)
    # A ReLU that onnxruntime kept: the Gemm before it computes in float.
    report = dataclasses.replace(report, runtime_ops={**fused, "FusedGemm": 1})
    assert not report.integer and report.runtime_float == {"FusedGemm": 1}
    assert report.summary()["integer"] is False
    assert "  onnxruntime's optimised graph still computes in float: FusedGemm x1" in (
        describe_onnx(report)
    )


def test_near_ties_that_rounding_flips_do_not_fail_the_export(tmp_path: Path) -> None:
    # 25 images change class, each where PyTorch's top-1 margin is within the difference.
    report = _report(tmp_path, output_difference=(0.01, 0.05), output_spread=2.0)
    assert report.agrees
    report.check(4)
    assert report.summary()["output_difference"] == {"mean": 0.01, "max": 0.05}


def test_class_changes_beyond_the_difference_fail_the_export_and_are_listed(
    tmp_path: Path,
) -> None:
    report = _report(
        tmp_path, output_difference=(0.01, 0.05), output_spread=2.0, unexplained=(3, 19)
    )
    assert not report.agrees
    lines = describe_onnx(report)
    assert "  test image 3 (label 1): PyTorch 1, onnxruntime 7" in lines
    assert "  ... and 5 more (export.json)" in lines
    assert any(line.endswith("(float/QDQ 0.50x)") for line in lines)
    with pytest.raises(ExportError) as raised:
        report.check(4)
    message = str(raised.value)
    assert "of trial 4 does not compute the PyTorch model's outputs" in message
    assert "differ by 0.01 on average (0.05 at most) against a spread of 2" in message
    assert "2 test images change class with a top-1 margin above twice" in message
    assert "test image 19 (label 1): PyTorch 1, onnxruntime 7" in message
    # Outputs far off on average fail too, whatever the classes.
    assert not _report(tmp_path, output_difference=(0.5, 1.0), output_spread=2.0).agrees


def test_an_unknown_format_is_refused(tmp_path: Path, task: Task) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    with pytest.raises(ExportError, match=r"unknown export format 'tflite': expected one of"):
        export_trial(study, 0, tmp_path / "x", task=task, format="tflite")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["float", "naive", "lsq", "dorefa", "bnn"])
def test_other_algorithms_export_to_onnx(tmp_path: Path, task: Task, algorithm: str) -> None:
    study = _study(tmp_path, task, [algorithm])
    result = export_trial(study, 0, tmp_path / "export", task=task, format="onnx")
    assert result.onnx is not None and result.onnx.agrees
    text = describe_export(result)
    assert "onnxruntime: test accuracy" in text
    if algorithm == "float":
        assert "no quantized tensor (float model)" in text


def _regression_task() -> Task:
    path = Path(__file__).resolve().parents[2] / "examples" / "regression_task.py"
    return get_task(f"{path}:make_task", options={"limit": 120}, seed=0)


def test_a_regression_model_with_keyword_inputs_exports_and_its_outputs_are_compared(
    tmp_path: Path,
) -> None:
    import torch

    from quantsearch.export import export_onnx_files
    from quantsearch.quantization import QAT_Quantizer
    from quantsearch.tasks import measure

    task = _regression_task()
    torch.manual_seed(0)
    float_model = task.build_model()
    model = task.build_model()
    model.load_state_dict(float_model.state_dict())
    config = [{"quant_types": ["weight", "output"], "quant_bits": 8,
               "op_types": ["Linear", "ReLU6"]}]
    quantizer = QAT_Quantizer(model, config, torch.optim.SGD(model.parameters(), lr=0.0),
                              dummy_input=task.dummy_input)
    quantizer.compress()
    model.train()
    for batch in torch.utils.data.DataLoader(task.train_set, batch_size=32):
        task.forward(model, batch)  # the output ranges
    stored = measure(model, task, task.test_set).values["mae"]
    report = export_onnx_files(model, float_model, task, tmp_path, stored_metric=stored,
                               metric="mae", latency_repeats=3)
    names = [i.name for i in onnx.load(str(tmp_path / "model.onnx")).graph.input]
    assert names == ["features"]  # the keyword argument's name
    summary = report.summary()
    # The task's own evaluation ran on onnxruntime's outputs: the MAE comes back as stored.
    assert summary["metric"] == "mae" and summary["onnx_mae"] == pytest.approx(stored, rel=1e-3)
    assert "agreement" not in summary and "differences" not in summary
    mean, largest = report.output_difference
    assert 0 <= mean <= largest and mean <= 0.1 * report.output_spread
    model.eval()
    with torch.no_grad():
        outputs = torch.cat([task.forward(model, batch) for batch in
                             torch.utils.data.DataLoader(task.test_set, batch_size=50)])
    assert report.output_spread == pytest.approx(float(outputs.std(unbiased=False)), rel=1e-4)
    assert report.agrees
    text = "\n".join(report.describe())
    assert (f"onnxruntime: test mae {report.onnx_metric:.4g} points (stored: {stored:.4g} points)"
            in text)
    assert "same class" not in text and "(allowed: 0.1 of it): agree" in text
    assert all(entry.qdq_ms > 0 and entry.float_ms > 0 for entry in report.latency)


def test_outputs_beyond_the_tolerance_fail_a_regression_export(tmp_path: Path) -> None:
    export = OnnxExport(path=tmp_path / "model.onnx", file_bytes=900, size_bytes=800, opset=25,
                        tensors=(), unquantized=())
    report = OnnxReport(
        export=export, float_path=tmp_path / "model_float.onnx", float_file_bytes=4000,
        metric=metric_info("mae", "minimize", unit="points"), onnx_metric=61.0,
        stored_metric=47.5, latency=(), test_samples=89, onnxruntime_version="1.32.0",
        output_difference=(0.3, 1.2), output_spread=1.0,
    )
    assert not report.agrees
    with pytest.raises(ExportError) as raised:
        report.check(2)
    message = str(raised.value)
    assert "differ by 0.3 on average (1.2 at most) against a spread of 1 (allowed: 0.1" in message
    assert "(test mae 61 points, stored 47.5 points)" in message
    assert "change class" not in message
