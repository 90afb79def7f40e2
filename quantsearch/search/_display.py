"""What a person sees: the progress of a running study and its trials as tables."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from quantsearch._studydata import layer_order
from quantsearch._units import format_count, format_size
from quantsearch.pipeline import TrialRecord, accuracy_interval
from quantsearch.quantization import QUANT_TYPES
from quantsearch.search._space import BITS_PARAMS
from quantsearch.search._study import TrialReport

__all__ = ["ConsoleProgress", "format_size", "front_table", "trial_line", "trials_table"]


def trial_line(report: TrialReport) -> str:
    """One line per finished trial: number, state, accuracies, size, ratio, seconds."""
    record = report.record
    head = f"trial {report.number:>3} {report.state:<8}"
    if report.state == "COMPLETE":
        body = (
            f"val {_number(record.val_accuracy):.4f}  test {_number(record.test_accuracy):.4f}  "
            f"size {format_size(record.size_bytes or 0):>9}  "
            f"ratio {_number(record.compression_ratio):5.2f}x  "
            f"{_number(record.train_seconds, 0.0):6.1f} s"
        )
    else:
        body = record.fail_reason or ""
    notes = []
    if record.baseline:
        notes.append(f"baseline {record.baseline}")
    if record.duplicate_of is not None:
        notes.append(f"same config_list as trial {record.duplicate_of}, not trained again")
    tail = f"  [{'; '.join(notes)}]" if notes else ""
    return f"{head} {body}{tail}"


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


def _common_row(trial: FrozenTrial) -> dict[str, Any]:
    record = TrialRecord.of(trial)
    return {
        "trial": trial.number,
        "val_acc": _interval(record.val_accuracy, record.val_samples),
        "test_acc": _interval(record.test_accuracy, record.test_samples),
        "size": format_size(_number(record.size_bytes)),
        "ratio": _ratio(record.compression_ratio),
    }


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


# Beyond this many layers the front table shows their bits in one column.
_WIDE_MODEL_LAYERS = 12


def front_table(study: optuna.Study) -> pd.DataFrame:
    """The Pareto front by size: accuracies (with their 95% intervals), size, ratio, bitops
    when it is an objective, and bits per layer ("-": float).

    A trial that reused another's result (same config_list) is shown once, as the original.
    """
    front = sorted(
        (t for t in study.best_trials if TrialRecord.of(t).duplicate_of is None),
        key=lambda t: (_number(TrialRecord.of(t).size_bytes), t.number),
    )
    layers = layer_order(study.user_attrs.get("layers"), front)
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
    """Every trial: state, accuracies, size, ratio, seconds, a note, and its parameters."""
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
    columns = ["trial", "state", "val_acc", "test_acc", "size", "ratio", "seconds", "note"]
    frame = pd.DataFrame(rows)
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
