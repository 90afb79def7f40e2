"""Export formats are a registry: a toy format (the layers' bits as JSON), registered here, runs
through export_trial and through ``quantsearch export --format``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest

from quantsearch.cli import main
from quantsearch.export import (
    DEFAULT_FORMAT,
    EXPORT_FORMATS,
    ExportContext,
    ExportError,
    describe_export,
    describe_formats,
    export_trial,
    register_export_format,
)
from quantsearch.tasks import Task, evaluate, get_task

from .test_export import _study

TOY = "bits-json"
TOY_FILE = "layer_bits.json"


@dataclass(frozen=True)
class BitsPart:
    """The toy format's part of the result."""

    path: Path
    layers: int
    fail: bool = False

    def summary(self) -> dict[str, Any]:
        return {"file": self.path.name, "layers": self.layers}

    def describe(self) -> list[str]:
        return [f"  {self.path.name:<20} bits of {self.layers} layers"]

    def check(self, trial_number: int) -> None:
        if self.fail:
            raise ExportError(f"trial {trial_number}: the toy format refuses")


@pytest.fixture
def toy_format() -> Iterator[dict[str, Any]]:
    """Registers the toy format for one test; ``options["fail"]`` makes its check fail."""
    options: dict[str, Any] = {"fail": False, "seen": []}

    @register_export_format(TOY, description="those and the layers' bits as JSON")
    def export_bits(context: ExportContext) -> BitsPart:
        options["seen"].append(context)
        path = context.out_dir / TOY_FILE
        path.write_text(json.dumps(context.record.layer_bits, sort_keys=True))
        return BitsPart(path, len(context.record.layer_bits), options["fail"])

    try:
        yield options
    finally:
        del EXPORT_FORMATS[TOY]


@pytest.fixture(scope="module")
def task() -> Task:
    return get_task("digits", seed=0)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory, task: Task) -> Path:
    folder = tmp_path_factory.mktemp("formats")
    _study(folder, task, ["naive"])
    return folder


def _load(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name="exp", storage=f"sqlite:///{folder / 'exp.db'}")


def test_the_built_in_formats_are_registered_in_order() -> None:
    assert list(EXPORT_FORMATS)[:2] == ["packed", "onnx"]
    assert DEFAULT_FORMAT == "packed"
    assert describe_formats() == (
        "packed: state dict, calibration and packed model (default); onnx: those and an ONNX "
        "QDQ model, checked in onnxruntime and timed"
    )


def test_a_registered_format_runs_through_export_trial(
    study_dir: Path, tmp_path: Path, task: Task, toy_format: dict[str, Any]
) -> None:
    study = _load(study_dir)
    trial = study.trials[0]
    result = export_trial(study, 0, tmp_path / "out", format=TOY)

    assert result.matches and result.format == TOY and result.onnx is None
    bits = trial.user_attrs["layer_bits"]
    # naive's "default" op type: every weighted layer's weights at 3 bits.
    assert bits == {layer: {"weight": 3} for layer in ("conv1", "conv2", "fc1", "fc2")}
    assert json.loads((tmp_path / "out" / TOY_FILE).read_text()) == bits
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "calibration.json", "export.json", TOY_FILE, "model.pt", "model.qpk",
        "model_dequantized.pt",
    ]
    # The handler got the trial's models, rebuilt: the ones the export measured.
    (context,) = toy_format["seen"]
    assert context.trial_number == 0 and context.out_dir == tmp_path / "out"
    assert context.stored_accuracy == trial.user_attrs["test_accuracy"]
    assert context.quantizer is not None
    assert evaluate(context.model, task.test_set) == result.checkpoint_accuracy
    assert evaluate(context.float_model, task.test_set) == result.state_dict_accuracy
    assert evaluate(context.deployed, task.test_set) == result.reloaded_accuracy
    assert isinstance(result.part, BitsPart)
    summary = json.loads((tmp_path / "out" / "export.json").read_text())
    assert summary[TOY] == {"file": TOY_FILE, "layers": 4}
    assert "onnx" not in summary
    assert describe_export(result).splitlines()[-1] == f"  {TOY_FILE:<20} bits of 4 layers"


def test_a_failing_check_raises_after_the_files_are_written(
    study_dir: Path, tmp_path: Path, toy_format: dict[str, Any]
) -> None:
    toy_format["fail"] = True
    with pytest.raises(ExportError, match=r"^trial 0: the toy format refuses$"):
        export_trial(_load(study_dir), 0, tmp_path / "out", format=TOY)
    summary = json.loads((tmp_path / "out" / "export.json").read_text())
    assert summary[TOY]["layers"] == 4


def test_the_command_offers_a_registered_format(
    study_dir: Path,
    tmp_path: Path,
    toy_format: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    storage = f"sqlite:///{study_dir / 'exp.db'}"
    out = tmp_path / "cli"
    code = main(["export", "--storage", storage, "--study", "exp", "--trial", "0",
                 "--out", str(out), "--format", TOY])
    text, err = capsys.readouterr()
    assert code == 0, err
    assert f"exported trial 0 to {out}" in text
    assert text.rstrip("\n").endswith(f"  {TOY_FILE:<20} bits of 4 layers")
    assert json.loads((out / TOY_FILE).read_text()) == _load(study_dir).trials[0].user_attrs[
        "layer_bits"
    ]
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert f"{TOY}: those and the layers' bits as JSON" in " ".join(capsys.readouterr().out.split())


def test_unknown_and_taken_names_are_refused(
    toy_format: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = None
    with pytest.raises(SystemExit) as stop:
        code = main(["export", "--storage", "sqlite:///x.db", "--study", "s", "--trial", "0",
                     "--out", str(tmp_path / "o"), "--format", "tflite"])
    assert code is None and stop.value.code == 2
    err = capsys.readouterr().err
    assert "argument --format: invalid choice: 'tflite'" in err and TOY in err
    study = optuna.create_study(directions=["maximize", "minimize"])
    with pytest.raises(ExportError, match=rf"expected one of \['packed', 'onnx', '{TOY}'\]"):
        export_trial(study, 0, tmp_path / "x", format="tflite")
    with pytest.raises(ValueError, match=f"export format '{TOY}' is already registered"):
        register_export_format(TOY, description="again")(lambda context: None)
    assert not (tmp_path / "o").exists() and not (tmp_path / "x").exists()
