"""report.md: the study's summary, its front with each config_list, the plots, how to export."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from quantsearch._units import format_count
from quantsearch.report._objectives import Axis
from quantsearch.report._plots import format_size

__all__ = ["ReportContext", "render_markdown"]

_FAIL_REASON_CHARS = 160


@dataclass(frozen=True)
class ReportContext:
    """What report.md says besides the trials themselves."""

    study_name: str
    study_attrs: Mapping[str, Any]
    study_args: str
    command: str | None
    hypervolume: float
    float_size_bytes: float
    axes: tuple[Axis, ...] = ()
    images: Mapping[str, str] = field(default_factory=dict)
    # (title, file) of each pairwise plot of the objectives, the first one leading.
    pareto_plots: tuple[tuple[str, str], ...] = ()


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


def _with_interval(value: float, low: float, high: float) -> str:
    """``97.41% ±1.23``: the accuracy and the half-width of its 95% interval, in points."""
    if value is None or not math.isfinite(value):
        return "–"
    if low is None or not (math.isfinite(low) and math.isfinite(high)):
        return _percent(value)
    return f"{value:.2%} ±{(high - low) / 2 * 100:.2f}"


def _trial_table(rows: pd.DataFrame, *, with_config: bool, with_bitops: bool) -> list[str]:
    header = "| trial | val. accuracy | test accuracy | size | bytes | compression |"
    rule = "|---:|---:|---:|---:|---:|---:|"
    if with_bitops:
        header += " bitops |"
        rule += "---:|"
    header += " algorithm | baseline |"
    rule += "---|---|"
    if with_config:
        header += " config_list |"
        rule += "---|"
    lines = [header, rule]
    for row in rows.itertuples():
        line = (
            f"| {int(row.number)} | {_with_interval(row.accuracy, row.val_low, row.val_high)} "
            f"| {_with_interval(row.test_accuracy, row.test_low, row.test_high)} "
            f"| {_size(row.size_bytes)} | {_bytes(row.size_bytes)} "
            f"| {_ratio(row.compression_ratio)} |"
        )
        if with_bitops:
            line += f" {format_count(row.bitops)} |"
        line += f" {_cell(_text(row.algorithm))} | {_cell(_text(row.baseline))} |"
        if with_config:
            line += f" {_config_code(row.config_list)} |"
        lines.append(line)
    return lines


def _split_sizes(frame: pd.DataFrame) -> str | None:
    """How many images the splits hold, and what one image is worth in accuracy."""
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


def render_markdown(frame: pd.DataFrame, front: pd.DataFrame, context: ReportContext) -> str:
    """Return the text of report.md for a study's trials frame and its front."""
    attrs = context.study_attrs
    complete = frame[frame["state"] == "COMPLETE"]
    feasible = complete[complete["feasible"]]
    infeasible_count = len(complete) - len(feasible)
    out: list[str] = [f"# Quantization study `{context.study_name}`", ""]
    with_bitops = any(axis.name == "bitops" for axis in context.axes)

    regenerate = context.command or f"quantsearch report {context.study_args}"
    out += [
        "This report was generated by:",
        "",
        "```sh",
        regenerate,
        "```",
        "",
        "## Summary",
        "",
        "| | |",
        "|---|---|",
    ]
    summary: list[tuple[str, str]] = []
    if attrs.get("task") is not None:
        summary.append(("task", _task_text(attrs["task"])))
    if attrs.get("algorithm") is not None:
        summary.append(("algorithm", f"`{_cell(_text(attrs.get('algorithm')))}`"))
    if context.axes:
        summary.append(
            ("objectives", ", ".join(f"{a.direction} `{a.name}`" for a in context.axes))
        )
    float_model = attrs.get("float_model")
    if isinstance(float_model, Mapping):
        summary.append(
            (
                "float model",
                f"{_cell(_text(float_model.get('source')))}: validation "
                f"{_percent(float_model.get('val_accuracy'))}, test "
                f"{_percent(float_model.get('test_accuracy'))}",
            )
        )
    splits = _split_sizes(frame)
    if splits:
        summary.append(("splits", splits))
    summary.append(("trials", f"{len(frame)} ({_state_summary(frame)})"))
    if infeasible_count:
        summary.append(("infeasible", f"{infeasible_count} complete trials broke a constraint"))
    if front.empty:
        summary.append(("front", "empty: no complete trial meets the constraints"))
    else:
        summary.append(("front", f"{len(front)} trials"))
    summary.append(("float model size", f"{_size(context.float_size_bytes)}"))
    if not front.empty:
        best = front.loc[front["accuracy"].idxmax()]
        smallest = front.iloc[0]
        summary.append(
            (
                "most accurate on the front",
                f"trial {int(best.number)}: {_percent(best.accuracy)} at {_size(best.size_bytes)}",
            )
        )
        summary.append(
            (
                "smallest on the front",
                f"trial {int(smallest.number)}: {_size(smallest.size_bytes)} "
                f"({_ratio(smallest.compression_ratio)} smaller) at {_percent(smallest.accuracy)}",
            )
        )
    spanned = ", ".join(
        f"{a.name} / float" if a.relative else ("1 - " if a.maximize else "") + a.name
        for a in context.axes
    )
    summary.append(
        ("hypervolume", f"{context.hypervolume:.4f} (of the unit cube of {spanned}; reference 1)")
    )
    if attrs.get("space_hash") is not None:
        summary.append(("space hash", f"`{_cell(_text(attrs.get('space_hash')))}`"))
    out += [f"| {key} | {value} |" for key, value in summary]
    out.append("")

    images = context.images
    for index, (title, image) in enumerate(context.pareto_plots):
        out += [f"## {title[0].upper()}{title[1:]}", "", f"![{title}]({image})", ""]
        if index == 0:
            out += [
                "Dots are complete trials, hollow circles infeasible ones, crosses on the bottom "
                "edge failed trials; the line is the Pareto front of the two axes; labelled "
                "markers are the baselines "
                + (f"([SVG version]({images['pareto_svg']}))." if "pareto_svg" in images else "."),
                "",
            ]

    out += [
        "## Pareto front",
        "",
        "Smallest first. Accuracy is measured on the validation split during the search and "
        "on the test split once per trial; size is the packed model's size.",
        "",
        *_trial_table(front, with_config=True, with_bitops=with_bitops),
        "",
    ]

    if "bits" in images:
        out += [
            "## Bit widths on the front",
            "",
            f"![Per-layer bit widths of the front's trials]({images['bits']})",
            "",
        ]
    if "history" in images:
        out += [
            "## Search progress",
            "",
            f"![Hypervolume and front size over the trials]({images['history']})",
            "",
        ]

    baselines = complete[complete["baseline"].notna()].sort_values("size_bytes")
    if not baselines.empty:
        out += [
            "## Baselines",
            "",
            *_trial_table(baselines, with_config=False, with_bitops=with_bitops),
            "",
        ]

    failed = frame[frame["state"] == "FAIL"]
    if not failed.empty:
        out += ["## Failed trials", "", "| trial | reason |", "|---:|---|"]
        for row in failed.itertuples():
            reason = _text(row.fail_reason) or "(no reason recorded)"
            if len(reason) > _FAIL_REASON_CHARS:
                reason = reason[: _FAIL_REASON_CHARS - 1] + "…"
            out.append(f"| {int(row.number)} | {_cell(reason)} |")
        out.append("")

    example = int((front if not front.empty else complete).iloc[0].number)
    out += [
        "## Export a trial",
        "",
        "Every trial's trained weights are stored with the study, so exporting needs no "
        "training. This writes the state dict (`model.pt`), the calibration file "
        "(`calibration.json`) and the packed integer model (`model.qpk`), reloads them and "
        "checks the reloaded model's test accuracy against the stored one:",
        "",
        "```sh",
        f"quantsearch export {context.study_args} --trial {example} --out exports/trial_{example}",
        "```",
        "",
        "For ONNX Runtime, TensorRT or OpenVINO, `--format onnx` adds a QDQ model "
        "(`model.onnx`, integer weights and quantized activations as QuantizeLinear/"
        "DequantizeLinear) and the float model (`model_float.onnx`); it checks the QDQ model "
        "in onnxruntime on the test split and measures both models' latency (needs "
        "`pip install 'quantsearch[onnx]'`):",
        "",
        "```sh",
        f"quantsearch export {context.study_args} --trial {example} "
        f"--out exports/trial_{example} --format onnx",
        "```",
        "",
        "All trials with every attribute: [trials.csv](trials.csv).",
        "",
    ]
    return "\n".join(out)
