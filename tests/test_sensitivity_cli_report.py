"""`quantsearch sensitivity` and the report's sensitivity section, on one tiny ptq study."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from quantsearch.cli import main
from quantsearch.pipeline import sensitivity_of
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


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    sensitivity = sensitivity_of(load_study(load_space(space)))
    assert sensitivity is not None and sensitivity.complete
    for param in ("conv1.weight_bits", "conv2.weight_bits", "fc1.weight_bits", "fc2.weight_bits"):
        increase = sensitivity.increase(param, 2)
        assert f"{param}" in first and f"{increase:+.4f}" in first
    assert "size change (bytes):" in first and "-122,872" in first  # fc1's 2-bit saving

    assert main(["sensitivity", "--space", str(space)]) == 0
    again = capsys.readouterr().out
    assert "measuring" not in again and "resuming" not in again
    assert again.split("\nsensitivity of")[1] == first.split("\nsensitivity of")[1]


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
    sensitivity = sensitivity_of(load_study(load_space(space)))
    assert sensitivity is not None
    assert (out / "sensitivity.png").stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "## Sensitivity" in text and "![Loss increase per layer and bit width]" in text
    entry = sensitivity.param("fc2.weight_bits").entry(2)
    assert entry is not None
    row = next(line for line in text.splitlines() if line.startswith("| `fc2.weight_bits`"))
    assert f"{entry.loss - sensitivity.float_loss:+.4f} / " in row
    assert f"/ {entry.size_delta:+,}" in row

    figure = sensitivity_heatmap_figure(sensitivity)
    shown = figure.axes[0].images[0].get_array()
    expected = sensitivity_pivot(sensitivity).to_numpy(dtype=float)
    assert np.allclose(np.ma.filled(shown, np.nan), expected, equal_nan=True)
