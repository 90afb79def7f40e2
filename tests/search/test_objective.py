"""One trial: seeded, trained, measured; diverged, hopeless and crashing trials are outcomes."""

from __future__ import annotations

from pathlib import Path

import torch

from quantsearch.quantization import get_quantizer
from quantsearch.search import TrialJob, run_trial, trial_seed
from quantsearch.search._objective import build_task
from quantsearch.search._space import HopelessRule, TaskSpec
from quantsearch.tasks import evaluate

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
        "train": {"epochs": 1},
        "config_list": CONFIG,
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
    assert outcome.state == "COMPLETE", outcome.reason
    assert 0.3 < outcome.val_accuracy <= 1
    assert 0.3 < outcome.test_accuracy <= 1
    assert outcome.layer_bits == {
        "conv1": {"weight": 4},
        "relu1": {"output": 8},
        "fc2": {"weight": 4},
    }

    float_outcome = run_trial(_job(config_list=[]))
    assert float_outcome.layer_bits == {}
    assert outcome.size_bytes < float_outcome.size_bytes

    # The checkpoint is the compressed model's state: it loads into a rebuilt one and gives
    # the same test accuracy.
    task = build_task(TASK, 0)
    model = task.build_model()
    model = get_quantizer("qat")(model, CONFIG, dummy_input=task.dummy_input).compress()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    assert evaluate(model, task.test_set) == outcome.test_accuracy


def test_the_same_job_gives_the_same_numbers() -> None:
    first, second = run_trial(_job()), run_trial(_job())
    assert (first.val_accuracy, first.size_bytes) == (second.val_accuracy, second.size_bytes)


def test_a_hopeless_trial_is_pruned_with_its_reason() -> None:
    outcome = run_trial(_job(hopeless=HopelessRule(after_epoch=1, margin=0.95)))
    assert outcome.state == "PRUNED"
    assert outcome.reason.startswith("hopeless: validation accuracy")
    assert "after epoch 1 is below chance + margin (1.050)" in outcome.reason


def test_a_diverged_trial_fails_with_its_reason(tmp_path: Path) -> None:
    task_file = tmp_path / "nan_task.py"
    task_file.write_text(NAN_TASK)
    outcome = run_trial(_job(task=TaskSpec(name=f"{task_file}:make_task"), config_list=[]))
    assert outcome.state == "FAIL"
    assert outcome.reason == "diverged: loss became nan at epoch 1, step 1"


def test_a_crashing_trial_fails_with_the_exception() -> None:
    bad = [{"quant_types": ["weight"], "quant_bits": {"weight": 40}, "op_names": ["conv1"]}]
    outcome = run_trial(_job(config_list=bad))
    assert outcome.state == "FAIL"
    assert outcome.reason.startswith("ConfigError: ")
    assert "Traceback" in outcome.detail
