"""A trial's ONNX export, proved: onnxruntime classifies the test split as the trial's PyTorch
model does, ``onnx.checker`` accepts the file, and the QDQ model's latency is measured against
the float model's on one thread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantsearch.export._errors import ExportError
from quantsearch.export._formats import ExportContext, register_export_format

if TYPE_CHECKING:
    import torch
    from torch import nn

    from quantsearch.quantization import OnnxExport
    from quantsearch.tasks import Task

__all__ = [
    "FLOAT_ONNX_FILE",
    "LATENCY_BATCHES",
    "MIN_AGREEMENT",
    "ONNX_FILE",
    "Latency",
    "OnnxReport",
    "describe_onnx",
    "export_onnx_files",
    "measure_latency",
]

ONNX_FILE = "model.onnx"
FLOAT_ONNX_FILE = "model_float.onnx"
#: The share of test images on which onnxruntime must pick the PyTorch model's class.
MIN_AGREEMENT = 0.999
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
    onnx_accuracy: float
    """Test accuracy of model.onnx in onnxruntime."""
    stored_test_accuracy: float
    """The trial's test accuracy as the study stored it (the PyTorch model's)."""
    agreement: float
    """Share of test images where onnxruntime's class equals the PyTorch model's."""
    differences: tuple[tuple[int, int, int, int], ...]
    """(test index, label, PyTorch class, onnxruntime class) where the two differ."""
    latency: tuple[Latency, ...]
    test_samples: int
    onnxruntime_version: str
    output_difference: tuple[float, float] = (0.0, 0.0)
    """Mean and largest absolute difference between onnxruntime's and PyTorch's outputs."""
    output_spread: float = 0.0
    """The standard deviation of PyTorch's outputs over the test split: the scale the
    difference is measured against."""
    unexplained: tuple[int, ...] = ()
    """Test images whose class differs although PyTorch's top-1 margin is more than twice that
    image's largest output difference: no rounding explains them (a graph mismatch does)."""
    runtime_ops: dict[str, int] | None = None
    """Node types of model.onnx after onnxruntime's graph optimisation, with counts."""

    @property
    def agrees(self) -> bool:
        """No image differs where its top-1 margin exceeds the outputs' difference, and the
        outputs differ by less than a tenth of their spread on average: a near-tie that
        rounding at a quantization boundary flips is not a mismatch."""
        return not self.unexplained and self.output_difference[0] <= 0.1 * max(
            self.output_spread, 1e-12
        )

    def summary(self) -> dict[str, Any]:
        """The export.json section."""
        export = self.export
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
            "integer": export.integer,
            "float_ops": [
                {"name": op.name, "op_type": op.op_type, "reason": op.reason}
                for op in export.float_ops
            ],
            "runtime_ops": self.runtime_ops,
            "checker": "passed",
            "onnx_accuracy": self.onnx_accuracy,
            "stored_test_accuracy": self.stored_test_accuracy,
            "agreement": self.agreement,
            "output_difference": {"mean": self.output_difference[0],
                                  "max": self.output_difference[1]},
            "output_spread": self.output_spread,
            "unexplained": list(self.unexplained),
            "differences": [
                {"index": i, "label": label, "pytorch": a, "onnx": b}
                for i, label, a, b in self.differences
            ],
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
        """Raise ExportError unless onnxruntime agrees with PyTorch on enough test images."""
        if not self.agrees:
            mean, largest = self.output_difference
            raise ExportError("\n".join([
                f"the ONNX model {self.export.path} of trial {trial_number} does not compute "
                f"the PyTorch model's outputs: they differ by {mean:.4g} on average ({largest:.4g}"
                f" at most) against a spread of {self.output_spread:.4g}, and "
                f"{len(self.unexplained)} test images change class with a top-1 margin above "
                f"twice that difference (test accuracy {self.onnx_accuracy:.4%}, stored "
                f"{self.stored_test_accuracy:.4%}); {len(self.differences)} differ:",
                *_difference_lines(self.differences),
            ]))


def _session(path: Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _test_batches(task: Task, size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from torch.utils.data import DataLoader

    yield from DataLoader(task.test_set, batch_size=size, shuffle=False)


def measure_latency(
    path: Path, inputs: Any, *, min_seconds: float = 0.5, min_runs: int = 20, warmup: int = 5
) -> float:
    """Median milliseconds of ``session.run`` on ``inputs`` (a numpy batch), one thread."""
    session = _session(path)
    name = session.get_inputs()[0].name
    feed = {name: inputs}
    for _ in range(warmup):
        session.run(None, feed)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - begin)
    return 1000.0 * statistics.median(times)


def _latency_inputs(task: Task, batch: int) -> Any:
    import torch

    first = next(_test_batches(task, batch))[0]
    repeats = -(-batch // first.shape[0])  # a test split smaller than the batch is repeated
    return torch.cat([first] * repeats)[:batch].numpy()


def export_onnx_files(
    model: nn.Module,
    float_model: nn.Module,
    task: Task,
    out_dir: Path,
    *,
    stored_accuracy: float,
    latency_seconds: float = 0.5,
) -> OnnxReport:
    """Write model.onnx (QDQ) and model_float.onnx to ``out_dir``, run model.onnx on the test
    split against ``model``'s own predictions (whose accuracy the study stored as
    ``stored_accuracy``), and time both files on batches of 1 and 64.

    ``model`` is the trial's model (compressed, or float for a float trial), ``float_model`` the
    same architecture with the trained float weights. Raises ExportError when a quantizer has no
    exact QDQ form or the ONNX extra is missing; the agreement is checked by the caller
    (:meth:`OnnxReport.check`), after export.json is written.
    """
    import numpy as np
    import torch

    from quantsearch.quantization import OnnxExportError, export_onnx

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

    session = _session(path)
    name = session.get_inputs()[0].name
    was_training = model.training
    model.eval()
    ours, theirs, labels = [], [], []
    try:
        with torch.no_grad():
            for inputs, targets in _test_batches(task):
                ours.append(model(inputs).reshape(len(inputs), -1).numpy())
                scores = session.run(None, {name: inputs.numpy()})[0]
                theirs.append(np.asarray(scores).reshape(len(inputs), -1))
                labels.append(targets.numpy())
    finally:
        model.train(was_training)
    torch_scores, onnx_scores = np.concatenate(ours), np.concatenate(theirs)
    torch_classes, onnx_classes = torch_scores.argmax(axis=1), onnx_scores.argmax(axis=1)
    label_array = np.concatenate(labels)
    differ = np.flatnonzero(torch_classes != onnx_classes)
    samples = len(label_array)
    difference = np.abs(onnx_scores - torch_scores)
    top2 = np.sort(torch_scores, axis=1)[:, -2:]
    margin = top2[:, -1] - top2[:, 0] if torch_scores.shape[1] > 1 else np.full(samples, np.inf)
    unexplained = [int(i) for i in differ if margin[i] > 2 * difference[i].max()]

    from quantsearch.quantization import runtime_op_counts

    qs_path = _quantize_static(float_path, task, out_dir)
    latency = []
    for batch in LATENCY_BATCHES:
        inputs = _latency_inputs(task, batch)
        latency.append(Latency(
            batch=batch,
            qdq_ms=measure_latency(path, inputs, min_seconds=latency_seconds),
            float_ms=measure_latency(float_path, inputs, min_seconds=latency_seconds),
            quantize_static_ms=None if qs_path is None else measure_latency(
                qs_path, inputs, min_seconds=latency_seconds
            ),
        ))
    if qs_path is not None:
        qs_path.unlink()
    return OnnxReport(
        export=export,
        float_path=float_path,
        float_file_bytes=float_path.stat().st_size,
        onnx_accuracy=float((onnx_classes == label_array).mean()),
        stored_test_accuracy=stored_accuracy,
        agreement=1.0 - len(differ) / samples,
        differences=tuple(
            (int(i), int(label_array[i]), int(torch_classes[i]), int(onnx_classes[i]))
            for i in differ
        ),
        latency=tuple(latency),
        test_samples=samples,
        onnxruntime_version=onnxruntime.__version__,
        output_difference=(float(difference.mean()), float(difference.max())),
        output_spread=float(torch_scores.std()),
        unexplained=tuple(unexplained),
        runtime_ops=runtime_op_counts(path),
    )


def _quantize_static(float_path: Path, task: Task, out_dir: Path) -> Path | None:
    """model_float.onnx through onnxruntime's ``quant_pre_process`` and ``quantize_static``
    (QDQ, per-channel, MinMax on 4 validation batches of 32, uint8 activations and int8
    weights), for the latency comparison; None when onnxruntime's tool fails on the model."""
    from torch.utils.data import DataLoader

    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        name = _session(float_path).get_inputs()[0].name
        feeds = []
        for inputs, _ in DataLoader(task.val_set, batch_size=32, shuffle=False):
            feeds.append({name: inputs.numpy()})
            if len(feeds) == 4:
                break

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
    if export.tensors:
        lines.append(
            "  onnxruntime's integer kernels run every compute op" if export.integer else
            f"  {len(export.float_ops)} compute op(s) stay float:"
        )
        lines += [f"    {op.name} ({op.op_type}): {op.reason}" for op in export.float_ops]
    if report.runtime_ops:
        counts = ", ".join(f"{kind} x{n}" for kind, n in report.runtime_ops.items())
        lines.append(f"  after onnxruntime's graph optimisation: {counts}")
    same = report.test_samples - len(report.differences)
    verdict = "agree" if report.agrees else "DISAGREE"
    mean, largest = report.output_difference
    lines.append(
        f"onnxruntime: test accuracy {report.onnx_accuracy:.4%} (stored: "
        f"{report.stored_test_accuracy:.4%}); same class as PyTorch on "
        f"{same}/{report.test_samples} test images ({report.agreement:.2%}); outputs differ "
        f"by {mean:.3g} on average, {largest:.3g} at most, against a spread of "
        f"{report.output_spread:.3g}; {len(report.unexplained)} class change(s) with a margin "
        f"above the difference: {verdict}; onnx.checker passed"
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
        stored_accuracy=context.stored_accuracy,
    )
