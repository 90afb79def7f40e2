"""The parsed search space: SearchSpec and its parts, as data with their stored form and hash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from quantsearch.pipeline import LatencySetup, mask_url
from quantsearch.search._errors import SpaceError
from quantsearch.search._nni_syntax import NniParam
from quantsearch.search._paths import artifacts_location, cwd_resolved, storage_url

__all__ = [
    "BITS_PARAMS",
    "DEFAULT_PATIENCE",
    "DEFAULT_SEEDS",
    "LATENCY_SOURCES",
    "Baselines",
    "Constraints",
    "HopelessRule",
    "LayerSelector",
    "Param",
    "PerLayer",
    "SamplerSpec",
    "SearchSpec",
    "SensitivitySpec",
    "Target",
    "TaskSpec",
    "changed_keys",
    "param_to_json",
]

BITS_PARAMS: tuple[str, ...] = ("quant_bits", "weight_bits", "input_bits", "output_bits")
# Seeds in a row off the front before the sampler goes on alone (benchmarks/bench_search.py).
DEFAULT_PATIENCE = 3
# The most seed trials when a space's sensitivity does not say.
DEFAULT_SEEDS = 50
# What a space's ``latency: {source: ...}`` may say the latency objective is (the first: the
# default, each trial's export timed).
LATENCY_SOURCES: tuple[str, ...] = ("measured", "predicted")
# Keys whose change does not change what a trial means: a study may grow or move.
_UNHASHED_KEYS = ("study_name", "n_trials", "storage", "artifacts")

# A parameter is either a fixed value or a distribution in NNI's syntax.
Param = NniParam | int | float | str


@dataclass(frozen=True)
class TaskSpec:
    """The task of a space. Paths a space file writes (``data_dir``, ``pretrained``, the file of
    a ``path/to/file.py:function`` task) are held resolved against the file's folder;
    ``written`` keeps the hashed ones (``name``, ``pretrained``) as the file writes them."""

    name: str = "digits"
    data_dir: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    written: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The task as the study uses it (resolved paths): recorded with the study."""
        out = {"name": self.name, "data_dir": self.data_dir, "options": dict(self.options)}
        if self.pretrained is not None:
            out["pretrained"] = self.pretrained
        return out

    def search_dict(self) -> dict[str, Any]:
        """The hashed part: no data_dir, and paths as written, so that a study's hash does not
        depend on the folder it is run from (nor on where its files were moved to)."""
        out = {k: v for k, v in self.to_dict().items() if k != "data_dir"}
        out.update({k: v for k, v in self.written.items() if k in out})
        return out


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler (``quantsearch.search.SAMPLERS``) and the options the space gave."""

    name: str = "nsga2"
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}


@dataclass(frozen=True)
class Baselines:
    float: bool = True
    uniform_bits: tuple[int, ...] = ()
    configs: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    """Named configs: (label, ((bits key, value), ...)), each value set on every parameter
    of that key (``weight_bits`` on every layer's weight bits)."""

    def to_dict(self) -> dict[str, Any]:
        named = {"configs": {k: dict(v) for k, v in self.configs}} if self.configs else {}
        return {"float": self.float, "uniform_bits": list(self.uniform_bits), **named}

    @property
    def labels(self) -> list[str]:
        uniform = [f"uniform-{b}" for b in self.uniform_bits]
        return (["float"] if self.float else []) + uniform + [k for k, _ in self.configs]

    def config(self, label: str) -> dict[str, Any] | None:
        """The bits values of a named config; None for ``float`` and ``uniform-<b>``."""
        return next((dict(values) for name, values in self.configs if name == label), None)


@dataclass(frozen=True)
class Constraints:
    """Bounds a feasible trial meets: ``min_accuracy``, ``max_size_bytes``, and ``bounds`` on
    any other metric, ``(kind, metric, value)`` with kind ``min`` or ``max`` (a space writes
    ``min_<metric>`` / ``max_<metric>``)."""

    min_accuracy: float | None = None
    max_size_bytes: int | None = None
    bounds: tuple[tuple[str, str, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_accuracy": self.min_accuracy,
            "max_size_bytes": self.max_size_bytes,
            # Only when set: the hash of a space without them stays what it was.
            **{f"{kind}_{metric}": value for kind, metric, value in self.bounds},
        }

    def __bool__(self) -> bool:
        return self.min_accuracy is not None or self.max_size_bytes is not None or bool(
            self.bounds
        )


@dataclass(frozen=True)
class HopelessRule:
    """Stop a trial whose validation accuracy after ``after_epoch`` epochs is below
    chance (1 / classes) plus ``margin``."""

    after_epoch: int = 1
    margin: float = 0.05

    def to_dict(self) -> dict[str, Any]:
        return {"after_epoch": self.after_epoch, "margin": self.margin}


@dataclass(frozen=True)
class SensitivitySpec:
    """Measure each per-layer bits parameter on the float model first, then seed the search.

    ``method``: ``loss`` ranks a tensor by the validation loss with it alone quantized;
    ``hessian`` by HAWQ-V2's mean Hessian trace x ||Q(W) - W||^2 (weights; activations keep
    the loss). ``batches``: validation batches each measurement evaluates. ``seeds``: the most
    configs of the predicted Pareto set queued as trials (None: DEFAULT_SEEDS, 50);
    ``spread``: their order (``hypervolume`` or ``size``); ``patience``: seeds in a row that
    miss the front before
    the sampler goes on alone (0: never stop early).

    Its defaults are the sensitivity's only defaults: a space without the key, or a command
    that measures one anyway, uses ``SensitivitySpec()``.
    """

    method: str = "loss"
    batches: int = 8
    seeds: int | None = None
    hessian_samples: int = 4
    spread: str = "hypervolume"
    patience: int = DEFAULT_PATIENCE

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "batches": self.batches,
            "seeds": self.seeds,
            "hessian_samples": self.hessian_samples,
            "spread": self.spread,
            # Written only when set, so studies made before the key existed keep their hash.
            **({"patience": self.patience} if self.patience != DEFAULT_PATIENCE else {}),
        }

    @property
    def max_seeds(self) -> int:
        """The most seed trials: ``seeds``, else DEFAULT_SEEDS."""
        return DEFAULT_SEEDS if self.seeds is None else self.seeds


@dataclass(frozen=True)
class Target:
    """The smallest model whose validation ``metric`` is within ``max_accuracy_drop`` of the
    float model's (for accuracy: ``target: {max_accuracy_drop: d}``): trials beyond it are
    infeasible, and the study stops once its best feasible trial is as small as the space
    allows.

    For another metric (``target: {metric: m, max_drop | max_relative_drop | bound: v}``),
    ``max_accuracy_drop`` is the allowed change in the metric's worse direction (a fraction
    of the float model's value when ``relative``), or ``bound`` an absolute floor (ceiling for a
    minimized metric) and ``max_accuracy_drop`` NaN."""

    max_accuracy_drop: float
    metric: str = "accuracy"
    relative: bool = False
    bound: float | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.metric == "accuracy" and not self.relative and self.bound is None:
            return {"max_accuracy_drop": self.max_accuracy_drop}
        if self.bound is not None:
            return {"metric": self.metric, "bound": self.bound}
        key = "max_relative_drop" if self.relative else "max_drop"
        return {"metric": self.metric, key: self.max_accuracy_drop}


@dataclass(frozen=True)
class LayerSelector:
    """Modules selected by class name (``op_types``) and/or qualified name (``op_names``)."""

    op_types: tuple[str, ...] | None = None
    op_names: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.op_types is not None:
            out["op_types"] = list(self.op_types)
        if self.op_names is not None:
            out["op_names"] = list(self.op_names)
        return out


@dataclass(frozen=True)
class PerLayer:
    """Each layer the selector matches gets its own copy of every parameter in ``params``."""

    selector: LayerSelector
    params: dict[str, Param]

    def to_dict(self) -> dict[str, Any]:
        return {**self.selector.to_dict(), **{k: param_to_json(v) for k, v in self.params.items()}}


@dataclass(frozen=True)
class SearchSpec:
    """A parsed, checked search space."""

    source: str
    study_name: str
    task: TaskSpec
    algorithm: str
    seed: int
    train: dict[str, Any]
    objectives: tuple[str, ...]
    sampler: SamplerSpec
    n_trials: int
    storage: str
    baselines: Baselines
    constraints: Constraints
    hopeless: HopelessRule | None
    quantize: dict[str, LayerSelector]
    params: dict[str, Param]
    per_layer: PerLayer | None
    from_scratch: bool = False
    float_train: dict[str, Any] = field(default_factory=dict)
    calibration_batches: int = 32
    sensitivity: SensitivitySpec | None = None
    target: Target | None = None
    artifacts: str | None = None
    """The artifact store every machine shares (a folder, s3://bucket/prefix); None: the
    artifacts folder beside the study."""
    latency: LatencySetup | None = None
    """How the ``latency`` metric is measured (batch size, threads, provider, repeats); None:
    the defaults (batch 1, one thread, CPU) if a latency metric is named."""
    latency_table: bool = False
    """Measure the per-layer latency table once per study and record each trial's predicted
    latency (``latency: {table: true}``)."""
    latency_source: str = LATENCY_SOURCES[0]
    """What the ``latency`` metric of a trial is: ``measured`` (its export timed) or
    ``predicted`` (from the table, nothing exported)."""
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Metrics the space declares in ``objectives`` (``{name: perplexity, direction:
    minimize}``): name -> direction (and label, unit)."""

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Every metric the space names: objectives, constraint bounds, the target's."""
        names = list(self.objectives)
        names += [m for _, m, _ in self.constraints.bounds if m not in names]
        if self.target is not None and self.target.metric not in names:
            names.append(self.target.metric)
        return tuple(names)

    def to_dict(self) -> dict[str, Any]:
        """The space with every default filled in, as plain JSON-able data."""
        return {
            "study_name": self.study_name,
            "task": self.task.to_dict(),
            "algorithm": self.algorithm,
            "seed": self.seed,
            "train": dict(self.train),
            "objectives": list(self.objectives),
            "sampler": self.sampler.to_dict(),
            "n_trials": self.n_trials,
            "storage": mask_url(self.storage),  # stored with the study: never its password
            "baselines": self.baselines.to_dict(),
            "constraints": self.constraints.to_dict(),
            "hopeless": None if self.hopeless is None else self.hopeless.to_dict(),
            "quantize": {t: s.to_dict() for t, s in self.quantize.items()},
            "params": {k: param_to_json(v) for k, v in self.params.items()},
            "per_layer": None if self.per_layer is None else self.per_layer.to_dict(),
            "from_scratch": self.from_scratch,
            "float_train": dict(self.float_train),
            "calibration": {"batches": self.calibration_batches},
            # Only when set: the hash of a space without it stays what it was.
            **({"sensitivity": self.sensitivity.to_dict()} if self.sensitivity else {}),
            **({"target": self.target.to_dict()} if self.target else {}),
            **({"artifacts": self.artifacts} if self.artifacts else {}),
            **({"metrics": dict(self.metrics)} if self.metrics else {}),
            **({"latency": self._latency_dict()} if self.latency else {}),
        }

    def _latency_dict(self) -> dict[str, Any]:
        """``latency:`` as stored: the setup, and the table's options only when set (a space
        without them hashes as before they existed)."""
        assert self.latency is not None
        return {
            **self.latency.to_dict(),
            **({"table": True} if self.latency_table else {}),
            **(
                {"source": self.latency_source}
                if self.latency_source != LATENCY_SOURCES[0]
                else {}
            ),
        }

    def search_dict(self) -> dict[str, Any]:
        """The part of the space that decides what a trial means (hashed to guard a study).

        Where the data lives and how many threads train are not part of it: a study may move
        to another machine.
        """
        out = {k: v for k, v in self.to_dict().items() if k not in _UNHASHED_KEYS}
        out["task"] = self.task.search_dict()
        for key in ("train", "float_train"):
            out[key] = {k: v for k, v in out[key].items() if k != "num_threads"}
        return out

    def matches_stored(self, stored_hash: str, stored: Mapping[str, Any]) -> bool:
        """Whether a study recorded with ``stored_hash`` (and the ``to_dict`` ``stored``) was
        created from this space.

        Its hash is of the paths as the space file writes them. A study created before those
        paths were relative to the file's folder recorded them relative to the working
        directory: rewritten to name the same files from the file's folder, they still match.
        """
        if stored_hash == self.space_hash:
            return True
        written = self._written_as_stored(stored)
        if written == self.task.written:
            return False
        again = replace(self, task=replace(self.task, written=written))
        return again.space_hash == stored_hash

    def _written_as_stored(self, stored: Mapping[str, Any]) -> dict[str, str]:
        """``task.written``, with the recorded value of each path that names the same file."""
        written = dict(self.task.written)
        task = stored.get("task")
        if not isinstance(task, Mapping):
            return written
        resolved = self.task.to_dict()
        for key in written:
            old = task.get(key)
            new = resolved.get(key)
            old_file = cwd_resolved(key, old)
            if isinstance(old, str) and (
                old == new or (old_file is not None and old_file == cwd_resolved(key, new))
            ):
                written[key] = old
        return written

    def changed_from(self, stored: Mapping[str, Any]) -> list[str]:
        """The searched keys whose values differ between ``stored`` (the ``to_dict`` recorded
        with a study) and this space, compared as ``search_dict`` compares them (a path that
        names the same file is the same)."""
        new = self.search_dict()
        old = {k: v for k, v in stored.items() if k in new}
        task = old.get("task")
        if isinstance(task, Mapping):
            task = {k: v for k, v in task.items() if k != "data_dir"}
            for key, written in self._written_as_stored(stored).items():
                if key in task and written == task[key]:
                    task[key] = self.task.written[key]
            old["task"] = task
        for key in ("train", "float_train"):
            if isinstance(old.get(key), Mapping):
                old[key] = {k: v for k, v in old[key].items() if k != "num_threads"}
        return changed_keys(old, new)

    @property
    def threads(self) -> int | None:
        """Torch threads per training process, when the space sets them (train.num_threads)."""
        return self.train.get("num_threads")

    @property
    def space_hash(self) -> str:
        canonical = json.dumps(self.search_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def with_overrides(
        self,
        *,
        storage: str | None = None,
        n_trials: int | None = None,
        data_dir: str | None = None,
        artifacts: str | None = None,
    ) -> SearchSpec:
        """The same space with the storage, trial count, data folder or artifact store given
        on the command line."""
        changes: dict[str, Any] = {}
        if artifacts is not None:
            changes["artifacts"] = artifacts_location(artifacts)
        if data_dir is not None:
            changes["task"] = replace(self.task, data_dir=data_dir)
        if storage is not None:
            changes["storage"] = storage_url(storage, key="--storage")
        if n_trials is not None:
            if n_trials < len(self.baselines.labels) or n_trials < 1:
                raise SpaceError(
                    f"{n_trials} is fewer than the {len(self.baselines.labels)} baseline "
                    "trials (and at least 1 is needed)",
                    key="--n-trials",
                )
            changes["n_trials"] = n_trials
        return replace(self, **changes)


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Key paths whose values differ between two parsed spaces (for a refusal message)."""
    keys: list[str] = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys.extend(changed_keys(a, b, prefix=f"{path}."))
        elif a != b:
            keys.append(path)
    return keys


def param_to_json(param: Param) -> Any:
    """A parameter as plain JSON-able data: a distribution's NNI form, or the fixed value."""
    return param.to_dict() if isinstance(param, NniParam) else param
