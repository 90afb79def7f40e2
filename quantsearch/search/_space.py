"""Search spaces: the YAML file, its validation, and the parsed SearchSpec."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from quantsearch._studydata import mask_url
from quantsearch.pipeline import METRICS
from quantsearch.quantization import QUANT_TYPES, QUANTIZERS
from quantsearch.search._errors import SpaceError, shown
from quantsearch.search._nni_syntax import NniParam, is_nni_param, parse_nni_param
from quantsearch.tasks import LR_SCHEDULES, OPTIMIZERS
from quantsearch.tasks._task import user_task_file

__all__ = [
    "BITS_PARAMS",
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
    "check_study_name",
    "load_space",
    "parse_space",
    "resolve_path",
    "storage_url",
]

BITS_PARAMS: tuple[str, ...] = ("quant_bits", "weight_bits", "input_bits", "output_bits")
ALGORITHMS: tuple[str, ...] = tuple(QUANTIZERS)
SAMPLERS: tuple[str, ...] = ("nsga2", "tpe", "random")
DEVICES: tuple[str, ...] = ("cpu", "cuda", "cuda:N", "auto")
QUANT_SCHEMES: tuple[str, ...] = (
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
)
OBSERVERS: tuple[str, ...] = ("minmax", "percentile", "mse")
SENSITIVITY_METHODS: tuple[str, ...] = ("loss", "hessian")
SEED_SPREADS: tuple[str, ...] = ("hypervolume", "size")
# Seeds in a row off the front before the sampler goes on alone (benchmarks/bench_search.py).
DEFAULT_PATIENCE = 3
OBJECTIVES: tuple[str, ...] = ("accuracy", "size_bytes")
# Names a space may use for a metric besides its own.
_METRIC_ALIASES = {"size": "size_bytes"}
# Keys whose change does not change what a trial means: a study may grow or move.
_UNHASHED_KEYS = ("study_name", "n_trials", "storage")
# A study name names files and folders (studies/<name>.db, <name>_artifacts/, reports/<name>/):
# no separator, no leading dot (so no "." or ".."), short enough for any file system.
STUDY_NAME_RULE = (
    "1 to 100 ASCII letters, digits, '.', '_' or '-', starting with a letter or a digit "
    "(it names the study's files and folders)"
)
_STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Seeds reach numpy and scikit-learn, which take 32-bit seeds.
MAX_SEED = 2**32 - 1
# What a space file may hold: a space is a few kilobytes; these stop a file that would take
# unbounded time or memory (a device, an alias bomb, thousands of nested brackets).
MAX_SPACE_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000

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
    name: str = "nsga2"
    population_size: int | None = None
    n_startup_trials: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.population_size is not None:
            out["population_size"] = self.population_size
        if self.n_startup_trials is not None:
            out["n_startup_trials"] = self.n_startup_trials
        return out


@dataclass(frozen=True)
class Baselines:
    float: bool = True
    uniform_bits: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"float": self.float, "uniform_bits": list(self.uniform_bits)}

    @property
    def labels(self) -> list[str]:
        return (["float"] if self.float else []) + [f"uniform-{b}" for b in self.uniform_bits]


@dataclass(frozen=True)
class Constraints:
    min_accuracy: float | None = None
    max_size_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"min_accuracy": self.min_accuracy, "max_size_bytes": self.max_size_bytes}

    def __bool__(self) -> bool:
        return self.min_accuracy is not None or self.max_size_bytes is not None


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
    configs of the predicted Pareto set queued as trials (None: 50); ``spread``: their order
    (``hypervolume`` or ``size``); ``patience``: seeds in a row that miss the front before
    the sampler goes on alone (0: never stop early).
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


@dataclass(frozen=True)
class Target:
    """The smallest model whose validation accuracy is within ``max_accuracy_drop`` of the
    float model's: trials below it are infeasible, and the study stops once its best
    feasible trial is as small as the space allows."""

    max_accuracy_drop: float

    def to_dict(self) -> dict[str, Any]:
        return {"max_accuracy_drop": self.max_accuracy_drop}


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
        return {**self.selector.to_dict(), **{k: _param_to_json(v) for k, v in self.params.items()}}


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
            "params": {k: _param_to_json(v) for k, v in self.params.items()},
            "per_layer": None if self.per_layer is None else self.per_layer.to_dict(),
            "from_scratch": self.from_scratch,
            "float_train": dict(self.float_train),
            "calibration": {"batches": self.calibration_batches},
            # Only when set: the hash of a space without it stays what it was.
            **({"sensitivity": self.sensitivity.to_dict()} if self.sensitivity else {}),
            **({"target": self.target.to_dict()} if self.target else {}),
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
            old_file = _cwd_resolved(key, old)
            if isinstance(old, str) and (
                old == new or (old_file is not None and old_file == _cwd_resolved(key, new))
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
    ) -> SearchSpec:
        """The same space with the storage, trial count or data folder given on the command
        line."""
        changes: dict[str, Any] = {}
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


def load_space(path: str | Path) -> SearchSpec:
    """Read and check a search-space YAML file; SpaceError names the file and the key.

    A relative path in the file (task.data_dir, task.pretrained, a task file, storage) is
    resolved against the file's folder; a space read from a pipe or a device resolves them
    against the working directory.
    """
    path = Path(path)
    source = str(path)
    try:
        # Read one byte past the limit, never more: the path may be /dev/zero or a pipe.
        with path.open("rb") as handle:
            raw = handle.read(MAX_SPACE_BYTES + 1)
    except FileNotFoundError:
        raise SpaceError("no such file", source=source) from None
    except IsADirectoryError:
        raise SpaceError("is a folder, expected a YAML file", source=source) from None
    except OSError as error:
        raise SpaceError(f"cannot be read ({error})", source=source) from None
    if len(raw) > MAX_SPACE_BYTES:
        raise SpaceError(
            f"is larger than {MAX_SPACE_BYTES} bytes; a search space is a small YAML file",
            source=source,
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpaceError(f"cannot be read ({error})", source=source) from None
    try:
        data = _load_yaml(text)
    except _TooLarge as error:
        raise SpaceError(f"too large: {error}", source=source) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise SpaceError(f"not valid YAML: {where}{problem}", source=source) from None
    base = path.parent if path.is_file() else None
    return parse_space(data, source=source, default_name=path.stem, base=base)


class _TooLarge(Exception):
    """A YAML document past MAX_DEPTH levels or MAX_NODES nodes (aliases expanded)."""


def _load_yaml(text: str) -> Any:
    """The YAML data of ``text``, refused (_TooLarge) past the depth and node limits."""
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_expanded(root: yaml.Node) -> None:
    """Refuse a node graph whose aliases expand past MAX_NODES nodes or MAX_DEPTH levels.

    Aliases share nodes, so the graph is small while its expansion (what every later walk of
    the data visits) may be exponential: sizes and depths are summed per distinct node.
    """
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, depth) once expanded
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        children = _children(node)
        if expanded:
            on_path.discard(key)
            done = [sizes[id(child)] for child in children]
            count = 1 + sum(c for c, _ in done)
            depth = 1 + max((d for _, d in done), default=0)
            if count > MAX_NODES:
                raise _TooLarge(f"more than {MAX_NODES} values once its aliases are expanded")
            if depth > MAX_DEPTH:
                raise _TooLarge(f"nested deeper than {MAX_DEPTH} levels")
            sizes[key] = (count, depth)
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise _TooLarge("an alias refers to a value that contains it (endless nesting)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a number (YAML 1.2) instead of a string.

    Composing is recursive: nesting past MAX_DEPTH is refused before Python's stack runs out.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _TooLarge(
                    f"nested deeper than {MAX_DEPTH} levels "
                    f"(line {mark.line + 1}, column {mark.column + 1})"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_space(
    data: Any, *, source: str, default_name: str = "study", base: str | Path | None = None
) -> SearchSpec:
    """Check the data of a search space; SpaceError names ``source`` and the key path.

    ``base``: the folder relative paths in ``data`` are resolved against (that of the file it
    was read from), ``~`` expanded; None (data not from a file) leaves them as given, relative
    to the working directory. Defaults (``studies/<study_name>.db``) stay relative to it.
    """
    try:
        return _Parser(source, None if base is None else Path(base)).parse(
            data, default_name=default_name
        )
    except SpaceError as error:
        raise error.with_source(source) from None


_TOP_KEYS = (
    "study_name",
    "task",
    "algorithm",
    "seed",
    "train",
    "objectives",
    "sampler",
    "n_trials",
    "storage",
    "baselines",
    "constraints",
    "hopeless",
    "quantize",
    "params",
    "per_layer",
    "from_scratch",
    "float_train",
    "calibration",
    "sensitivity",
    "target",
)
_TRAIN_KEYS = (
    "epochs",
    "steps",
    "batch_size",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "lr_schedule",
    "device",
    "num_threads",
)


@dataclass(frozen=True)
class _Rule:
    """What values a parameter takes: ``check`` for one value, ``integral`` for ranges."""

    allowed: str
    check: Callable[[Any], bool]
    integral: bool = False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    # Finite only: .inf and .nan pass no range check a trial could use.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_BITS_RULE = _Rule(
    "an integer 1..16 or 'float'",
    lambda v: v == "float" or (_is_int(v) and 1 <= v <= 16),
    integral=True,
)
_PARAM_RULES: dict[str, _Rule] = {
    **dict.fromkeys(BITS_PARAMS, _BITS_RULE),
    "quant_start_step": _Rule("an integer >= 0", lambda v: _is_int(v) and v >= 0, integral=True),
    "quant_scheme": _Rule(f"one of {', '.join(QUANT_SCHEMES)}", lambda v: v in QUANT_SCHEMES),
    "quant_dtype": _Rule("'int' or 'uint'", lambda v: v in ("int", "uint")),
    "observer": _Rule(f"one of {', '.join(OBSERVERS)}", lambda v: v in OBSERVERS),
    "percentile": _Rule(
        "a number in (50, 100]", lambda v: _is_real(v) and 50 < v <= 100
    ),
    "lr": _Rule("a number > 0", lambda v: _is_real(v) and v > 0),
    "weight_decay": _Rule("a number >= 0", lambda v: _is_real(v) and v >= 0),
    "momentum": _Rule("a number in [0, 1)", lambda v: _is_real(v) and 0 <= v < 1),
    "batch_size": _Rule("an integer >= 1", lambda v: _is_int(v) and v >= 1, integral=True),
}
TRAIN_PARAMS: tuple[str, ...] = ("lr", "weight_decay", "momentum", "batch_size")
# Parameters only one algorithm takes.
_ALGORITHM_PARAMS = {"quant_start_step": "qat", "observer": "ptq", "percentile": "ptq"}
_TRAIN_RULES: dict[str, _Rule] = {
    "epochs": _Rule("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "steps": _Rule("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "num_threads": _Rule("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "optimizer": _Rule(f"one of {', '.join(OPTIMIZERS)}", lambda v: v in OPTIMIZERS),
    "lr_schedule": _Rule(f"one of {', '.join(LR_SCHEDULES)}", lambda v: v in LR_SCHEDULES),
    "device": _Rule(
        f"one of {', '.join(DEVICES)}",
        lambda v: v in DEVICES or (isinstance(v, str) and re.fullmatch(r"cuda:\d+", v)),
    ),
    **{k: _PARAM_RULES[k] for k in TRAIN_PARAMS},
}


class _Parser:
    def __init__(self, source: str, base: Path | None = None) -> None:
        self.source = source
        self.base = base

    def path(self, value: str) -> str:
        """``value``, a path written in the space, resolved against ``base`` when given."""
        return resolve_path(value, self.base)

    def parse(self, data: Any, *, default_name: str) -> SearchSpec:
        if data is None:
            raise SpaceError("the file is empty; a space needs at least algorithm and params")
        top = _mapping(data, key="(top level)", allowed=_TOP_KEYS)
        algorithm = self.algorithm(top.get("algorithm"))
        quantize = self.quantize(top.get("quantize"))
        params = self.params(top.get("params", {}), algorithm)
        per_layer = self.per_layer(top.get("per_layer"))
        self.check_bits_given(quantize, params, per_layer)
        baselines = self.baselines(top.get("baselines"), params, per_layer)
        n_trials = top.get("n_trials", 16)
        if not _is_int(n_trials) or n_trials < 1:
            raise SpaceError(f"{n_trials!r} is not an integer >= 1", key="n_trials")
        if n_trials < len(baselines.labels):
            raise SpaceError(
                f"{n_trials} is fewer than the {len(baselines.labels)} baseline trials "
                f"({', '.join(baselines.labels)})",
                key="n_trials",
            )
        if "study_name" in top:
            study_name = check_study_name(top["study_name"], key="study_name")
        else:
            study_name = check_study_name(
                default_name, key="study_name", hint=" (by default the space file's name)"
            )
        seed = top.get("seed", 0)
        if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
            raise SpaceError(f"{shown(seed)} is not an integer in 0..{MAX_SEED}", key="seed")
        if "storage" in top:
            storage = storage_url(top["storage"], key="storage", base=self.base)
        else:  # the default, like a command-line path: relative to the working directory
            storage = storage_url(f"studies/{study_name}.db", key="storage")
        return SearchSpec(
            source=self.source,
            study_name=study_name,
            task=self.task(top.get("task", "digits")),
            algorithm=algorithm,
            seed=seed,
            train=self.train(top.get("train")),
            objectives=self.objectives(top.get("objectives")),
            sampler=self.sampler(top.get("sampler")),
            n_trials=n_trials,
            storage=storage,
            baselines=baselines,
            constraints=self.constraints(top.get("constraints")),
            hopeless=self.hopeless(top.get("hopeless")),
            quantize=quantize,
            params=params,
            per_layer=per_layer,
            from_scratch=self.from_scratch(top.get("from_scratch", False), algorithm),
            float_train=self.train(top.get("float_train"), key="float_train"),
            calibration_batches=self.calibration(top.get("calibration")),
            sensitivity=self.sensitivity(
                top.get("sensitivity"), per_layer, n_trials, top.get("from_scratch") is True
            ),
            target=self.target(top.get("target"), top),
        )

    def from_scratch(self, value: Any, algorithm: str) -> bool:
        if not isinstance(value, bool):
            raise SpaceError(f"{value!r} is not true or false", key="from_scratch")
        if value and algorithm == "ptq":
            raise SpaceError(
                "a ptq trial only calibrates, so it needs trained float weights, not a fresh "
                "model: drop from_scratch",
                key="from_scratch",
            )
        return value

    def calibration(self, value: Any) -> int:
        calibration = _mapping(value or {}, key="calibration", allowed=("batches",))
        batches = calibration.get("batches", 32)
        if not _is_int(batches) or batches < 1:
            raise SpaceError(f"{batches!r} is not an integer >= 1", key="calibration.batches")
        return batches

    def sensitivity(
        self, value: Any, per_layer: PerLayer | None, n_trials: int, from_scratch: bool
    ) -> SensitivitySpec | None:
        if value is None or value is False:
            return None
        if value is True:
            value = {}
        rule = _mapping(
            value,
            key="sensitivity",
            allowed=("method", "batches", "seeds", "hessian_samples", "spread", "patience"),
        )
        if per_layer is None:
            raise SpaceError(
                "measures each per-layer bits parameter, but the space has no per_layer; "
                "add per_layer or drop sensitivity",
                key="sensitivity",
            )
        if from_scratch:
            raise SpaceError(
                "is measured on the trained float model, which from_scratch trials do not "
                "use; drop one of them",
                key="sensitivity",
            )
        method = rule.get("method", "loss")
        if method not in SENSITIVITY_METHODS:
            raise SpaceError(
                f"{method!r} is not a method; allowed: {', '.join(SENSITIVITY_METHODS)}",
                key="sensitivity.method",
            )
        for key in ("batches", "hessian_samples"):
            count = rule.get(key, 1)
            if not _is_int(count) or count < 1:
                raise SpaceError(f"{count!r} is not an integer >= 1", key=f"sensitivity.{key}")
        spread = rule.get("spread", "hypervolume")
        if spread not in SEED_SPREADS:
            raise SpaceError(
                f"{spread!r} is not a spread; allowed: {', '.join(SEED_SPREADS)}",
                key="sensitivity.spread",
            )
        patience = rule.get("patience", DEFAULT_PATIENCE)
        if not _is_int(patience) or patience < 0:
            raise SpaceError(f"{patience!r} is not an integer >= 0", key="sensitivity.patience")
        seeds = rule.get("seeds")
        if seeds is not None and (not _is_int(seeds) or seeds < 0):
            raise SpaceError(f"{seeds!r} is not an integer >= 0", key="sensitivity.seeds")
        if seeds is not None and seeds > n_trials:
            raise SpaceError(
                f"{seeds} seed trials do not fit in n_trials ({n_trials})",
                key="sensitivity.seeds",
            )
        for name, param in per_layer.params.items():
            values = param.candidates() if isinstance(param, NniParam) else [param]
            # Sensitivity is measured post-training, by the ptq quantizer (2..16 bits).
            low = [v for v in values if _is_int(v) and v < 2]
            if low:
                raise SpaceError(
                    f"per_layer.{name} offers {low[0]} bit(s); sensitivity measures "
                    "post-training (ptq), which quantizes to 2..16 bits",
                    key="sensitivity",
                )
        return SensitivitySpec(
            method=method,
            batches=rule.get("batches", 8),
            seeds=seeds,
            hessian_samples=rule.get("hessian_samples", 4),
            spread=spread,
            patience=patience,
        )

    def target(self, value: Any, top: Mapping[str, Any]) -> Target | None:
        if value is None:
            return None
        rule = _mapping(value, key="target", allowed=("max_accuracy_drop",))
        drop = rule.get("max_accuracy_drop")
        if not _is_real(drop) or not 0 <= drop < 1:
            raise SpaceError(
                f"{drop!r} is not an accuracy drop in [0, 1) (0.01: one point below float)",
                key="target.max_accuracy_drop",
            )
        if top.get("from_scratch") is True:
            raise SpaceError(
                "is measured from the float model's accuracy, which from_scratch trials do not "
                "use; use constraints.min_accuracy instead",
                key="target",
            )
        objectives = self.objectives(top.get("objectives"))
        if "accuracy" not in objectives or "size_bytes" not in objectives:
            raise SpaceError(
                "asks for the smallest model within an accuracy drop, so objectives must "
                "include accuracy and size_bytes",
                key="target",
            )
        return Target(max_accuracy_drop=float(drop))

    def algorithm(self, value: Any) -> str:
        if value is None:
            raise SpaceError(f"missing; allowed: {', '.join(ALGORITHMS)}", key="algorithm")
        if value not in ALGORITHMS:
            raise SpaceError(
                f"{value!r} is not an algorithm; allowed: {', '.join(ALGORITHMS)}",
                key="algorithm",
            )
        return str(value)

    def task(self, value: Any) -> TaskSpec:
        if isinstance(value, str):
            if not value.strip():
                raise SpaceError("is empty; give a task name such as digits", key="task")
            return self.task_spec(name=value)
        task = _mapping(value, key="task", allowed=("name", "data_dir", "options", "pretrained"))
        name = task.get("name")
        if not isinstance(name, str) or not name.strip():
            raise SpaceError(f"{name!r} is not a task name such as digits", key="task.name")
        data_dir = task.get("data_dir")
        if data_dir is not None and not isinstance(data_dir, str):
            raise SpaceError(f"{data_dir!r} is not a folder path", key="task.data_dir")
        options = task.get("options", {})
        if not isinstance(options, dict):
            raise SpaceError(f"{options!r} is not a mapping", key="task.options")
        pretrained = task.get("pretrained")
        if pretrained is not None and (not isinstance(pretrained, str) or not pretrained):
            raise SpaceError(
                f"{pretrained!r} is not a state-dict file path", key="task.pretrained"
            )
        return self.task_spec(
            name=name, data_dir=data_dir, options=dict(options), pretrained=pretrained
        )

    def task_spec(
        self,
        *,
        name: str,
        data_dir: str | None = None,
        options: dict[str, Any] | None = None,
        pretrained: str | None = None,
    ) -> TaskSpec:
        """The TaskSpec with its paths resolved; ``written`` keeps the hashed ones as given."""
        written: dict[str, str] = {}
        task_file = user_task_file(name)
        if task_file is not None and self.base is not None:
            file, rest = task_file
            resolved = self.path(file) + rest
            if resolved != name:
                written["name"], name = name, resolved
        if data_dir is not None:
            data_dir = self.path(data_dir)
        if pretrained is not None and self.path(pretrained) != pretrained:
            written["pretrained"], pretrained = pretrained, self.path(pretrained)
        return TaskSpec(
            name=name,
            data_dir=data_dir,
            options=dict(options or {}),
            pretrained=pretrained,
            written=written,
        )

    def train(self, value: Any, *, key: str = "train") -> dict[str, Any]:
        train = _mapping(value or {}, key=key, allowed=_TRAIN_KEYS)
        out: dict[str, Any] = {}
        for name, item in train.items():
            rule = _TRAIN_RULES[name]
            if not rule.check(item):
                raise SpaceError(f"{item!r} is not {rule.allowed}", key=f"{key}.{name}")
            out[name] = float(item) if name in ("lr", "weight_decay", "momentum") else item
        return out

    def objectives(self, value: Any) -> tuple[str, ...]:
        if value is None:
            return OBJECTIVES
        known = ", ".join(METRICS)
        if not isinstance(value, list) or not 2 <= len(value) <= 3:
            raise SpaceError(
                f"{value!r} is not a list of two or three metrics; known metrics: {known}",
                key="objectives",
            )
        names: list[str] = []
        for index, item in enumerate(value):
            name = _METRIC_ALIASES.get(item, item) if isinstance(item, str) else item
            if name not in METRICS:
                raise SpaceError(
                    f"{item!r} is not a metric; known metrics: {known}",
                    key=f"objectives[{index}]",
                )
            if name in names:
                raise SpaceError(f"{item!r} is listed twice", key=f"objectives[{index}]")
            names.append(name)
        return tuple(names)

    def sampler(self, value: Any) -> SamplerSpec:
        if isinstance(value, str):
            value = {"name": value}
        sampler = _mapping(
            value or {}, key="sampler", allowed=("name", "population_size", "n_startup_trials")
        )
        name = sampler.get("name", "nsga2")
        if name not in SAMPLERS:
            raise SpaceError(
                f"{name!r} is not a sampler; allowed: {', '.join(SAMPLERS)}", key="sampler.name"
            )
        population = sampler.get("population_size")
        if population is not None and (
            name != "nsga2" or not _is_int(population) or population < 2
        ):
            raise SpaceError(
                f"{population!r}: population_size is an integer >= 2, for the nsga2 sampler only",
                key="sampler.population_size",
            )
        startup = sampler.get("n_startup_trials")
        if startup is not None and (name != "tpe" or not _is_int(startup) or startup < 0):
            raise SpaceError(
                f"{startup!r}: n_startup_trials is an integer >= 0, for the tpe sampler only",
                key="sampler.n_startup_trials",
            )
        return SamplerSpec(name=name, population_size=population, n_startup_trials=startup)

    def constraints(self, value: Any) -> Constraints:
        constraints = _mapping(
            value or {}, key="constraints", allowed=("min_accuracy", "max_size_bytes")
        )
        min_accuracy = constraints.get("min_accuracy")
        if min_accuracy is not None and not (_is_real(min_accuracy) and 0 <= min_accuracy <= 1):
            raise SpaceError(
                f"{min_accuracy!r} is not an accuracy in [0, 1]", key="constraints.min_accuracy"
            )
        max_size = constraints.get("max_size_bytes")
        if max_size is not None and not (_is_int(max_size) and max_size > 0):
            raise SpaceError(
                f"{max_size!r} is not a size in bytes (an integer > 0)",
                key="constraints.max_size_bytes",
            )
        return Constraints(
            min_accuracy=None if min_accuracy is None else float(min_accuracy),
            max_size_bytes=max_size,
        )

    def hopeless(self, value: Any) -> HopelessRule | None:
        if value is None or value is False:
            return None
        rule = _mapping(value, key="hopeless", allowed=("after_epoch", "margin"))
        after = rule.get("after_epoch", 1)
        if not _is_int(after) or after < 1:
            raise SpaceError(f"{after!r} is not an integer >= 1", key="hopeless.after_epoch")
        margin = rule.get("margin", 0.05)
        if not _is_real(margin) or not 0 <= margin < 1:
            raise SpaceError(f"{margin!r} is not a number in [0, 1)", key="hopeless.margin")
        return HopelessRule(after_epoch=after, margin=float(margin))

    def selector(self, value: Mapping[str, Any], *, key: str) -> LayerSelector:
        names: dict[str, tuple[str, ...] | None] = {}
        for list_key in ("op_types", "op_names"):
            items = value.get(list_key)
            if items is None:
                names[list_key] = None
                continue
            if (
                not isinstance(items, list)
                or not items
                or not all(isinstance(i, str) and i for i in items)
            ):
                raise SpaceError(
                    f"{items!r} is not a non-empty list of names", key=f"{key}.{list_key}"
                )
            names[list_key] = tuple(items)
        if names["op_types"] is None and names["op_names"] is None:
            raise SpaceError("needs op_types and/or op_names to select layers", key=key)
        return LayerSelector(op_types=names["op_types"], op_names=names["op_names"])

    def quantize(self, value: Any) -> dict[str, LayerSelector]:
        if value is None:
            # Weights of the weighted layers, the one quant type every algorithm supports.
            return {"weight": LayerSelector(op_types=("default",))}
        quantize = _mapping(value, key="quantize", allowed=QUANT_TYPES)
        if not quantize:
            raise SpaceError("is empty; name at least one of weight, input, output", key="quantize")
        out: dict[str, LayerSelector] = {}
        for quant_type in QUANT_TYPES:
            if quant_type in quantize:
                key = f"quantize.{quant_type}"
                selector = _mapping(quantize[quant_type], key=key, allowed=("op_types", "op_names"))
                out[quant_type] = self.selector(selector, key=key)
        return out

    def param(self, name: str, value: Any, *, key: str) -> Param:
        rule = _PARAM_RULES[name]
        if not is_nni_param(value):
            if isinstance(value, Mapping) or not rule.check(value):
                raise SpaceError(
                    f"{value!r} is not {rule.allowed}, nor a search space "
                    "{_type: ..., _value: [...]}",
                    key=key,
                )
            return value
        param = parse_nni_param(value, key=key)
        if param.nni_type == "choice":
            for index, choice in enumerate(param.value):
                if not rule.check(choice):
                    raise SpaceError(
                        f"{choice!r} is not {rule.allowed}", key=f"{key}._value[{index}]"
                    )
            return param
        continuous = param.nni_type in ("uniform", "loguniform") or not all(
            _is_int(v) or float(v).is_integer() for v in param.value
        )
        if rule.integral and continuous:
            raise SpaceError(
                f"{param.describe()} gives non-integer values; {name} is {rule.allowed}",
                key=f"{key}._value",
            )
        for end in param.candidates():
            if not rule.check(end):
                raise SpaceError(
                    f"{param.describe()} reaches {end!r}, but {name} is {rule.allowed}",
                    key=f"{key}._value",
                )
        return param

    def params(self, value: Any, algorithm: str) -> dict[str, Param]:
        params = _mapping(value, key="params", allowed=tuple(_PARAM_RULES))
        out: dict[str, Param] = {}
        for name, item in params.items():
            owner = _ALGORITHM_PARAMS.get(name)
            if owner is not None and algorithm != owner:
                raise SpaceError(
                    f"only the {owner} algorithm has {name}, not {algorithm}",
                    key=f"params.{name}",
                )
            out[name] = self.param(name, item, key=f"params.{name}")
        return out

    def per_layer(self, value: Any) -> PerLayer | None:
        if value is None:
            return None
        per_layer = _mapping(value, key="per_layer", allowed=("op_types", "op_names", *BITS_PARAMS))
        selector = self.selector(per_layer, key="per_layer")
        params = {
            name: self.param(name, per_layer[name], key=f"per_layer.{name}")
            for name in BITS_PARAMS
            if name in per_layer
        }
        if not params:
            raise SpaceError(
                f"names no parameter; give one of {', '.join(BITS_PARAMS)}", key="per_layer"
            )
        return PerLayer(selector=selector, params=params)

    def check_bits_given(
        self,
        quantize: Mapping[str, LayerSelector],
        params: Mapping[str, Param],
        per_layer: PerLayer | None,
    ) -> None:
        layer_params = per_layer.params if per_layer else {}
        for quant_type in quantize:
            bits_key = f"{quant_type}_bits"
            if not {bits_key, "quant_bits"} & (set(params) | set(layer_params)):
                raise SpaceError(
                    f"{quant_type} is quantized but no bit width is given; add "
                    f"params.quant_bits or params.{bits_key}",
                    key=f"quantize.{quant_type}",
                )

    def baselines(
        self, value: Any, params: Mapping[str, Param], per_layer: PerLayer | None
    ) -> Baselines:
        if value is None:
            return Baselines()
        baselines = _mapping(value, key="baselines", allowed=("float", "uniform_bits"))
        use_float = baselines.get("float", True)
        if not isinstance(use_float, bool):
            raise SpaceError(f"{use_float!r} is not true or false", key="baselines.float")
        bits = baselines.get("uniform_bits", [])
        if not isinstance(bits, list) or not all(_is_int(b) and 1 <= b <= 16 for b in bits):
            raise SpaceError(
                f"{bits!r} is not a list of bit widths (integers 1..16)",
                key="baselines.uniform_bits",
            )
        if len(set(bits)) != len(bits):
            raise SpaceError(f"{bits!r} lists a bit width twice", key="baselines.uniform_bits")
        searched = [(f"params.{k}", p) for k, p in params.items() if k in BITS_PARAMS]
        if per_layer is not None:
            searched += [(f"per_layer.{k}", p) for k, p in per_layer.params.items()]
        for b in bits:
            for key, param in searched:
                try:
                    _encode(param, b)
                except ValueError:
                    shown = param.describe() if isinstance(param, NniParam) else repr(param)
                    raise SpaceError(
                        f"{b} is not a value of {key} ({shown}), so a uniform-{b} "
                        "trial is not in the space",
                        key="baselines.uniform_bits",
                    ) from None
        return Baselines(float=use_float, uniform_bits=tuple(bits))


def _encode(param: Param, value: Any) -> Any:
    if isinstance(param, NniParam):
        return param.encode(value)
    if param != value:
        raise ValueError(f"{value!r} differs from the fixed value {param!r}")
    return value


def _mapping(value: Any, *, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SpaceError(f"expected a mapping, got {value!r}", key=key)
    for item in value:
        if item not in allowed:
            where = key if key != "(top level)" else None
            raise SpaceError(
                f"unknown key {item!r}; allowed: {', '.join(allowed)}",
                key=f"{where}.{item}" if where else str(item),
            )
    return dict(value)


def check_study_name(name: Any, *, key: str = "study_name", hint: str = "") -> str:
    """``name`` if it can name the study's files and folders, else SpaceError with the rule."""
    if not isinstance(name, str) or not _STUDY_NAME.fullmatch(name):
        raise SpaceError(f"{shown(name)}{hint} is not a study name: use {STUDY_NAME_RULE}", key=key)
    return name


def _cwd_resolved(key: str, value: Any) -> str | None:
    """A task ``name`` (a task file's) or ``pretrained`` path read from the working directory
    (as spaces were before their paths were relative to their file), made absolute."""
    if not isinstance(value, str):
        return None
    if key == "pretrained":
        return resolve_path(value, Path.cwd())
    task_file = user_task_file(value)
    if task_file is None:
        return None
    file, rest = task_file
    return resolve_path(file, Path.cwd()) + rest


def resolve_path(value: str, base: Path | None) -> str:
    """``value`` (``~`` expanded) joined to the folder ``base`` unless absolute, ``..`` taken
    out (``search_spaces/../studies/a.db`` is ``studies/a.db``: a ``base`` given relative to
    the working directory gives a path relative to it); unchanged when ``base`` is None."""
    if base is None:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    return os.path.normpath(base / path)


def storage_url(value: Any, *, key: str = "--storage", base: Path | None = None) -> str:
    """A storage URL from a SQLite file path or a database URL (SpaceError naming ``key``).

    ``base``: the folder a relative SQLite file (a path, or a ``sqlite:///`` URL) is in, for a
    storage written in a space file; None: the working directory (left relative).
    """
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        shown_value = shown(mask_url(value)) if isinstance(value, str) else shown(value)
        raise SpaceError(
            f"{shown_value} is not a storage: give a SQLite file path or a database URL "
            "(sqlite:///path.db, postgresql://...)",
            key=key,
        )
    if "://" not in value:
        path = Path(value).expanduser()
        url = f"sqlite:///{resolve_path(str(path), base)}"
    else:
        url = value
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise SpaceError(
            f"{shown(mask_url(value))} is not a database URL (sqlite:///path.db, "
            "postgresql://user@host/db)",
            key=key,
        ) from None
    database = parsed.database
    if (
        base is not None
        and "://" in value
        and parsed.drivername.startswith("sqlite")
        and database
        and database != ":memory:"
        and not database.startswith("file:")  # an SQLite URI filename: left as given
        and not Path(database).is_absolute()
    ):
        url = f"{value[: value.index('://')]}:///{os.path.normpath(base / database)}"
        if parsed.query:
            url += "?" + value.partition("?")[2]
    return url


def _param_to_json(param: Param) -> Any:
    return param.to_dict() if isinstance(param, NniParam) else param
