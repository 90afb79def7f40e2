"""NNI's search-space syntax (``{_type: ..., _value: [...]}``) mapped onto Optuna distributions.

The mapping, one ``_type`` at a time (``low``/``high``/``q`` are the ``_value`` entries):

- ``choice``: ``CategoricalDistribution`` over the values (ints, floats, strings such as
  ``"float"``, booleans; nested search spaces are not supported).
- ``randint [low, high]``: an integer in ``low..high-1`` (NNI excludes the upper bound):
  ``IntDistribution(low, high - 1)``.
- ``uniform [low, high]``: ``FloatDistribution(low, high)``.
- ``quniform [low, high, q]``: NNI draws ``clip(round(uniform(low, high) / q) * q, low, high)``.
  When ``low`` and ``high`` are multiples of ``q`` those values are exactly the stepped
  distribution ``low, low + q, ..., high``: ``IntDistribution(step=q)`` when all three are
  integers, else ``FloatDistribution(step=q)``. Otherwise NNI's clipping adds ``low`` and
  ``high`` themselves to the multiples of ``q`` in between; that uneven set becomes a
  ``CategoricalDistribution``. Every value has the same probability (NNI gives the two end
  values about half the weight of the others).
- ``loguniform [low, high]``: ``FloatDistribution(low, high, log=True)``.
- ``qloguniform [low, high, q]``: Optuna has no stepped log distribution, so the trial samples
  ``FloatDistribution(low, high, log=True)`` (``IntDistribution(low, high, log=True)`` when all
  three are integers and ``q`` is 1, which is already exact) and the value used is NNI's
  ``clip(round(x / q) * q, low, high)``. The raw sample is what Optuna stores as the
  parameter; the rounded value is what reaches the config_list.

NNI's ``normal``, ``qnormal``, ``lognormal`` and ``qlognormal`` have no Optuna counterpart and
are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from quantsearch.search._errors import SpaceError, shown

__all__ = ["NNI_TYPES", "NniParam", "is_nni_param", "parse_nni_param"]

NNI_TYPES: tuple[str, ...] = (
    "choice",
    "randint",
    "uniform",
    "quniform",
    "loguniform",
    "qloguniform",
)
_UNSUPPORTED = ("normal", "qnormal", "lognormal", "qlognormal")
_VALUE_LENGTHS = {
    "randint": 2,
    "uniform": 2,
    "quniform": 3,
    "loguniform": 2,
    "qloguniform": 3,
}
_VALUE_SHAPES = {
    "randint": "[low, high] (integers, high excluded)",
    "uniform": "[low, high]",
    "quniform": "[low, high, q]",
    "loguniform": "[low, high] (0 < low < high)",
    "qloguniform": "[low, high, q] (0 < low < high)",
}


def is_nni_param(value: Any) -> bool:
    """Whether a YAML value is written in NNI's syntax (a mapping with ``_type``)."""
    return isinstance(value, Mapping) and "_type" in value


@dataclass(frozen=True)
class NniParam:
    """One parameter in NNI's syntax, with its Optuna distribution and its value decoding."""

    nni_type: str
    value: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"_type": self.nni_type, "_value": list(self.value)}

    @property
    def distribution(self) -> BaseDistribution:
        kind = self.nni_type
        if kind == "choice":
            return CategoricalDistribution(list(self.value))
        if kind == "randint":
            low, high = self.value
            return IntDistribution(low, high - 1)
        if kind == "uniform":
            low, high = self.value
            return FloatDistribution(low, high)
        if kind == "loguniform":
            low, high = self.value
            return FloatDistribution(low, high, log=True)
        if kind == "quniform":
            low, high, q = self.value
            if _on_grid(low, q) and _on_grid(high, q):
                if _all_integral(low, high, q):
                    return IntDistribution(int(low), int(high), step=int(q))
                return FloatDistribution(low, high, step=q)
            return CategoricalDistribution(_quniform_values(low, high, q))
        # qloguniform
        low, high, q = self.value
        if _all_integral(low, high, q) and q == 1:
            return IntDistribution(int(low), int(high), log=True)
        return FloatDistribution(low, high, log=True)

    def decode(self, raw: Any) -> Any:
        """The value a trial uses, from the value Optuna sampled."""
        if self.nni_type != "qloguniform":
            return raw
        low, high, q = self.value
        rounded = min(max(round(raw / q) * q, low), high)
        return round(rounded) if _all_integral(low, high, q) else rounded

    def encode(self, value: Any) -> Any:
        """The raw Optuna value that decodes to ``value``; ValueError when there is none."""
        distribution = self.distribution
        if isinstance(distribution, CategoricalDistribution):
            if not any(_same(value, choice) for choice in distribution.choices):
                raise ValueError(f"{value!r} is not one of {list(distribution.choices)}")
            return next(choice for choice in distribution.choices if _same(value, choice))
        if not _is_number(value):
            raise ValueError(f"{value!r} is not a number")
        low, high = distribution.low, distribution.high
        step = distribution.step
        inside = low <= value <= high and (step is None or _on_grid(value - low, step))
        if not inside or self.decode(value) != value:
            raise ValueError(f"{value!r} is not a value of {self.describe()}")
        return int(value) if isinstance(distribution, IntDistribution) else float(value)

    def candidates(self) -> list[Any]:
        """Values worth a dry check: every choice, or the two ends of a range."""
        distribution = self.distribution
        if isinstance(distribution, CategoricalDistribution):
            return list(distribution.choices)
        return [self.decode(distribution.low), self.decode(distribution.high)]

    def describe(self) -> str:
        return f"{self.nni_type} {list(self.value)}"


def parse_nni_param(obj: Any, *, key: str) -> NniParam:
    """Check one ``{_type, _value}`` mapping; ``key`` is its path for error messages."""
    if not is_nni_param(obj):
        raise SpaceError(f"expected a mapping {{_type: ..., _value: [...]}}, got {obj!r}", key=key)
    extra = sorted(set(obj) - {"_type", "_value"})
    if extra:
        raise SpaceError(
            f"unknown key {extra[0]!r}; a parameter has only _type and _value", key=key
        )
    kind = obj["_type"]
    if kind in _UNSUPPORTED:
        raise SpaceError(
            f"{kind!r} has no Optuna counterpart; use one of {', '.join(NNI_TYPES)}",
            key=f"{key}._type",
        )
    if kind not in NNI_TYPES:
        raise SpaceError(
            f"{kind!r} is not a search-space type; allowed: {', '.join(NNI_TYPES)}",
            key=f"{key}._type",
        )
    if "_value" not in obj:
        raise SpaceError("missing; every parameter needs _value", key=f"{key}._value")
    value = obj["_value"]
    value_key = f"{key}._value"
    if not isinstance(value, list):
        raise SpaceError(f"expected a list, got {value!r}", key=value_key)
    if kind == "choice":
        return NniParam(kind, _check_choices(value, key=value_key))
    return NniParam(kind, _check_range(kind, value, key=value_key))


def _check_choices(values: list[Any], *, key: str) -> tuple[Any, ...]:
    if not values:
        raise SpaceError("a choice needs at least one value", key=key)
    for index, choice in enumerate(values):
        if isinstance(choice, float) and not math.isfinite(choice):
            raise SpaceError(f"{choice!r} is not a finite number", key=f"{key}[{index}]")
        if choice is not None and not isinstance(choice, (bool, int, float, str)):
            raise SpaceError(
                f"{choice!r} is not allowed; choices are numbers, strings, booleans or null"
                " (nested search spaces are not supported)",
                key=f"{key}[{index}]",
            )
        if any(_same(choice, earlier) for earlier in values[:index]):
            raise SpaceError(f"{choice!r} is listed twice", key=f"{key}[{index}]")
    return tuple(values)


def _check_range(kind: str, values: list[Any], *, key: str) -> tuple[Any, ...]:
    shape = _VALUE_SHAPES[kind]
    if len(values) != _VALUE_LENGTHS[kind] or not all(_is_number(v) for v in values):
        raise SpaceError(f"{shown(values)} is not {shape}", key=key)
    if not all(math.isfinite(v) for v in values):
        # The sampler refuses an infinite range only when the first trial asks for it.
        raise SpaceError(f"{shown(values)}: every bound must be a finite number", key=key)
    low, high = values[0], values[1]
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        raise SpaceError(f"{values!r} is not {shape}", key=key)
    if not low < high:
        raise SpaceError(f"{values!r}: low must be smaller than high", key=key)
    if kind in ("loguniform", "qloguniform") and low <= 0:
        raise SpaceError(f"{values!r}: low must be above 0 for a log scale", key=key)
    if len(values) == 3 and values[2] <= 0:
        raise SpaceError(f"{values!r}: q must be above 0", key=key)
    return tuple(values)


def _quniform_values(low: Real, high: Real, q: Real) -> list[int | float]:
    """NNI's reachable values: the multiples of q inside (low, high), plus low and high."""
    first, last = math.ceil(low / q - 1e-9), math.floor(high / q + 1e-9)
    inner = [k * q for k in range(first, last + 1) if low < k * q < high]
    values = sorted({low, *inner, high})
    if _all_integral(low, high, q):
        return [int(v) for v in values]
    return [float(v) for v in values]


def _on_grid(value: Real, q: Real) -> bool:
    ratio = value / q
    return math.isclose(ratio, round(ratio), rel_tol=0.0, abs_tol=1e-9)


def _all_integral(*values: Real) -> bool:
    return all(isinstance(v, int) or float(v).is_integer() for v in values)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same kind: 1, 1.0 and True are different choices."""
    return type(a) is type(b) and a == b
