"""What a person sees: the progress of a running study, its trials as tables, and the lines the
``quantsearch`` commands print (banner, front, target, validation, sensitivity)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from quantsearch._units import format_count, format_size
from quantsearch.pipeline import (
    LATENCY_METRIC,
    Sensitivity,
    StudyRecord,
    TrialRecord,
    accuracy_interval,
    front_trials,
    get_metric,
    layer_order,
    mask_text,
)
from quantsearch.quantization import QUANT_TYPES
from quantsearch.search._nni_syntax import NniParam
from quantsearch.search._prepare import StudyContext
from quantsearch.search._progress import TrialReport
from quantsearch.search._seed_guide import seed_limit
from quantsearch.search._sensitivity_study import describe_front, sensitivity_pivot
from quantsearch.search._spec import BITS_PARAMS, SearchSpec
from quantsearch.search._target import best_within
from quantsearch.tasks import Task

__all__ = [
    "ConsoleProgress",
    "format_size",
    "front_lines",
    "front_table",
    "sensitivity_lines",
    "study_banner",
    "target_line",
    "trial_line",
    "trials_lines",
    "trials_table",
    "validation_lines",
]


def trial_line(report: TrialReport) -> str:
    """One line per finished trial: number, state, accuracies (or the task's metrics, val and
    test), size, ratio, latency (one value in ms, when measured), seconds."""
    record = report.record
    head = f"trial {report.number:>3} {report.state:<8}"
    if report.state == "COMPLETE":
        shown = [n for n in record.metrics if n not in ("accuracy", LATENCY_METRIC)][:3]
        values = "  ".join(
            f"val {name} {_number(record.metrics.get(name)):.4g}  "
            f"test {name} {_number(record.test_metrics.get(name)):.4g}"
            for name in shown
        )
        if record.val_accuracy is not None or not (shown or LATENCY_METRIC in record.metrics):
            values = (
                f"val {_number(record.val_accuracy):.4f}  test "
                f"{_number(record.test_accuracy):.4f}" + (f"  {values}" if values else "")
            )
        parts = (
            values,
            f"size {format_size(record.size_bytes or 0):>9}",
            f"ratio {_number(record.compression_ratio):5.2f}x",
            _latency_cell(record),
            f"{_number(record.train_seconds, 0.0):6.1f} s",
        )
        body = "  ".join(part for part in parts if part)
    else:
        body = record.fail_reason or ""
    notes = []
    if record.baseline:
        notes.append(f"baseline {record.baseline}")
    if record.duplicate_of is not None:
        notes.append(f"same config_list as trial {record.duplicate_of}, not trained again")
    tail = f"  [{'; '.join(notes)}]" if notes else ""
    return f"{head} {body}{tail}"


def _latency_cell(record: TrialRecord) -> str:
    """``latency 11.70 ms (1.66x float)``: the trial's latency, one value whatever the split
    (the same model is timed once), with its speedup over the float model timed in the same
    loop and the latency the study's table predicts, if any; a latency only predicted (not
    measured) says so."""
    if LATENCY_METRIC not in record.metrics:
        return ""
    value = _number(record.metrics[LATENCY_METRIC])
    if record.latency_ms is None and record.latency_predicted_ms is not None:
        return f"latency {value:.2f} ms (predicted)"
    notes = [] if record.latency_speedup is None else [f"{record.latency_speedup:.2f}x float"]
    if record.latency_predicted_ms is not None:
        notes.append(f"predicted {record.latency_predicted_ms:.2f}")
    return f"latency {value:.2f} ms" + (f" ({'; '.join(notes)})" if notes else "")


class ConsoleProgress:
    """A progress bar on stderr (done/total, elapsed, ETA, front size) and a line per trial
    on stdout; ``quiet`` keeps only the lines (for logs)."""

    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stdout
        self.bar: tqdm | None = None
        self.started = time.perf_counter()

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self._print(text)

    def count(self, label: str, done: int, total: int) -> None:
        """A bar of its own for work before the trials (the sensitivity pass)."""
        if self.quiet:
            return
        if self.bar is None or self.bar.desc != label:
            self.close()
            self.bar = tqdm(
                total=total,
                initial=done,
                desc=label,
                file=sys.stderr,
                dynamic_ncols=True,
                smoothing=0,
                leave=False,
            )
        self.bar.update(max(0, done - self.bar.n))
        self.bar.refresh()
        if done >= total:
            self.close()

    def start(self, *, total: int, done: int, front: int) -> None:
        self.close()
        self.started = time.perf_counter()
        if done:
            self._print(f"resuming: {done} of {total} trials done, front of {front}")
        if self.quiet:
            return
        self.bar = tqdm(
            total=total,
            initial=done,
            unit="trial",
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0,
            leave=False,
        )
        self.bar.set_postfix_str(f"front {front}")

    def trial(self, report: TrialReport, *, done: int, front: int) -> None:
        line = trial_line(report)
        if self.bar is None:
            elapsed = time.perf_counter() - self.started
            self._print(f"[{elapsed:7.1f} s] {line}  (done {done}, front {front})")
            return
        self.bar.write(line, file=self.stream)
        self.bar.set_postfix_str(f"front {front}", refresh=False)
        self.bar.update(max(0, done - self.bar.n))
        self.bar.refresh()  # trials end seconds apart: never leave the count behind tqdm's throttle

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def _bits_cell(per_type: dict[str, int] | None) -> str:
    if not per_type:
        return "-"
    if len(per_type) == 1:
        return str(next(iter(per_type.values())))
    return "/".join(f"{t[0]}{per_type[t]}" for t in QUANT_TYPES if t in per_type)


def _number(value: float | None, default: float = math.nan) -> float:
    return default if value is None else float(value)


def _interval(accuracy: float | None, samples: int | None) -> str:
    """``0.9722 ±0.0090``: the accuracy and the half-width of its 95% interval."""
    if accuracy is None:
        return ""
    if not samples:
        return f"{accuracy:.4f}"
    low, high = accuracy_interval(accuracy, samples)
    return f"{accuracy:.4f} ±{(high - low) / 2:.4f}"


def _with_interval(value: float | None, interval: Any) -> str:
    """``5.123 ±0.08``: a metric and the half-width of its stored 95% interval, if any."""
    if value is None:
        return ""
    if not interval:
        return f"{value:.4g}"
    low, high = interval
    return f"{value:.4g} ±{(high - low) / 2:.2g}"


def _common_row(trial: FrozenTrial) -> dict[str, Any]:
    record = TrialRecord.of(trial)
    row: dict[str, Any] = {"trial": trial.number}
    if record.val_accuracy is not None or not record.metrics:
        row["val_acc"] = _interval(record.val_accuracy, record.val_samples)
        row["test_acc"] = _interval(record.test_accuracy, record.test_samples)
    for name, value in record.metrics.items():
        if name not in ("accuracy", LATENCY_METRIC):
            row[f"val_{name}"] = _with_interval(value, record.intervals.get(name))
            row[f"test_{name}"] = _with_interval(
                record.test_metrics.get(name), record.test_intervals.get(name)
            )
    row["size"] = format_size(_number(record.size_bytes))
    row["ratio"] = _ratio(record.compression_ratio)
    if LATENCY_METRIC in record.metrics:
        # One model, one latency whatever the split: milliseconds, and the speedup over the
        # float model timed in the same loop.
        row["latency_ms"] = f"{record.metrics[LATENCY_METRIC]:.2f}"
        row["speedup"] = _ratio(record.latency_speedup)
    return row


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


# Beyond this many layers the front table shows their bits in one column.
_WIDE_MODEL_LAYERS = 12


def front_table(study: optuna.Study) -> pd.DataFrame:
    """The Pareto front by size: accuracies (with their 95% intervals), size, ratio, latency
    (ms) and speedup over float when measured, bitops when it is an objective, and bits per
    layer ("-": float).

    A trial that reused another's result (same config_list) is shown once, as the original.
    """
    directions = [d.name.lower() for d in study.directions]
    front = sorted(
        front_trials(study.get_trials(deepcopy=False), directions),
        key=lambda t: (_number(TrialRecord.of(t).size_bytes), t.number),
    )
    layers = layer_order(StudyRecord.of(study).layers, front)
    with_bitops = "bitops" in (study.metric_names or [])
    rows = []
    for trial in front:
        record = TrialRecord.of(trial)
        row = _common_row(trial)
        if with_bitops:
            row["bitops"] = format_count(record.bitops)
        row["baseline"] = record.baseline or ""
        cells = {layer: _bits_cell(record.layer_bits.get(layer)) for layer in layers}
        if len(layers) > _WIDE_MODEL_LAYERS:
            row["bits (model order)"] = " ".join(cells.values())
        else:
            row.update(cells)
        rows.append(row)
    return pd.DataFrame(rows)


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """Every trial: state, accuracies, size, ratio, latency and speedup (when measured),
    seconds, a note, and its parameters."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        row = _common_row(trial)
        row["state"] = trial.state.name
        row["seconds"] = _number(TrialRecord.of(trial).train_seconds)
        row["note"] = _note(trial)
        # Parameters as sampled (4, not 4.0000), short for floats; the float baseline's bits
        # parameters only hold a point of the space: its model is not quantized.
        unquantized = TrialRecord.of(trial).config_list == []
        row.update(
            {
                k: "-" if unquantized and k.rsplit(".", 1)[-1] in BITS_PARAMS else _param_cell(v)
                for k, v in trial.params.items()
            }
        )
        rows.append(row)
    measured = [
        key for row in rows for key in row
        if key.startswith(("val_", "test_")) and key not in ("val_acc", "test_acc")
    ]
    columns = [
        "trial", "state", "val_acc", "test_acc", *dict.fromkeys(measured), "size", "ratio",
        "latency_ms", "speedup", "seconds", "note",
    ]
    frame = pd.DataFrame(rows)
    columns = [c for c in columns if c in frame.columns]
    if frame.empty:
        return frame
    params = [c for c in frame.columns if c not in columns]
    frame[params] = frame[params].fillna("")  # a trial still waiting has no parameters yet
    return frame[[*columns, *params]]


def _param_cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _note(trial: FrozenTrial) -> str:
    record = TrialRecord.of(trial)
    notes = []
    if record.baseline is not None:
        notes.append(f"baseline {record.baseline}")
    if record.duplicate_of is not None:
        notes.append(f"same as {record.duplicate_of}")
    if record.retry_of is not None:
        notes.append(f"rerun of {record.retry_of}")
    if trial.state == TrialState.COMPLETE and any(v > 0 for v in trial.constraints.values()):
        notes.append("infeasible")
    if trial.state in (TrialState.FAIL, TrialState.PRUNED):
        notes.append(record.fail_reason or "failed: no heartbeat from its process")
    return "; ".join(notes)


def _table_text(frame: pd.DataFrame) -> str:
    return frame.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def study_banner(spec: SearchSpec, *, jobs: int, threads: int, cores: int) -> str:
    """The line ``quantsearch study`` starts with: what runs, how, and where it is stored."""
    start = "trained from scratch" if spec.from_scratch else "from the float model"
    return (
        f"study {spec.study_name!r}: {spec.algorithm} on {spec.task.name} ({start}), "
        f"objectives {', '.join(spec.objectives)}, {spec.n_trials} trials, {jobs} job(s) "
        f"x {threads} thread(s) on {cores} cores, storage {mask_text(spec.storage)}"
    )


def front_lines(study: optuna.Study) -> list[str]:
    """The study's Pareto front after a run, as :func:`front_table` under a title."""
    front = front_table(study)
    if front.empty:
        return ["no trial finished: the study has no Pareto front yet"]
    return [f"\nPareto front ({len(front)} trials):", _table_text(front)]


def target_line(study: optuna.Study) -> str | None:
    """The trial that meets the space's target (smallest within the accuracy drop); None
    when the study has no target."""
    target = StudyRecord.of(study).target
    if target is None:
        return None
    best = best_within(study.trials, target)
    sign = ">=" if target.direction == "maximize" else "<="
    floor = f"validation {target.metric} {sign} {target.min_accuracy:.4f}"
    if best is None:
        return f"target: no trial reaches {floor}"
    size = TrialRecord.of(best).size_bytes
    return f"target: trial {best.number}, the smallest with {floor} ({size:,} bytes)"


def trials_lines(study: optuna.Study) -> list[str]:
    """``quantsearch trials``: every trial as :func:`trials_table`."""
    table = trials_table(study)
    if table.empty:
        return [f"study {study.study_name!r} has no trials"]
    return [_table_text(table)]


def _start_of(spec: SearchSpec, task: Task) -> str:
    """How the space's trials get their weights, in words."""
    if spec.from_scratch:
        return "train a fresh model each (from_scratch)"
    source = (
        f"the weights in {spec.task.pretrained}"
        if spec.task.pretrained
        else "the task's pretrained weights"
        if task.pretrained is not None
        else "a float model trained once (float_train)"
    )
    ptq = spec.algorithm == "ptq"
    how = f"calibrate {spec.calibration_batches} batches" if ptq else "fine-tune"
    return f"start from {source}, then {how}"


def _describe(param: Any) -> str:
    return param.describe() if isinstance(param, NniParam) else f"fixed {param!r}"


def validation_lines(space: Path, spec: SearchSpec, context: StudyContext) -> list[str]:
    """``quantsearch validate``: what the space ``space`` searches, once prepared."""
    plan = context.plan
    lines = [
        f"{space}: valid",
        f"  study      {spec.study_name} ({spec.n_trials} trials, "
        f"storage {mask_text(spec.storage)})",
        f"  task       {spec.task.name}: {context.task.description or context.task.name}",
        f"  layers     {', '.join(context.layers)}",
        f"  algorithm  {spec.algorithm}",
        f"  trials     {_start_of(spec, context.task)}",
        "  objectives "
        + ", ".join(
            f"{name} ({context.metrics[name].direction})"
            if name in context.metrics
            else f"{name} ({get_metric(name).direction})"
            for name in spec.objectives
        ),
        f"  sampler    {spec.sampler.name} (seed {spec.seed})",
    ]
    lines += [f"  param      {name}: {_describe(param)}" for name, param in spec.params.items()]
    if spec.per_layer is not None:
        layers = ", ".join(plan.per_layer_names)
        lines += [
            f"  per layer  {name}: {_describe(param)} on {layers}"
            for name, param in spec.per_layer.params.items()
        ]
    dry = context.dry_run
    if dry is not None:
        folded = ", ".join(f"{bn} into {conv}" for conv, bn in dry.folded.items()) or "none"
        lines.append(f"  folded     {folded}")
        lines.append(f"  outputs    {', '.join(dry.quantized_outputs) or 'none quantized'}")
        if dry.difference_at_16_bits is not None:
            lines.append(
                f"  checked    forward passes in training and eval mode; at 16 bits the outputs "
                f"are within {dry.difference_at_16_bits:.1e} of the float model's"
            )
    lines.append(f"  searched   {len(plan.distributions)} parameter(s)")
    if spec.sensitivity is not None:
        options = spec.sensitivity
        stop = f", until {options.patience} in a row miss the front" if options.patience else ""
        lines.append(
            f"  sensitivity {options.method} on {options.batches} validation batches, then up "
            f"to {seed_limit(spec)} configs of its predicted front first{stop}"
        )
    lines.append(f"  baselines  {', '.join(spec.baselines.labels) or 'none'}")
    return lines


def sensitivity_lines(study_name: str, sensitivity: Sensitivity) -> list[str]:
    """``quantsearch sensitivity``: what was measured, one table per value (the loss increase,
    the metric's change for the worse, the size change), the predicted front."""
    info = sensitivity.metric_info
    metric = "" if info is None else f", {info.name} {sensitivity.shown(sensitivity.float_metric)}"
    lines = [
        f"\nsensitivity of {study_name!r} ({sensitivity.method}, "
        f"{sensitivity.samples} validation examples; float {sensitivity.loss_label} "
        f"{sensitivity.float_loss:.4f}{metric})"
    ]
    tables = [("loss_increase", f"validation {sensitivity.loss_label} increase, each parameter "
               "alone at each bit width", "{:+.4f}")]
    if info is not None:
        pattern = "{:+.4f}" if info.proportion else "{:+.4g}"
        tables.append(("metric_shown", f"validation {sensitivity.drop_label}", pattern))
    tables.append(("size_delta", "size change (bytes)", "{:+,.0f}"))
    if sensitivity.method == "hessian":
        tables.append(("predicted", "predicted cost (Hessian measure)", "{:+.4f}"))
    for value, title, pattern in tables:
        table = sensitivity_pivot(sensitivity, value).astype(float)
        lines += [f"\n{title}:", table.to_string(float_format=pattern.format)]
    lines.append(f"\n{describe_front(sensitivity)}")
    return lines
