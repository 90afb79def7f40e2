"""A trial's ONNX export, proved: ``onnx.checker`` accepts the file; onnxruntime runs the test
split through the task's own evaluation and computes the PyTorch model's outputs (within a
tenth of their spread on average, and, for a classifier, the same class wherever the top-1
margin exceeds the difference); the QDQ model is timed against the float model and
onnxruntime's own ``quantize_static`` on one thread."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from quantsearch.export._errors import ExportError
from quantsearch.export._formats import ExportContext, register_export_format
from quantsearch.export._onnx_runtime import RuntimeModel
from quantsearch.quantization import ModelInputs, runtime_float_ops
from quantsearch.tasks import evaluation_mode

if TYPE_CHECKING:
    from torch import nn

    from quantsearch.pipeline import MetricInfo
    from quantsearch.quantization import OnnxExport
    from quantsearch.tasks import Task

__all__ = [
    "FLOAT_ONNX_FILE",
    "LATENCY_BATCHES",
    "MIN_AGREEMENT",
    "ONNX_FILE",
    "OUTPUT_TOLERANCE",
    "Latency",
    "OnnxReport",
    "describe_onnx",
    "export_onnx_files",
]

ONNX_FILE = "model.onnx"
FLOAT_ONNX_FILE = "model_float.onnx"
#: The share of test images on which onnxruntime must pick the PyTorch model's class.
MIN_AGREEMENT = 0.999
#: The largest mean absolute difference between onnxruntime's and PyTorch's outputs, as a share
#: of the standard deviation of PyTorch's outputs over the test split.
OUTPUT_TOLERANCE = 0.1
LATENCY_BATCHES = (1, 64)
_MAX_LISTED = 20  # differences printed one by one; the rest are counted


@dataclass(frozen=True)
class Latency:
    """Median milliseconds per ``session.run`` of one batch, onnxruntime on one thread."""

    batch: int
    qdq_ms: float
    float_ms: float
    quantize_static_ms: float | None = None
    """onnxruntime's own ``quantize_static`` (QDQ, per channel, MinMax, uint8 activations and
    int8 weights) of model_float.onnx, calibrated on validation batches; None when it failed."""

    @property
    def speedup(self) -> float:
        """float time / QDQ time: above 1 the QDQ model is faster."""
        return self.float_ms / self.qdq_ms


@dataclass(frozen=True)
class OnnxReport:
    """What the ONNX export of a trial wrote and measured."""

    export: OnnxExport
    float_path: Path
    float_file_bytes: int
    metric: MetricInfo
    """The test metric the export checks (the one the packed export checks, e.g. accuracy)."""
    onnx_metric: float
    """That metric of model.onnx in onnxruntime, through the task's own evaluation."""
    stored_metric: float
    """The trial's test metric as the study stored it (the PyTorch model's)."""
    latency: tuple[Latency, ...]
    test_samples: int
    onnxruntime_version: str
    output_difference: tuple[float, float] = (0.0, 0.0)
    """Mean and largest absolute difference between onnxruntime's and PyTorch's outputs."""
    output_spread: float = 0.0
    """The standard deviation of PyTorch's outputs over the test split: the scale the
    difference is measured against."""
    agreement: float | None = None
    """A classifier's share of test images where onnxruntime's class equals PyTorch's."""
    differences: tuple[tuple[int, int, int, int], ...] = ()
    """(test index, label, PyTorch class, onnxruntime class) where the two differ."""
    unexplained: tuple[int, ...] = ()
    """Test images whose class differs although PyTorch's top-1 margin is more than twice that
    image's largest output difference: no rounding explains them (a graph mismatch does)."""
    runtime_ops: dict[str, int] | None = None
    """Node types of model.onnx after onnxruntime's graph optimisation, with counts."""

    @property
    def runtime_float(self) -> dict[str, int]:
        """Layers onnxruntime computes in float after its graph optimisation, by node type."""
        return runtime_float_ops(self.runtime_ops or {})

    @property
    def integer(self) -> bool:
        """Every compute op on integer kernels, by the export's reading of the graph and in
        onnxruntime's optimised graph."""
        return self.export.integer and not self.runtime_float

    @property
    def agrees(self) -> bool:
        """The outputs differ by at most ``OUTPUT_TOLERANCE`` of their spread on average, and
        no image changes class where its top-1 margin exceeds the outputs' difference: a
        near-tie that rounding at a quantization boundary flips is not a mismatch."""
        return not self.unexplained and self.output_difference[0] <= OUTPUT_TOLERANCE * max(
            self.output_spread, 1e-12
        )

    def summary(self) -> dict[str, Any]:
        """The export.json section."""
        export = self.export
        classes = {} if self.agreement is None else {
            "agreement": self.agreement,
            "unexplained": list(self.unexplained),
            "differences": [
                {"index": i, "label": label, "pytorch": a, "onnx": b}
                for i, label, a, b in self.differences
            ],
        }
        return {
            "file": export.path.name,
            "float_file": self.float_path.name,
            "opset": export.opset,
            "file_bytes": export.file_bytes,
            "float_file_bytes": self.float_file_bytes,
            "size_bytes": export.size_bytes,
            "tensors": {
                t.name: {"bits": t.bits, "type": t.onnx_type, "qmin": t.qmin, "qmax": t.qmax,
                         "per_channel": t.per_channel, "clipped": t.clipped}
                for t in export.tensors
            },
            "unquantized": list(export.unquantized),
            "folded": list(export.folded),
            "integer": self.integer,
            "float_ops": [
                {"name": op.name, "op_type": op.op_type, "reason": op.reason}
                for op in export.float_ops
            ],
            "runtime_quantized": list(export.runtime_quantized),
            "runtime_ops": self.runtime_ops,
            "checker": "passed",
            "metric": self.metric.name,
            f"onnx_{self.metric.name}": self.onnx_metric,
            f"stored_test_{self.metric.name}": self.stored_metric,
            "output_difference": {"mean": self.output_difference[0],
                                  "max": self.output_difference[1]},
            "output_spread": self.output_spread,
            "output_tolerance": OUTPUT_TOLERANCE,
            **classes,
            "latency_ms": [
                {"batch": lat.batch, "qdq": lat.qdq_ms, "float": lat.float_ms,
                 "quantize_static": lat.quantize_static_ms}
                for lat in self.latency
            ],
            "latency_setup": f"onnxruntime {self.onnxruntime_version} CPU, 1 thread, median",
            "test_samples": self.test_samples,
            "agrees": self.agrees,
        }

    def describe(self) -> list[str]:
        """Terminal lines: the files, the agreement with PyTorch and the latency."""
        return describe_onnx(self)

    def check(self, trial_number: int) -> None:
        """Raise ExportError unless onnxruntime computes the PyTorch model's outputs."""
        if self.agrees:
            return
        mean, largest = self.output_difference
        classes = "" if self.agreement is None else (
            f", and {len(self.unexplained)} test images change class with a top-1 margin above "
            f"twice that difference; {len(self.differences)} differ"
        )
        raise ExportError("\n".join([
            f"the ONNX model {self.export.path} of trial {trial_number} does not compute the "
            f"PyTorch model's outputs: they differ by {mean:.4g} on average ({largest:.4g} at "
            f"most) against a spread of {self.output_spread:.4g} (allowed: {OUTPUT_TOLERANCE:g}"
            f" of it on average){classes} (test {self.metric.name} "
            f"{self.metric.format(self.onnx_metric)}, stored "
            f"{self.metric.format(self.stored_metric)})",
            *_difference_lines(self.differences),
        ]))


def _calls(task: Task, model: nn.Module, dataset: Any, batch_size: int, count: int
           ) -> list[ModelInputs]:
    """The inputs of the model's first call on each of the first ``count`` batches of
    ``dataset`` (as the task batches and runs it)."""
    from quantsearch.tasks import Batches

    calls: list[ModelInputs] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict, _output: Any) -> None:
        if len(calls) < count and not seen:
            calls.append(ModelInputs(tuple(args), dict(kwargs)))
            seen.append(True)

    seen: list[bool] = []
    handle = model.register_forward_hook(hook, with_kwargs=True)
    batches = Batches(dataset, batch_size, torch.device("cpu"), shuffle=False,
                      collate_fn=task.collate_fn, raw=not task.is_classifier)
    try:
        with evaluation_mode(model, torch.device("cpu")):
            for batch in batches:
                seen.clear()
                task.output(model, batch)
                if len(calls) == count:
                    break
    finally:
        handle.remove()
    if not calls:
        raise ExportError(f"task {task.name!r}: its forward never calls the model")
    return calls


def _metric_info(task: Task, name: str) -> MetricInfo:
    from quantsearch.pipeline import metric_info

    declared = next((m for m in task.task_metrics if m.name == name), None)
    if declared is None:
        return metric_info(name, "maximize")
    return metric_info(name, declared.direction, label=declared.label, unit=declared.unit,
                       proportion=declared.proportion)


def _labels(task: Task) -> np.ndarray:
    """A classifier's test labels, in the order of its test batches."""
    from quantsearch.tasks import Batches

    batches = Batches(task.test_set, 256, torch.device("cpu"), shuffle=False)
    return np.concatenate([batch[1].numpy() for batch in batches])


def _classes(kept: list[tuple[np.ndarray, np.ndarray]], labels: np.ndarray
             ) -> dict[str, Any]:
    """The classifier's part of the check: where the classes differ, and which of those no
    rounding explains (PyTorch's top-1 margin above twice the image's output difference)."""
    torch_scores = np.concatenate([ours for ours, _ in kept])
    onnx_scores = np.concatenate([theirs for _, theirs in kept])
    torch_classes, onnx_classes = torch_scores.argmax(axis=1), onnx_scores.argmax(axis=1)
    differ = np.flatnonzero(torch_classes != onnx_classes)
    samples = len(labels)
    difference = np.abs(onnx_scores - torch_scores)
    top2 = np.sort(torch_scores, axis=1)[:, -2:]
    margin = top2[:, -1] - top2[:, 0] if torch_scores.shape[1] > 1 else np.full(samples, np.inf)
    return {
        "agreement": 1.0 - len(differ) / samples,
        "differences": tuple(
            (int(i), int(labels[i]), int(torch_classes[i]), int(onnx_classes[i]))
            for i in differ
        ),
        "unexplained": tuple(int(i) for i in differ if margin[i] > 2 * difference[i].max()),
    }


def export_onnx_files(
    model: nn.Module,
    float_model: nn.Module,
    task: Task,
    out_dir: Path,
    *,
    stored_metric: float,
    metric: str = "accuracy",
    evaluate: Callable[[nn.Module], float] | None = None,
    latency_repeats: int = 20,
) -> OnnxReport:
    """Write model.onnx (QDQ) and model_float.onnx to ``out_dir``, run model.onnx on the test
    split beside ``model`` (the trial's model, whose test ``metric`` the study stored as
    ``stored_metric``), and time both files (and onnxruntime's ``quantize_static`` of the
    float file) on batches of 1 and 64.

    The test split runs through the task's own evaluation with the ONNX model in the place of
    the PyTorch model (``evaluate``: the export's test-metric function; default: the task's
    ``measure``), and every call compares the two models' outputs on the same inputs.
    ``float_model`` is the same architecture with the trained float weights. Raises
    ExportError when a quantizer has no exact QDQ form or the ONNX extra is missing; the
    agreement is checked by the caller (:meth:`OnnxReport.check`), after export.json is
    written.
    """
    from quantsearch.pipeline import LatencySetup, time_sessions
    from quantsearch.quantization import OnnxExportError, export_onnx, runtime_op_counts
    from quantsearch.tasks import measure

    path, float_path = out_dir / ONNX_FILE, out_dir / FLOAT_ONNX_FILE
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ExportError(
            f"no ONNX export: {error}: install the ONNX extra: pip install 'quantsearch[onnx]'"
        ) from None
    try:
        export = export_onnx(model, path, task.dummy_input)
        export_onnx(float_model, float_path, task.dummy_input)
    except (OnnxExportError, ImportError) as error:
        raise ExportError(f"no ONNX export: {error}") from error
    onnx.checker.check_model(str(path), full_check=True)  # the file as written

    was_training = model.training
    model.eval()
    try:
        runtime = RuntimeModel(path, model, keep=task.is_classifier)
        value = (evaluate(runtime) if evaluate is not None
                 else measure(runtime, task, task.test_set).values.get(metric, math.nan))
        classes = _classes(runtime.kept, _labels(task)) if task.is_classifier else {}
    finally:
        model.train(was_training)
    example = _calls(task, float_model, task.test_set, 1, 1)[0]
    qs_path = _quantize_static(float_path, task, float_model, out_dir)
    latency = []
    for batch in LATENCY_BATCHES:
        feed = example.batched(batch).feed(float_model)
        files = [path, float_path] + ([qs_path] if qs_path is not None else [])
        times = time_sessions(files, feed, LatencySetup(batch_size=batch,
                                                        repeats=latency_repeats))
        medians = [statistics.median(kept) for kept in times]
        latency.append(Latency(
            batch=batch, qdq_ms=medians[0], float_ms=medians[1],
            quantize_static_ms=medians[2] if qs_path is not None else None,
        ))
    if qs_path is not None:
        qs_path.unlink()
    comparison = runtime.comparison
    return OnnxReport(
        export=export,
        float_path=float_path,
        float_file_bytes=float_path.stat().st_size,
        metric=_metric_info(task, metric),
        onnx_metric=float(value),
        stored_metric=stored_metric,
        latency=tuple(latency),
        test_samples=len(task.test_set),  # type: ignore[arg-type]
        onnxruntime_version=onnxruntime.__version__,
        output_difference=(comparison.mean_difference, comparison.largest),
        output_spread=comparison.spread,
        runtime_ops=runtime_op_counts(path),
        **classes,
    )


def _quantize_static(float_path: Path, task: Task, float_model: nn.Module, out_dir: Path
                     ) -> Path | None:
    """model_float.onnx through onnxruntime's ``quant_pre_process`` and ``quantize_static``
    (QDQ, per-channel, MinMax on 4 validation batches of 32, uint8 activations and int8
    weights), for the latency comparison; None when onnxruntime's tool fails on the model."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        feeds = [inputs.feed(float_model)
                 for inputs in _calls(task, float_model, task.val_set, 32, 4)]

        class _Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.feeds = iter(feeds)

            def get_next(self) -> dict[str, Any] | None:
                return next(self.feeds, None)

        prepared = out_dir / "model_float.prepared.onnx.tmp"
        out = out_dir / "model_quantize_static.onnx.tmp"
        quant_pre_process(str(float_path), str(prepared))
        quantize_static(
            str(prepared), str(out), _Reader(), quant_format=QuantFormat.QDQ,
            per_channel=True, calibrate_method=CalibrationMethod.MinMax,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )
        prepared.unlink()
        return out
    except Exception:
        return None


def _types_line(export: OnnxExport) -> str:
    """E.g. ``weights int4 x3, uint8 x1; activations uint8 x3 (1 clipped)``."""
    parts = []
    for label, weights in (("weights", True), ("activations", False)):
        tensors = [t for t in export.tensors if t.name.endswith(".weight") == weights]
        if not tensors:
            continue
        counts: dict[str, int] = {}
        for t in tensors:
            counts[t.onnx_type] = counts.get(t.onnx_type, 0) + 1
        text = ", ".join(f"{kind} x{n}" for kind, n in counts.items())
        clipped = sum(t.clipped for t in tensors)
        parts.append(f"{label} {text}" + (f" ({clipped} with a narrower range)" if clipped else ""))
    return "; ".join(parts) or "no quantized tensor (float model)"


def _difference_lines(differences: tuple[tuple[int, int, int, int], ...]) -> list[str]:
    lines = [
        f"  test image {index} (label {label}): PyTorch {ours}, onnxruntime {theirs}"
        for index, label, ours, theirs in differences[:_MAX_LISTED]
    ]
    if len(differences) > _MAX_LISTED:
        lines.append(f"  ... and {len(differences) - _MAX_LISTED} more (export.json)")
    return lines


def describe_onnx(report: OnnxReport) -> list[str]:
    """Terminal lines for an ONNX export."""
    export = report.export
    lines = [
        f"  {export.path.name:<17} ONNX QDQ model (opset {export.opset}), "
        f"{export.file_bytes:,} bytes (model size {export.size_bytes:,} bytes): "
        f"{_types_line(export)}",
        f"  {report.float_path.name:<17} float ONNX model, {report.float_file_bytes:,} bytes",
    ]
    if export.unquantized:
        lines.append(f"  left in float (never calibrated): {', '.join(export.unquantized)}")
    if export.folded:
        lines.append(f"  quantized twice in a row, written once: {', '.join(export.folded)}")
    if export.tensors and report.integer:
        lines.append("  onnxruntime's integer kernels run every compute op")
    elif export.float_ops:
        lines.append(f"  {len(export.float_ops)} compute op(s) stay float:")
        lines += [f"    {op.name} ({op.op_type}): {op.reason}" for op in export.float_ops]
    elif export.tensors:
        kinds = ", ".join(f"{kind} x{n}" for kind, n in report.runtime_float.items())
        lines.append(f"  onnxruntime's optimised graph still computes in float: {kinds}")
    if export.runtime_quantized:
        lines.append(
            "  float weights onnxruntime quantizes itself (int8 per tensor; their inputs and "
            f"outputs are quantized): {', '.join(export.runtime_quantized)}"
        )
    if report.runtime_ops:
        counts = ", ".join(f"{kind} x{n}" for kind, n in report.runtime_ops.items())
        lines.append(f"  after onnxruntime's graph optimisation: {counts}")
    verdict = "agree" if report.agrees else "DISAGREE"
    mean, largest = report.output_difference
    metric = report.metric
    classes = "" if report.agreement is None else (
        f"same class as PyTorch on {report.test_samples - len(report.differences)}/"
        f"{report.test_samples} test images ({report.agreement:.2%}); "
    )
    changes = "" if report.agreement is None else (
        f"; {len(report.unexplained)} class change(s) with a margin above the difference"
    )
    lines.append(
        f"onnxruntime: test {metric.name} {metric.format(report.onnx_metric)} (stored: "
        f"{metric.format(report.stored_metric)}); {classes}outputs differ by {mean:.3g} on "
        f"average, {largest:.3g} at most, against a spread of {report.output_spread:.3g} "
        f"(allowed: {OUTPUT_TOLERANCE:g} of it){changes}: {verdict}; onnx.checker passed"
    )
    lines += _difference_lines(report.differences)
    lines.append(
        f"latency (onnxruntime {report.onnxruntime_version}, CPU, 1 thread, median per batch):"
    )
    for lat in report.latency:
        static = "" if lat.quantize_static_ms is None else (
            f", onnxruntime quantize_static {lat.quantize_static_ms:.3f} ms"
        )
        lines.append(
            f"  batch {lat.batch:>3}: QDQ {lat.qdq_ms:.3f} ms, float {lat.float_ms:.3f} ms "
            f"(float/QDQ {lat.speedup:.2f}x){static}"
        )
    return lines


@register_export_format(
    "onnx", description="those and an ONNX QDQ model, checked in onnxruntime and timed"
)
def _onnx_format(context: ExportContext) -> OnnxReport:
    """The ``onnx`` format: model.onnx and model_float.onnx, run and timed in onnxruntime."""
    return export_onnx_files(
        context.model,
        context.float_model,
        context.task,
        context.out_dir,
        stored_metric=context.stored_accuracy,
        metric=context.metric,
        evaluate=context.evaluate,
    )
