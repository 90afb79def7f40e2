"""The trial pipeline: one way from a config_list to a measured, recorded trial.

    compressed = build_compressed(task, "qat", config_list, float_state=state, train=config)
    adapted = adapt(compressed, task, "finetune", config, seed=1, calibration_batches=32)
    METRICS["bitops"].compute(evaluated)      # any registered metric, by name
    TrialRecord.of(frozen_trial)              # what the study stored, typed

Used by the search (objective, dry run) and the reports (tables, export) alike.
"""

from __future__ import annotations

from quantsearch.pipeline._build import (
    Adapted,
    Compressed,
    adapt,
    build_compressed,
    trial_mode,
)
from quantsearch.pipeline._float import (
    FloatModel,
    FloatModelError,
    load_state,
    load_weights,
    make_float_model,
    state_sha256,
)
from quantsearch.pipeline._metrics import (
    FLOAT_BITS,
    METRICS,
    Evaluated,
    Metric,
    ModelProfile,
    accuracy_interval,
    front_mask,
    get_metric,
    register_metric,
)
from quantsearch.pipeline._record import RECORD_VERSION, TrialMode, TrialRecord
from quantsearch.pipeline._sensitivity import (
    SENSITIVITY_ATTR,
    Bits,
    ParamSensitivity,
    Sensitivity,
    SensitivityEntry,
    sensitivity_of,
)

__all__ = [
    "FLOAT_BITS",
    "METRICS",
    "RECORD_VERSION",
    "SENSITIVITY_ATTR",
    "Adapted",
    "Bits",
    "Compressed",
    "Evaluated",
    "FloatModel",
    "FloatModelError",
    "Metric",
    "ModelProfile",
    "ParamSensitivity",
    "Sensitivity",
    "SensitivityEntry",
    "TrialMode",
    "TrialRecord",
    "accuracy_interval",
    "adapt",
    "build_compressed",
    "front_mask",
    "get_metric",
    "load_state",
    "load_weights",
    "make_float_model",
    "register_metric",
    "sensitivity_of",
    "state_sha256",
    "trial_mode",
]
