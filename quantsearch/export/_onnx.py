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

    @property
    def agrees(self) -> bool:
        # On a split under 1,000 images one value on a rounding boundary (PyTorch multiplies by
        # 1/scale, QuantizeLinear divides) is already 0.1%: one differing image is allowed.
        return self.agreement >= MIN_AGREEMENT or len(self.differences) <= 1

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
            "checker": "passed",
            "onnx_accuracy": self.onnx_accuracy,
            "stored_test_accuracy": self.stored_test_accuracy,
            "agreement": self.agreement,
            "min_agreement": MIN_AGREEMENT,
            "differences": [
                {"index": i, "label": label, "pytorch": a, "onnx": b}
                for i, label, a, b in self.differences
            ],
            "latency_ms": [
                {"batch": lat.batch, "qdq": lat.qdq_ms, "float": lat.float_ms}
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
            raise ExportError("\n".join([
                f"the ONNX model {self.export.path} of trial {trial_number} picks the PyTorch "
                f"model's class on {self.agreement:.3%} of the test images, below "
                f"{MIN_AGREEMENT:.1%} (test accuracy {self.onnx_accuracy:.4%}, stored "
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
                ours.append(model(inputs).argmax(dim=1).numpy())
                scores = session.run(None, {name: inputs.numpy()})[0]
                theirs.append(np.asarray(scores).argmax(axis=1))
                labels.append(targets.numpy())
    finally:
        model.train(was_training)
    torch_classes, onnx_classes = np.concatenate(ours), np.concatenate(theirs)
    label_array = np.concatenate(labels)
    differ = np.flatnonzero(torch_classes != onnx_classes)
    samples = len(label_array)

    latency = []
    for batch in LATENCY_BATCHES:
        inputs = _latency_inputs(task, batch)
        latency.append(Latency(
            batch=batch,
            qdq_ms=measure_latency(path, inputs, min_seconds=latency_seconds),
            float_ms=measure_latency(float_path, inputs, min_seconds=latency_seconds),
        ))
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
    )


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
    same = report.test_samples - len(report.differences)
    verdict = "agree" if report.agrees else "DISAGREE"
    lines.append(
        f"onnxruntime: test accuracy {report.onnx_accuracy:.4%} (stored: "
        f"{report.stored_test_accuracy:.4%}); same class as PyTorch on "
        f"{same}/{report.test_samples} test images ({report.agreement:.2%}, "
        f"at least {MIN_AGREEMENT:.1%} needed): {verdict}; onnx.checker passed"
    )
    lines += _difference_lines(report.differences)
    lines.append(
        f"latency (onnxruntime {report.onnxruntime_version}, CPU, 1 thread, median per batch):"
    )
    for lat in report.latency:
        lines.append(
            f"  batch {lat.batch:>3}: QDQ {lat.qdq_ms:.3f} ms, float {lat.float_ms:.3f} ms "
            f"(float/QDQ {lat.speedup:.2f}x)"
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
