"""The search: YAML search spaces in NNI's syntax, and a resumable multi-objective Optuna study.

spec = load_space("search_spaces/qat.yaml")      # SpaceError names file, key and fix
context = prepare(spec)                            # builds the task, checks the space
study = run_study(context, jobs=2)                 # until the study holds spec.n_trials
"""

from __future__ import annotations

from quantsearch.pipeline import (
    ParamSensitivity,
    Sensitivity,
    SensitivityEntry,
)
from quantsearch.search._config_builder import FLOAT, ModelLayers, SpacePlan, config_key
from quantsearch.search._display import (
    ConsoleProgress,
    front_lines,
    front_table,
    sensitivity_lines,
    study_banner,
    target_line,
    trials_lines,
    trials_table,
    validation_lines,
)
from quantsearch.search._errors import SpaceError
from quantsearch.search._nni_syntax import NNI_TYPES, NniParam, parse_nni_param
from quantsearch.search._objective import TrialJob, TrialOutcome, run_trial, trial_seed
from quantsearch.search._parser import load_space, parse_space
from quantsearch.search._paths import check_study_name, storage_url
from quantsearch.search._predicted_front import PredictedPoint, predicted_front, seed_configs
from quantsearch.search._prepare import DryRun, StudyContext, prepare, study_location
from quantsearch.search._progress import Progress, TrialReport, counted_trials
from quantsearch.search._samplers import (
    SAMPLERS,
    SamplerEntry,
    SamplerOption,
    make_sampler,
    register_sampler,
)
from quantsearch.search._seed_guide import SeedGuide
from quantsearch.search._sensitivity_measure import SensitivityError, measure_sensitivity
from quantsearch.search._sensitivity_study import (
    describe_front,
    sensitivity_frame,
    sensitivity_pivot,
    study_sensitivity,
)
from quantsearch.search._spec import SearchSpec, SensitivitySpec
from quantsearch.search._storage import (
    StorageError,
    StudyBusyError,
    StudyNotFoundError,
    load_study,
    load_study_from,
    open_study,
)
from quantsearch.search._study import ensure_float_model, run_study, study_threads
from quantsearch.search._workers import available_cores

__all__ = [
    "FLOAT",
    "NNI_TYPES",
    "SAMPLERS",
    "ConsoleProgress",
    "DryRun",
    "ModelLayers",
    "NniParam",
    "ParamSensitivity",
    "PredictedPoint",
    "Progress",
    "SamplerEntry",
    "SamplerOption",
    "SearchSpec",
    "SeedGuide",
    "Sensitivity",
    "SensitivityEntry",
    "SensitivityError",
    "SensitivitySpec",
    "SpaceError",
    "SpacePlan",
    "StorageError",
    "StudyBusyError",
    "StudyContext",
    "StudyNotFoundError",
    "TrialJob",
    "TrialOutcome",
    "TrialReport",
    "available_cores",
    "check_study_name",
    "config_key",
    "counted_trials",
    "describe_front",
    "ensure_float_model",
    "front_lines",
    "front_table",
    "load_space",
    "load_study",
    "load_study_from",
    "make_sampler",
    "measure_sensitivity",
    "open_study",
    "parse_nni_param",
    "parse_space",
    "predicted_front",
    "prepare",
    "register_sampler",
    "run_study",
    "run_trial",
    "seed_configs",
    "sensitivity_frame",
    "sensitivity_lines",
    "sensitivity_pivot",
    "storage_url",
    "study_banner",
    "study_location",
    "study_sensitivity",
    "study_threads",
    "target_line",
    "trial_seed",
    "trials_lines",
    "trials_table",
    "validation_lines",
]
