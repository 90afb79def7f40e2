"""One row per trial: the study as a pandas DataFrame (the source of every plot and table)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from quantsearch.pipeline import (
    StudyRecord,
    TrialRecord,
    accuracy_interval,
    front_trials,
    layer_order,
)
from quantsearch.quantization import QUANT_TYPES
from quantsearch.report._errors import ReportError

__all__ = [
    "BITS_PREFIX",
    "PARAMS_PREFIX",
    "bits_columns",
    "check_reportable",
    "metric_columns",
    "pareto_frame",
    "trials_frame",
]

BITS_PREFIX = "bits."
PARAMS_PREFIX = "params."
ATTR_PREFIX = "attr."

# Record fields that get a column of their own (any other user attribute: "attr.<key>").
_NUMBER_FIELDS = (
    "test_accuracy",
    "val_accuracy",
    "compression_ratio",
    "float_size_bytes",
    "bitops",
    "float_bitops",
    "train_seconds",
    "duplicate_of",
    "val_samples",
    "test_samples",
    "steps",
)
_TEXT_FIELDS = ("algorithm", "mode", "baseline", "fail_reason", "checkpoint")
_COLUMN_FIELDS = frozenset(
    {
        *_NUMBER_FIELDS,
        *_TEXT_FIELDS,
        "config_list",
        "layer_bits",
        "size_bytes",
        "metrics",
        "test_metrics",
        "intervals",
        "test_intervals",
    }
)

_BASE_COLUMNS = (
    "number",
    "state",
    "accuracy",
    "size_bytes",
    "bitops",
    "test_accuracy",
    "test_low",
    "test_high",
    "test_samples",
    "val_accuracy",
    "val_low",
    "val_high",
    "val_samples",
    "compression_ratio",
    "float_size_bytes",
    "float_bitops",
    "train_seconds",
    "steps",
    "algorithm",
    "mode",
    "baseline",
    "duplicate_of",
    "feasible",
    "pareto",
    "constraints",
    "fail_reason",
    "checkpoint",
    "datetime_start",
    "datetime_complete",
    "duration_seconds",
    "config_list",
)


def metric_columns(name: str) -> tuple[str, str, str, str, str, str]:
    """The trials frame's columns of a metric: validation value, test value, and the low and
    high ends of each one's 95% interval. Accuracy keeps its historical names (``accuracy``,
    ``test_accuracy``, ``val_low`` ...); metric ``m`` has ``m``, ``test_m``, ``m_low``,
    ``m_high``, ``test_m_low``, ``test_m_high``."""
    if name == "accuracy":
        return ("accuracy", "test_accuracy", "val_low", "val_high", "test_low", "test_high")
    return (
        name, f"test_{name}", f"{name}_low", f"{name}_high", f"test_{name}_low",
        f"test_{name}_high",
    )


def _metric_cells(record: TrialRecord, complete: bool) -> dict[str, float]:
    """A trial's columns of every metric it recorded that is not accuracy."""
    row: dict[str, float] = {}
    names = [n for n in (*record.metrics, *record.test_metrics) if n != "accuracy"]
    for name in dict.fromkeys(names):
        val, test, val_low, val_high, test_low, test_high = metric_columns(name)
        row[val] = _float_or_nan(record.metrics.get(name) if complete else None)
        row[test] = _float_or_nan(record.test_metrics.get(name))
        for (low, high), intervals in (
            ((val_low, val_high), record.intervals),
            ((test_low, test_high), record.test_intervals),
        ):
            interval = intervals.get(name)
            row[low], row[high] = interval if interval is not None else (math.nan, math.nan)
    return row


def _float_or_nan(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _is_feasible(trial: FrozenTrial) -> bool:
    return all(c <= 0.0 for c in trial.constraints.values())


def _bits_column_names(layers: Sequence[str], trials: Sequence[FrozenTrial]) -> list[str]:
    present: set[tuple[str, str]] = set()
    for trial in trials:
        for layer, per_type in TrialRecord.of(trial).layer_bits.items():
            present.update((layer, qtype) for qtype in per_type)
    extra_types = sorted({t for _, t in present} - set(QUANT_TYPES))
    columns = []
    for layer in layers:
        for qtype in (*QUANT_TYPES, *extra_types):
            if (layer, qtype) in present:
                columns.append(f"{BITS_PREFIX}{layer}.{qtype}")
    return columns


def _cell(value: Any) -> Any:
    """A CSV-friendly cell: scalars as they are, anything else as JSON."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    return json.dumps(value, sort_keys=True)


def _row(
    trial: FrozenTrial,
    pareto_numbers: set[int],
    bits_columns: Sequence[str],
    metric_names: Sequence[str],
) -> dict:
    record = TrialRecord.of(trial)
    complete = trial.state == TrialState.COMPLETE and trial.values is not None
    config_list = record.config_list
    duration = trial.duration
    row: dict[str, Any] = {
        "number": trial.number,
        "state": trial.state.name,
        "accuracy": _float_or_nan(record.val_accuracy if complete else None),
        "size_bytes": _float_or_nan(record.size_bytes),
        "feasible": complete and _is_feasible(trial),
        "pareto": trial.number in pareto_numbers,
        "constraints": json.dumps(list(trial.constraints.values())) if trial.constraints else None,
        "datetime_start": trial.datetime_start,
        "datetime_complete": trial.datetime_complete,
        "duration_seconds": duration.total_seconds() if duration is not None else math.nan,
        "config_list": json.dumps(config_list) if config_list is not None else None,
    }
    for key in _NUMBER_FIELDS:
        row[key] = _float_or_nan(getattr(record, key))
    row.update(_metric_cells(record, complete))
    if complete:
        # Each objective's value under its metric's name, as the study recorded it.
        row.update(zip(metric_names, map(float, trial.values), strict=False))
    for key in _TEXT_FIELDS:
        row[key] = getattr(record, key)
    for split, accuracy, samples in (
        ("val", record.val_accuracy, record.val_samples),
        ("test", record.test_accuracy, record.test_samples),
    ):
        low, high = accuracy_interval(_float_or_nan(accuracy), samples or 0)
        row[f"{split}_low"], row[f"{split}_high"] = low, high
    for column in bits_columns:
        layer, qtype = column[len(BITS_PREFIX) :].rsplit(".", 1)
        bits = (record.layer_bits.get(layer) or {}).get(qtype)
        row[column] = _float_or_nan(bits)
    for name, value in trial.params.items():
        row[f"{PARAMS_PREFIX}{name}"] = _cell(value)
    for key, value in trial.user_attrs.items():
        if key not in _COLUMN_FIELDS:
            row[f"{ATTR_PREFIX}{key}"] = _cell(value)
    return row


def trials_frame(study: optuna.Study, *, record: StudyRecord | None = None) -> pd.DataFrame:
    """Return one row per trial of ``study``, in trial-number order (``record``: the study's
    :class:`~quantsearch.pipeline.StudyRecord`, when the caller has read it already).

    Columns: ``number``, ``state`` (``COMPLETE``, ``FAIL``, ...), ``accuracy`` (the validation
    accuracy; NaN unless complete), ``size_bytes`` (for an unfinished trial its recorded size,
    if any), ``bitops``, the 95% intervals of both accuracies (``val_low``/``val_high``,
    ``test_low``/``test_high``), the trial's other measurements (``test_accuracy``,
    ``compression_ratio``, ``train_seconds``, ...), ``algorithm``, ``mode`` (finetune, ptq,
    scratch, float), ``baseline``, one column per objective that is not one of these (named
    after its metric), ``feasible`` (complete and every constraint <= 0), ``pareto`` (on the study's
    front, which only holds feasible complete trials; a reused result is listed once),
    ``fail_reason``, ``config_list`` (JSON),
    one ``bits.<layer>.<type>`` column per quantized tensor (NaN where the layer stays float),
    ``params.<name>`` per sampled parameter and ``attr.<key>`` for any other user attribute.
    """
    trials = study.get_trials(deepcopy=False)
    # A trial that reused a finished trial's result ("duplicate_of") is the same point.
    directions = [d.name.lower() for d in study.directions]
    pareto_numbers = {t.number for t in front_trials(trials, directions)}
    record = StudyRecord.of(study) if record is None else record
    layers = layer_order(record.layers, trials)
    bits_cols = _bits_column_names(layers, trials)
    metric_names = list(study.metric_names or ["accuracy", "size_bytes"])
    rows = [_row(trial, pareto_numbers, bits_cols, metric_names) for trial in trials]
    frame = pd.DataFrame(rows)
    custom = [name for name in metric_names if name not in _BASE_COLUMNS]
    leading = [*_BASE_COLUMNS, *custom, *bits_cols]
    if frame.empty:
        return pd.DataFrame(columns=leading)
    for column in custom:
        if column not in frame:
            frame[column] = math.nan
    rest = sorted(c for c in frame.columns if c not in leading)
    frame = frame[[*leading, *rest]].sort_values("number", kind="stable").reset_index(drop=True)
    frame["number"] = frame["number"].astype(int)
    frame["feasible"] = frame["feasible"].astype(bool)
    frame["pareto"] = frame["pareto"].astype(bool)
    return frame


def bits_columns(frame: pd.DataFrame) -> list[str]:
    """The ``bits.<layer>.<type>`` columns of a trials frame, in model order."""
    return [c for c in frame.columns if c.startswith(BITS_PREFIX)]


def pareto_frame(study_or_frame: optuna.Study | pd.DataFrame) -> pd.DataFrame:
    """Return the front's rows (feasible complete trials no other trial dominates) by size."""
    frame = (
        study_or_frame if isinstance(study_or_frame, pd.DataFrame) else trials_frame(study_or_frame)
    )
    front = frame[frame["pareto"]]
    return front.sort_values(["size_bytes", "number"], kind="stable").reset_index(drop=True)


def check_reportable(
    study_name: str,
    frame: pd.DataFrame,
    *,
    rerun_hint: str | None = None,
) -> None:
    """Raise :class:`ReportError` unless ``frame`` has at least one complete trial."""
    hint = rerun_hint or "quantsearch study --space <space.yaml>"
    if frame.empty:
        raise ReportError(f"study {study_name!r} has no trial yet: run `{hint}` first")
    if not (frame["state"] == TrialState.COMPLETE.name).any():
        counts = _state_counts(frame["state"])
        reasons = frame["fail_reason"].dropna().astype(str)
        first_reason = f"; first failure: {reasons.iloc[0]}" if not reasons.empty else ""
        raise ReportError(
            f"study {study_name!r} has no completed trial yet ({counts}){first_reason}: "
            f"fix the failure or run `{hint}` first"
        )


def _state_counts(states: Mapping[Any, str] | pd.Series) -> str:
    counts = pd.Series(states).value_counts()
    return ", ".join(f"{n} {state.lower()}" for state, n in counts.items())
