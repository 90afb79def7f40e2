"""How far the latency predicted from a study's per-layer table is from the latency measured,
over the study's trials that have both (report.md's "Predicted latency" section)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from quantsearch.pipeline import LatencyTable

__all__ = [
    "MEASURED_COLUMN",
    "PREDICTED_COLUMN",
    "PredictionError",
    "latency_pairs",
    "latency_prediction_markdown",
    "prediction_error",
]

#: The trials frame's columns of the record's ``latency_ms`` and ``latency_predicted_ms``.
MEASURED_COLUMN = "attr.latency_ms"
PREDICTED_COLUMN = "attr.latency_predicted_ms"

# Rows of the largest differences the section lists.
_SHOWN_ROWS = 10


@dataclass(frozen=True)
class PredictionError:
    """Prediction against measurement over ``count`` trials: the absolute relative error
    |predicted - measured| / measured (median and largest, with that trial) and Spearman's
    rank correlation (NaN under 2 trials or a constant column)."""

    count: int
    median_relative: float
    max_relative: float
    worst_trial: int
    spearman: float


def latency_pairs(frame: pd.DataFrame) -> pd.DataFrame:
    """``number``, ``measured``, ``predicted`` and ``relative`` (error) of each complete trial
    with both a measured and a predicted latency; a trial that reused another's result
    (``duplicate_of``) is that trial again and is left out."""
    columns = ["number", "measured", "predicted", "relative"]
    if MEASURED_COLUMN not in frame or PREDICTED_COLUMN not in frame:
        return pd.DataFrame(columns=columns)
    rows = frame[frame["state"] == "COMPLETE"]
    if "duplicate_of" in rows:
        rows = rows[rows["duplicate_of"].isna()]
    pairs = pd.DataFrame(
        {
            "number": rows["number"].astype(int),
            "measured": pd.to_numeric(rows[MEASURED_COLUMN], errors="coerce"),
            "predicted": pd.to_numeric(rows[PREDICTED_COLUMN], errors="coerce"),
        }
    ).dropna()
    pairs = pairs[pairs["measured"] > 0]
    pairs["relative"] = (pairs["predicted"] - pairs["measured"]).abs() / pairs["measured"]
    return pairs[columns].reset_index(drop=True)


def _spearman(a: pd.Series, b: pd.Series) -> float:
    if len(a) < 2:
        return math.nan
    ra, rb = a.rank().to_numpy(float), b.rank().to_numpy(float)
    if np.std(ra) == 0 or np.std(rb) == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def prediction_error(frame: pd.DataFrame) -> PredictionError | None:
    """The error of the predicted latency over the trials that have both (None: no trial)."""
    pairs = latency_pairs(frame)
    if pairs.empty:
        return None
    worst = pairs.loc[pairs["relative"].idxmax()]
    return PredictionError(
        count=len(pairs),
        median_relative=float(pairs["relative"].median()),
        max_relative=float(worst["relative"]),
        worst_trial=int(worst["number"]),
        spearman=_spearman(pairs["measured"], pairs["predicted"]),
    )


def _ms(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.3f}"


def latency_prediction_markdown(table: LatencyTable | None, frame: pd.DataFrame) -> list[str]:
    """The report.md section: the table measured, and prediction against measurement."""
    pairs = latency_pairs(frame)
    if table is None and pairs.empty:
        return []
    out = ["## Predicted latency", ""]
    if table is not None:
        setup = table.setup
        out += [
            f"The per-layer latency table holds {len(table.entries)} entries (each layer at "
            "each bit width, alone quantized in the float model, timed in turn with the float "
            f"model) and the float model's own time: {_ms(table.float_ms)} ms per batch of "
            f"{setup.get('batch_size')} on {setup.get('threads')} thread(s) "
            f"({setup.get('provider')}), measured in {table.seconds:.0f} s. A config's "
            "predicted latency is the float time plus each quantized layer's change alone; "
            "fused neighbours (a conv and the ReLU after it) do not add up, so read it as a "
            "ranking more than as milliseconds.",
            "",
        ]
    error = prediction_error(frame)
    if error is None:
        return [
            *out,
            "No trial has both a measured and a predicted latency (with `latency: {source: "
            "predicted}` trials are not timed; `quantsearch export --format onnx` times one).",
            "",
        ]
    rho = "–" if not math.isfinite(error.spearman) else f"{error.spearman:.2f}"
    out += [
        f"Over the {error.count} trials with both: median absolute relative error "
        f"{error.median_relative:.1%}, largest {error.max_relative:.1%} (trial "
        f"{error.worst_trial}), Spearman rank correlation {rho}.",
        "",
        "| trial | measured (ms) | predicted (ms) | relative error |",
        "|---:|---:|---:|---:|",
    ]
    shown = pairs.sort_values(["relative", "number"], ascending=[False, True])
    for row in shown.head(_SHOWN_ROWS).itertuples():
        out.append(
            f"| {int(row.number)} | {_ms(row.measured)} | {_ms(row.predicted)} "
            f"| {row.relative:.1%} |"
        )
    if len(pairs) > _SHOWN_ROWS:
        out += [
            "",
            f"The {_SHOWN_ROWS} largest differences; every trial: `{PREDICTED_COLUMN}` "
            "in trials.csv.",
        ]
    return [*out, ""]
