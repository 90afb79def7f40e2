"""What each value of a space may be: the names it may use and the rule of every parameter."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from quantsearch.quantization import QUANT_TYPES, QUANTIZERS, PtqQuantizer, algorithm_rules
from quantsearch.search._errors import SpaceError
from quantsearch.search._spec import BITS_PARAMS
from quantsearch.tasks import TrainConfig

__all__ = [
    "BITS_RULE",
    "MAX_SEED",
    "MEASURING_ALGORITHM",
    "METRIC_ALIASES",
    "OBJECTIVES",
    "SEED_SPREADS",
    "SENSITIVITY_METHODS",
    "TRAIN_KEYS",
    "TRAIN_PARAMS",
    "Rule",
    "entry_keys",
    "is_int",
    "is_real",
    "mapping",
    "option_owners",
    "param_names",
    "param_rule",
]

SENSITIVITY_METHODS: tuple[str, ...] = ("loss", "hessian")
SEED_SPREADS: tuple[str, ...] = ("hypervolume", "size")
OBJECTIVES: tuple[str, ...] = ("accuracy", "size_bytes")
# Names a space may use for a metric besides its own.
METRIC_ALIASES = {"size": "size_bytes", "latency_ms": "latency"}
# Seeds reach numpy and scikit-learn, which take 32-bit seeds.
MAX_SEED = 2**32 - 1
# The keys of ``train:`` and ``float_train:``: TrainConfig's settings, in its order.
TRAIN_KEYS: tuple[str, ...] = tuple(f.name for f in fields(TrainConfig))
# Training settings a space may search in ``params``.
TRAIN_PARAMS: tuple[str, ...] = ("lr", "weight_decay", "momentum", "batch_size")


@dataclass(frozen=True)
class Rule:
    """What values a parameter takes: ``problem`` gives what is allowed when it refuses a
    value (None when it takes it); ``integral``: a range of it must give integers."""

    problem: Callable[[Any], str | None]
    integral: bool = False
    #: It also takes a fixed dict of values per quant type (``quant_scheme: {weight: ...}``).
    per_quant_type: bool = False


def is_int(value: Any) -> bool:
    """An integer, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite number, not a bool."""
    # Finite only: .inf and .nan pass no range check a trial could use.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bits_problem(value: Any) -> str | None:
    ok = value == "float" or (is_int(value) and 1 <= value <= 16)
    return None if ok else "an integer 1..16 or 'float'"


def _train_rule(key: str) -> Rule:
    rule = TrainConfig.rule(key, search=True)
    return Rule(lambda v: None if rule.check(v) else rule.allowed, integral=rule.integral)


BITS_RULE = Rule(_bits_problem, integral=True)


# The algorithm a sensitivity is measured with: the core's post-training quantizer (it
# calibrates, never trains), by the name the core registered it under.
MEASURING_ALGORITHM = next(name for name, cls in QUANTIZERS.items() if cls is PtqQuantizer)


def _options(algorithm: str) -> Mapping[str, tuple[Any, Callable[[Any], str | None]]]:
    return algorithm_rules(algorithm).options


def _allowed(problem: str | None) -> str | None:
    # The core says "expected one of [...]"; a space's message says "... is not one of [...]".
    return None if problem is None else problem.removeprefix("expected ")


def param_names() -> tuple[str, ...]:
    """Every key ``params`` may hold: the bit widths, each registered algorithm's own config
    keys (in registration order) and the training settings a space may search."""
    options = dict.fromkeys(key for name in QUANTIZERS for key in _options(name))
    return (*BITS_PARAMS, *options, *TRAIN_PARAMS)


def option_owners(key: str) -> list[str]:
    """The registered algorithms that take the config key ``key``."""
    return [name for name in QUANTIZERS if key in _options(name)]


def entry_keys(algorithm: str) -> tuple[str, ...]:
    """The config keys ``algorithm`` takes besides the bits: written into every config_list
    entry when the space sets them."""
    return tuple(_options(algorithm))


def param_rule(name: str, algorithm: str) -> Rule | None:
    """The rule of the parameter ``name`` under ``algorithm``; None when ``algorithm`` does
    not take it (another algorithm's config key)."""
    if name in BITS_PARAMS:
        return BITS_RULE
    if name in TRAIN_PARAMS:
        return _train_rule(name)
    options = _options(algorithm)
    if name not in options:
        return None
    _, check = options[name]
    if name not in algorithm_rules(algorithm).per_type:
        return Rule(lambda v: _allowed(check(v)))

    def problem(value: Any) -> str | None:
        if not isinstance(value, Mapping):
            return _allowed(check(value))
        if not value or any(key not in QUANT_TYPES for key in value):
            return f"a dict with keys from {list(QUANT_TYPES)}"
        return next((f"{key}: {_allowed(check(v))}" for key, v in value.items() if check(v)), None)

    return Rule(problem, per_quant_type=True)


def mapping(value: Any, *, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """``value`` as a dict, SpaceError naming ``key`` unless it is a mapping of ``allowed`` keys."""
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
