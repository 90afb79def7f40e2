"""Export a trial from a study whose trials were trained here, then reload and re-evaluate it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState, create_trial

from quantsearch.export import ExportError, describe_export, export_trial, resolve_checkpoint
from quantsearch.quantization import get_quantizer, model_size_bytes
from quantsearch.tasks import Task, TrainConfig, evaluate, fit, get_task, make_optimizer

CONFIGS: dict[str, list[dict[str, Any]]] = {
    "float": [],
    "qat": [
        {"quant_types": ["weight"], "quant_bits": {"weight": 4}, "op_types": ["Conv2d", "Linear"]},
        {"quant_types": ["output"], "quant_bits": {"output": 8}, "op_types": ["ReLU6"]},
    ],
    "naive": [{"quant_types": ["weight"], "quant_bits": 3, "op_types": ["default"]}],
    "dorefa": [{"quant_types": ["weight"], "quant_bits": 2, "op_names": ["conv2", "fc1"]}],
    "lsq": [{"quant_types": ["weight", "output"], "quant_bits": 4, "op_types": ["Linear"]}],
    "bnn": [{"quant_types": ["weight"], "quant_bits": 1, "op_names": ["conv2", "fc1"]}],
}


@pytest.fixture(scope="module")
def task() -> Task:
    return get_task("digits", seed=0)


def _trained_trial(task: Task, algorithm: str, checkpoint: Path) -> optuna.trial.FrozenTrial:
    """Train a trial for one epoch the way a study does and store its checkpoint."""
    torch.manual_seed(0)
    model = task.build_model()
    config = TrainConfig(epochs=1, num_threads=1)
    optimizer = make_optimizer(model.parameters(), config)
    config_list = CONFIGS[algorithm]
    quantizer = None
    if config_list:
        quantizer = get_quantizer(algorithm)(
            model, config_list, optimizer=optimizer, dummy_input=task.dummy_input
        )
        model = quantizer.compress()
    result = fit(model, task, optimizer, config, seed=0)
    test_accuracy = evaluate(model, task.test_set)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), checkpoint)
    size = model_size_bytes(model)
    return create_trial(
        values=[result.val_accuracy, float(size)],
        user_attrs={
            "config_list": config_list,
            "algorithm": "qat" if algorithm == "float" else algorithm,
            "val_accuracy": result.val_accuracy,
            "test_accuracy": test_accuracy,
            "size_bytes": size,
            "layer_bits": quantizer.layer_bits() if quantizer is not None else {},
            "checkpoint": str(checkpoint.relative_to(checkpoint.parents[2])),
            **({"baseline": "float"} if algorithm == "float" else {}),
        },
    )


def _study(tmp_path: Path, task: Task, algorithms: list[str]) -> optuna.Study:
    storage = f"sqlite:///{tmp_path / 'exp.db'}"
    study = optuna.create_study(
        study_name="exp", storage=storage, directions=["maximize", "minimize"]
    )
    study.set_metric_names(["accuracy", "size_bytes"])
    study.set_user_attr("task", "digits")
    study.set_user_attr(
        "space", {"task": {"name": "digits", "data_dir": None, "options": {}}, "seed": 0}
    )
    for number, algorithm in enumerate(algorithms):
        checkpoint = tmp_path / "exp_artifacts" / "exp" / f"trial_{number}.pt"
        study.add_trial(_trained_trial(task, algorithm, checkpoint))
    return study


@pytest.mark.parametrize("algorithm", ["qat", "naive", "dorefa", "lsq", "bnn"])
def test_export_reloads_to_the_stored_accuracy(tmp_path: Path, task: Task, algorithm: str) -> None:
    study = _study(tmp_path, task, [algorithm])
    # A fresh handle on the database, as `quantsearch export` has.
    study = optuna.load_study(study_name="exp", storage=f"sqlite:///{tmp_path / 'exp.db'}")
    stored = study.trials[0].user_attrs["test_accuracy"]
    # Well above chance (10%), so equal accuracies mean the same predictions, not a dead model.
    assert stored > 0.3
    result = export_trial(study, 0, tmp_path / "export")  # the task comes from the study

    assert result.matches
    assert result.checkpoint_accuracy == stored
    assert result.reloaded_accuracy == stored
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "calibration.json",
        "export.json",
        "model.pt",
        "model.qpk",
        "model_dequantized.pt",
    ]
    # The deployed weights in the original architecture (activations float), evaluated.
    dequantized = task.build_model()
    dequantized.load_state_dict(torch.load(result.dequantized_path, weights_only=True))
    assert evaluate(dequantized, task.test_set) == result.dequantized_accuracy
    calibration = json.loads(result.calibration_path.read_text())
    bits = study.trials[0].user_attrs["layer_bits"]
    assert set(calibration) == set(bits)
    for layer, per_type in bits.items():
        if "weight" in per_type:
            assert calibration[layer]["weight_bits"] == per_type["weight"]
    # The state dict is the original architecture's: it loads strictly into a fresh model.
    task.build_model().load_state_dict(torch.load(result.model_path, weights_only=True))
    # The packed file holds the weights at their bit width: about the stored model size.
    assert result.packed_file_bytes == (tmp_path / "export" / "model.qpk").stat().st_size
    assert result.packed_file_bytes <= 1.1 * result.size_bytes + 4096
    text = describe_export(result)
    correct = round(stored * len(task.test_set))
    assert f"({correct}/{len(task.test_set)}); stored: {stored:.4%}: equal" in text
    summary = json.loads((tmp_path / "export" / "export.json").read_text())
    assert summary["reloaded_accuracy"] == stored
    assert summary["matches"] is True


def test_export_of_the_float_baseline(tmp_path: Path, task: Task) -> None:
    study = _study(tmp_path, task, ["float"])
    result = export_trial(study, 0, tmp_path / "export", task=task)
    assert result.packed_path.is_file()
    # All float32: the payload is the float size, after a header of a few KB.
    assert 0 < result.packed_file_bytes - result.size_bytes < 4096
    assert result.reloaded_accuracy == study.trials[0].user_attrs["test_accuracy"]
    assert result.state_dict_accuracy == result.reloaded_accuracy
    assert json.loads(result.calibration_path.read_text()) == {}


def test_export_detects_an_accuracy_mismatch(tmp_path: Path, task: Task) -> None:
    study = _study(tmp_path, task, ["naive"])
    trial = study.trials[0]
    wrong = trial.user_attrs["test_accuracy"] - 2 / len(task.test_set)
    tampered = create_trial(
        values=trial.values, user_attrs={**trial.user_attrs, "test_accuracy": wrong}
    )
    study.add_trial(tampered)
    with pytest.raises(ExportError, match=r"trial 1's checkpoint .* but the study stored"):
        export_trial(study, 1, tmp_path / "export", task=task)


def test_export_errors_name_the_problem(tmp_path: Path, task: Task) -> None:
    study = _study(tmp_path, task, ["naive"])
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "diverged"}))
    with pytest.raises(ExportError, match=r"trial 1 is FAIL \(diverged\): only complete"):
        export_trial(study, 1, tmp_path / "export", task=task)
    with pytest.raises(ExportError, match=r"has no trial 7: its trials are numbered 0 to 1"):
        export_trial(study, 7, tmp_path / "export", task=task)
    (tmp_path / "exp_artifacts" / "exp" / "trial_0.pt").unlink()
    with pytest.raises(ExportError, match=r"checkpoint of trial 0 not found at .*trial_0\.pt"):
        export_trial(study, 0, tmp_path / "export", task=task)


def test_checkpoint_paths_are_relative_to_the_database(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    (tmp_path / "sub").mkdir()
    study = optuna.create_study(storage=storage, directions=["maximize", "minimize"])
    study.add_trial(create_trial(values=[0.5, 10.0], user_attrs={"checkpoint": "a/t.pt"}))
    (tmp_path / "sub" / "a").mkdir()
    (tmp_path / "sub" / "a" / "t.pt").write_bytes(b"")
    assert resolve_checkpoint(study, study.trials[0]) == tmp_path / "sub" / "a" / "t.pt"

    memory = optuna.create_study(directions=["maximize", "minimize"])
    memory.add_trial(create_trial(values=[0.5, 10.0], user_attrs={"checkpoint": "a/t.pt"}))
    with pytest.raises(ExportError, match="not stored in one: pass checkpoint_root"):
        resolve_checkpoint(memory, memory.trials[0])
    found = resolve_checkpoint(memory, memory.trials[0], checkpoint_root=tmp_path / "sub")
    assert found == tmp_path / "sub" / "a" / "t.pt"


@pytest.mark.parametrize("conv_bias", [True, False])
def test_the_dequantized_state_dict_holds_the_deployed_weights_in_the_original_architecture(
    tmp_path: Path, conv_bias: bool
) -> None:
    import torch
    from torch import nn

    from quantsearch.export import dequantized_state
    from quantsearch.quantization import QAT_Quantizer, load_packed

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 3, 3, bias=conv_bias), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
            nn.Linear(3 * 36, 4),
        )

    x = torch.randn(16, 1, 8, 8)
    model = build()
    config = [{"quant_types": ["weight"], "quant_bits": 4, "op_types": ["Conv2d", "Linear"]}]
    quantizer = QAT_Quantizer(model, config, dummy_input=x[:1])
    model = quantizer.compress()
    model.train()
    for _ in range(3):
        model(x)  # BatchNorm statistics move away from the identity
    quantizer.export_packed(tmp_path / "m.qpk")
    deployed = load_packed(tmp_path / "m.qpk", build())
    assert quantizer.folded_batch_norms() == {"0": "1"}
    state = dequantized_state(deployed, build(), quantizer.folded_batch_norms())
    fresh = build()
    fresh.load_state_dict(state)  # strict: every key of the original architecture
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), deployed(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fresh(x), model.eval()(x), atol=1e-5, rtol=1e-5)
