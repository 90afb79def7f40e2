"""`quantsearch sensitivity` and the report's sensitivity section, on one tiny ptq study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from quantsearch.cli import main
from quantsearch.pipeline import StudyRecord
from quantsearch.report import sensitivity_heatmap_figure
from quantsearch.search import load_space, load_study, sensitivity_pivot
from tests.search._spaces import SMALL_SPACE

SPACE = {
    **SMALL_SPACE,
    "algorithm": "ptq",
    "params": {},
    "calibration": {"batches": 1},
    "n_trials": 2,
    "baselines": {"float": True},
    "quantize": {"weight": {"op_types": ["Conv2d", "Linear"]}},
    "per_layer": {
        "op_types": ["Conv2d", "Linear"],
        "weight_bits": {"_type": "choice", "_value": [2, 8, "float"]},
    },
    "sensitivity": {"batches": 1},
}



@pytest.fixture
def space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**SPACE, "storage": str(tmp_path / "s.db")}))
    return path


def test_the_command_measures_once_and_prints_the_table(
    space: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sensitivity", "--space", str(space), "--threads", "1"]) == 0
    first = capsys.readouterr().out
    assert "sensitivity: measuring each per-layer bit width" in first
    assert "validation loss increase, each parameter alone at each bit width:" in first
    sensitivity = StudyRecord.of(load_study(load_space(space))).sensitivity
    assert sensitivity is not None and sensitivity.complete
    for param in ("conv1.weight_bits", "conv2.weight_bits", "fc1.weight_bits", "fc2.weight_bits"):
        increase = sensitivity.increase(param, 2)
        assert f"{param}" in first and f"{increase:+.4f}" in first
    assert "size change (bytes):" in first and "-122,872" in first  # fc1's 2-bit saving

    assert main(["sensitivity", "--space", str(space)]) == 0
    again = capsys.readouterr().out
    assert "measuring" not in again and "resuming" not in again
    assert again.split("\nsensitivity of")[1] == first.split("\nsensitivity of")[1]


def test_the_command_measures_on_workers_and_validate_says_what_seeds(
    space: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", "--space", str(space)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "sensitivity" in x)
    # n_trials 2 less the float baseline leaves one seed.
    assert " ".join(line.split()) == (
        "sensitivity loss on 1 validation batches, then up to 1 configs of its predicted "
        "front first, until 3 in a row miss the front"
    )
    assert main(["sensitivity", "--space", str(space), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "sensitivity 12/12 (" in out
    sensitivity = StudyRecord.of(load_study(load_space(space))).sensitivity
    assert sensitivity is not None and sensitivity.complete
    assert [len(p.entries) for p in sensitivity.params] == [3, 3, 3, 3]


def test_the_command_refuses_a_space_without_per_layer_bits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "flat.yaml"
    flat = {**SPACE, "per_layer": None, "sensitivity": None, "storage": str(tmp_path / "f.db")}
    flat["params"] = {"weight_bits": {"_type": "choice", "_value": [4, 8]}}
    path.write_text(yaml.safe_dump({k: v for k, v in flat.items() if v is not None}))
    assert main(["sensitivity", "--space", str(path)]) == 2
    error = capsys.readouterr().err
    assert "per_layer: has no searched per-layer bits parameter" in error
    assert not (tmp_path / "f.db").exists()


def test_the_report_draws_the_heatmap_and_the_table(
    space: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    assert main(["study", "--space", str(space), "--report-dir", str(out), "--quiet"]) == 0
    capsys.readouterr()
    sensitivity = StudyRecord.of(load_study(load_space(space))).sensitivity
    assert sensitivity is not None
    assert (out / "sensitivity.png").stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "## Sensitivity" in text and "![Loss increase per layer and bit width]" in text
    assert text.index("## Pareto front") < text.index("## Noise on the front")
    assert text.index("## Noise on the front") < text.index("## Bit widths on the front")
    entry = sensitivity.param("fc2.weight_bits").entry(2)
    assert entry is not None
    row = next(line for line in text.splitlines() if line.startswith("| `fc2.weight_bits`"))
    assert f"{entry.loss - sensitivity.float_loss:+.4f} / " in row
    assert f"/ {entry.size_delta:+,}" in row

    figure = sensitivity_heatmap_figure(sensitivity)
    shown = figure.axes[0].images[0].get_array()
    expected = sensitivity_pivot(sensitivity).to_numpy(dtype=float)
    assert np.allclose(np.ma.filled(shown, np.nan), expected, equal_nan=True)


def test_front_trials_within_the_test_noise_are_marked() -> None:
    import pandas as pd

    from quantsearch.report import indistinct
    from quantsearch.report._noise import noise_markdown

    front = pd.DataFrame(
        {
            "number": [4, 7, 9, 2],
            "size_bytes": [1000, 2000, 3000, 4000],
            "test_accuracy": [0.90, 0.93, 0.99, 0.995],
            "test_low": [0.86, 0.905, 0.97, 0.98],
            "test_high": [0.93, 0.95, 0.997, 0.999],
        }
    )
    # 7 overlaps 4 (0.905 <= 0.93); 9 overlaps neither; 2 overlaps 9.
    assert indistinct(front) == {7: 4, 2: 9}
    text = "\n".join(noise_markdown(front))
    assert "| 7 | 2 KB | 93.00% [90.50%, 95.00%] | 4 | 1 KB | 90.00% [86.00%, 93.00%] |" in text
    assert not any(line.startswith("| 9 |") for line in text.splitlines())
    assert "| 2 | 4 KB | 99.50% [98.00%, 99.90%] | 9 |" in text
    apart = front.assign(test_low=[0.80, 0.94, 0.97, 0.998], test_high=[0.85, 0.96, 0.99, 1.0])
    assert indistinct(apart) == {}
    assert "Every front trial is distinguishable" in "\n".join(noise_markdown(apart))


def test_a_failed_measurement_is_one_line_naming_it(
    space: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from quantsearch.search import _sensitivity_study
    from quantsearch.search._sensitivity_measure import SensitivityError

    def failing(*args: object, **kwargs: object) -> None:
        raise SensitivityError("measuring fc1.weight_bits at 2 bits failed: out of memory")

    monkeypatch.setattr(_sensitivity_study, "ensure_sensitivity", failing)
    assert main(["sensitivity", "--space", str(space)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("quantsearch: error: measuring fc1.weight_bits at 2 bits failed")
    assert "Traceback" not in error
