"""The study: database contents, resume, the space guard, re-queued and duplicate trials."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from quantsearch.pipeline import (
    FLOAT_MODEL_FILE,
    FloatModel,
    FloatModelError,
    TrialRecord,
    _location,
    load_state,
    state_sha256,
)
from quantsearch.search import (
    SpaceError,
    StudyBusyError,
    _objective,
    _recovery,
    counted_trials,
    load_space,
    load_study,
    open_study,
    prepare,
    run_study,
    study_location,
    trial_seed,
)
from quantsearch.search._storage import study_lock
from quantsearch.tasks import evaluate, get_task

from .test_objective import NAN_TASK

SpaceFile = Callable[..., Path]


def _run(path: Path, **overrides: object) -> optuna.Study:
    spec = load_space(path).with_overrides(**overrides)
    return run_study(prepare(spec))


def _states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def test_a_small_study_fills_the_database(space_file: SpaceFile, tmp_path: Path) -> None:
    path = space_file()
    study = _run(path)
    spec = load_space(path)
    trials = study.get_trials()
    assert _states(study) == ["COMPLETE"] * 4
    assert study.directions == [
        optuna.study.StudyDirection.MAXIMIZE,
        optuna.study.StudyDirection.MINIMIZE,
    ]
    assert study.metric_names == ["accuracy", "size_bytes"]

    attrs = study.user_attrs
    assert attrs["space_hash"] == spec.space_hash
    assert attrs["space"] == spec.to_dict()
    assert attrs["task"] == {
        "name": "digits",
        "data_dir": None,
        "options": {"limit": 300},
        "seed": 0,
    }
    assert attrs["algorithm"] == "qat"
    assert attrs["layers"] == ["conv1", "conv2", "fc1", "fc2"]
    float_size = attrs["float_size_bytes"]
    assert float_size == 4 * sum(
        t.numel()
        for t in prepare(spec).task.build_model().state_dict().values()
        if t.dtype == torch.float32
    )

    # The baselines come first: float (empty config_list), then uniform 8 bits.
    assert [t.user_attrs.get("baseline") for t in trials] == ["float", "uniform-8", None, None]
    assert trials[0].user_attrs["config_list"] == []
    assert trials[0].values[1] == float_size
    assert trials[0].user_attrs["compression_ratio"] == 1.0
    assert trials[1].user_attrs["config_list"][0]["quant_bits"] == {"weight": 8}
    assert trials[1].user_attrs["config_list"][0]["op_names"] == ["conv1", "conv2", "fc1", "fc2"]
    assert set(trials[1].user_attrs["layer_bits"]["conv1"]) == {"weight"}

    location = study_location(spec)

    root, folder = location.root, location.folder
    for trial in trials:
        user = trial.user_attrs
        assert set(user) >= {
            "config_list",
            "val_accuracy",
            "test_accuracy",
            "size_bytes",
            "float_size_bytes",
            "compression_ratio",
            "train_seconds",
            "algorithm",
            "layer_bits",
            "checkpoint",
            "seed",
        }
        assert trial.values == [user["val_accuracy"], user["size_bytes"]]
        assert user["compression_ratio"] == pytest.approx(float_size / user["size_bytes"])
        assert user["seed"] == trial_seed(0, trial.number)
        assert user["checkpoint"] == f"small_artifacts/small/trial_{trial.number}.pt"
        assert (root / user["checkpoint"]).is_file()
        # Per-layer choices: "float" layers are absent from the config_list and layer_bits.
        float_layers = [k.split(".")[0] for k, v in trial.params.items() if v == "float"]
        quantized = {n for e in user["config_list"] for n in e["op_names"]}
        assert not set(float_layers) & quantized
    assert folder == tmp_path / "studies" / "small_artifacts" / "small"


def test_running_again_resumes_up_to_n_trials_in_total(space_file: SpaceFile) -> None:
    path = space_file(n_trials=3)
    assert len(_run(path).trials) == 3
    assert len(_run(path).trials) == 3  # already complete: nothing new
    study = _run(path, n_trials=5)
    assert _states(study) == ["COMPLETE"] * 5
    # A resumed sampler draws anew instead of replaying the first run's values.
    params = [tuple(sorted(t.params.items())) for t in study.trials[2:]]
    assert len(set(params)) == len(params)


def test_a_changed_space_is_refused_and_the_study_left_alone(space_file: SpaceFile) -> None:
    path = space_file(n_trials=2)
    _run(path)
    changed = space_file(
        name="changed.yaml", n_trials=2, train={"epochs": 2, "batch_size": 64, "lr": 0.003}
    )
    with pytest.raises(SpaceError) as caught:
        _run(changed)
    message = str(caught.value)
    assert message.startswith(f"{changed}: the study 'small' in sqlite:///")
    assert "created from a different space (changed: train.epochs)" in message
    assert "give the space a new study_name, or use another --storage" in message
    assert len(load_study(load_space(path)).trials) == 2


def test_trials_left_running_by_a_dead_process_run_again(space_file: SpaceFile) -> None:
    path = space_file(n_trials=4)
    context = prepare(load_space(path))
    study = open_study(context)
    # What a killed process leaves behind: a trial asked, never told.
    abandoned = study.ask(context.plan.distributions)
    assert abandoned.user_attrs["baseline"] == "float"

    study = run_study(context)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["fail_reason"].startswith("interrupted: its process stopped")
    retries = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retries) == 1
    assert retries[0].params == trials[0].params
    assert retries[0].user_attrs["baseline"] == "float"
    assert retries[0].state == TrialState.COMPLETE
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4
    assert counted_trials(trials) == 4


def test_an_interrupted_run_requeues_its_trial(
    space_file: SpaceFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = space_file(n_trials=3)
    real_run_trial = _objective.run_trial

    def interrupted_second(job):  # type: ignore[no-untyped-def]
        if job.number == 1:
            raise KeyboardInterrupt
        return real_run_trial(job)

    monkeypatch.setattr(_objective, "run_trial", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        _run(path)
    study = load_study(load_space(path))
    assert _states(study) == ["COMPLETE", "FAIL", "WAITING"]
    assert study.trials[1].user_attrs["fail_reason"].startswith("interrupted")
    assert study.trials[2].user_attrs == {"retry_of": 1, "baseline": "uniform-8"}

    monkeypatch.setattr(_objective, "run_trial", real_run_trial)
    study = _run(path)
    assert _states(study) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[2].params == study.trials[1].params


def test_a_repeated_config_list_takes_the_stored_result(space_file: SpaceFile) -> None:
    path = space_file(
        n_trials=3,
        baselines={"float": False},
        per_layer=None,
        params={"quant_bits": {"_type": "choice", "_value": [4]}},
    )
    study = _run(path)
    first, *repeats = study.get_trials()
    assert _states(study) == ["COMPLETE"] * 3
    for trial in repeats:
        assert trial.user_attrs["duplicate_of"] == 0
        assert trial.values == first.values
        assert trial.user_attrs["train_seconds"] == 0.0
        assert trial.user_attrs["checkpoint"] == first.user_attrs["checkpoint"]
        assert trial.user_attrs["seed"] == trial_seed(0, trial.number)


def test_constraints_are_optuna_constraints(space_file: SpaceFile) -> None:
    path = space_file(n_trials=2, constraints={"min_accuracy": 0.999, "max_size_bytes": 30000})
    study = _run(path)
    for trial in study.trials:
        assert trial.constraints == {
            "min_accuracy": pytest.approx(0.999 - trial.values[0]),
            "max_size_bytes": trial.values[1] - 30000,
        }
    assert study.best_trials == []  # nothing is feasible


def test_hopeless_trials_are_pruned_and_the_study_goes_on(space_file: SpaceFile) -> None:
    space = space_file(n_trials=3, hopeless={"after_epoch": 1, "margin": 0.95}, from_scratch=True)
    study = _run(space)
    assert _states(study) == ["PRUNED"] * 3
    assert all(t.user_attrs["fail_reason"].startswith("hopeless:") for t in study.trials)


def test_failing_trials_are_recorded_and_the_study_goes_on(
    space_file: SpaceFile, tmp_path: Path
) -> None:
    task_file = tmp_path / "nan_task.py"
    task_file.write_text(NAN_TASK)
    path = space_file(
        n_trials=2,
        task=f"{task_file}:make_task",
        quantize={"weight": {"op_types": ["Linear"]}},
        per_layer=None,
        params={"quant_bits": {"_type": "choice", "_value": [4, 8]}},
        from_scratch=True,
    )
    study = _run(path)
    assert _states(study) == ["FAIL", "FAIL"]
    reason = study.trials[0].user_attrs["fail_reason"]
    assert reason == "diverged: loss became nan at epoch 1, step 1"


def test_a_second_process_on_the_same_study_is_refused(space_file: SpaceFile) -> None:
    spec = load_space(space_file(n_trials=2))
    busy = pytest.raises(StudyBusyError, match="already running in process")
    with study_lock(study_location(spec)), busy:
        run_study(prepare(spec))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_shared_database_fails_stale_trials_by_heartbeat(
    space_file: SpaceFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PostgreSQL path, on SQLite: no lock file; a trial whose heartbeat stopped is failed
    (by whichever machine looks next) and its parameters run again."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_location, "sqlite_path", lambda url: None)
    monkeypatch.setattr(_recovery, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(_recovery, "GRACE_SECONDS", 1)
    context = prepare(load_space(space_file(n_trials=3)))
    (tmp_path / "studies").mkdir()  # a database server needs no folder; this file does
    study = open_study(context)
    # Another machine asked a trial, sent one heartbeat, and died.
    abandoned = study.ask(context.plan.distributions)
    study._storage.record_heartbeat(abandoned._trial_id)
    time.sleep(2.5)

    study = run_study(context)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1
    assert retry[0].params == trials[0].params
    assert retry[0].user_attrs["baseline"] == "float"
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    # Checkpoints of a shared database live on each machine, stored as absolute paths.
    checkpoint = Path(retry[0].user_attrs["checkpoint"])
    assert checkpoint == tmp_path / "studies" / "small_artifacts" / f"trial_{retry[0].number}.pt"
    assert checkpoint.is_file()
    assert not list(tmp_path.rglob("study.lock"))


def test_the_float_model_is_made_once_and_every_trial_starts_from_it(
    space_file: SpaceFile,
) -> None:
    path = space_file(n_trials=3, train={"steps": 5, "lr": 1e-4})
    study = _run(path)
    stored = FloatModel.model_validate(study.user_attrs["float_model"])
    spec = load_space(path)
    location = study_location(spec)
    root, folder = location.root, location.folder
    weights = folder / FLOAT_MODEL_FILE
    assert root / stored.file == weights
    assert stored.sha256 == state_sha256(load_state(weights))
    assert stored.source == "trained by quantsearch (5 epochs)"
    records = [TrialRecord.of(t) for t in study.get_trials()]
    # The float baseline is the float model evaluated, not trained again.
    assert (records[0].baseline, records[0].mode, records[0].steps) == ("float", "float", 0)
    assert records[0].val_accuracy == stored.val_accuracy
    assert records[0].test_accuracy == stored.test_accuracy
    assert [r.mode for r in records[1:]] == ["finetune", "finetune"]
    assert [r.steps for r in records[1:]] == [5, 5]
    # A resume takes the stored file as it is.
    modified = weights.stat().st_mtime_ns
    _run(path, n_trials=4)
    assert weights.stat().st_mtime_ns == modified


def test_a_lost_float_model_is_made_again_and_must_hash_the_same(space_file: SpaceFile) -> None:
    path = space_file(n_trials=2)
    study = _run(path)
    folder = study_location(load_space(path)).folder
    (folder / FLOAT_MODEL_FILE).unlink()
    _run(path, n_trials=3)  # trained again from the same seed: the same weights
    assert (folder / FLOAT_MODEL_FILE).is_file()
    stored = dict(study.user_attrs["float_model"])
    study.set_user_attr("float_model", {**stored, "sha256": "0" * 64})
    (folder / FLOAT_MODEL_FILE).unlink()
    with pytest.raises(FloatModelError, match="differs from the study's"):
        _run(path, n_trials=4)


def test_pretrained_weights_are_the_float_model(space_file: SpaceFile, tmp_path: Path) -> None:
    task = get_task("digits", options={"limit": 300})
    model = task.build_model()
    weights = tmp_path / "mine.pt"
    torch.save(model.state_dict(), weights)
    pretrained = {"name": "digits", "options": {"limit": 300}, "pretrained": str(weights)}
    path = space_file(n_trials=2, task=pretrained)
    study = _run(path)
    stored = FloatModel.model_validate(study.user_attrs["float_model"])
    assert stored.sha256 == state_sha256(model.state_dict())
    assert stored.source == f"pretrained {weights}"
    assert TrialRecord.of(study.trials[0]).val_accuracy == evaluate(model, task.val_set)


def test_pretrained_weights_that_do_not_fit_are_refused_up_front(
    space_file: SpaceFile, tmp_path: Path
) -> None:
    weights = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, weights)
    path = space_file(task={"name": "digits", "pretrained": str(weights)})
    fits = r"task.pretrained: .*other.pt does not fit the task's model: missing bn1.bias, .*"
    with pytest.raises(SpaceError, match=fits + "; unexpected fc.weight"):
        prepare(load_space(path))
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    path = space_file(task={"name": "digits", "pretrained": str(tmp_path / "junk.pt")})
    with pytest.raises(SpaceError, match=r"junk\.pt: not a state dict saved by torch\.save"):
        prepare(load_space(path))


def test_a_float_model_that_diverges_is_a_clear_error(
    space_file: SpaceFile, tmp_path: Path
) -> None:
    task_file = tmp_path / "nan_task.py"
    task_file.write_text(NAN_TASK)
    path = space_file(
        n_trials=2,
        task=f"{task_file}:make_task",
        quantize={"weight": {"op_types": ["Linear"]}},
        per_layer=None,
        params={"quant_bits": {"_type": "choice", "_value": [4, 8]}},
    )
    with pytest.raises(FloatModelError, match=r"training the float model diverged \(loss became "
                       r"nan at epoch 1, step 1\)"):
        _run(path)


def test_three_objectives_are_the_study_values_in_order(space_file: SpaceFile) -> None:
    path = space_file(n_trials=3, objectives=["accuracy", "size", "bitops"])
    study = _run(path)
    assert study.metric_names == ["accuracy", "size_bytes", "bitops"]
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    context = prepare(load_space(path))
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        record = TrialRecord.of(trial)
        assert trial.values == [
            record.val_accuracy,
            record.size_bytes,
            context.profile.bitops(record.layer_bits),
        ]
        assert record.bitops == trial.values[2]
        assert record.float_bitops == context.profile.bitops({})
    float_trial = TrialRecord.of(study.trials[0])
    assert float_trial.bitops == float_trial.float_bitops


def test_a_ptq_study_calibrates_every_trial_without_training(space_file: SpaceFile) -> None:
    path = space_file(
        n_trials=4,
        algorithm="ptq",
        calibration={"batches": 2},
        baselines={"float": True, "uniform_bits": [8]},
        params={
            "output_bits": {"_type": "choice", "_value": [6, 8]},
            "observer": {"_type": "choice", "_value": ["minmax", "mse"]},
        },
    )
    study = _run(path)
    records = [TrialRecord.of(t) for t in study.get_trials()]
    assert _states(study) == ["COMPLETE"] * 4
    assert [r.mode for r in records] == ["float", "ptq", "ptq", "ptq"]
    assert all(r.steps == 0 for r in records)
    assert {e["observer"] for r in records[1:] for e in r.config_list} <= {"minmax", "mse"}
    # Calibrated 8-bit weights and activations stay close to the float model.
    assert records[1].baseline == "uniform-8"
    assert records[1].val_accuracy >= records[0].val_accuracy - 0.05


def test_ptq_options_belong_to_the_ptq_algorithm(space_file: SpaceFile) -> None:
    path = space_file(params={"quant_bits": 8, "observer": "mse"})
    with pytest.raises(SpaceError, match=r"params\.observer: only the ptq algorithm has observer"):
        load_space(path)


SHARED_CONV_TASK = """
from dataclasses import replace

from torch import nn

from quantsearch.tasks import get_task


class SharedConvNet(nn.Module):
    # The conv's output feeds its BatchNorm and, unnormalised, a residual sum.
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn.running_mean.fill_(0.5)  # statistics as after training, not the identity
        self.bn.running_var.fill_(4.0)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x):
        y = self.conv(x)
        return self.fc((self.bn(y) + USE * y).flatten(1))


def make_task(data_dir=None, options=None, seed=0):
    return replace(get_task("digits", options={"limit": 100}, seed=seed), build_model=SharedConvNet)
"""

RAW_WEIGHT_TASK = SHARED_CONV_TASK.replace(
    "return self.fc((self.bn(y) + USE * y).flatten(1))",
    "return (self.bn(y).flatten(1) @ self.fc.weight.t())",
)


MOBILENET_V2_TASK = """
from dataclasses import replace

import torch
from torch import nn

from quantsearch.tasks import get_task


def _divisible(value, divisor=8):
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    # torchvision's layout at width 0.5: 17 inverted residual blocks, separate ReLU6 modules.
    def __init__(self, width=0.5):
        super().__init__()
        cin = _divisible(32 * width)
        layers = [nn.Conv2d(1, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6()]
        for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
            cout = _divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, 10)
        # BatchNorm statistics as after training: every block's output at unit scale.
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.momentum = None
            self(torch.rand(64, 1, 8, 8, generator=generator))

    def forward(self, x):
        # At 32x32, as the network is meant to run: deep feature maps that are more than 1x1.
        x = nn.functional.interpolate(x, size=32)
        return self.classifier(self.features(x).mean((2, 3)))


def make_task(data_dir=None, options=None, seed=0):
    return replace(get_task("digits", options={"limit": 100}, seed=seed), build_model=MobileNetV2)
"""


def _user_space(space_file: SpaceFile, tmp_path: Path, source: str, **changes: object) -> Path:
    task_file = tmp_path / "user_task.py"
    task_file.write_text(source)
    settings: dict[str, object] = {
        "quantize": {"weight": {"op_types": ["Conv2d", "Linear"]}},
        "per_layer": None,
        "params": {"quant_bits": {"_type": "choice", "_value": [4, 8]}},
    }
    return space_file(task=f"{task_file}:make_task", **{**settings, **changes})


def test_the_dry_run_lists_folded_batch_norms_and_checks_16_bits(
    space_file: SpaceFile, tmp_path: Path
) -> None:
    path = _user_space(space_file, tmp_path, SHARED_CONV_TASK.replace("USE", "0"))
    dry = prepare(load_space(path)).dry_run
    assert dry is not None
    assert dry.folded == {"conv": "bn"}
    assert dry.quantized_outputs == []
    assert dry.difference_at_16_bits < 1e-3


def test_a_quantizer_that_changes_the_model_is_refused_before_any_trial(
    space_file: SpaceFile, tmp_path: Path
) -> None:
    # Folding the BatchNorm into the conv also normalises the residual branch's input.
    path = _user_space(space_file, tmp_path, SHARED_CONV_TASK.replace("USE", "1"))
    with pytest.raises(SpaceError, match=r"with every quantized tensor at 16 bits the "
                       r"qat-compressed model's outputs differ from the float model's by "):
        prepare(load_space(path))
    assert not (tmp_path / "studies").exists()


def test_a_model_that_reads_a_quantized_weight_directly_is_refused_up_front(
    space_file: SpaceFile, tmp_path: Path
) -> None:
    path = _user_space(space_file, tmp_path, RAW_WEIGHT_TASK)
    with pytest.raises(SpaceError, match="the qat-compressed model fails a forward pass in "
                       "training mode: AttributeError"):
        prepare(load_space(path))


def test_a_mobilenet_v2_with_fixed_8_bit_relu6_outputs_passes_the_dry_run(
    space_file: SpaceFile, tmp_path: Path
) -> None:
    """Fixed 8-bit outputs through 17 blocks are at 16 bits too in the check, not only the
    searched weights: the model is not refused."""
    path = _user_space(
        space_file,
        tmp_path,
        MOBILENET_V2_TASK,
        quantize={"weight": {"op_types": ["Conv2d", "Linear"]}, "output": {"op_types": ["ReLU6"]}},
        params={"weight_bits": {"_type": "choice", "_value": [4, 8]}, "output_bits": 8},
    )
    dry = prepare(load_space(path)).dry_run
    assert dry is not None
    assert len(dry.quantized_outputs) == 35  # every ReLU6
    assert dry.difference_at_16_bits is not None and dry.difference_at_16_bits < 1e-2
