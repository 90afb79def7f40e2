"""Export a finished trial from its stored checkpoint, then prove the export by reloading it."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from quantsearch.export._checkpoint import (
    checkpoint_file,
    float_weights_file,
    load_checkpoint,
    resolve_checkpoint,
)
from quantsearch.export._errors import ExportError
from quantsearch.export._formats import (
    DEFAULT_FORMAT,
    ExportContext,
    ExportPart,
    get_export_format,
)

if TYPE_CHECKING:
    from torch import Tensor, nn

    from quantsearch.export._onnx import OnnxReport
    from quantsearch.pipeline import StudyRecord
    from quantsearch.tasks import Task

__all__ = [
    "ExportResult",
    "dequantized_state",
    "describe_export",
    "export_trial",
    "resolve_checkpoint",
    "task_from_study",
]

MODEL_FILE = "model.pt"
CALIBRATION_FILE = "calibration.json"
PACKED_FILE = "model.qpk"
DEQUANTIZED_FILE = "model_dequantized.pt"
SUMMARY_FILE = "export.json"


@dataclass(frozen=True)
class ExportResult:
    """The files of an exported trial and the test accuracies measured on the way."""

    trial_number: int
    out_dir: Path
    model_path: Path
    calibration_path: Path
    packed_path: Path
    """The deployed model (all float32 for a float trial)."""
    stored_test_accuracy: float
    checkpoint_accuracy: float
    """The trained model rebuilt from the stored checkpoint."""
    reloaded_accuracy: float
    """The deployed export reloaded: model.qpk through ``load_packed``."""
    state_dict_accuracy: float
    """model.pt alone in a fresh float model: the trained float weights, no quantization."""
    dequantized_path: Path | None
    """The deployed weights (quantized, then dequantized) in the original architecture's state
    dict; None where the architecture cannot hold a folded bias."""
    dequantized_accuracy: float
    """model_dequantized.pt in a fresh float model: deployed weights, float activations."""
    size_bytes: int
    packed_file_bytes: int
    test_samples: int
    format: str = DEFAULT_FORMAT
    """The registered format that wrote the files (:data:`EXPORT_FORMATS`)."""
    part: ExportPart | None = None
    """What the format wrote beyond the base files (None for ``packed``)."""

    @property
    def onnx(self) -> OnnxReport | None:
        """The ONNX export, checked in onnxruntime (``format="onnx"``)."""
        return self.part if self.format == "onnx" else None  # type: ignore[return-value]

    metric: str = "accuracy"
    """The test metric the ``*_accuracy`` fields hold: accuracy for a classifier, else the
    task's first metric the trial stored, else its first fidelity metric (agreement, kl,
    sqnr_db, cosine: against the study's float model's outputs on the test split)."""

    @property
    def matches(self) -> bool:
        """True when the reloaded export classifies exactly as many test samples right (for
        another metric: gives the stored value to a relative 1e-4)."""
        return _same(
            self.reloaded_accuracy, self.stored_test_accuracy, self.test_samples, self.metric
        )


def _same_count(a: float, b: float, samples: int) -> bool:
    """Accuracies equal as counts of correct samples (immune to float formatting of a ratio)."""
    return round(a * samples) == round(b * samples)


#: How close a metric that is not a count of hits must come back (relative).
METRIC_TOLERANCE = 1e-4


def _same(a: float, b: float, samples: int, metric: str) -> bool:
    if metric == "accuracy":
        return _same_count(a, b, samples)
    return math.isclose(a, b, rel_tol=METRIC_TOLERANCE, abs_tol=1e-9)


def _checked_metric(record: Any, task: Any) -> tuple[str, float | None]:
    """The test metric the export checks, and its stored value: the task's own first, else
    a fidelity metric (a label-free task's)."""
    from quantsearch.pipeline import FIDELITY_METRICS

    if record.test_accuracy is not None or task.is_classifier:
        return "accuracy", record.test_accuracy
    names = [m.name for m in task.task_metrics if m.name in record.test_metrics]
    names += [name for name in record.test_metrics if name in FIDELITY_METRICS]
    if not names:
        return "accuracy", None
    return names[0], record.test_metrics[names[0]]


def _find_trial(study: optuna.Study, number: int) -> FrozenTrial:
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.number == number:
            return trial
    if not trials:
        raise ExportError(f"study {study.study_name!r} has no trial: nothing to export")
    raise ExportError(
        f"study {study.study_name!r} has no trial {number}: "
        f"its trials are numbered 0 to {trials[-1].number}"
    )


def _task_settings(study: optuna.Study, record: StudyRecord) -> tuple[str, dict[str, Any]]:
    """The task name and get_task keyword arguments recorded with the study."""
    name, settings = record.task_settings()
    if not name:
        raise ExportError(
            f"study {study.study_name!r} does not record its task (study user attribute "
            "'task'): pass the task to export explicitly"
        )
    kwargs: dict[str, Any] = {}
    for key in ("data_dir", "options", "seed"):
        # The space's top-level value stands in where the task's settings lack the key.
        source = settings if key in settings else record.space
        if key in source and source[key] is not None:
            kwargs[key] = source[key]
    return str(name), kwargs


def task_from_study(study: optuna.Study, *, data_dir: str | Path | None = None) -> Task:
    """Rebuild the study's task (same name, data folder, options and seed, hence same splits);
    ``data_dir`` replaces the recorded data folder (the same data, in another place)."""
    from quantsearch.pipeline import StudyRecord

    return _task_of(study, StudyRecord.of(study), data_dir=data_dir)


def _task_of(
    study: optuna.Study, record: StudyRecord, *, data_dir: str | Path | None = None
) -> Task:
    from quantsearch.tasks import get_task

    name, kwargs = _task_settings(study, record)
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    return get_task(name, **kwargs)


def export_trial(
    study: optuna.Study,
    trial_number: int,
    out_dir: str | Path,
    *,
    task: Task | None = None,
    checkpoint_root: str | Path | None = None,
    format: str = DEFAULT_FORMAT,
    artifacts: str | None = None,
) -> ExportResult:
    """Write ``trial_number``'s model to ``out_dir`` from its checkpoint, reload it, evaluate it.

    Files: ``model.pt`` (the real, unwrapped state dict), ``calibration.json`` (per-layer scales,
    zero points and bits under NNI's keys), ``model.qpk`` (integers packed at their bit width;
    all float32 for a float trial) and ``export.json`` (the accuracies below). The packed file is
    loaded into a fresh float model and evaluated on the test split; an :class:`ExportError` is
    raised unless it gets the trial's stored test accuracy exactly (the files stay written, for
    inspection).

    ``format`` names a registered format (:data:`EXPORT_FORMATS`) that writes more files once
    the base ones are checked. ``format="onnx"`` also writes ``model.onnx`` (QDQ) and
    ``model_float.onnx``, runs the first in onnxruntime on the test split and times both; an
    ExportError is raised unless it picks the PyTorch model's class on at least 99.9% of the
    test images.

    A checkpoint that is not on this machine (another machine trained the trial) is fetched
    from the study's artifact store, or from ``artifacts`` (a folder or ``s3://bucket/prefix``)
    where this machine reaches the store elsewhere, into ``out_dir`` for the time it is read.
    """
    import torch

    from quantsearch.pipeline import (
        FIDELITY_METRICS,
        StudyRecord,
        TrialRecord,
        build_compressed,
        measure_split,
    )
    from quantsearch.quantization import load_packed, save_packed
    from quantsearch.tasks import Measured, measure
    from quantsearch.tasks import evaluate as _top1

    handler = get_export_format(format).handler
    trial = _find_trial(study, trial_number)
    record = TrialRecord.of(trial)
    if trial.state != TrialState.COMPLETE:
        reason = record.fail_reason
        detail = f" ({reason})" if reason else ""
        raise ExportError(
            f"trial {trial_number} is {trial.state.name}{detail}: only complete trials have a "
            "model to export"
        )
    config_list = record.config_list
    study_record = StudyRecord.of(study)
    algorithm = record.algorithm or study_record.algorithm
    task = task if task is not None else _task_of(study, study_record)
    metric, stored = _checked_metric(record, task)
    out = Path(out_dir)
    store = artifacts or study_record.artifacts
    float_weights: Path | None = None

    def evaluate(model: Any, dataset: Any) -> float:
        if metric == "accuracy":
            return _top1(model, dataset)
        if float_weights is None:
            return measure(model, task, dataset).values[metric]
        split = measure_split(
            model,
            task,
            "test",
            device=torch.device("cpu"),
            batch_size=256,
            measured=Measured(values={}, samples=len(dataset)),
            fidelity_names=(metric,),
            float_weights=float_weights,
        )
        return split.values[metric]

    if config_list is None or algorithm is None or stored is None:
        missing = [
            key
            for key, value in (
                ("config_list", config_list),
                ("algorithm", algorithm),
                (f"test {metric}" if metric != "accuracy" else "test_accuracy", stored),
            )
            if value is None
        ]
        raise ExportError(f"trial {trial_number} lacks the user attributes {missing}")
    checkpoint, fetched = checkpoint_file(
        study, trial, out, checkpoint_root=checkpoint_root, store=store
    )

    # A float trial (empty config_list) holds the bare model: no quantizer to rebuild.
    compressed = build_compressed(task, algorithm, config_list)
    model, quantizer = compressed.model, compressed.quantizer
    try:
        model.load_state_dict(load_checkpoint(checkpoint, trial_number))
    except RuntimeError:  # names or shapes that are not this model's
        raise ExportError(
            f"checkpoint of trial {trial_number} at {checkpoint} does not fit the trial's model "
            "(its tensors' names or shapes differ): it was changed or belongs to another study"
        ) from None
    finally:
        if fetched:
            checkpoint.unlink(missing_ok=True)
    fetched_float = False
    if metric in FIDELITY_METRICS:
        # Compared as the trial was: with the study's float model's outputs on the test split.
        float_weights, fetched_float = float_weights_file(
            study,
            out,
            checkpoint_root=checkpoint_root,
            store=store,
            why=f"trial {trial_number}'s test {metric} compares with the float model",
        )
    checkpoint_accuracy = evaluate(model, task.test_set)

    out.mkdir(parents=True, exist_ok=True)
    model_path = out / MODEL_FILE
    calibration_path = out / CALIBRATION_FILE
    packed_path = out / PACKED_FILE
    if quantizer is not None:
        quantizer.export_model(model_path, calibration_path)
        quantizer.export_packed(packed_path)
    else:
        torch.save(model.state_dict(), model_path)
        calibration_path.write_text("{}\n")
        save_packed(model, packed_path)

    float_model = task.build_model()
    float_model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    state_dict_accuracy = evaluate(float_model, task.test_set)
    deployed = load_packed(packed_path, task.build_model())
    reloaded_accuracy = evaluate(deployed, task.test_set)
    dequantized_path: Path | None = out / DEQUANTIZED_FILE
    dequantized_accuracy = math.nan
    folded = quantizer.folded_batch_norms() if quantizer is not None else {}
    state = dequantized_state(deployed, task.build_model(), folded)
    if state is None:
        dequantized_path = None
    else:
        torch.save(state, dequantized_path)
        dequantized_model = task.build_model()
        dequantized_model.load_state_dict(state)
        dequantized_accuracy = evaluate(dequantized_model, task.test_set)
    if fetched_float and float_weights is not None:  # with the outputs cached beside it
        for leftover in out.glob(f"{float_weights.name}*"):
            leftover.unlink(missing_ok=True)
    part = handler(
        ExportContext(
            trial_number=trial_number,
            record=record,
            task=task,
            out_dir=out,
            model=model,
            quantizer=quantizer,
            float_model=float_model,
            deployed=deployed,
            stored_accuracy=float(stored),
            metric=metric,
            evaluate=lambda candidate: evaluate(candidate, task.test_set),
        )
    )

    samples = len(task.test_set)  # type: ignore[arg-type]
    result = ExportResult(
        trial_number=trial_number,
        out_dir=out,
        model_path=model_path,
        calibration_path=calibration_path,
        packed_path=packed_path,
        stored_test_accuracy=float(stored),
        checkpoint_accuracy=checkpoint_accuracy,
        reloaded_accuracy=reloaded_accuracy,
        state_dict_accuracy=state_dict_accuracy,
        dequantized_path=dequantized_path,
        dequantized_accuracy=dequantized_accuracy,
        size_bytes=int(record.size_bytes if record.size_bytes is not None else 0),
        packed_file_bytes=packed_path.stat().st_size,
        test_samples=samples,
        format=format,
        part=part,
        metric=metric,
    )
    (out / SUMMARY_FILE).write_text(json.dumps(_summary(result), indent=2) + "\n")
    if metric != "accuracy" and not result.matches:
        raise ExportError(
            f"the exported model {packed_path} (or checkpoint {checkpoint}) gives test {metric} "
            f"{reloaded_accuracy:.6g} (checkpoint {checkpoint_accuracy:.6g}), but trial "
            f"{trial_number} stored {result.stored_test_accuracy:.6g}"
        )
    if not _same(checkpoint_accuracy, result.stored_test_accuracy, samples, metric):
        raise ExportError(
            f"trial {trial_number}'s checkpoint {checkpoint} gives test accuracy "
            f"{checkpoint_accuracy:.4%}, but the study stored {result.stored_test_accuracy:.4%}: "
            "the checkpoint does not belong to this trial's model"
        )
    if not result.matches:
        raise ExportError(
            f"the exported model {packed_path} reloaded gives test accuracy "
            f"{reloaded_accuracy:.4%}, but trial {trial_number} stored "
            f"{result.stored_test_accuracy:.4%}"
        )
    if part is not None:
        part.check(trial_number)
    return result


def dequantized_state(
    deployed: nn.Module, fresh: nn.Module, folded: Mapping[str, str]
) -> dict[str, Tensor] | None:
    """The state dict of ``fresh``'s architecture holding ``deployed``'s (``load_packed``'s)
    weights: each folded BatchNorm passes its input through (mean 0, variance 1 - eps, weight 1)
    and carries the folded bias when its conv has none. None when a folded bias has no place
    (a conv without bias before a BatchNorm without affine parameters)."""
    import torch

    state = fresh.state_dict()
    given = deployed.state_dict()
    for key, value in given.items():
        if key in state and state[key].shape == value.shape:
            state[key] = value.detach().clone()
    for conv, bn in folded.items():
        bias = given[f"{conv}.bias"].detach().clone()
        module = fresh.get_submodule(bn)
        if not getattr(module, "affine", False) and f"{conv}.bias" not in state:
            return None
        eps = float(getattr(module, "eps", 1e-5))
        state[f"{bn}.running_mean"] = torch.zeros_like(state[f"{bn}.running_mean"])
        state[f"{bn}.running_var"] = torch.full_like(state[f"{bn}.running_var"], 1.0 - eps)
        if getattr(module, "affine", False):
            state[f"{bn}.weight"] = torch.ones_like(state[f"{bn}.weight"])
            state[f"{bn}.bias"] = torch.zeros_like(state[f"{bn}.bias"])
        if f"{conv}.bias" in state:
            state[f"{conv}.bias"] = bias
        else:
            state[f"{bn}.bias"] = bias
    return state


def _summary(result: ExportResult) -> dict[str, Any]:
    summary = {
        "trial": result.trial_number,
        "files": {
            "state_dict": result.model_path.name,
            "calibration": result.calibration_path.name,
            "packed": result.packed_path.name,
        },
        "stored_test_accuracy": result.stored_test_accuracy,
        "checkpoint_accuracy": result.checkpoint_accuracy,
        "reloaded_accuracy": result.reloaded_accuracy,
        "state_dict_accuracy": result.state_dict_accuracy,
        "dequantized_accuracy": result.dequantized_accuracy,
        "size_bytes": result.size_bytes,
        "packed_file_bytes": result.packed_file_bytes,
        "test_samples": result.test_samples,
        "matches": result.matches,
    }
    if result.metric != "accuracy":  # the *_accuracy values hold this metric
        summary["metric"] = result.metric
    if result.part is not None:
        summary[result.format] = result.part.summary()
    return summary


def describe_export(result: ExportResult) -> str:
    """What an export wrote and measured, as lines for a terminal."""
    correct = round(result.reloaded_accuracy * result.test_samples)
    shown = (lambda v: f"{v:.2%}") if result.metric == "accuracy" else (lambda v: f"{v:.6g}")
    lines = [
        f"exported trial {result.trial_number} to {result.out_dir}",
        f"  {result.model_path.name:<20} the float weights the trial trained, before quantization"
        f" (NNI's export_model): {shown(result.state_dict_accuracy)} on test; not the deployed "
        "model",
        f"  {result.calibration_path.name:<20} calibration (scales, zero points, bits)",
    ]
    if result.dequantized_path is not None:
        lines.append(
            f"  {result.dequantized_path.name:<20} the deployed weights, dequantized, for the "
            f"original architecture (activations float): {shown(result.dequantized_accuracy)}"
        )
    lines.append(
        f"  {result.packed_path.name:<20} the deployed model (load_packed): packed integers and "
        f"activation quantizers, {result.packed_file_bytes:,} bytes (model size "
        f"{result.size_bytes:,} bytes)"
    )
    verdict = "equal" if result.matches else "DIFFERENT"
    if result.metric != "accuracy":
        lines.append(
            f"test {result.metric} of the reloaded packed model: {result.reloaded_accuracy:.6g}; "
            f"stored: {result.stored_test_accuracy:.6g} (to a relative {METRIC_TOLERANCE:g}): "
            f"{verdict}"
        )
        return "\n".join(lines + (result.part.describe() if result.part is not None else []))
    lines.append(
        f"test accuracy of the reloaded packed model: {result.reloaded_accuracy:.4%} "
        f"({correct}/{result.test_samples}); stored: {result.stored_test_accuracy:.4%}: {verdict}"
    )
    if result.part is not None:
        lines += result.part.describe()
    return "\n".join(lines)
