"""The ``latency`` metric: a trial's model exported to ONNX and timed in onnxruntime.

The model is exported as the integer QDQ graph (``export_onnx``, weights in 8-bit containers:
onnxruntime has no kernels below 8 bits, so a 4-bit weight runs as int8 codes) into a temporary
folder, loaded into an onnxruntime session with the space's provider and thread count, run
``warmup`` times, then ``repeats`` times on one batch; the value is the median milliseconds per
run, recorded with the spread (the interquartile range) and the repeat count.

Timing is noisy on a shared machine, so a trial's latency is cached by its config: a trial
whose config (algorithm, config_list, setup) was measured before in this process reuses that
measurement instead of timing the same graph again.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from quantsearch.pipeline._metrics import Evaluated, Metric, register_metric
from quantsearch.quantization import ModelInputs

__all__ = [
    "LATENCY_METRIC",
    "LatencyMeasurement",
    "LatencySetup",
    "latency_inputs",
    "measure_latency",
    "measure_onnx_latency",
    "onnx_session",
    "time_sessions",
]

LATENCY_METRIC = "latency"


@dataclass(frozen=True)
class LatencySetup:
    """How latency is measured (a space's ``latency:`` section)."""

    batch_size: int = 1
    threads: int = 1
    provider: str = "CPUExecutionProvider"
    repeats: int = 20
    warmup: int = 5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LatencyMeasurement:
    """One model's latency: median and spread (interquartile range) in ms per batch."""

    median_ms: float
    spread_ms: float
    repeats: int
    setup: LatencySetup
    integer: bool
    """Every compute op of the exported graph runs on onnxruntime's integer kernels (the
    export's reading of the graph, checked on onnxruntime's optimised graph for the CPU)."""
    float_ops: int
    """Compute ops that stay float (0 for an integer graph)."""
    cached: bool = False
    """Reused from an earlier trial with the same config (not timed again)."""
    reference_ms: float | None = None
    """The float model's median, timed in the same runs (one of each in turn), when given."""

    @property
    def speedup(self) -> float | None:
        """reference / this model: above 1 the model is faster than float. Measured in one
        loop, so a burst of load from other jobs slows both alike."""
        return None if self.reference_ms is None else self.reference_ms / self.median_ms

    def record_fields(self) -> dict[str, Any]:
        """The TrialRecord fields of this measurement."""
        return {
            "latency_ms": self.median_ms,
            "latency_spread_ms": self.spread_ms,
            "latency_repeats": self.repeats,
            "latency_setup": self.setup.to_dict(),
            "latency_integer": self.integer,
            "latency_float_ms": self.reference_ms,
            "latency_speedup": self.speedup,
        }


_CACHE: dict[str, LatencyMeasurement] = {}


def _cache_key(config: Any, setup: LatencySetup) -> str:
    text = json.dumps({"config": config, "setup": setup.to_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def latency_inputs(dummy_input: Any, batch_size: int) -> ModelInputs:
    """A batch of ``batch_size`` made of the task's example input (repeated along the batch
    dimension; a dict or tuple example keeps its structure)."""
    return ModelInputs.of(dummy_input).map(lambda t: t.detach().cpu()).batched(batch_size)


def onnx_session(path: Path, setup: LatencySetup | None = None) -> Any:
    """An onnxruntime session on the file at ``path`` with ``setup``'s provider and threads
    (default: CPU, one thread), sequential, quiet."""
    import onnxruntime as ort

    setup = setup or LatencySetup()

    options = ort.SessionOptions()
    options.intra_op_num_threads = setup.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=[setup.provider])


def time_sessions(
    paths: Sequence[Path], feed: Mapping[str, Any], setup: LatencySetup
) -> list[list[float]]:
    """Milliseconds of each ``session.run`` of the ONNX files at ``paths`` on ``feed`` (graph
    input name -> numpy array), ``setup.repeats`` times each after ``setup.warmup`` runs; the
    files run in turn, once each per repeat, so a burst of load slows them alike."""
    sessions = [onnx_session(path, setup) for path in paths]
    for session in sessions:
        for _ in range(setup.warmup):
            session.run(None, dict(feed))
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(setup.repeats):
        for session, kept in zip(sessions, times, strict=True):
            begin = time.perf_counter()
            session.run(None, dict(feed))
            kept.append(1000.0 * (time.perf_counter() - begin))
    return times


def measure_onnx_latency(
    path: Path, feed: Mapping[str, Any], setup: LatencySetup, reference: Path | None = None
) -> tuple[float, float, float | None]:
    """(median, interquartile range, reference median) in ms of ``session.run`` of the ONNX
    file at ``path`` on ``feed`` (graph input name -> numpy array), after ``setup.warmup``
    runs; with a ``reference`` file the two run in turn, once each per repeat."""
    times = time_sessions([path] if reference is None else [path, reference], feed, setup)
    ours = times[0]
    spread = 0.0
    if len(ours) >= 2:
        quartiles = statistics.quantiles(ours, n=4)
        spread = quartiles[2] - quartiles[0]
    other = statistics.median(times[1]) if reference is not None else None
    return statistics.median(ours), spread, other


_REFERENCES: dict[str, Path] = {}


def _reference_file(reference: nn.Module, key: str, example: ModelInputs) -> Path:
    """The float reference exported once per process (its weights do not change its time)."""
    from quantsearch.quantization import export_onnx

    if key not in _REFERENCES:
        path = Path(tempfile.mkdtemp(prefix="quantsearch-latency-float-")) / "float.onnx"
        export_onnx(reference, path, example)
        _REFERENCES[key] = path
    return _REFERENCES[key]


def measure_latency(
    model: nn.Module,
    dummy_input: Any,
    setup: LatencySetup | None = None,
    *,
    config: Any = None,
    reference: nn.Module | None = None,
    reference_key: str = "float",
) -> LatencyMeasurement:
    """The latency of ``model`` (compressed or float) exported to ONNX, in onnxruntime.

    With ``config`` (anything JSON-able that identifies the model's quantization: the
    algorithm and config_list) a config measured before in this process is not timed again.
    With ``reference`` (the float model) that model is timed in the same loop, in turn with
    ``model`` (exported once per process under ``reference_key``).
    """
    from quantsearch.quantization import export_onnx

    setup = setup or LatencySetup()
    key = None if config is None else _cache_key(config, setup)
    if key is not None and key in _CACHE:
        return replace(_CACHE[key], cached=True)
    inputs = latency_inputs(dummy_input, setup.batch_size)
    example = latency_inputs(dummy_input, 1)
    other = None if reference is None else _reference_file(reference, reference_key, example)
    with tempfile.TemporaryDirectory(prefix="quantsearch-latency-") as folder:
        path = Path(folder) / "model.onnx"
        export = export_onnx(model, path, example, sub_byte_types=False)
        median, spread, reference_ms = measure_onnx_latency(
            path, inputs.feed(model), setup, other
        )
        runtime_float = _runtime_float_ops(path, setup)
    measured = LatencyMeasurement(
        median_ms=median,
        spread_ms=spread,
        repeats=setup.repeats,
        setup=setup,
        integer=export.integer and runtime_float == 0,
        float_ops=max(len(export.float_ops), runtime_float),
        reference_ms=reference_ms,
    )
    if key is not None:
        _CACHE[key] = measured
    return measured


def _runtime_float_ops(path: Path, setup: LatencySetup) -> int:
    """Layers that onnxruntime's CPU provider computes in float after its graph optimisation:
    what was timed, whatever the export's own reading of the graph said."""
    from quantsearch.quantization import runtime_float_ops, runtime_op_counts

    if setup.provider != "CPUExecutionProvider":
        return 0
    return sum(runtime_float_ops(runtime_op_counts(path, threads=setup.threads)).values())


def _latency_value(evaluated: Evaluated) -> float:
    """The trial's measured latency; a model evaluated without it is measured here with the
    default setup (batch 1, one thread, CPU)."""
    if LATENCY_METRIC in evaluated.metrics:
        return float(evaluated.metrics[LATENCY_METRIC])
    return measure_latency(evaluated.model, evaluated.task.dummy_input).median_ms


register_metric(
    Metric(
        LATENCY_METRIC,
        "minimize",
        "latency (onnxruntime, median per batch)",
        _latency_value,
        unit="ms",
    )
)
