"""report.md: an ordered list of sections, each drawn from the report's data (the target, the
summary, the plots, the front, its noise, bit widths, progress, baselines, failures, how to
export, the sensitivity, the predicted latency)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

from quantsearch._units import format_count, format_size
from quantsearch.report._data import (
    BITS_IMAGE,
    HISTORY_IMAGE,
    PARETO_SVG,
    SENSITIVITY_IMAGE,
    TRIALS_CSV,
    ReportData,
)
from quantsearch.report._latency import latency_prediction_markdown
from quantsearch.report._noise import noise_markdown
from quantsearch.report._objectives import Axis
from quantsearch.report._sensitivity import sensitivity_markdown
from quantsearch.report._table import metric_columns
from quantsearch.report._target import target_markdown

__all__ = ["SECTIONS", "Section", "render_markdown"]

_FAIL_REASON_CHARS = 160

#: A section of report.md: its lines (none when it does not apply to the study).
Section = Callable[[ReportData], list[str]]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _percent(value: float) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.2%}"


def _ratio(value: float) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.2f}×"


def _size(value: float) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{format_size(value)}"


def _bytes(value: float) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{int(value):,}"


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _config_code(config_json: Any) -> str:
    if not isinstance(config_json, str):
        return "–"
    compact = json.dumps(json.loads(config_json), separators=(", ", ": "))
    return f"`{_cell(compact)}`"


def _task_text(task: Any) -> str:
    """``digits`` (seed 0, data_dir ...): the task attribute, a name or a get_task mapping."""
    if not isinstance(task, Mapping):
        return f"`{_cell(str(task))}`"
    details = [
        f"{key} `{_cell(json.dumps(task[key]) if key == 'options' else str(task[key]))}`"
        for key in ("seed", "data_dir", "options")
        if task.get(key) not in (None, {}, "")
    ]
    name = f"`{_cell(str(task.get('name')))}`"
    return f"{name} ({', '.join(details)})" if details else name


def _with_interval(value: float, low: float, high: float, axis: Axis | None = None) -> str:
    """``97.41% ±1.23``: the accuracy and the half-width of its 95% interval, in points (for
    another metric: its value and half-width in its own units)."""
    if value is None or not math.isfinite(value):
        return "–"
    proportion = axis is None or axis.proportion
    shown = _percent(value) if proportion else axis.format(value)  # type: ignore[union-attr]
    if low is None or not (math.isfinite(low) and math.isfinite(high)):
        return shown
    if proportion:
        return f"{value:.2%} ±{(high - low) / 2 * 100:.2f}"
    return f"{shown} ±{(high - low) / 2:.3g}"


def _cells(row: Any, axis: Axis) -> tuple[str, str]:
    """The validation and test cells of the quality metric, with their intervals."""
    val, test, val_low, val_high, test_low, test_high = metric_columns(axis.name)
    get = row.get if isinstance(row, Mapping | pd.Series) else lambda k: getattr(row, k, None)
    return (
        _with_interval(get(val), get(val_low), get(val_high), axis),
        _with_interval(get(test), get(test_low), get(test_high), axis),
    )


def _latency_columns(rows: pd.DataFrame) -> tuple[str, str, str] | None:
    """The frame's (latency, speedup, integer) columns when its trials have a latency."""
    measured = "latency" if "latency" in rows else "attr.latency_ms"
    if measured not in rows or not pd.to_numeric(rows[measured], errors="coerce").notna().any():
        return None
    return measured, "attr.latency_speedup", "attr.latency_integer"


def _latency_cells(row: pd.Series, columns: tuple[str, str, str]) -> tuple[str, str]:
    """``12.1 ms (1.64x)`` and whether every compute op runs on onnxruntime's integer
    kernels (``yes``, ``no``; ``–`` where the trial was not exported)."""
    measured, speedup, integer = (row.get(c) for c in columns)
    if measured is None or pd.isna(measured):
        return "–", "–"
    text = f"{float(measured):.3g} ms"
    if speedup is not None and not pd.isna(speedup):
        text += f" ({float(speedup):.2f}x)"
    kernels = "–" if integer is None or pd.isna(integer) else ("yes" if bool(integer) else "no")
    return text, kernels


def _trial_table(
    rows: pd.DataFrame, *, with_config: bool, with_bitops: bool, quality: Axis | None = None
) -> list[str]:
    name = "accuracy" if quality is None else quality.name
    header = f"| trial | val. {name} | test {name} | size | bytes | compression |"
    rule = "|---:|---:|---:|---:|---:|---:|"
    if with_bitops:
        header += " bitops |"
        rule += "---:|"
    latency = _latency_columns(rows)
    if latency:
        header += " latency | integer kernels |"
        rule += "---:|---|"
    header += " algorithm | baseline |"
    rule += "---|---|"
    if with_config:
        header += " config_list |"
        rule += "---|"
    lines = [header, rule]
    for _, series in rows.iterrows():
        row = series
        if quality is None or quality.name == "accuracy":
            val = _with_interval(row.accuracy, row.val_low, row.val_high)
            test = _with_interval(row.test_accuracy, row.test_low, row.test_high)
        else:
            val, test = _cells(series, quality)
        line = (
            f"| {int(row.number)} | {val} "
            f"| {test} "
            f"| {_size(row.size_bytes)} | {_bytes(row.size_bytes)} "
            f"| {_ratio(row.compression_ratio)} |"
        )
        if with_bitops:
            line += f" {format_count(row.bitops)} |"
        if latency:
            line += " " + " | ".join(_latency_cells(series, latency)) + " |"
        line += f" {_cell(_text(row.algorithm))} | {_cell(_text(row.baseline))} |"
        if with_config:
            line += f" {_config_code(row.config_list)} |"
        lines.append(line)
    return lines


def _split_sizes(frame: pd.DataFrame, quality: Axis | None = None) -> str | None:
    """How many images the splits hold, and what one image is worth in accuracy."""
    if quality is not None and quality.name != "accuracy":
        return _example_counts(frame, quality)
    sizes = []
    for split in ("val", "test"):
        values = frame[f"{split}_samples"].dropna()
        if values.empty:
            return None
        sizes.append(int(values.max()))
    val, test = sizes
    return (
        f"validation {val:,} images (one image = {100 / val:.2f} points), test {test:,} "
        f"(one image = {100 / test:.2f} points); ± is the half-width of the 95% (Wilson) interval"
    )


def _example_counts(frame: pd.DataFrame, quality: Axis) -> str | None:
    counts = [frame[f"{split}_samples"].dropna() for split in ("val", "test")]
    if any(c.empty for c in counts):
        return None
    val, test = (int(c.max()) for c in counts)
    if quality.proportion:
        how = "± is the half-width of the 95% (Wilson) interval"
    else:
        low = metric_columns(quality.name)[2]
        has = low in frame and frame[low].notna().any()
        how = (
            "± is the half-width of the 95% percentile-bootstrap interval of the per-example "
            "values" if has else f"{quality.name} has no interval (no per-example values)"
        )
    return f"validation {val:,} examples, test {test:,}; {how}"


_STATE_WORDS = {
    "COMPLETE": "complete",
    "FAIL": "failed",
    "PRUNED": "pruned",
    "RUNNING": "running",
    "WAITING": "waiting",
}


def _state_summary(frame: pd.DataFrame) -> str:
    counts = frame["state"].value_counts()
    return ", ".join(f"{n} {_STATE_WORDS.get(state, state.lower())}" for state, n in counts.items())


def _complete(data: ReportData) -> pd.DataFrame:
    return data.frame[data.frame["state"] == "COMPLETE"]


def _with_bitops(data: ReportData) -> bool:
    return any(axis.name == "bitops" for axis in data.axes)


def _header(data: ReportData) -> list[str]:
    regenerate = data.command or f"quantsearch report {data.study_args}"
    return [
        f"# Quantization study `{data.study_name}`",
        "",
        "This report was generated by:",
        "",
        "```sh",
        regenerate,
        "```",
        "",
    ]


def _target(data: ReportData) -> list[str]:
    target = data.record.target
    if target is None:
        return []
    return target_markdown(data.frame, target, data.record.metric(target.metric))


def _summary_rows(data: ReportData) -> list[tuple[str, str]]:
    record, frame, front = data.record, data.frame, data.front
    complete = _complete(data)
    infeasible_count = len(complete) - int(complete["feasible"].sum())
    rows: list[tuple[str, str]] = []
    if record.task is not None:
        rows.append(("task", _task_text(record.task)))
    if record.algorithm is not None:
        rows.append(("algorithm", f"`{_cell(_text(record.algorithm))}`"))
    if data.axes:
        rows.append(("objectives", ", ".join(f"{a.direction} `{a.name}`" for a in data.axes)))
    float_model = record.float_model
    quality = data.quality_metric
    if float_model is not None and quality.name != "accuracy":
        val = float_model.metric(quality.name)
        test = float_model.metric(quality.name, "test")
        rows.append(
            (
                "float model",
                f"{_cell(_text(float_model.source))}: validation {quality.name} "
                f"{quality.format(val)}, test {quality.format(test)}",
            )
        )
    elif float_model is not None:
        rows.append(
            (
                "float model",
                f"{_cell(_text(float_model.source))}: validation "
                f"{_percent(float_model.val_accuracy)}, test "
                f"{_percent(float_model.test_accuracy)}",
            )
        )
    splits = _split_sizes(frame, quality)
    if splits:
        rows.append(("splits", splits))
    rows.append(("trials", f"{len(frame)} ({_state_summary(frame)})"))
    if infeasible_count:
        rows.append(("infeasible", f"{infeasible_count} complete trials broke a constraint"))
    if front.empty:
        rows.append(("front", "empty: no complete trial meets the constraints"))
    else:
        rows.append(("front", f"{len(front)} trials"))
    rows.append(("float model size", f"{_size(data.float_size_bytes)}"))
    if not front.empty and quality.name != "accuracy":
        column = front[quality.name]
        best = front.loc[column.idxmax() if quality.maximize else column.idxmin()]
        smallest = front.iloc[0]
        rows.append(
            (
                f"best {quality.name} on the front",
                f"trial {int(best.number)}: {quality.format(best[quality.name])} at "
                f"{_size(best.size_bytes)}",
            )
        )
        rows.append(
            (
                "smallest on the front",
                f"trial {int(smallest.number)}: {_size(smallest.size_bytes)} "
                f"({_ratio(smallest.compression_ratio)} smaller) at "
                f"{quality.format(smallest[quality.name])}",
            )
        )
    elif not front.empty:
        best = front.loc[front["accuracy"].idxmax()]
        smallest = front.iloc[0]
        rows.append(
            (
                "most accurate on the front",
                f"trial {int(best.number)}: {_percent(best.accuracy)} at {_size(best.size_bytes)}",
            )
        )
        rows.append(
            (
                "smallest on the front",
                f"trial {int(smallest.number)}: {_size(smallest.size_bytes)} "
                f"({_ratio(smallest.compression_ratio)} smaller) at {_percent(smallest.accuracy)}",
            )
        )
    spanned = ", ".join(_spanned(a) for a in data.axes)
    rows.append(
        ("hypervolume", f"{data.hypervolume:.4f} (of the unit cube of {spanned}; reference 1)")
    )
    if record.space_hash is not None:
        rows.append(("space hash", f"`{_cell(_text(record.space_hash))}`"))
    return rows


def _spanned(axis: Axis) -> str:
    """How an axis is put on [0, 1]: ``size_bytes / float``, ``1 - accuracy``, ``perplexity
    from 0 to 9.8``."""
    if axis.relative:
        return f"{axis.name} / float"
    if axis.best is not None and axis.worst is not None:
        return f"{axis.name} from {axis.best:.4g} (0) to {axis.worst:.4g} (1)"
    return ("1 - " if axis.maximize else "") + axis.name


def _summary(data: ReportData) -> list[str]:
    rows = [f"| {key} | {value} |" for key, value in _summary_rows(data)]
    return ["## Summary", "", "| | |", "|---|---|", *rows, ""]


def _pareto_plots(data: ReportData) -> list[str]:
    out: list[str] = []
    for index, plot in enumerate(data.pareto_plots):
        title = plot.title
        out += [f"## {title[0].upper()}{title[1:]}", "", f"![{title}]({plot.image})", ""]
        if index == 0:
            out += [
                "Dots are complete trials, hollow circles infeasible ones, crosses on the bottom "
                "edge failed trials; the line is the Pareto front of the two axes; labelled "
                f"markers are the baselines ([SVG version]({PARETO_SVG})).",
                "",
            ]
    return out


def _front(data: ReportData) -> list[str]:
    quality = data.quality_metric
    name = "Accuracy" if quality.name == "accuracy" else f"`{quality.name}`"
    return [
        "## Pareto front",
        "",
        f"Smallest first. {name} is measured on the validation split during the search and "
        "on the test split once per trial; size is the packed model's size.",
        "",
        *_trial_table(
            data.front, with_config=True, with_bitops=_with_bitops(data), quality=quality
        ),
        "",
    ]


def _noise(data: ReportData) -> list[str]:
    if data.front.empty or data.quality_metric.name != "accuracy":
        return []
    return noise_markdown(data.front)


def _bit_widths(data: ReportData) -> list[str]:
    return [
        "## Bit widths on the front",
        "",
        f"![Per-layer bit widths of the front's trials]({BITS_IMAGE})",
        "",
    ]


def _progress(data: ReportData) -> list[str]:
    return [
        "## Search progress",
        "",
        f"![Hypervolume and front size over the trials]({HISTORY_IMAGE})",
        "",
    ]


def _baselines(data: ReportData) -> list[str]:
    complete = _complete(data)
    baselines = complete[complete["baseline"].notna()].sort_values("size_bytes")
    if baselines.empty:
        return []
    return [
        "## Baselines",
        "",
        *_trial_table(
            baselines,
            with_config=False,
            with_bitops=_with_bitops(data),
            quality=data.quality_metric,
        ),
        "",
    ]


def _failed(data: ReportData) -> list[str]:
    failed = data.frame[data.frame["state"] == "FAIL"]
    if failed.empty:
        return []
    out = ["## Failed trials", "", "| trial | reason |", "|---:|---|"]
    for row in failed.itertuples():
        reason = _text(row.fail_reason) or "(no reason recorded)"
        if len(reason) > _FAIL_REASON_CHARS:
            reason = reason[: _FAIL_REASON_CHARS - 1] + "…"
        out.append(f"| {int(row.number)} | {_cell(reason)} |")
    return [*out, ""]


def _export(data: ReportData) -> list[str]:
    example = int((data.front if not data.front.empty else _complete(data)).iloc[0].number)
    export = f"quantsearch export {data.study_args} --trial {example} --out exports/trial_{example}"
    return [
        "## Export a trial",
        "",
        "Every trial's trained weights are stored with the study, so exporting needs no "
        "training. This writes the state dict (`model.pt`), the calibration file "
        "(`calibration.json`) and the packed integer model (`model.qpk`), reloads them and "
        f"checks the reloaded model's test {data.quality_metric.name} against the stored one:",
        "",
        "```sh",
        export,
        "```",
        "",
        "For ONNX Runtime, TensorRT or OpenVINO, `--format onnx` adds a QDQ model "
        "(`model.onnx`, integer weights and quantized activations as QuantizeLinear/"
        "DequantizeLinear) and the float model (`model_float.onnx`); it checks the QDQ model "
        "in onnxruntime on the test split and measures both models' latency (needs "
        "`pip install 'quantsearch[onnx]'`):",
        "",
        "```sh",
        f"{export} --format onnx",
        "```",
        "",
        f"All trials with every attribute: [{TRIALS_CSV}]({TRIALS_CSV}).",
        "",
    ]


def _latency_prediction(data: ReportData) -> list[str]:
    return latency_prediction_markdown(data.record.latency_table, data.frame)


def _sensitivity(data: ReportData) -> list[str]:
    sensitivity = data.sensitivity
    return [] if sensitivity is None else sensitivity_markdown(sensitivity, SENSITIVITY_IMAGE)


#: report.md's sections, in order.
SECTIONS: tuple[Section, ...] = (
    _header,
    _target,
    _summary,
    _pareto_plots,
    _front,
    _noise,
    _bit_widths,
    _progress,
    _baselines,
    _failed,
    _export,
    _sensitivity,
    _latency_prediction,
)


def render_markdown(data: ReportData) -> str:
    """Return the text of report.md: each of :data:`SECTIONS` that applies, in order."""
    return "\n".join(line for section in SECTIONS for line in section(data))
