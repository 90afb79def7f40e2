"""The samplers a space can name, as a registry: a name, its options, and how to make it.

A sampler joins with :func:`register_sampler`; the space parser, the study and the docs read
this registry only, so adding one touches this file (or the user's own) and its tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna

__all__ = [
    "SAMPLERS",
    "SamplerEntry",
    "SamplerOption",
    "get_sampler",
    "make_sampler",
    "register_sampler",
    "sampler_seed",
]


@dataclass(frozen=True)
class SamplerOption:
    """One key a sampler accepts in the space's ``sampler:`` mapping."""

    rule: str
    """What a valid value is, as the error message says it (``an integer >= 2``)."""
    check: Callable[[Any], bool]


def _int_at_least(low: int) -> SamplerOption:
    return SamplerOption(
        f"an integer >= {low}",
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low,
    )


SamplerFactory = Callable[..., optuna.samplers.BaseSampler]
"""``factory(options, *, seed, n_trials)``: a sampler from its checked options."""


@dataclass(frozen=True)
class SamplerEntry:
    name: str
    make: SamplerFactory
    options: Mapping[str, SamplerOption] = field(default_factory=dict)


SAMPLERS: dict[str, SamplerEntry] = {}


def register_sampler(
    name: str, *, options: Mapping[str, SamplerOption] | None = None
) -> Callable[[SamplerFactory], SamplerFactory]:
    """Register ``factory(options, *, seed, n_trials)`` as the sampler ``name``."""

    def register(factory: SamplerFactory) -> SamplerFactory:
        if name in SAMPLERS:
            raise ValueError(f"a sampler named {name!r} is already registered")
        SAMPLERS[name] = SamplerEntry(name, factory, dict(options or {}))
        return factory

    return register


def get_sampler(name: str) -> SamplerEntry:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise KeyError(f"unknown sampler {name!r}: expected one of {', '.join(SAMPLERS)}") from None


def sampler_seed(seed: int, resume_index: int, *, shared: bool = False) -> int:
    """The sampler's seed, from the study seed and the number of trials so far.

    A resumed study continues with fresh random draws instead of replaying the first run's.
    On a shared database (``shared``) each process adds entropy of its own: processes joining
    at the same trial count would otherwise draw the same parameters.
    """
    words = [seed, resume_index, 1]
    if shared:
        words.append(int.from_bytes(os.urandom(8), "little"))
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def make_sampler(
    name: str, options: Mapping[str, Any], *, seed: int, n_trials: int
) -> optuna.samplers.BaseSampler:
    """The registered sampler ``name`` with the space's ``options``."""
    return get_sampler(name).make(options, seed=seed, n_trials=n_trials)


def _generation(n_trials: int) -> int:
    # A quarter of the trials per generation / at random, within 4..50.
    return min(50, max(4, n_trials // 4))


@register_sampler("nsga2", options={"population_size": _int_at_least(2)})
def _nsga2(options: Mapping[str, Any], *, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    size = options.get("population_size") or _generation(n_trials)
    return optuna.samplers.NSGAIISampler(population_size=size, seed=seed)


@register_sampler("tpe", options={"n_startup_trials": _int_at_least(0)})
def _tpe(options: Mapping[str, Any], *, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    startup = options.get("n_startup_trials")
    return optuna.samplers.TPESampler(
        multivariate=True,
        n_startup_trials=_generation(n_trials) if startup is None else startup,
        seed=seed,
    )


@register_sampler("random")
def _random(options: Mapping[str, Any], *, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)
