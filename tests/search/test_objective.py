"""One trial: seeded, trained, measured; diverged, hopeless and crashing trials are outcomes."""

from __future__ import annotations

from pathlib import Path

import torch

from quantsearch.quantization import get_quantizer
from quantsearch.search import TrialJob, run_trial, trial_seed
from quantsearch.search._objective import build_task
from quantsearch.search._spec import HopelessRule, TaskSpec
from quantsearch.tasks import TrainConfig, evaluate, fit

TASK = TaskSpec(name="digits", options={"limit": 300})
CONFIG = [
    {"quant_types": ["weight"], "quant_bits": {"weight": 4}, "op_names": ["conv1", "fc2"]},
    {"quant_types": ["output"], "quant_bits": {"output": 8}, "op_names": ["relu1"]},
]

NAN_TASK = """
from dataclasses import replace

from torch import nn

from quantsearch.tasks import get_task


class NanNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


def make_task(data_dir=None, options=None, seed=0):
    return replace(get_task("digits", options={"limit": 100}, seed=seed), build_model=NanNet)
"""


def _job(**changes: object) -> TrialJob:
    fields = {
        "number": 0,
        "seed": 5,
        "task": TASK,
        "task_seed": 0,
        "algorithm": "qat",
        "mode": "scratch",
        "train": {"epochs": 1},
        "config_list": CONFIG,
        "objectives": ("accuracy", "size_bytes"),
        **changes,
    }
    return TrialJob(**fields)


def test_trial_seed_depends_on_study_seed_and_number() -> None:
    assert trial_seed(0, 3) == trial_seed(0, 3)
    seeds = {trial_seed(s, n) for s in range(3) for n in range(20)}
    assert len(seeds) == 60
    assert all(0 <= s < 2**31 for s in seeds)


def test_a_trial_trains_measures_and_saves_its_checkpoint(tmp_path: Path) -> None:
    checkpoint = tmp_path / "a" / "trial_0.pt"
    outcome = run_trial(_job(checkpoint=str(checkpoint)))
    assert outcome.state == "COMPLETE", outcome.record.fail_reason
    record = outcome.record
    assert 0.3 < record.val_accuracy <= 1
    assert 0.3 < record.test_accuracy <= 1
    assert outcome.values == (record.val_accuracy, record.size_bytes)
    assert (record.mode, record.algorithm, record.seed) == ("scratch", "qat", 5)
    assert record.layer_bits == {
        "conv1": {"weight": 4},
        "relu1": {"output": 8},
        "fc2": {"weight": 4},
    }

    float_outcome = run_trial(_job(config_list=[]))
    assert float_outcome.record.layer_bits == {}
    assert record.size_bytes < float_outcome.record.size_bytes

    # The checkpoint is the compressed model's state: it loads into a rebuilt one and gives
    # the same test accuracy.
    task = build_task(TASK, 0)
    model = task.build_model()
    model = get_quantizer("qat")(model, CONFIG, dummy_input=task.dummy_input).compress()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    assert evaluate(model, task.test_set) == record.test_accuracy


def test_the_same_job_gives_the_same_numbers() -> None:
    first, second = run_trial(_job()).record, run_trial(_job()).record
    assert (first.val_accuracy, first.size_bytes) == (second.val_accuracy, second.size_bytes)


def _float_weights(folder: Path) -> tuple[Path, float]:
    """A float model of TASK trained for 3 epochs, saved; and its validation accuracy."""
    task = build_task(TASK, 0)
    model = task.build_model()
    fit(model, task, torch.optim.Adam(model.parameters(), 3e-3), TrainConfig(epochs=3), seed=1)
    path = folder / "float.pt"
    torch.save(model.state_dict(), path)
    return path, evaluate(model, task.val_set)


def test_a_float_trial_evaluates_the_float_weights_without_training(tmp_path: Path) -> None:
    path, accuracy = _float_weights(tmp_path)
    outcome = run_trial(_job(mode="float", config_list=[], float_weights=str(path)))
    assert outcome.state == "COMPLETE", outcome.record.fail_reason
    assert outcome.record.val_accuracy == accuracy
    assert outcome.record.steps == 0


def test_a_finetune_trial_starts_from_the_float_weights_and_runs_its_step_budget(
    tmp_path: Path,
) -> None:
    path, accuracy = _float_weights(tmp_path)
    tuned = run_trial(
        _job(mode="finetune", float_weights=str(path), train={"steps": 7, "lr": 1e-4})
    )
    assert tuned.state == "COMPLETE", tuned.record.fail_reason
    assert tuned.record.steps == 7
    # Seven small steps from a trained model stay near it; from scratch they would not.
    scratch = run_trial(_job(train={"steps": 7, "lr": 1e-4}))
    assert tuned.record.val_accuracy > accuracy - 0.1
    assert tuned.record.val_accuracy > scratch.record.val_accuracy + 0.2


def test_a_trial_that_needs_float_weights_without_them_fails_clearly() -> None:
    outcome = run_trial(_job(mode="finetune"))
    assert outcome.state == "FAIL"
    reason = "ValueError: a finetune trial needs the study's float weights"
    assert outcome.record.fail_reason == reason


def test_a_hopeless_trial_is_pruned_with_its_reason() -> None:
    outcome = run_trial(_job(hopeless=HopelessRule(after_epoch=1, margin=0.95)))
    assert outcome.state == "PRUNED"
    assert outcome.record.fail_reason.startswith("hopeless: validation accuracy")
    assert "after epoch 1 is below chance + margin (1.050)" in outcome.record.fail_reason


def test_a_diverged_trial_fails_with_its_reason(tmp_path: Path) -> None:
    task_file = tmp_path / "nan_task.py"
    task_file.write_text(NAN_TASK)
    outcome = run_trial(_job(task=TaskSpec(name=f"{task_file}:make_task"), config_list=[]))
    assert outcome.state == "FAIL"
    assert outcome.record.fail_reason == "diverged: loss became nan at epoch 1, step 1"


def test_a_crashing_trial_fails_with_the_exception() -> None:
    bad = [{"quant_types": ["weight"], "quant_bits": {"weight": 40}, "op_names": ["conv1"]}]
    outcome = run_trial(_job(config_list=bad))
    assert outcome.state == "FAIL"
    assert outcome.record.fail_reason.startswith("ConfigError: ")
    assert "Traceback" in outcome.record.fail_detail
