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
from quantsearch._units import format_size
from quantsearch.quantization import QUANT_TYPES
from quantsearch.search._study import TrialReport

__all__ = ["ConsoleProgress", "format_size", "front_table", "trial_line", "trials_table"]


def trial_line(report: TrialReport) -> str:
    """One line per finished trial: number, state, accuracies, size, ratio, seconds."""
    head = f"trial {report.number:>3} {report.state:<8}"
    if report.state == "COMPLETE":
        body = (
            f"val {report.val_accuracy:.4f}  test {report.test_accuracy:.4f}  "
            f"size {format_size(report.size_bytes):>9}  ratio {report.compression_ratio:5.2f}x  "
            f"{report.train_seconds:6.1f} s"
        )
    else:
        body = report.reason or ""
    notes = []
    if report.baseline:
        notes.append(f"baseline {report.baseline}")
    if report.duplicate_of is not None:
        notes.append(f"same config_list as trial {report.duplicate_of}, not trained again")
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

    def start(self, *, total: int, done: int, front: int) -> None:
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


def _common_row(trial: FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {
        "trial": trial.number,
        "val_acc": attrs.get("val_accuracy", math.nan),
        "test_acc": attrs.get("test_accuracy", math.nan),
        "size": format_size(attrs.get("size_bytes", math.nan)),
        "ratio": attrs.get("compression_ratio", math.nan),
    }


def front_table(study: optuna.Study) -> pd.DataFrame:
    """The Pareto front by size: accuracies, size, ratio and bits per layer ("-": float).

    A trial that reused another's result (same config_list) is shown once, as the original.
    """
    front = sorted(
        (t for t in study.best_trials if "duplicate_of" not in t.user_attrs),
        key=lambda t: (t.values[1], t.number),
    )
    layers = layer_order(study.user_attrs.get("layers"), front)
    rows = []
    for trial in front:
        row = _common_row(trial)
        row["baseline"] = trial.user_attrs.get("baseline", "")
        bits = trial.user_attrs.get("layer_bits") or {}
        row.update({layer: _bits_cell(bits.get(layer)) for layer in layers})
        rows.append(row)
    return pd.DataFrame(rows)


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """Every trial: state, accuracies, size, ratio, seconds, a note, and its parameters."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        row = _common_row(trial)
        row["state"] = trial.state.name
        row["seconds"] = attrs.get("train_seconds", math.nan)
        row["note"] = _note(trial)
        # Parameters as sampled (4, not 4.0000), short for floats.
        row.update({k: _param_cell(v) for k, v in trial.params.items()})
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
    attrs = trial.user_attrs
    notes = []
    if "baseline" in attrs:
        notes.append(f"baseline {attrs['baseline']}")
    if "duplicate_of" in attrs:
        notes.append(f"same as {attrs['duplicate_of']}")
    if "retry_of" in attrs:
        notes.append(f"rerun of {attrs['retry_of']}")
    if trial.state == TrialState.COMPLETE and any(v > 0 for v in trial.constraints.values()):
        notes.append("infeasible")
    if trial.state in (TrialState.FAIL, TrialState.PRUNED):
        notes.append(attrs.get("fail_reason") or "failed: no heartbeat from its process")
    return "; ".join(notes)
