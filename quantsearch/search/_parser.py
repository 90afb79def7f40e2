"""The space parser: a space file's data checked key by key into a SearchSpec."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantsearch.quantization import QUANT_TYPES, QUANTIZERS, algorithm_rules
from quantsearch.search._errors import SpaceError, shown
from quantsearch.search._nni_syntax import NniParam, is_nni_param, parse_nni_param
from quantsearch.search._paths import artifacts_location, check_study_name, storage_url
from quantsearch.search._rules import (
    BITS_RULE,
    MAX_SEED,
    TRAIN_KEYS,
    Rule,
    is_int,
    is_real,
    mapping,
    option_owners,
    param_names,
    param_rule,
)
from quantsearch.search._sections import (
    is_user_task,
    parse_calibration,
    parse_constraints,
    parse_hopeless,
    parse_latency,
    parse_latency_options,
    parse_metrics,
    parse_objectives,
    parse_sampler,
    parse_sensitivity,
    parse_target,
    parse_task,
)
from quantsearch.search._spec import (
    BITS_PARAMS,
    Baselines,
    LayerSelector,
    Param,
    PerLayer,
    SearchSpec,
)
from quantsearch.search._yaml import read_yaml_file
from quantsearch.tasks import TrainConfig, TrainConfigError

__all__ = ["TOP_KEYS", "load_space", "parse_space"]

TOP_KEYS = (
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
    "artifacts",
    "latency",
)


def load_space(path: str | Path) -> SearchSpec:
    """Read and check a search-space YAML file; SpaceError names the file and the key.

    A relative path in the file (task.data_dir, task.pretrained, a task file, storage) is
    resolved against the file's folder; a space read from a pipe or a device resolves them
    against the working directory.
    """
    path = Path(path)
    data = read_yaml_file(path)
    base = path.parent if path.is_file() else None
    return parse_space(data, source=str(path), default_name=path.stem, base=base)


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


class _Parser:
    """The checks of what is quantized and searched; the study-level sections are in
    ``_sections``."""

    def __init__(self, source: str, base: Path | None = None) -> None:
        self.source = source
        self.base = base

    def parse(self, data: Any, *, default_name: str) -> SearchSpec:
        if data is None:
            raise SpaceError("the file is empty; a space needs at least algorithm and params")
        top = mapping(data, key="(top level)", allowed=TOP_KEYS)
        algorithm = self.algorithm(top.get("algorithm"))
        quantize = self.quantize(top.get("quantize"))
        params = self.params(top.get("params", {}), algorithm)
        per_layer = self.per_layer(top.get("per_layer"))
        self.check_bits_given(quantize, params, per_layer)
        baselines = self.baselines(top.get("baselines"), params, per_layer)
        n_trials = top.get("n_trials", 16)
        if not is_int(n_trials) or n_trials < 1:
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
        if not is_int(seed) or not 0 <= seed <= MAX_SEED:
            raise SpaceError(f"{shown(seed)} is not an integer in 0..{MAX_SEED}", key="seed")
        if "storage" in top:
            storage = storage_url(top["storage"], key="storage", base=self.base)
        else:  # the default, like a command-line path: relative to the working directory
            storage = storage_url(f"studies/{study_name}.db", key="storage")
        return SearchSpec(
            source=self.source,
            study_name=study_name,
            task=parse_task(top.get("task", "digits"), self.base),
            algorithm=algorithm,
            seed=seed,
            train=self.train(top.get("train")),
            objectives=parse_objectives(top.get("objectives"), user_task=is_user_task(top)),
            sampler=parse_sampler(top.get("sampler")),
            n_trials=n_trials,
            storage=storage,
            baselines=baselines,
            constraints=parse_constraints(
                top.get("constraints"), user_task=is_user_task(top)
            ),
            hopeless=parse_hopeless(top.get("hopeless")),
            quantize=quantize,
            params=params,
            per_layer=per_layer,
            from_scratch=self.from_scratch(top.get("from_scratch", False), algorithm),
            float_train=self.train(top.get("float_train"), key="float_train"),
            calibration_batches=parse_calibration(top.get("calibration")),
            sensitivity=parse_sensitivity(
                top.get("sensitivity"), per_layer, n_trials, top.get("from_scratch") is True
            ),
            target=parse_target(top.get("target"), top),
            metrics=parse_metrics(top.get("objectives")),
            latency=parse_latency(top.get("latency")),
            **parse_latency_options(top.get("latency")),
            artifacts=None
            if top.get("artifacts") is None
            else artifacts_location(top["artifacts"], key="artifacts", base=self.base),
        )

    def from_scratch(self, value: Any, algorithm: str) -> bool:
        if not isinstance(value, bool):
            raise SpaceError(f"{value!r} is not true or false", key="from_scratch")
        if value and not algorithm_rules(algorithm).trains:
            raise SpaceError(
                f"a {algorithm} trial only calibrates, so it needs trained float weights, not "
                "a fresh model: drop from_scratch",
                key="from_scratch",
            )
        return value

    def algorithm(self, value: Any) -> str:
        # Read when parsing: an algorithm registered after this import is known too.
        algorithms = tuple(QUANTIZERS)
        if value is None:
            raise SpaceError(f"missing; allowed: {', '.join(algorithms)}", key="algorithm")
        if value not in algorithms:
            raise SpaceError(
                f"{value!r} is not an algorithm; allowed: {', '.join(algorithms)}",
                key="algorithm",
            )
        return str(value)

    def train(self, value: Any, *, key: str = "train") -> dict[str, Any]:
        train = mapping(value or {}, key=key, allowed=TRAIN_KEYS)
        try:
            return TrainConfig.checked(train, search=True)
        except TrainConfigError as error:
            raise SpaceError(
                f"{error.value!r} is not {error.allowed}", key=f"{key}.{error.key}"
            ) from None

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
        quantize = mapping(value, key="quantize", allowed=QUANT_TYPES)
        if not quantize:
            raise SpaceError("is empty; name at least one of weight, input, output", key="quantize")
        out: dict[str, LayerSelector] = {}
        for quant_type in QUANT_TYPES:
            if quant_type in quantize:
                key = f"quantize.{quant_type}"
                selector = mapping(quantize[quant_type], key=key, allowed=("op_types", "op_names"))
                out[quant_type] = self.selector(selector, key=key)
        return out

    def param(self, name: str, value: Any, *, key: str, rule: Rule) -> Param:
        if not is_nni_param(value):
            problem = rule.problem(value)
            if problem is None and isinstance(value, Mapping) and not rule.per_quant_type:
                problem = "a single value"  # a mapping is a search space or nothing
            if problem is not None:
                raise SpaceError(
                    f"{value!r} is not {problem}, nor a search space {{_type: ..., _value: [...]}}",
                    key=key,
                )
            return value
        param = parse_nni_param(value, key=key)
        if param.nni_type == "choice":
            for index, choice in enumerate(param.value):
                problem = rule.problem(choice)
                if problem is not None:
                    raise SpaceError(f"{choice!r} is not {problem}", key=f"{key}._value[{index}]")
            return param
        continuous = param.nni_type in ("uniform", "loguniform") or not all(
            is_int(v) or float(v).is_integer() for v in param.value
        )
        if rule.integral and continuous:
            raise SpaceError(
                # 0.5 is no integer: an integral rule's refusal of it says what it takes.
                f"{param.describe()} gives non-integer values; {name} is {rule.problem(0.5)}",
                key=f"{key}._value",
            )
        for end in param.candidates():
            problem = rule.problem(end)
            if problem is None:
                continue
            if continuous and _whole(end) and rule.problem(int(end)) is None:
                # Takes the integer, refuses the float: the range is what is wrong.
                raise SpaceError(
                    f"{param.describe()} gives non-integer values; {name} is {problem}",
                    key=f"{key}._value",
                )
            raise SpaceError(
                f"{param.describe()} reaches {end!r}, but {name} is {problem}",
                key=f"{key}._value",
            )
        return param

    def params(self, value: Any, algorithm: str) -> dict[str, Param]:
        params = mapping(value, key="params", allowed=param_names())
        out: dict[str, Param] = {}
        for name, item in params.items():
            rule = param_rule(name, algorithm)
            if rule is None:
                owners = option_owners(name)
                those = f"{owners[0]} algorithm has" if len(owners) == 1 else (
                    f"{', '.join(owners[:-1])} and {owners[-1]} algorithms have"
                )
                raise SpaceError(
                    f"only the {those} {name}, not {algorithm}", key=f"params.{name}"
                )
            out[name] = self.param(name, item, key=f"params.{name}", rule=rule)
        return out

    def per_layer(self, value: Any) -> PerLayer | None:
        if value is None:
            return None
        per_layer = mapping(value, key="per_layer", allowed=("op_types", "op_names", *BITS_PARAMS))
        selector = self.selector(per_layer, key="per_layer")
        params = {
            name: self.param(name, per_layer[name], key=f"per_layer.{name}", rule=BITS_RULE)
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
        baselines = mapping(
            value, key="baselines", allowed=("float", "uniform_bits", "configs")
        )
        use_float = baselines.get("float", True)
        if not isinstance(use_float, bool):
            raise SpaceError(f"{use_float!r} is not true or false", key="baselines.float")
        bits = baselines.get("uniform_bits", [])
        if not isinstance(bits, list) or not all(is_int(b) and 1 <= b <= 16 for b in bits):
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
            for where, param in searched:
                _require_value(
                    param, b, where, key="baselines.uniform_bits",
                    why=f", so a uniform-{b} trial is not in the space",
                )
        configs = self.baseline_configs(baselines.get("configs", {}), searched)
        return Baselines(float=use_float, uniform_bits=tuple(bits), configs=configs)

    def baseline_configs(
        self, value: Any, searched: list[tuple[str, Param]]
    ) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
        """Named baseline configs: each sets every bits parameter of the space through its key."""
        if not isinstance(value, Mapping):
            raise SpaceError(f"expected a mapping of names to bits, got {value!r}",
                             key="baselines.configs")
        out = []
        for name, values in value.items():
            key = f"baselines.configs.{name}"
            if not isinstance(name, str) or not _LABEL.fullmatch(name) or name == "float" or (
                name.startswith("uniform-")
            ):
                raise SpaceError(
                    "a baseline's name is 1 to 40 letters, digits, '.', '_' or '-', starting "
                    "with a letter, and neither 'float' nor 'uniform-...'", key=key,
                )
            chosen = mapping(values, key=key, allowed=BITS_PARAMS)
            for where, param in searched:
                bits_key = where.rpartition(".")[2]
                if bits_key in chosen:
                    _require_value(param, chosen[bits_key], where, key=f"{key}.{bits_key}")
                elif isinstance(param, NniParam):  # a fixed one keeps its value
                    raise SpaceError(f"gives no {bits_key} (for {where})", key=key)
            unused = sorted(set(chosen) - {w.rpartition(".")[2] for w, _ in searched})
            if unused:
                raise SpaceError(f"the space has no {', '.join(unused)} to set", key=key)
            out.append((name, tuple(chosen.items())))
        return tuple(out)


_LABEL = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,39}")


def _require_value(param: Param, value: Any, where: str, *, key: str, why: str = "") -> None:
    """SpaceError at ``key`` unless ``value`` is one the parameter at ``where`` takes."""
    try:
        _encode(param, value)
    except ValueError:
        shown = param.describe() if isinstance(param, NniParam) else repr(param)
        raise SpaceError(
            f"{value!r} is not a value of {where} ({shown}){why}", key=key
        ) from None


def _encode(param: Param, value: Any) -> Any:
    if isinstance(param, NniParam):
        return param.encode(value)
    if param != value:
        raise ValueError(f"{value!r} differs from the fixed value {param!r}")
    return value


def _whole(value: Any) -> bool:
    return is_real(value) and float(value).is_integer()
