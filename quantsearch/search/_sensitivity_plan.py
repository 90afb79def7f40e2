"""Which per-layer bits parameters sensitivity measures, at which bit widths, and the space's
parameter values that set one of them alone."""

from __future__ import annotations

from typing import Any

from optuna.distributions import CategoricalDistribution, IntDistribution

from quantsearch.pipeline import Bits
from quantsearch.search._config_builder import FLOAT, SpacePlan
from quantsearch.search._nni_syntax import NniParam
from quantsearch.search._spec import BITS_PARAMS

__all__ = ["candidates_of", "only_at", "param_values", "searched_tensors"]


def param_values(param: Any) -> list[Bits]:
    """Every value a bits parameter takes (a range gives each integer in it; a fixed value:
    itself)."""
    if not isinstance(param, NniParam):
        return [param]
    distribution = param.distribution
    if isinstance(distribution, CategoricalDistribution):
        return list(dict.fromkeys(param.decode(choice) for choice in distribution.choices))
    if isinstance(distribution, IntDistribution):
        raw = range(distribution.low, distribution.high + 1, distribution.step)
    else:  # a rounded log range of integers
        low, high, q = param.value
        raw = range(int(low), int(high) + 1, int(q))
    return sorted({param.decode(v) for v in raw})


def searched_tensors(plan: SpacePlan) -> dict[str, list[str]]:
    """Each searched per-layer bits parameter -> the ``<layer>.<quant type>`` it sets."""
    out: dict[str, list[str]] = {}
    for name, param in plan.params.items():
        layer, _, key = name.rpartition(".")
        if not layer or key not in BITS_PARAMS or not isinstance(param, NniParam):
            continue
        tensors = [f"{lay}.{qt}" for (lay, qt), src in plan.bits_source.items() if src == name]
        if tensors:
            out[name] = tensors
    return out


def candidates_of(plan: SpacePlan) -> dict[str, list[Bits]]:
    """Each searched per-layer bits parameter -> every bit width it takes."""
    out = {}
    for name in searched_tensors(plan):
        param = plan.params[name]
        assert isinstance(param, NniParam)
        out[name] = param_values(param)
    return out


def only_at(plan: SpacePlan, name: str, bits: Bits) -> dict[str, Any]:
    """Parameter values with ``name`` at ``bits`` and every other bits parameter float; the
    other searched parameters at their first value."""
    values: dict[str, Any] = {}
    for key, param in plan.params.items():
        if key.rpartition(".")[2] in BITS_PARAMS:
            values[key] = FLOAT
        elif isinstance(param, NniParam):
            values[key] = param.candidates()[0]
        else:
            values[key] = param
    values[name] = bits
    return values
