"""The trial pipeline: one way from a config_list to a measured, recorded trial.

    compressed = build_compressed(task, "qat", config_list, float_state=state, train=config)
    adapted = adapt(compressed, task, "finetune", config, seed=1, calibration_batches=32)
    METRICS["bitops"].compute(evaluated)      # any registered metric, by name
    TrialRecord.of(frozen_trial)              # what the study stored about a trial, typed
    StudyRecord.of(study)                     # ... and about the study as a whole
    StudyLocation.of(storage, name)           # its database, artifacts folder and files

Used by the search (objective, dry run) and the reports (tables, export) alike.
"""

from __future__ import annotations

from quantsearch.pipeline._artifacts import (
    ArtifactError,
    ArtifactStore,
    fetch_artifact,
    file_sha256,
    open_artifact_store,
    store_artifact,
)
from quantsearch.pipeline._build import (
    Adapted,
    Compressed,
    adapt,
    build_compressed,
    trial_mode,
)
from quantsearch.pipeline._fidelity import (
    FIDELITY_METRICS,
    FidelityError,
    fidelity,
    float_outputs,
    main_tensor,
    model_outputs,
)
from quantsearch.pipeline._float import (
    FloatModel,
    FloatModelError,
    load_state,
    load_weights,
    make_float_model,
    state_sha256,
)
from quantsearch.pipeline._latency import (
    LATENCY_METRIC,
    LatencyMeasurement,
    LatencySetup,
    latency_inputs,
    measure_latency,
    measure_onnx_latency,
    onnx_session,
    time_sessions,
)
from quantsearch.pipeline._latency_table import LatencyEntry, LatencyTable
from quantsearch.pipeline._location import (
    FLOAT_MODEL_FILE,
    StudyLocation,
    mask_text,
    mask_url,
    sqlite_path,
    storage_url,
)
from quantsearch.pipeline._measure import SplitMetrics, known_metrics, measure_split
from quantsearch.pipeline._metrics import (
    FLOAT_BITS,
    METRICS,
    Evaluated,
    Metric,
    MetricInfo,
    ModelProfile,
    accuracy_interval,
    bootstrap_interval,
    front_mask,
    front_trials,
    get_metric,
    metric_info,
    register_metric,
)
from quantsearch.pipeline._record import RECORD_VERSION, TrialMode, TrialRecord
from quantsearch.pipeline._sensitivity import (
    Bits,
    ParamSensitivity,
    Sensitivity,
    SensitivityEntry,
)
from quantsearch.pipeline._study_record import (
    STUDY_RECORD_VERSION,
    StudyRecord,
    TargetState,
    layer_order,
)
from quantsearch.pipeline._torchmetrics import (
    MAE,
    MEAN_IOU,
    PERPLEXITY,
    TorchmetricsMissingError,
    absolute_errors,
    mean_iou_per_example,
    nll_per_example,
    perplexity_of,
    require_torchmetrics,
)

__all__ = [
    "FIDELITY_METRICS",
    "FLOAT_BITS",
    "FLOAT_MODEL_FILE",
    "LATENCY_METRIC",
    "MAE",
    "MEAN_IOU",
    "METRICS",
    "PERPLEXITY",
    "RECORD_VERSION",
    "STUDY_RECORD_VERSION",
    "Adapted",
    "ArtifactError",
    "ArtifactStore",
    "Bits",
    "Compressed",
    "Evaluated",
    "FidelityError",
    "FloatModel",
    "FloatModelError",
    "LatencyEntry",
    "LatencyMeasurement",
    "LatencySetup",
    "LatencyTable",
    "Metric",
    "MetricInfo",
    "ModelProfile",
    "ParamSensitivity",
    "Sensitivity",
    "SensitivityEntry",
    "SplitMetrics",
    "StudyLocation",
    "StudyRecord",
    "TargetState",
    "TorchmetricsMissingError",
    "TrialMode",
    "TrialRecord",
    "absolute_errors",
    "accuracy_interval",
    "adapt",
    "bootstrap_interval",
    "build_compressed",
    "fetch_artifact",
    "fidelity",
    "file_sha256",
    "float_outputs",
    "front_mask",
    "front_trials",
    "get_metric",
    "known_metrics",
    "latency_inputs",
    "layer_order",
    "load_state",
    "load_weights",
    "main_tensor",
    "make_float_model",
    "mask_text",
    "mask_url",
    "mean_iou_per_example",
    "measure_latency",
    "measure_onnx_latency",
    "measure_split",
    "metric_info",
    "model_outputs",
    "nll_per_example",
    "onnx_session",
    "open_artifact_store",
    "perplexity_of",
    "register_metric",
    "require_torchmetrics",
    "sqlite_path",
    "state_sha256",
    "storage_url",
    "store_artifact",
    "time_sessions",
    "trial_mode",
]
